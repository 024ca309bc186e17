"""Reusable scratch buffers for the large-M path: one dequantized weight at a time per stream.

The large-M forward and backward dequantize Ŵᵀ (with the LoRA factor appended) into a buffer and
hand it to one cuBLAS call; the buffer is dead as soon as that call is enqueued. So a single buffer
per (device, stream, dtype) serves every layer of a model: the next layer's dequant kernel is
enqueued on the same stream after the previous GEMM, and CUDA runs a stream's work in order, so it
cannot overwrite Ŵ while a GEMM still reads it. Nothing dequantized is saved for backward (the
backward dequantizes again), so training memory holds one weight-sized buffer, not one per layer.

Buffers are keyed by stream as well, so work on two streams never shares one. A buffer only
grows (to the largest layer seen) and is released by :func:`clear`. During CUDA-graph capture a
buffer that must grow is allocated for that call only (it belongs to the graph's private pool and
must not outlive the graph); warm up outside capture, as ``torch.cuda.graphs`` requires anyway.
"""
from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch

_buffers: Dict[Tuple, torch.Tensor] = {}
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
                _buffers.pop(key, None)  # free the old one before allocating the larger
                buf = alloc(numel, dtype=dtype, device=device)
                _buffers[key] = buf
    return buf[:numel].view(shape)


def nbytes(device=None) -> int:
    """Bytes held by the buffers (of ``device``, or all)."""
    dev = None if device is None else torch.device(device)
    return sum(b.numel() * b.element_size() for k, b in _buffers.items() if dev is None or k[0] == dev)


def clear() -> None:
    """Release every buffer (e.g. before handing the GPU memory to something else)."""
    with _lock:
        _buffers.clear()
