"""Backend dispatch: which implementation runs the fused quantized-LoRA ops.

The choice is read at call time: :func:`set_backend` wins, else the ``CLOQ_BACKEND`` environment
variable (``auto`` | ``torch`` | ``triton`` | ``cpp``), else ``auto``. ``auto`` takes Triton for
CUDA tensors when it imports, the C++ extension for CPU tensors when it was built, and the torch
reference otherwise. Asking explicitly for a backend that cannot run raises a clear error.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

import torch

from . import torch_ref

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "cpp")
_override: Optional[str] = None
_loaded: dict = {}


def _check_name(name: str, source: str) -> str:
    """``name`` lower-cased, or a ValueError that names where the bad value came from."""
    name = str(name).lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}; got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for this process (``None`` returns control to ``CLOQ_BACKEND``)."""
    global _override
    _override = None if name is None else _check_name(name, "set_backend(name): the backend")


def requested_backend() -> str:
    return _override or _check_name(os.environ.get("CLOQ_BACKEND", "auto") or "auto",
                                    "the environment variable CLOQ_BACKEND")


def _load(name: str) -> Optional[ModuleType]:
    """Import a backend module once; None (with the reason logged) when it cannot load."""
    if name == "torch":
        return torch_ref
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}_backend")
        except Exception as e:  # missing triton, extension not built, ...
            logger.info("cloq_engine: %s backend unavailable: %s", name, e)
            _loaded[name] = None
    return _loaded[name]


def available_backends() -> list:
    return [n for n in ("torch", "triton", "cpp") if _load(n) is not None]


def get_backend(device: torch.device) -> ModuleType:
    """The backend module to use for tensors on ``device``."""
    name = requested_backend()
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and _load("triton") is not None:
            return _load("triton")
        if device.type == "cpu" and _load("cpp") is not None:
            return _load("cpp")
        return torch_ref
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"CLOQ_BACKEND={name!r} was requested but the {name} backend is unavailable here")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError("the cpp backend runs on CPU tensors only")
    return mod


def active_backend(device="cpu") -> str:
    """Name of the backend that ops on ``device`` would use now."""
    return get_backend(device).NAME
