"""Joint re-quantization: minimise ``tr(M H M^T)``, ``M = W - Q - s·B·A``, over Q *and* (A, B).

One-shot CLoQ quantizes W first and fits the adapter to what is left. Here the two alternate:

* ``Q ← quantize(W - s·B·A, H)``: GPTQ with the adapter's share taken out of the target;
* ``(A, B) ← init(W - Q, H)``: the calibrated optimum (CLoQ) or ALS (QuAILoRA) for that Q.

The first round starts low-rank first (as PiSSA/QPiSSA do): its adapter is the calibrated rank-r
approximation of W itself, so the quantizer sees W without its dominant directions, a narrower
range at the same bits. Starting from the one-shot adapter instead barely moves: that adapter
holds the whitened quantization error, which re-quantizing only reshuffles (measured on MiniLM:
the objective rose). Later rounds alternate from the latest adapter.

A quantizer is not an exact minimiser, so a round can lose: the best ``(Q, A, B)`` seen, the
one-shot start included, is kept (the objective returned never rises), and the loop stops when
a round improves on the best by less than ``tol`` (relative).
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

import torch

from ..config import QuantConfig
from ..formats import QuantizedWeight
from ..quant import quantize_weight

logger = logging.getLogger(__name__)


def _objective(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: float) -> float:
    M = W - Q - scaling * (B @ A)
    return float(((M @ H) * M).sum())


def requantize(W: torch.Tensor, H: torch.Tensor, quant_config: QuantConfig, qw: QuantizedWeight,
               A: torch.Tensor, B: torch.Tensor, solve: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
               scaling: float = 1.0, rounds: int = 3, tol: float = 1e-3,
               history: Optional[List[float]] = None) -> Tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """Best ``(qw, A, B)`` after up to ``rounds`` rounds from the one-shot ``(qw, A, B)``.

    ``W`` (out, in) and ``H`` (in, in) in the compute dtype; ``solve(R)`` returns ``(A, B)`` for
    ``R = W - Q``. ``history``, if a list, receives the objective of the start and of every round.
    """
    Wd, Hd = W.to(torch.float64), H.to(device=W.device, dtype=torch.float64)

    def f(q, a, b):
        return _objective(Wd, q.dequantize().to(device=W.device, dtype=torch.float64), Hd,
                          a.to(torch.float64), b.to(torch.float64), scaling)

    best = (f(qw, A, B), qw, A, B)
    if history is not None:
        history.append(best[0])
    cur_A, cur_B = solve(W)  # low-rank first: the calibrated rank-r part of W itself
    for t in range(rounds):
        target = W - scaling * (cur_B.to(W.dtype) @ cur_A.to(W.dtype))
        q_t = quantize_weight(target, quant_config, H=H)
        A_t, B_t = solve(W - q_t.dequantize().to(device=W.device, dtype=W.dtype))
        f_t = f(q_t, A_t, B_t)
        if history is not None:
            history.append(f_t)
        gain = (best[0] - f_t) / max(best[0], 1e-300)
        logger.debug("requantize: round %d objective %.6g (relative gain %.3g)", t + 1, f_t, gain)
        if gain > 0:
            best = (f_t, q_t, A_t, B_t)
        if gain < tol:
            break
        cur_A, cur_B = A_t, B_t
    return best[1], best[2], best[3]
