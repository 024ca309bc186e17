"""CLoQ: the closed-form optimum of ``tr(M H M^T)`` over rank-r ``s·B·A`` (docs/design.md §4).

``H + λI = L L^T``, ``E = R·L`` with ``R = W - Q``, ``[E]_r = U Σ V^T``; then ``s·B·A = [E]_r L^{-1}``
with the balanced split ``B = U Σ^{1/2} / √s``, ``A = Σ^{1/2} V^T L^{-1} / √s`` (a triangular solve).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from .. import linalg
from ..config import InitMethod
from .registry import register_init

logger = logging.getLogger(__name__)

# Default relative damping: small enough that the damped optimum is the undamped one to ~1e-5 when H
# is well conditioned; grown geometrically only when the Cholesky fails.
DEFAULT_DAMP = 1e-6
# None: block Krylov (svd="auto" on large layers) iterates until the captured energy settles;
# svd="randomized" then takes linalg.DEFAULT_POWER_ITERS subspace iterations (see benchmarks/init.py).
DEFAULT_POWER_ITERS = None
DEFAULT_OVERSAMPLE = None  # max(16, rank)
# Options of every method that takes a truncated SVD (linalg.truncated_svd).
SVD_OPTIONS = ("svd", "oversample", "power_iters", "seed")


@register_init(InitMethod.CLOQ, needs_H=True, options=SVD_OPTIONS + ("damp", "max_tries"))
def cloq(R: torch.Tensor, H: torch.Tensor, rank: int, scaling: float = 1.0, damp: float = DEFAULT_DAMP,
         svd: str = "auto", oversample: Optional[int] = DEFAULT_OVERSAMPLE, power_iters: Optional[int] = DEFAULT_POWER_ITERS,
         seed: Optional[int] = 0, max_tries: int = 12) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` minimising ``tr((R - s·B·A) H (R - s·B·A)^T)``; R (out, in), H (in, in), same dtype."""
    L, lam = linalg.damped_cholesky(H, damp=damp, max_tries=max_tries)
    method = linalg.choose_svd(R.shape, rank) if svd == "auto" else svd
    logger.debug("cloq: %s rank %d, λ=%.3g, svd=%s", tuple(R.shape), rank, lam, method)
    t = linalg.truncated_svd(R, rank, L, method=method, oversample=oversample, power_iters=power_iters, seed=seed,
                            gram=(H, lam))
    B, A_white = linalg.balanced_split(t.U, t.S, t.Vh, scaling)
    A = linalg.solve_right_lower(A_white, L)
    return A, B
