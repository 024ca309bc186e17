"""Dequantize packed storage into a strided destination of any float dtype: Ŵᵀ [K, N].

This is the first half of the large-M path (training, prefill): the packed weight is expanded,
at memory bandwidth, straight into the activation dtype inside a reused workspace laid out for one
cuBLAS call per product (``[Ŵᵀ ; s·Bᵀ]`` with K + r rows for the forward, ``[Ŵᵀ | Aᵀ]`` with N + r
columns for the backward: the caller passes the [K, N] view and its strides). The same kernel
writes the float32 Ŵ [N, K] for merging and export (a transposed view as destination).

Each program owns a [BLOCK_K, BLOCK_N] tile. It loads every packed int32 word of the tile once, at
its packed shape, and expands the ``32 // bits`` codes of each word in registers over an extra
tensor axis (3-bit: a 2-bit plane word and a 1-bit plane word per 16/32 codes), so the tile is
never reshaped and the store is coalesced along N, which is contiguous in both the packed words
and the destination. ``BLOCK_K`` divides the group size (or there is one group), so the tile uses
one scale row: ``w = q·s + z'`` with ``z' = -z·s`` (exactly ``(q - z)·s`` before the final
rounding, since both products are exact in float32). Destination offsets are 64-bit.

Every width streams at the same layout: BLOCK_N = 4 columns x 32 threads x warps, so the 16-byte
word loads put all warps along N, and the stores are capped at 4 columns a thread (8-byte bf16
stores, whole sectors per warp) to keep that layout; the 3-bit 1-bit plane is loaded at the 2-bit
plane's shape and NF4 levels come from a register select tree. No tile goes through shared memory
(the compile check shows no barrier in any width).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .utils import INTERPRET, along_n, expanded_codes, load_group_params, nf4_levels


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def dequant_configs() -> list:
    """Every config the shipped table may name (the compile check covers all of them)."""
    rows = [
        # BLOCK_K, BLOCK_N, warps. BLOCK_N = 4 columns x 32 threads x warps: the packed-word loads
        # (16 bytes = 4 columns a thread) and the stores (capped at 4 columns) then share one layout
        # with every warp along N, so no tile changes layout through shared memory
        (32, 512, 4),
        (32, 1024, 8),
        (32, 256, 2),
    ]  # BLOCK_K = 64 or 128 spills at 3 bits and NF4 (see kernels.check)
    return [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn}, num_warps=w, num_stages=1) for bk, bn, w in rows]


def _fits(cfg: dict, K: int, group_size: int) -> bool:
    return group_size >= K or group_size % cfg["BLOCK_K"] == 0


DEFAULT = triton.Config({"BLOCK_K": 32, "BLOCK_N": 512}, num_warps=4, num_stages=1)


def pick_config(K: int, N: int, bits: int, group_size: int, device, bench=None) -> triton.Config:
    """The shipped config for this shape (``configs.json``), BLOCK_K shrunk to divide the group."""
    if INTERPRET:  # small tiles: the interpreter runs programs one by one
        return triton.Config({"BLOCK_K": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    candidates = [c for c in dequant_configs() if _fits(c.kwargs, K, group_size)]
    cfg = configs.lookup("dequant", device, DEFAULT, candidates, bench, n=N, k=K, bits=bits, group=group_size)
    kw = dict(cfg.kwargs)
    while not _fits(kw, K, group_size) and kw["BLOCK_K"] > 32:
        kw["BLOCK_K"] //= 2
    return triton.Config(kw, num_warps=cfg.num_warps, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def dequant_kernel(
    # ---- pointers
    q_ptr, scales_ptr, zeros_ptr, codebook_ptr, w_ptr,
    # ---- sizes
    N, K, KP, group_size, num_groups,
    # ---- strides (w: the destination Ŵᵀ, element [k, n] at k * stride_wk + n * stride_wn)
    stride_qk, stride_qn, stride_sg, stride_sn, stride_wk, stride_wn,
    # ---- meta
    BITS: tl.constexpr, NF4: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # ---------------------------------------------------------------- program -> tile
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    g = tl.minimum(k0 // group_size, num_groups - 1)
    s, zs = load_group_params(scales_ptr, zeros_ptr, g, offs_n, mask_n, stride_sg, stride_sn, NF4)

    # ---------------------------------------------------------------- words -> codes, in registers
    codes, kk = expanded_codes(q_ptr, k0, offs_n, mask_n, KP, stride_qk, stride_qn, BITS, BLOCK_K)
    # the store keeps the packed words' layout (4 columns a thread, 8-byte bf16 stores, still whole
    # sectors per warp): capping the known contiguity at 4 stops Triton from re-laying the tile out
    # in shared memory for 16-byte stores
    n_ = along_n(tl.max_contiguous(offs_n, 4), BITS)

    # ---------------------------------------------------------------- dequantize, store
    if NF4:
        w = nf4_levels(codes, codebook_ptr) * along_n(s, BITS)
    else:
        w = codes.to(tl.float32) * along_n(s, BITS) + along_n(zs, BITS)
    dst = w_ptr + kk.to(tl.int64) * stride_wk + n_.to(tl.int64) * stride_wn
    tl.store(dst, w.to(w_ptr.dtype.element_ty), mask=(kk < K) & (n_ < N))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def dequant_into(out: torch.Tensor, qweight, scales, zeros, codebook, bits: int, group_size: int,
                 in_features: int) -> torch.Tensor:
    """Write Ŵᵀ [in_features, N] into ``out`` (any float dtype, any strides: e.g. the top K rows of
    a [K + r, N] workspace); ``group_size`` is the effective one; ``zeros`` None means NF4."""
    K, N = in_features, qweight.shape[1]
    if tuple(out.shape) != (K, N):
        raise ValueError(f"out must have shape {(K, N)} (in_features, out_features); got {tuple(out.shape)}")
    if not out.dtype.is_floating_point:
        raise ValueError(f"out must be a float tensor; got {out.dtype}")
    kp = qweight.shape[0] * 32 // bits
    nf4 = zeros is None

    def launch(cfg):
        bk, bn = cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_N"]
        dequant_kernel[(triton.cdiv(K, bk), triton.cdiv(N, bn))](
            qweight, scales, scales if nf4 else zeros, codebook if nf4 else scales, out,
            N, K, kp, group_size, K // group_size,
            qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
            BITS=bits, NF4=nf4, BLOCK_K=bk, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=1,
        )

    launch(pick_config(K, N, bits, group_size, out.device, bench=launch))
    return out


def dequant(qweight, scales, zeros, codebook, bits: int, group_size: int, in_features: int,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense Ŵ [N, K] (nn.Linear orientation) in ``dtype``, for merging, export and tests."""
    w = torch.empty((qweight.shape[1], in_features), dtype=dtype, device=qweight.device)
    dequant_into(w.t(), qweight, scales, zeros, codebook, bits, group_size, in_features)
    return w
