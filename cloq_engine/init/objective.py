"""The calibrated objective ``f(A, B) = tr(M H M^T)``, ``M = W - Q - s·B·A``, and its optimum."""
from __future__ import annotations

from typing import Optional

import torch


def calibrated_error(R: torch.Tensor, H: Optional[torch.Tensor], A: Optional[torch.Tensor] = None,
                     B: Optional[torch.Tensor] = None, scaling: float = 1.0) -> float:
    """``tr(M H M^T)`` with ``M = R - scaling·B·A`` (``||M||_F^2`` when ``H`` is None), in float64."""
    M = R.double()
    if A is not None and B is not None:
        M = M - scaling * (B.double() @ A.double())
    if H is None:
        return float(M.pow(2).sum())
    return float(((M @ H.double()) * M).sum())
