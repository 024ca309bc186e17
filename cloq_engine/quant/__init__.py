"""Weight quantizers: ``quantize_weight(W, config, H=None)`` dispatches on ``config.method`` through
the registry that :mod:`.rtn`, :mod:`.gptq` and :mod:`.nf4` fill."""
from __future__ import annotations

from typing import Optional

import torch

from ..config import QuantConfig, QuantMethod
from ..formats import QuantizedWeight
from . import gptq, nf4, rtn  # noqa: F401  (they register themselves)
from .grids import layer_config
from .registry import get_quantizer, register_quantizer
from .validate import check_hessian, check_weight

__all__ = ["quantize_weight", "needs_calibration", "register_quantizer", "get_quantizer"]


def needs_calibration(method) -> bool:
    """Whether quantize method ``method`` reads the calibration Gram matrix H."""
    return get_quantizer(QuantMethod(method)).needs_H


def quantize_weight(W: torch.Tensor, config: QuantConfig, H: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """Quantize a weight of shape (out_features, in_features) into packed storage.

    ``H = X^T X`` (in, in) is required by GPTQ and ignored by RTN and NF4. The storage has the bits
    of ``quant.grids.layer_config(config, in_features)``: ``config.bits`` but for a k-quant grid's
    fallback layers.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig; got {type(config).__name__}")
    check_weight(W, config)
    config = layer_config(config, W.shape[1])  # a k-quant grid's fallback layer has bits of its own
    if H is not None:
        check_hessian(H, W.shape[1])
    spec = get_quantizer(config.method)
    if spec.needs_H and H is None:
        raise ValueError(
            f"method={config.method.value!r} needs the calibration Gram matrix `H` (in_features x in_features)"
        )
    return spec.fn(W, config, H)
