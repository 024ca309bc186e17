"""LoftQ (uncalibrated baseline): alternate ``Q = quant(W - s·B·A)`` and the rank-r SVD of ``W - Q``."""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from .. import linalg
from ..config import QuantConfig
from ..formats import QuantizedWeight
from ..quant import quantize_weight
from .cloq import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS

logger = logging.getLogger(__name__)

DEFAULT_NUM_ITERS = 5


def svd_init(R: torch.Tensor, rank: int, scaling: float = 1.0, svd: str = "auto",
             oversample: Optional[int] = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
             seed: Optional[int] = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the plain rank-r SVD of ``R`` with the balanced split (one LoftQ step, Q fixed)."""
    t = linalg.truncated_svd(R, rank, None, method=svd, oversample=oversample, power_iters=power_iters, seed=seed)
    B, A = linalg.balanced_split(t.U, t.S, t.Vh, scaling)
    return A, B


def loftq(W: torch.Tensor, quant_config: QuantConfig, rank: int, scaling: float = 1.0,
          num_iters: int = DEFAULT_NUM_ITERS, H: Optional[torch.Tensor] = None,
          **svd_opts) -> Tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """``(qw, A, B)`` after ``num_iters`` alternations; W float32 (out, in).

    ``H`` is passed to the quantizer only (GPTQ needs it); the SVD step stays uncalibrated.
    """
    A = B = None
    qw = None
    for t in range(num_iters):
        target = W if A is None else W - scaling * (B @ A)
        qw = quantize_weight(target, quant_config, H=H)
        A, B = svd_init(W - qw.dequantize().to(W.device), rank, scaling, **svd_opts)
        logger.debug("loftq: iteration %d/%d", t + 1, num_iters)
    return qw, A, B
