"""Loads the optional C++ extension ``cloq_engine._C`` (built by ``pip install -e .``).

``load()`` returns the module, or ``None`` when it is not available; ``unavailable_reason()``
says why (not built, built against another torch, disabled with ``CLOQ_NO_EXT=1``). The package
works without the extension: the torch reference backend and the Python pack/unpack are used.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (loads libtorch before the extension)

logger = logging.getLogger(__name__)

_state: dict = {}


def load() -> Optional[ModuleType]:
    """The extension module, or None (the reason is kept for :func:`unavailable_reason`)."""
    if "module" not in _state:
        module, reason = None, None
        if os.environ.get("CLOQ_NO_EXT") == "1":
            reason = "disabled by CLOQ_NO_EXT=1"
        else:
            try:
                module = importlib.import_module("cloq_engine._C")
            except (ImportError, OSError) as e:  # not built, or built against another torch
                reason = f"cloq_engine._C could not be imported ({type(e).__name__}: {e}); build it with " \
                         "`pip install --no-build-isolation -e .`"
        if reason is not None:
            logger.info("cloq_engine: C++ extension unavailable: %s", reason)
        _state["module"], _state["reason"] = module, reason
    return _state["module"]


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned None; None when the extension is loaded."""
    load()
    return _state["reason"]
