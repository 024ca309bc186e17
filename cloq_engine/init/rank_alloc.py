"""Rank where it pays: per-layer LoRA ranks under a total adapter-parameter budget.

CLoQ's objective after rank r is ``||E||_F^2 - Σ_{i<=r} σ_i^2`` with ``σ_i`` the singular values of
the whitened error ``E = (W - Q)·L``: the i-th rank of a layer buys ``σ_i^2`` and costs
``in_features + out_features`` parameters. Gains are compared across layers relative to each
layer's output energy ``||X W^T||_F^2 = tr(W H W^T)`` (the relative calibrated error the reports
use), so a layer with large activations does not take the whole budget. Since each layer's gains
shrink with i, taking the best gain per parameter first is the greedy optimum of this separable
budget problem (up to the last, partly affordable, rank).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from .. import linalg

logger = logging.getLogger(__name__)


def whitened_spectrum(R: torch.Tensor, H: torch.Tensor, max_rank: int, damp: float = 1e-6,
                      svd: str = "auto") -> torch.Tensor:
    """The top ``max_rank`` squared singular values of ``E = R·L`` (``H + λI = L L^T``), float64."""
    L, _ = linalg.damped_cholesky(H, damp=damp, warn=False)
    t = linalg.truncated_svd(R, max_rank, L, method=svd)
    return t.S.double() ** 2


def allocate_ranks(gains: Dict[str, torch.Tensor], costs: Dict[str, int], budget: int, min_rank: int = 1,
                   max_rank: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """``{layer: rank}`` maximising the summed gains with ``Σ rank·cost <= budget``.

    ``gains[layer][i]`` is what rank i+1 buys (non-increasing in i); ``costs[layer]`` the parameters
    one rank costs; every layer gets at least ``min_rank`` and at most ``max_rank[layer]`` (default:
    the length of its gains).
    """
    if set(gains) != set(costs):
        raise ValueError("`gains` and `costs` must name the same layers")
    if min_rank < 0:
        raise ValueError(f"`min_rank` must be >= 0; got {min_rank}")
    caps = {n: len(g) if max_rank is None else min(len(g), max_rank[n]) for n, g in gains.items()}
    ranks = {n: min(min_rank, caps[n]) for n in gains}
    left = budget - sum(ranks[n] * costs[n] for n in gains)
    if left < 0:
        raise ValueError(f"`budget`={budget} is below min_rank={min_rank} for every layer")
    cand = [(float(gains[n][i]) / costs[n], n, i) for n in gains for i in range(ranks[n], caps[n])]
    cand.sort(key=lambda c: -c[0])
    for _, n, i in cand:  # within a layer the order is preserved, so ranks grow one at a time
        if i == ranks[n] and costs[n] <= left:
            ranks[n] += 1
            left -= costs[n]
    return ranks
