"""QLoRA / PEFT default initialisation: ``B = 0``, ``A`` Kaiming-uniform."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..config import InitMethod
from .registry import register_init


def zero_init(out_features: int, in_features: int, rank: int, device=None,
              seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: A (rank, in) from ``kaiming_uniform_(a=sqrt(5))`` as PEFT does, B (out, rank) zeros."""
    A = torch.empty(rank, in_features, dtype=torch.float32, device=device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=A.device)
        gen.manual_seed(int(seed))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
    B = torch.zeros(out_features, rank, dtype=torch.float32, device=device)
    return A, B


@register_init(InitMethod.ZERO, needs_H=False, options=("seed",))
def zero(R: torch.Tensor, H: Optional[torch.Tensor], rank: int, scaling: float = 1.0,
         seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`zero_init` in the registry's fixed-Q signature (``R`` gives only shape and device)."""
    return zero_init(R.shape[0], R.shape[1], rank, device=R.device, seed=seed)
