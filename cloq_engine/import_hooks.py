"""Run a function right after another package's module is imported, without importing it.

``import cloq_engine`` plugs into transformers (its quantizer registry) and PEFT (its LoRA layer
dispatch), but importing either takes seconds that a user of the kernels alone, or ``cloq
--help``, should not pay. :func:`after_import` runs the callback at once when the module is
already loaded, otherwise from a one-shot import hook right after the module finishes loading.
This module imports nothing heavy (no torch).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Callable, Dict, List

logger = logging.getLogger(__name__)

_PENDING: Dict[str, List[Callable[[], None]]] = {}  # module name -> callbacks not run yet


def _run(name: str, callbacks: List[Callable[[], None]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception as e:  # never break the other package's own import
            logger.warning("cloq_engine could not plug into %s (%s)", name, e)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module to run its callbacks."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PENDING:
            return None
        with contextlib.suppress(ValueError):  # let the real finders find it
            sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            if _PENDING:
                sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        callbacks = _PENDING.pop(self._name, [])
        if not _PENDING:
            _remove_finder()
        _run(self._name, callbacks)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


def _remove_finder() -> None:
    for f in [f for f in sys.meta_path if isinstance(f, _AfterImport)]:
        sys.meta_path.remove(f)


def after_import(module: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` once ``module`` is imported: now if it already is, else right after it
    loads. A failing callback logs a warning; the import itself always succeeds."""
    if module in sys.modules:
        _run(module, [callback])
        return
    _PENDING.setdefault(module, []).append(callback)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


__all__ = ["after_import"]
