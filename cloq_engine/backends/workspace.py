"""Reusable scratch buffers for the large-M path: one dequantized weight at a time per stream.

The large-M forward and backward dequantize Ŵᵀ (with the LoRA factor appended) into a buffer and
hand it to one cuBLAS call; the buffer is dead as soon as that call is enqueued. So a single buffer
per (device, stream, dtype) serves every layer of a model: the next layer's dequant kernel is
enqueued on the same stream after the previous GEMM, and CUDA runs a stream's work in order, so it
cannot overwrite Ŵ while a GEMM still reads it. Nothing dequantized is saved for backward (the
backward dequantizes again), so training memory holds one weight-sized buffer, not one per layer.

Buffers are keyed by stream as well, so work on two streams never shares one. A buffer only
grows (to the largest layer seen, in steps of at least 1.5x) and is released by :func:`clear`.

CUDA graphs: a graph keeps the addresses it captured, so a buffer is never freed or moved by a
later call. When a slot must grow, the old buffer is retired, not freed: it stays allocated (a
graph captured earlier may still replay on it) until :func:`clear`, which must not be called while
such a graph is alive. The geometric growth bounds the retired bytes by twice the live ones. During
capture a buffer that must grow is allocated for that call only (from the graph's private pool,
which the graph keeps); warm up outside capture, as ``torch.cuda.graphs`` requires anyway.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Tuple

import torch

_buffers: Dict[Tuple, torch.Tensor] = {}
_retired: List[torch.Tensor] = []  # outgrown buffers, kept alive for graphs that captured them
_lock = threading.Lock()


def _stream_key(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


def buffer(shape, dtype: torch.dtype, device, slot: str = "weight", zeroed: bool = False) -> torch.Tensor:
    """A contiguous tensor of ``shape`` viewing this stream's ``slot`` scratch buffer.

    Contents are undefined, except with ``zeroed``: the buffer is zero when allocated (for split-K
    counters, which the kernel leaves at zero). The view is valid until the next call with the same
    (device, stream, dtype, slot).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    alloc = torch.zeros if zeroed else torch.empty
    numel = 1
    for d in shape:
        numel *= int(d)
    key = (device, _stream_key(device), dtype, slot)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return alloc(shape, dtype=dtype, device=device)
        with _lock:
            buf = _buffers.get(key)
            if buf is None or buf.numel() < numel:
                size = numel
                if buf is not None:
                    _retired.append(buf)
                    size = max(numel, buf.numel() * 3 // 2)
                buf = alloc(size, dtype=dtype, device=device)
                _buffers[key] = buf
    return buf[:numel].view(shape)


def nbytes(device=None, retired: bool = True) -> int:
    """Bytes held by the buffers (of ``device``, or all), the retired ones included unless told."""
    dev = None if device is None else torch.device(device)
    live = sum(b.numel() * b.element_size() for k, b in _buffers.items() if dev is None or k[0] == dev)
    if retired:
        live += sum(b.numel() * b.element_size() for b in _retired if dev is None or b.device == dev)
    return live


def clear() -> None:
    """Release every buffer, retired ones included (e.g. between benchmark variants). No CUDA graph
    that captured a call using them may replay afterwards."""
    with _lock:
        _buffers.clear()
        _retired.clear()
