"""LoftQ (uncalibrated baseline): alternate ``Q = quant(W - s·B·A)`` and the rank-r SVD of ``W - Q``.

``svd`` (the registry's "svd" method) is one such SVD step with Q fixed.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from .. import linalg
from ..config import InitMethod, QuantConfig
from ..formats import QuantizedWeight
from ..quant import quantize_weight
from .cloq import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, SVD_OPTIONS
from .registry import register_init

logger = logging.getLogger(__name__)

DEFAULT_NUM_ITERS = 5


def svd_init(R: torch.Tensor, rank: int, scaling: float = 1.0, svd: str = "auto",
             oversample: Optional[int] = DEFAULT_OVERSAMPLE, power_iters: Optional[int] = DEFAULT_POWER_ITERS,
             seed: Optional[int] = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the plain rank-r SVD of ``R`` with the balanced split (one LoftQ step, Q fixed)."""
    t = linalg.truncated_svd(R, rank, None, method=svd, oversample=oversample, power_iters=power_iters, seed=seed)
    B, A = linalg.balanced_split(t.U, t.S, t.Vh, scaling)
    return A, B


@register_init(InitMethod.SVD, needs_H=False, options=SVD_OPTIONS)
def svd(R: torch.Tensor, H: Optional[torch.Tensor], rank: int, scaling: float = 1.0,
        **svd_opts) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rank-r SVD of ``W - Q`` with Q fixed (``H`` unused): :func:`svd_init` in the registry's signature."""
    return svd_init(R, rank, scaling, **svd_opts)


@register_init(InitMethod.LOFTQ, needs_H=False, requantizes=True, options=SVD_OPTIONS + ("iters",))
def loftq(W: torch.Tensor, quant_config: QuantConfig, rank: int, scaling: float = 1.0,
          H: Optional[torch.Tensor] = None, iters: int = DEFAULT_NUM_ITERS,
          **svd_opts) -> Tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """``(qw, A, B)`` after ``iters`` alternations; W float32/64 (out, in).

    ``H`` is passed to the quantizer only (GPTQ needs it); the SVD step stays uncalibrated.
    """
    A = B = None
    qw = None
    # Quantize and truncated SVD in turns: element-wise passes and thin products, each far too
    # short to amortise thread barriers on a shared CPU (see linalg.serial_threads).
    with linalg.serial_threads(W):
        for t in range(iters):
            target = W if A is None else W - scaling * (B @ A)
            qw = quantize_weight(target, quant_config, H=H)
            A, B = svd_init(W - qw.dequantize().to(device=W.device, dtype=W.dtype), rank, scaling, **svd_opts)
            logger.debug("loftq: iteration %d/%d", t + 1, iters)
    return qw, A, B
