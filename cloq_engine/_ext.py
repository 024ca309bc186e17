"""Loads the optional C++ extension ``cloq_engine._C`` (built by ``pip install -e .``).

Importing the library registers its tensor ops with the dispatcher as ``torch.ops.cloq_engine.*``
(``csrc/bindings.cpp``); this module adds their fake kernels (output shapes and dtypes from input
shapes alone), which ``torch.compile`` and FakeTensor need to trace through them.

``load()`` returns an :class:`Extension` (the ops plus the kernel ISA switch), or ``None`` when it
is not available; ``unavailable_reason()`` says why (not built, built against another torch,
disabled with ``CLOQ_NO_EXT=1``). The package works without the extension: the torch reference
backend and the Python pack/unpack are used.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_PACK_ALIGN = 32  # formats.PACK_ALIGN (formats imports this module, not the other way round)

_state: dict = {}


class Extension:
    """The loaded extension: ``torch.ops.cloq_engine`` ops by name, plus ``kernel_isa`` and
    ``set_kernel_isa`` (plain functions: they take no tensors and never run inside a graph)."""

    def __init__(self, module: ModuleType):
        for name in OPS:
            setattr(self, name, getattr(torch.ops.cloq_engine, name))
        self.kernel_isa, self.set_kernel_isa = module.kernel_isa, module.set_kernel_isa


def load() -> Optional[Extension]:
    """The extension, or None (the reason is kept for :func:`unavailable_reason`)."""
    if "ext" not in _state:
        ext, reason = None, None
        if os.environ.get("CLOQ_NO_EXT") == "1":
            reason = "disabled by CLOQ_NO_EXT=1"
        else:
            try:
                ext = Extension(importlib.import_module("cloq_engine._C"))
            except (ImportError, OSError, AttributeError) as e:  # not built, built against another torch, stale build
                reason = f"cloq_engine._C could not be imported ({type(e).__name__}: {e}); build it with " \
                         "`pip install --no-build-isolation -e .`"
        if ext is not None:
            _register_fake_kernels()
        else:
            logger.info("cloq_engine: C++ extension unavailable: %s", reason)
        _state["ext"], _state["reason"] = ext, reason
    return _state["ext"]


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returned None; None when the extension is loaded."""
    load()
    return _state["reason"]


# ---------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, mirroring the checks the C++ ops make on them
# ---------------------------------------------------------------------------------------------
def _packed_rows(in_features: int, bits: int) -> int:
    return -(-in_features // _PACK_ALIGN) * _PACK_ALIGN * bits // 32


def _fake_pack_codes(codes, bits):
    return codes.new_empty((_packed_rows(codes.shape[0], bits), codes.shape[1]), dtype=torch.int32)


def _fake_unpack_codes(qweight, bits, in_features):
    return qweight.new_empty((in_features, qweight.shape[1]), dtype=torch.int64)


def _fake_dequantize_kn(qweight, scales, zeros, codebook, bits, group_size, in_features, k0, k1, dtype):
    return qweight.new_empty((k1 - k0, qweight.shape[1]), dtype=dtype)


def _fake_qmm_(y, x, qweight, scales, zeros, codebook, bits, group_size, block_k):
    torch._check(y.shape[0] == x.shape[0] and y.shape[1] == qweight.shape[1],
                 lambda: f"y must have shape [{x.shape[0]}, {qweight.shape[1]}]; got {tuple(y.shape)}")


def _fake_qmm_t_(dx, dy, qweight, scales, zeros, codebook, bits, group_size, block_k):
    torch._check(dx.shape[0] == dy.shape[0] and dy.shape[1] == qweight.shape[1],
                 lambda: f"dx must have {dy.shape[0]} rows and dy {qweight.shape[1]} columns")


FAKE_KERNELS = {
    "pack_codes": _fake_pack_codes,
    "unpack_codes": _fake_unpack_codes,
    "dequantize_kn": _fake_dequantize_kn,
    "qmm_": _fake_qmm_,
    "qmm_t_": _fake_qmm_t_,
}
OPS = tuple(FAKE_KERNELS)  # the ops csrc/bindings.cpp registers


def _register_fake_kernels() -> None:
    for name, fake in FAKE_KERNELS.items():
        torch.library.register_fake(f"cloq_engine::{name}", fake)
