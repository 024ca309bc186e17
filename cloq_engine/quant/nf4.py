"""NormalFloat4 (QLoRA, Dettmers et al. 2023): blockwise absmax scaling onto the 16 NF4 levels.

``config.group_size`` is the absmax block: the number of consecutive input columns of a row that
share one absmax (64 matches bitsandbytes' default ``blocksize``; -1 = one block per row). Each
weight is divided by its block's absmax and mapped to the nearest level of
``formats.NF4_CODEBOOK``; ``W[n, k] ≈ NF4_CODEBOOK[code] · absmax``.

Unlike bitsandbytes (float32 absmax, optionally double-quantized), the absmax is stored as
float16, like the scales of the integer formats; codes are chosen against the float16-rounded
absmax, so dequantization reproduces exactly the levels the quantizer picked.
"""
from __future__ import annotations

import torch

from ..config import QuantConfig, QuantMethod
from ..formats import NF4_CODEBOOK, QuantizedWeight, pack_codes
from .registry import register_quantizer

_MIN_SCALE = 2.0**-24  # smallest positive float16: an all-zero block keeps a usable scale


def nearest_nf4(x: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest NF4 level for each value of ``x`` (values in about [-1, 1])."""
    cb = NF4_CODEBOOK.to(x.device)
    midpoints = (cb[1:] + cb[:-1]) / 2
    return torch.bucketize(x.float().contiguous(), midpoints)


@register_quantizer(QuantMethod.NF4, needs_H=False)
@torch.no_grad()
def quantize_nf4(W: torch.Tensor, config: QuantConfig, H=None) -> QuantizedWeight:
    """NF4-quantize ``W`` (out, in) with one float16 absmax per block of ``group_size`` inputs; ``H`` unused."""
    n, k = W.shape
    g = k if config.group_size == -1 else config.group_size
    blocks = W.detach().float().reshape(n, k // g, g)  # [N, G, g]
    absmax = blocks.abs().amax(dim=2).clamp(min=_MIN_SCALE).half()  # [N, G]
    codes = nearest_nf4(blocks / absmax.float().unsqueeze(2)).reshape(n, k)
    return QuantizedWeight(
        qweight=pack_codes(codes.t(), 4),
        scales=absmax.t().contiguous(),
        zeros=None,
        bits=4,
        group_size=config.group_size,
        in_features=k,
        out_features=n,
        method="nf4",
    )
