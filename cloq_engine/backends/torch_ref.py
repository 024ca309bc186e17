"""The PyTorch reference backend: the numerical spec every other backend is tested against.

Every backend module (``torch_ref``, ``triton``, ``cpp``) exposes the same functions:

* ``dequantize(qw) -> Tensor``: float32 (out_features, in_features).
* ``forward(x, qw, lora_A, lora_B, scaling, bias=None, x_lora=None) -> (y, S)``:
  ``S = x_lora @ A^T`` and ``y = x @ Ŵ^T + scaling * S @ B^T + bias``, for 2-D ``x`` [M, K];
  ``x_lora`` (dropout applied) defaults to ``x``. ``y`` has x's dtype; ``S`` is float32 here
  (the Triton backend returns it in x's dtype, as cuBLAS consumes it; ``backward`` takes either).
* ``backward(dy, x, S, qw, lora_A, lora_B, scaling, x_lora=None, need_dx=True)
  -> (dx, dx_lora, dA, dB)`` with ``dS = scaling * dy @ B``, ``dB = scaling * dy^T @ S``,
  ``dA = dS^T @ x_lora``, ``dx = dy @ Ŵ`` plus ``dS @ A`` when ``x_lora`` is None (fused), else
  ``dx_lora = dS @ A`` is returned apart. dx has x's dtype, dA/dB the parameters' dtypes.
* ``gram_add(H, x)``: ``H += x^T x`` in H's dtype (float32 or float64), x 2-D.

Accumulation is float32 (float64 when x is float64, for gradcheck); inputs are upcast before any
arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..formats import QuantizedWeight, dequantize_stored

NAME = "torch"

# The format's own definition (formats.py) is the reference: no second copy to drift from it.
dequantize = dequantize_stored


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def forward(x, qw: QuantizedWeight, lora_A, lora_B, scaling: float, bias=None, x_lora=None):
    acc = _acc_dtype(x)
    w = dequantize(qw).to(acc)
    xf = x.to(acc)
    s = (xf if x_lora is None else x_lora.to(acc)) @ lora_A.to(acc).t()
    y = xf @ w.t() + scaling * (s @ lora_B.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), s


def backward(dy, x, S, qw: QuantizedWeight, lora_A, lora_B, scaling: float, x_lora=None, need_dx: bool = True):
    acc = _acc_dtype(x)
    dyf = dy.to(acc)
    ds = scaling * (dyf @ lora_B.to(acc))  # [M, r]
    d_b = scaling * (dyf.t() @ S.to(acc))  # [N, r]
    d_a = ds.t() @ (x if x_lora is None else x_lora).to(acc)  # [r, K]
    dx = dx_lora = None
    if need_dx:
        dxf = dyf @ dequantize(qw).to(acc)
        if x_lora is None:
            dxf = dxf + ds @ lora_A.to(acc)
        else:
            dx_lora = (ds @ lora_A.to(acc)).to(x_lora.dtype)
        dx = dxf.to(x.dtype)
    return dx, dx_lora, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype)


def gram_add(H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    xf = x.to(H.dtype)
    H.addmm_(xf.t(), xf)
    return H
