"""Decode GEMV (M <= 16): Y = X·Ŵᵀ + scaling·S·Bᵀ (+ bias), streaming the packed weight once.

At decode the packed words are the whole cost, so the kernel is built for bytes in flight:

* M = 1 (``gemv_kernel``): warps and threads lie along N only; each thread owns ``BLOCK_N / (32·warps)``
  adjacent columns and walks its K slice in tiles of ``BLOCK_K`` rows, reducing K inside the thread
  (no shuffles, no shared memory, no barrier until the split-K hand-off). The next tile's packed
  words are loaded before the current tile is computed (a register double buffer), so each thread
  has two tiles of words in flight: ``2 · BLOCK_K·bits/32 · columns`` words, >= 64 bytes for every
  shipped config (``bytes_in_flight``). A weight costs a shift, a logic op (the 2^23 trick turns
  a code into a float with one OR and one subtract, no convert) and an FMA; the scale is factored
  out of each tile's sum (``acc += s·Σ x·q + z'·Σ x``), and W2 reads half of W4's words per tile.
  x is loaded straight in the weights' layout (every thread reads the same few values: broadcast
  loads from L1), which is what keeps layout conversions out of the loop.
* M = 2..16 (``gemv_dot_kernel``): dequantize a [BLOCK_K, BLOCK_N] tile and ``tl.dot`` on 16 rows.
* Split-K without atomics on the output: the grid is (N tiles, SPLIT_K contiguous K slices); each
  program stores its float32 partial, then bumps a per-N-tile counter; the program that arrives
  last sums the partials in slice order (deterministic), adds the LoRA up-projection and the bias,
  writes Y in the activation dtype and resets the counter to 0 for the next launch. One launch,
  no host sync, no memset: CUDA-graph capturable. The counters must start at 0 (the caller keeps
  them in a zeroed buffer that the kernel leaves zeroed); SPLIT_K = 1 needs neither buffer.

``S = X_lora·Aᵀ`` comes in from one tiny cuBLAS call, so a LoRA forward is two launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .utils import (INTERPRET, codes_to_float, dot_precision, expand_words, load_group_params, load_words,
                    load_wt_tile, lora_up, r_pad, sum_over_k, tile_rows)

MAX_M = 16


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def gemv_configs() -> list:
    """M = 1 configs the shipped table may name. SPLIT_K = 0: chosen from the SM count. BLOCK_K is
    the tile in K rows (shrunk to divide the group); columns per thread = BLOCK_N / (32·warps)."""
    rows = [
        # BLOCK_N, BLOCK_K, SPLIT_K, warps: BLOCK_N = 4 columns x 32 threads x warps, so that the
        # 16-byte vector loads Triton coalesces to put every warp along N (none along K)
        (512, 32, 0, 4),
        (1024, 32, 0, 8),
        (256, 32, 0, 2),
    ]  # (128, 64) with 1 warp (8 rows x 4 columns a thread) spills at 3 bits and NF4: see kernels.check
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=1)
            for bn, bk, sk, w in rows]


def gemv_dot_configs() -> list:
    """M = 2..16 configs (tl.dot over 16 rows)."""
    rows = [
        # BLOCK_N, BLOCK_K, SPLIT_K, warps, stages
        (128, 32, 0, 4, 3),
        (256, 64, 0, 8, 2),
        (128, 128, 0, 8, 2),
    ]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
            for bn, bk, sk, w, s in rows]


DEFAULT = triton.Config({"BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_K": 0}, num_warps=4, num_stages=1)
DEFAULT_DOT = triton.Config({"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 0}, num_warps=4, num_stages=3)
INTERPRET_CONFIG = {1: triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=1, num_stages=1),
                    MAX_M: triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4, num_stages=1)}


def bytes_in_flight(cfg: triton.Config, bits: int) -> int:
    """Packed-weight bytes each thread has requested at once (the current tile and the prefetched one)."""
    columns = cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)
    return 2 * cfg.kwargs["BLOCK_K"] * bits // 8 * columns


def _fits(cfg: dict, K: int, group_size: int) -> bool:
    return group_size >= K or group_size % cfg["BLOCK_K"] == 0


def pick_config(M: int, N: int, K: int, bits: int, group_size: int, device, bench=None) -> triton.Config:
    if INTERPRET:
        return INTERPRET_CONFIG[1 if M == 1 else MAX_M]
    kernel, default, pool = ("gemv", DEFAULT, gemv_configs()) if M == 1 else ("gemv_dot", DEFAULT_DOT,
                                                                             gemv_dot_configs())
    candidates = [c for c in pool if _fits(c.kwargs, K, group_size)]
    cfg = configs.lookup(kernel, device, default, candidates, bench, m=M, n=N, k=K, bits=bits, group=group_size)
    kw = dict(cfg.kwargs)
    while not _fits(kw, K, group_size) and kw["BLOCK_K"] > 32:
        kw["BLOCK_K"] //= 2
    return triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def split_k(N: int, K: int, block_n: int, block_k: int, requested: int, device) -> tuple:
    """(SPLIT_K, tiles per slice): the requested split, or (0) enough slices for ~4 programs per SM;
    never an empty slice."""
    n_tiles = triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    split = requested
    if split <= 0:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        split = triton.next_power_of_2(max(1, triton.cdiv(4 * sms, n_tiles)))
    split = max(1, min(split, k_tiles, 64))
    per = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per), per


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _store_output(acc, s_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R,
                  stride_lm, stride_lr, stride_bn, stride_br, stride_ym, stride_yn, scaling,
                  HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    if HAS_LORA:
        acc = lora_up(acc, s_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_bn, stride_br,
                      scaling, R_PAD, BLOCK_M > 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _finish(acc, pid_n, pid_k, s_ptr, b_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr, offs_m, offs_n, M, N, R,
            stride_lm, stride_lr, stride_bn, stride_br, stride_ym, stride_yn, scaling,
            HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
            SPLIT_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32 of this K slice -> Y (directly, or through the split-K hand-off)."""
    if SPLIT_K == 1:
        _store_output(acc, s_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr,
                      stride_bn, stride_br, stride_ym, stride_yn, scaling, HAS_LORA, HAS_BIAS, R_PAD, BLOCK_M)
    else:
        tile = offs_m[:, None] * N + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(part_ptr + pid_k * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
        arrived = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:  # the last slice of this N tile: reduce in slice order
            total = tl.zeros((BLOCK_M, acc.shape[1]), dtype=tl.float32)
            for sk in range(SPLIT_K):
                total += tl.load(part_ptr + sk * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            _store_output(total, s_ptr, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr,
                          stride_bn, stride_br, stride_ym, stride_yn, scaling, HAS_LORA, HAS_BIAS, R_PAD, BLOCK_M)
            tl.atomic_xchg(lock_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def gemv_kernel(
    # ---- pointers
    x_ptr, q_ptr, scales_ptr, zeros_ptr, codebook_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,
    # ---- sizes
    N, K, KP, R, group_size, num_groups, tiles_per_split,
    # ---- strides
    stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_lr, stride_bn, stride_br, stride_yn,
    # ---- scalars
    scaling,
    # ---- meta
    BITS: tl.constexpr, NF4: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """M = 1. Program (pid_n, pid_k): columns pid_n·BLOCK_N.., K tiles of slice pid_k."""
    # ---------------------------------------------------------------- program -> columns, K tiles
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(K, BLOCK_K))
    kk = tile_rows(BITS, BLOCK_K)  # K offsets of a tile, laid out like its expanded codes
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # ---------------------------------------------------------------- stream the slice, K in-thread
    k_stop = tl.minimum(t_hi * BLOCK_K, KP)  # the prefetch reads nothing past the slice
    lo, hi = load_words(q_ptr, t_lo * BLOCK_K, k_stop, offs_n, mask_n, KP, stride_qk, stride_qn, BITS, BLOCK_K)
    for t in range(t_lo, t_hi):
        k0 = t * BLOCK_K
        # the next tile's words go out before this tile is computed
        nlo, nhi = load_words(q_ptr, k0 + BLOCK_K, k_stop, offs_n, mask_n, KP, stride_qk, stride_qn, BITS, BLOCK_K)
        xv = tl.load(x_ptr + (k0 + kk) * stride_xk, mask=k0 + kk < K, other=0.0).to(tl.float32)
        w = codes_to_float(expand_words(lo, hi, BITS), codebook_ptr, NF4)
        g = tl.minimum(k0 // group_size, num_groups - 1)
        s, zs = load_group_params(scales_ptr, zeros_ptr, g, offs_n, mask_n, stride_sg, stride_sn, NF4)
        acc += sum_over_k(xv * w, BITS) * s
        if not NF4:  # Σ x from the thread's own copy of x (in-thread adds, no cross-thread reduction)
            acc += zs * sum_over_k(xv, BITS)
        lo, hi = nlo, nhi

    # ---------------------------------------------------------------- split-K hand-off, epilogue
    _finish(acc[None, :], pid_n, pid_k, s_ptr, b_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr, tl.arange(0, 1),
            offs_n, 1, N, R, 0, stride_lr, stride_bn, stride_br, 0, stride_yn, scaling,
            HAS_LORA, HAS_BIAS, R_PAD, 1, SPLIT_K)


@triton.jit
def gemv_dot_kernel(
    # ---- pointers
    x_ptr, q_ptr, scales_ptr, zeros_ptr, codebook_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr,
    # ---- sizes
    M, N, K, KP, R, group_size, num_groups, tiles_per_split,
    # ---- strides
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
    stride_lm, stride_lr, stride_bn, stride_br, stride_ym, stride_yn,
    # ---- scalars
    scaling,
    # ---- meta
    BITS: tl.constexpr, NF4: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """M = 2..16: dequantize a tile, tl.dot over BLOCK_M = 16 rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        w = load_wt_tile(q_ptr, scales_ptr, zeros_ptr, codebook_ptr, k0, offs_n, mask_n, KP, group_size,
                         num_groups, stride_qk, stride_qn, stride_sg, stride_sn, BITS, NF4, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    _finish(acc, pid_n, pid_k, s_ptr, b_ptr, bias_ptr, y_ptr, part_ptr, lock_ptr, offs_m, offs_n, M, N, R,
            stride_lm, stride_lr, stride_bn, stride_br, stride_ym, stride_yn, scaling,
            HAS_LORA, HAS_BIAS, R_PAD, BLOCK_M, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def gemv(x, qweight, scales, zeros, codebook, S, B, bias, scaling: float, bits: int, group_size: int,
         in_features: int, scratch=None) -> torch.Tensor:
    """Y [M, N] in x's dtype for M <= 16. ``group_size`` is the effective one; ``zeros`` None means
    NF4 (``codebook`` then holds the 16 levels); ``S``/``B`` None: no LoRA.

    Split-K needs two scratch buffers: ``scratch(numel, dtype, zeroed)`` returns them (a float32
    partial-sum buffer, then an int32 counter buffer that must be zero when first allocated and is
    left zero by every launch); reuse them (e.g. from a workspace) to keep launches allocation-free
    and CUDA-graph capturable. Without ``scratch`` they are allocated per call.
    """
    M, K = x.shape
    N = qweight.shape[1]
    if M > MAX_M:
        raise ValueError(f"the GEMV handles M <= {MAX_M}; got M={M}")
    if K != in_features:
        raise ValueError(f"x has {K} columns; in_features is {in_features}")
    kp = qweight.shape[0] * 32 // bits
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    nf4 = zeros is None
    has_lora = S is not None
    rank = S.shape[1] if has_lora else 1
    dummy = scales
    alloc = scratch or (lambda numel, dtype, zeroed: (torch.zeros if zeroed else torch.empty)(
        numel, dtype=dtype, device=x.device))
    common = dict(BITS=bits, NF4=nf4, HAS_LORA=has_lora, HAS_BIAS=bias is not None, R_PAD=r_pad(rank))

    def launch(cfg):
        bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        split, per = split_k(N, K, bn, bk, cfg.kwargs["SPLIT_K"], x.device)
        n_tiles = triton.cdiv(N, bn)
        p = lk = None
        if split > 1:
            p = alloc(split * M * N, torch.float32, False)
            lk = alloc(n_tiles, torch.int32, True)
        ptrs = (x, qweight, scales, dummy if nf4 else zeros, codebook if nf4 else dummy,
                S if has_lora else dummy, B if has_lora else dummy, bias if bias is not None else dummy, y,
                p if split > 1 else dummy, lk if split > 1 else qweight)
        lora_strides = (S.stride(0), S.stride(1), B.stride(0), B.stride(1)) if has_lora else (0, 0, 0, 0)
        meta = dict(common, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
        if M == 1:
            gemv_kernel[(n_tiles, split)](
                *ptrs, N, K, kp, rank, group_size, K // group_size, per,
                x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
                *lora_strides[1:], y.stride(1), float(scaling), **meta)
        else:
            gemv_dot_kernel[(n_tiles, split)](
                *ptrs, M, N, K, kp, rank, group_size, K // group_size, per,
                x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
                *lora_strides, y.stride(0), y.stride(1), float(scaling),
                DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=MAX_M, **meta)

    launch(pick_config(M, N, K, bits, group_size, x.device, bench=launch))
    return y
