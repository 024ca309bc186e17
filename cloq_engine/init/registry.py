"""The init-method registry: one entry per :class:`~cloq_engine.config.InitMethod`.

Each method module registers its solver with :func:`register_init`. Two kinds exist:

* fixed-Q methods (``requantizes=False``): ``fn(R, H, rank, scaling, **opts) -> (A, B)`` for
  ``R = W - Q`` in the compute dtype;
* re-quantizing methods (``requantizes=True``): ``fn(W, quant_config, rank, scaling, H=None,
  **opts) -> (qw, A, B)``.

``options`` names the keyword options the method accepts; ``init_lora`` rejects any other.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from ..config import InitMethod


@dataclass(frozen=True)
class InitSpec:
    method: InitMethod
    fn: Callable
    needs_H: bool
    requantizes: bool
    options: Tuple[str, ...]


_INITS: Dict[InitMethod, InitSpec] = {}


def register_init(method: InitMethod, *, needs_H: bool, requantizes: bool = False, options: Tuple[str, ...] = ()):
    """Decorator: make ``fn`` the solver of ``method``."""

    def deco(fn: Callable) -> Callable:
        if method in _INITS:
            raise ValueError(f"init method {method.value!r} is already registered")
        _INITS[method] = InitSpec(method, fn, needs_H, requantizes, tuple(options))
        return fn

    return deco


def init_method(method) -> InitMethod:
    """``method`` (an InitMethod or its name, any case) as an InitMethod; ValueError naming the choices."""
    try:
        return InitMethod(method.value if isinstance(method, enum.Enum) else str(method).lower())
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in InitMethod)
        raise ValueError(f"`method` must be one of {allowed}; got {method!r}") from None


def get_init(method) -> InitSpec:
    method = init_method(method)
    if method not in _INITS:
        raise ValueError(f"init method {method.value!r} has no registered solver")
    return _INITS[method]
