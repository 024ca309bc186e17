"""Gram-matrix accumulation H = X^T X over calibration activations."""
from __future__ import annotations

from typing import Optional

import torch

from . import backends


class GramAccumulator:
    """Accumulates ``H = sum_t x_t^T x_t`` over inputs of shape (..., in_features).

    Inputs may be float16/bfloat16/float32; accumulation is float32 (``dtype=torch.float64`` for
    more headroom). On CUDA tensors the active backend's ``gram_add`` runs (a Triton SYRK kernel).
    ``name`` is used in error messages (the model driver passes the layer name).
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None, name: Optional[str] = None):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"`in_features` must be a positive integer; got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {dtype}")
        self.in_features = in_features
        self.name = name
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> "GramAccumulator":
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._where()}input has last dimension {x.shape[-1]}; expected in_features={self.in_features}"
            )
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"{self._where()}unsupported activation dtype {x.dtype}")
        x = x.detach().reshape(-1, self.in_features)
        if not torch.isfinite(x).all():
            raise ValueError(f"{self._where()}calibration activations contain NaN or Inf")
        if x.device != self.H.device:
            if self.count == 0:
                self.H = self.H.to(x.device)
            else:
                x = x.to(self.H.device)
        backends.get_backend(x.device).gram_add(self.H, x)
        self.count += x.shape[0]
        return self

    def _where(self) -> str:
        return f"layer {self.name!r}: " if self.name else ""
