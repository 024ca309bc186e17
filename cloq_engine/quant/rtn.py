"""Round-to-nearest quantization, on our own grid or a llama.cpp one (:mod:`.grids`).

The per-group primitives (``find_params``, ``quantize``, ``dequantize``, ``fit_group``) live in
:mod:`.groups` and are re-exported here, where GPTQ and the tests have always found them.
"""
from __future__ import annotations

import torch

from ..config import QuantConfig, QuantMethod
from ..formats import QuantizedWeight, pack_codes
from .grids import grid_for
from .groups import _MIN_SCALE, dequantize, find_params, fit_group, quantize  # noqa: F401  (re-exported)
from .registry import register_quantizer

@register_quantizer(QuantMethod.RTN, needs_H=False)
def quantize_rtn(W: torch.Tensor, config: QuantConfig, H=None) -> QuantizedWeight:
    """Round-to-nearest with per-group min-max (or symmetric) scales; W is (out, in); ``H`` unused."""
    n, k = W.shape
    g = k if config.group_size == -1 else config.group_size
    maxq = 2**config.bits - 1
    W = W.float()
    grid = grid_for(config, k)
    codes = torch.empty_like(W)
    scales, zeros = [], []
    state = None
    for j in range(0, k, g):
        if grid.super_size > 1 and j % grid.super_size == 0:
            state = grid.fit_super(W[:, j : j + grid.super_size])
        wg = W[:, j : j + g]
        s, z = grid.fit_group(wg, state)
        codes[:, j : j + g] = grid.codes(wg, s, z, maxq)
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(
        qweight=pack_codes(codes.t().to(torch.int64), config.bits),
        scales=torch.stack(scales).half(),
        zeros=torch.stack(zeros).half(),
        bits=config.bits,
        group_size=config.group_size,
        in_features=k,
        out_features=n,
        method="rtn",
    )
