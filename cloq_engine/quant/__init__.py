"""Weight quantizers: ``quantize_weight(W, config, H=None)`` dispatches on ``config.method``."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import QuantConfig, QuantMethod
from ..formats import QuantizedWeight
from .validate import check_hessian, check_weight


def quantize_weight(W: torch.Tensor, config: QuantConfig, H: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Quantize a weight of shape (out_features, in_features) into packed storage.

    ``H = X^T X`` (in, in) is required by GPTQ and ignored by RTN and NF4.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig; got {type(config).__name__}")
    check_weight(W, config)
    if H is not None:
        check_hessian(H, W.shape[1])
    if config.method == QuantMethod.RTN:
        from .rtn import quantize_rtn

        return quantize_rtn(W, config)
    if config.method == QuantMethod.NF4:
        from .nf4 import quantize_nf4

        return quantize_nf4(W, config)
    if H is None:
        raise ValueError("method='gptq' needs the calibration Gram matrix `H` (in_features x in_features)")
    from .gptq import quantize_gptq

    return quantize_gptq(W, H, config)
