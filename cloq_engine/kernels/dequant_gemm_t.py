"""Transposed-dequant GEMM for the backward pass: dX = dY·Ŵ (+ dS·A), no dequantized W in memory.

Each program owns a [BLOCK_M, BLOCK_K] tile of dX and walks N: it loads the packed weight tile of
its K rows and the current N columns (the same K-major tile the forward reads), dequantizes it in
registers with the one scale row of its K tile, and accumulates ``dY_tile @ tile^T`` in float32.
With ``FUSE_LORA`` the epilogue adds ``dS·A`` (dS = scaling·dY·B, from cuBLAS), so
the input gradient of the base and LoRA branches is written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .utils import dot_precision, load_wt_tile, r_pad, swizzle_tile


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def gemm_t_configs() -> list:
    rows = [
        # BLOCK_M, BLOCK_K (output columns), BLOCK_N (reduction), warps, stages
        (64, 32, 64, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 32, 64, 4, 3),
        (128, 64, 64, 8, 3),
        (128, 128, 32, 8, 3),
        (64, 128, 64, 4, 3),
        (128, 128, 64, 8, 2),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bk, bn, w, s in rows
    ]


def shared_bytes_estimate(cfg: dict, num_stages: int, x_bytes: int, bits: int) -> int:
    a = cfg["BLOCK_M"] * cfg["BLOCK_N"] * x_bytes
    b = cfg["BLOCK_K"] * bits // 8 * cfg["BLOCK_N"]
    return num_stages * (a + b)


DEFAULT = triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4)


def prune_configs(candidates, dy: torch.Tensor, bits: int, group_size: int, num_groups: int) -> list:
    """Configs whose BLOCK_K serves one scale row and whose buffers fit the device's shared memory."""
    return configs.prune_tiled(candidates, dy, bits, group_size, num_groups, shared_bytes_estimate)


def pick_config(dy: torch.Tensor, N: int, K: int, bits: int, group_size: int, bench=None) -> triton.Config:
    """Shipped config (``configs.json``) for this shape; autotuned once and cached only off the table."""
    return configs.pick_tiled("dequant_gemm_t", dy, gemm_t_configs(), DEFAULT, shared_bytes_estimate, N, K, bits, group_size, bench)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def dequant_gemm_t_kernel(
    # ---- pointers
    dy_ptr, q_ptr, scales_ptr, zeros_ptr, codebook_ptr, ds_ptr, a_ptr, dx_ptr,
    # ---- sizes
    M, N, K, KP, R, group_size, num_groups,
    # ---- strides
    stride_dym, stride_dyn, stride_qk, stride_qn, stride_sg, stride_sn,
    stride_dsm, stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    # ---- meta
    BITS: tl.constexpr, NF4: tl.constexpr, FUSE_LORA: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---------------------------------------------------------------- program -> tile
    pid = tl.program_id(0)
    pid_m, pid_k = swizzle_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_nb = tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)  # M·K and M·N can pass 2^31 (long sequences x wide layers)

    # ---------------------------------------------------------------- N loop
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_nb
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_t = load_wt_tile(q_ptr, scales_ptr, zeros_ptr, codebook_ptr, k0, offs_n, mask_n, KP, group_size,
                           num_groups, stride_qk, stride_qn, stride_sg, stride_sn, BITS, NF4, BLOCK_K, BLOCK_N)
        acc = tl.dot(dy, tl.trans(w_t.to(dy.dtype)), acc, input_precision=DOT_PRECISION)

    # ---------------------------------------------------------------- epilogue: + dS·A
    if FUSE_LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        ds = tl.load(ds_ptr + offs_m[:, None] * stride_dsm + offs_r[None, :] * stride_dsr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(ds, a, acc, input_precision="ieee")
    tl.store(dx_ptr + rows[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def dequant_gemm_t(dy, qweight, scales, zeros, codebook, dS, A, bits: int, group_size: int, in_features: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """dX [M, K] = dY·Ŵ (+ dS·A when ``dS`` is given) in ``out_dtype``; ``zeros`` None means NF4."""
    M, N = dy.shape
    if qweight.shape[1] != N:
        raise ValueError(f"dy has {N} columns; the weight has out_features={qweight.shape[1]}")
    K = in_features
    kp = qweight.shape[0] * 32 // bits
    dx = torch.empty((M, K), dtype=out_dtype, device=dy.device)
    nf4 = zeros is None
    fuse = dS is not None
    rank = dS.shape[1] if fuse else 1
    dummy = scales

    def launch(cfg):
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(K, cfg.kwargs["BLOCK_K"]),)
        dequant_gemm_t_kernel[grid](
            dy, qweight, scales, dummy if nf4 else zeros, codebook if nf4 else dummy,
            dS if fuse else dummy, A if fuse else dummy, dx,
            M, N, K, kp, rank, group_size, K // group_size,
            dy.stride(0), dy.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            dS.stride(0) if fuse else 0, dS.stride(1) if fuse else 0,
            A.stride(0) if fuse else 0, A.stride(1) if fuse else 0, dx.stride(0), dx.stride(1),
            BITS=bits, NF4=nf4, FUSE_LORA=fuse, R_PAD=r_pad(rank),
            DOT_PRECISION=dot_precision(dy.dtype),
            **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    launch(pick_config(dy, N, K, bits, group_size, bench=launch))
    return dx
