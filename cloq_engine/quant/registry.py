"""The quantizer registry: one entry per :class:`~cloq_engine.config.QuantMethod`.

Each quantizer module registers ``fn(W, config, H) -> QuantizedWeight`` with
:func:`register_quantizer`; ``needs_H`` says whether it reads the calibration Gram matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from ..config import QuantMethod


@dataclass(frozen=True)
class QuantizerSpec:
    method: QuantMethod
    fn: Callable
    needs_H: bool


_QUANTIZERS: Dict[QuantMethod, QuantizerSpec] = {}


def register_quantizer(method: QuantMethod, *, needs_H: bool):
    """Decorator: make ``fn(W, config, H)`` the quantizer of ``method``."""

    def deco(fn: Callable) -> Callable:
        if method in _QUANTIZERS:
            raise ValueError(f"quantize method {method.value!r} is already registered")
        _QUANTIZERS[method] = QuantizerSpec(method, fn, needs_H)
        return fn

    return deco


def get_quantizer(method: QuantMethod) -> QuantizerSpec:
    if method not in _QUANTIZERS:
        raise ValueError(f"quantize method {method.value!r} has no registered quantizer")
    return _QUANTIZERS[method]
