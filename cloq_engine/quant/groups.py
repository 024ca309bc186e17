"""Per-group primitives shared by RTN, GPTQ and the grids: ``find_params`` fits (scale, zero) to a
block of columns; ``quantize`` maps values to integer codes. Pure functions. Scales are rounded to
float16 before codes are chosen, so the stored format reproduces exactly what the quantizer decided.
"""
from __future__ import annotations

import torch

_MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal)


def find_params(w: torch.Tensor, bits: int, sym: bool, shrink: float | torch.Tensor = 1.0):
    """Per-row (scale, zero) for ``w`` of shape [N, g], both float32 [N]; zero in code units.

    The range always includes 0 (as GPTQ's quantizer does) so that exact zeros stay representable.
    ``shrink`` (scalar or [N]) scales the min-max range down for clip search.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0) * shrink
    xmax = torch.clamp(w.max(dim=1).values, min=0) * shrink
    if sym:
        amax = torch.maximum(-xmin, xmax)
        scale = 2 * amax / maxq
        scale = scale.clamp(min=_MIN_SCALE).half().float()
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).half().float()
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (float tensor of whole numbers) of ``w`` [N, ...] with per-row scale/zero [N]."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q - zero.view(shape)) * scale.view(shape)


def fit_group(w: torch.Tensor, bits: int, sym: bool, mse_clip: bool):
    """(scale, zero) for one group [N, g], float32 [N] each; with ``mse_clip`` the shrink of the
    min-max range (1.0 included) that minimises each row's squared weight error."""
    scale, zero = find_params(w, bits, sym)
    if not mse_clip:
        return scale, zero
    maxq = 2**bits - 1
    best = ((dequantize(quantize(w, scale, zero, maxq), scale, zero) - w) ** 2).sum(dim=1)
    for p in torch.linspace(0.95, 0.5, 10).tolist():
        s, z = find_params(w, bits, sym, shrink=p)
        err = ((dequantize(quantize(w, s, z, maxq), s, z) - w) ** 2).sum(dim=1)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero
