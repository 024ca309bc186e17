"""QuAILoRA: alternating least squares on ``tr(M H M^T)``, ``M = R - P·A``, ``P = s·B`` (docs/design.md §4).

Start from the rank-r SVD of ``R = W - Q`` (uncalibrated), then repeat

* ``P ← R H A^T (A H A^T)^{-1}``: the minimiser over P for fixed A;
* ``A ← (P^T P)^{-1} P^T R``: the minimiser over A for fixed P. The gradient in A is
  ``-2 P^T (R - P A) H``, which this choice zeroes for any H, so the weighting drops out.

Both are r×r solves (damped Cholesky). Each step cannot increase the objective. In whitened terms
this is subspace iteration on ``E E^T`` with ``E = R L``, so it approaches CLoQ's optimum.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch

from .. import linalg
from ..config import InitMethod
from .cloq import DEFAULT_DAMP, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, SVD_OPTIONS
from .registry import register_init

logger = logging.getLogger(__name__)

# Enough to land within 1% of CLoQ's objective on the MiniLM layers (measured by benchmarks/init.py).
DEFAULT_ITERS = 20


def _objective(R: torch.Tensor, H: torch.Tensor, P: torch.Tensor, A: torch.Tensor) -> float:
    M = R - P @ A
    return float(((M @ H) * M).sum())


@register_init(InitMethod.QUAILORA, needs_H=True, options=SVD_OPTIONS + ("damp", "iters", "tol", "history"))
def quailora(R: torch.Tensor, H: torch.Tensor, rank: int, scaling: float = 1.0, iters: int = DEFAULT_ITERS,
             tol: float = 0.0, damp: float = DEFAULT_DAMP, svd: str = "auto",
             oversample: Optional[int] = DEFAULT_OVERSAMPLE, power_iters: Optional[int] = DEFAULT_POWER_ITERS,
             seed: Optional[int] = 0, history: Optional[List[float]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` after ``iters`` ALS sweeps (fewer if the relative improvement drops below ``tol``).

    ``H`` is damped by ``damp · mean(diag H)`` on its diagonal (so singular H is fine). If
    ``history`` is a list, the objective (with the damped H) before and after every sweep is appended.
    """
    lam = damp * linalg.mean_diag(H)
    Hd = H.clone()
    torch.diagonal(Hd).add_(lam)
    t = linalg.truncated_svd(R, rank, None, method=svd, oversample=oversample, power_iters=power_iters, seed=seed)
    P, A = linalg.balanced_split(t.U, t.S, t.Vh, 1.0)
    track = history is not None or tol > 0
    prev = _objective(R, Hd, P, A) if track else None
    if history is not None:
        history.append(prev)
    # Thin products and r×r solves: on one thread (see linalg.serial_threads).
    with linalg.serial_threads(R):
        for it in range(iters):
            AH = A @ Hd  # (r, in)
            P = linalg.spd_solve_right(AH @ A.transpose(0, 1), R @ AH.transpose(0, 1))
            A = linalg.spd_solve_left(P.transpose(0, 1) @ P, P.transpose(0, 1) @ R)
            if track:
                cur = _objective(R, Hd, P, A)
                if history is not None:
                    history.append(cur)
                if tol > 0 and prev - cur <= tol * abs(prev):
                    logger.debug("quailora: stopped after %d sweeps (relative improvement below %g)", it + 1, tol)
                    break
                prev = cur
    B, A = linalg.rebalance(P, A, scaling)
    return A, B
