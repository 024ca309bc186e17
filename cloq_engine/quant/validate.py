"""Input checks shared by the quantizers: a specific ValueError for each kind of bad input."""
from __future__ import annotations

import torch

from ..config import QuantConfig
from ..formats import check_group_size

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FP16_MAX = 65504.0


def check_weight(W: torch.Tensor, config: QuantConfig) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D tensor (out_features, in_features); got {getattr(W, 'shape', type(W))}")
    if W.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"W has unsupported dtype {W.dtype}; expected one of float16, bfloat16, float32, float64")
    if W.numel() == 0:
        raise ValueError("W is empty")
    if not torch.isfinite(W).all():
        raise ValueError("W contains NaN or Inf values")
    if W.abs().max() > _FP16_MAX:
        raise ValueError(f"W has values beyond the float16 range (|w| > {_FP16_MAX:g}); scales are stored as float16")
    check_group_size(W.shape[1], config.group_size)


def check_hessian(H: torch.Tensor, in_features: int) -> None:
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"H must have shape ({in_features}, {in_features}); got {tuple(getattr(H, 'shape', ()))}")
    if H.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"H has unsupported dtype {H.dtype}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf values")
    Hf = H.float()
    tol = 1e-4 * Hf.abs().max().clamp(min=1e-30)
    if (Hf - Hf.t()).abs().max() > tol:
        raise ValueError("H is not symmetric; it must be a Gram matrix X^T X")
    if (torch.diag(Hf) < 0).any():
        raise ValueError("H has negative diagonal entries; it must be a Gram matrix X^T X")
