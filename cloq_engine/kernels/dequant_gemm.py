"""Tiled ``tl.dot`` GEMM: Y = X·Ŵ^T + scaling·S·B^T (+ bias), Ŵ dequantized in registers.

Each program owns a [BLOCK_M, BLOCK_N] tile of Y. The K loop loads an activation tile and a packed
weight tile (at packed shape), dequantizes it with one scale row (BLOCK_K divides the group size),
casts it to the activation dtype and accumulates with ``tl.dot`` in float32. The LoRA up-projection
``S·B^T`` (S = X_lora·A^T, one cuBLAS call beforehand) and the bias are the epilogue.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .utils import dot_precision, load_wt_tile, lora_up, r_pad, swizzle_tile


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def gemm_configs() -> list:
    """Every shipped config (the compile check covers all of them)."""
    rows = [
        # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (32, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 128, 64, 8, 3),
        (64, 64, 128, 4, 3),
    ]  # larger tiles (128x256x32, 128x128x128 with 8 warps; 128x64x64 with 4 warps: NF4, bf16, sm_80) spill
    # registers: see kernels.check
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in rows
    ]


def shared_bytes_estimate(cfg: dict, num_stages: int, x_bytes: int, bits: int) -> int:
    """Pipelined operand buffers: activation tile + packed weight tile, per stage."""
    a = cfg["BLOCK_M"] * cfg["BLOCK_K"] * x_bytes
    b = cfg["BLOCK_K"] * bits // 8 * cfg["BLOCK_N"]
    return num_stages * (a + b)


DEFAULT = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4)


def prune_configs(candidates, x: torch.Tensor, bits: int, group_size: int, num_groups: int) -> list:
    """Configs whose BLOCK_K serves one scale row and whose buffers fit the device's shared memory."""
    return configs.prune_tiled(candidates, x, bits, group_size, num_groups, shared_bytes_estimate)


def pick_config(x: torch.Tensor, N: int, K: int, bits: int, group_size: int, bench=None) -> triton.Config:
    """Shipped config (``configs.json``) for this shape; autotuned once and cached only off the table."""
    return configs.pick_tiled("dequant_gemm", x, gemm_configs(), DEFAULT, shared_bytes_estimate, N, K, bits, group_size, bench)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def dequant_gemm_kernel(
    # ---- pointers
    x_ptr, q_ptr, scales_ptr, zeros_ptr, codebook_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    # ---- sizes
    M, N, K, KP, R, group_size, num_groups,
    # ---- strides
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
    stride_lm, stride_lr, stride_bn, stride_br, stride_ym, stride_yn,
    # ---- scalars
    scaling,
    # ---- meta
    BITS: tl.constexpr, NF4: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ---------------------------------------------------------------- program -> tile
    pid = tl.program_id(0)
    pid_m, pid_n = swizzle_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)  # M·K and M·N can pass 2^31 (long sequences x wide layers)

    # ---------------------------------------------------------------- K loop
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        w = load_wt_tile(q_ptr, scales_ptr, zeros_ptr, codebook_ptr, k0, offs_n, mask_n, KP, group_size,
                         num_groups, stride_qk, stride_qn, stride_sg, stride_sn, BITS, NF4, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    # ---------------------------------------------------------------- epilogue
    if HAS_LORA:
        acc = lora_up(acc, s_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_bn, stride_br,
                      scaling, R_PAD, True)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def dequant_gemm(x, qweight, scales, zeros, codebook, S, B, bias, scaling: float, bits: int,
                 group_size: int, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Y [M, N] in x's dtype. ``group_size`` is the effective one (K for a single group);
    ``zeros`` None means NF4 (``codebook`` then holds the 16 levels); ``S``/``B`` None: no LoRA."""
    M, K = x.shape
    N = qweight.shape[1]
    if K != in_features:
        raise ValueError(f"x has {K} columns; in_features is {in_features}")
    kp = qweight.shape[0] * 32 // bits
    y = out if out is not None else torch.empty((M, N), dtype=x.dtype, device=x.device)
    nf4 = zeros is None
    has_lora = S is not None
    rank = S.shape[1] if has_lora else 1
    dummy = scales

    def launch(cfg):
        grid = (triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)
        dequant_gemm_kernel[grid](
            x, qweight, scales, dummy if nf4 else zeros, codebook if nf4 else dummy,
            S if has_lora else dummy, B if has_lora else dummy, bias if bias is not None else dummy, y,
            M, N, K, kp, rank, group_size, K // group_size,
            x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            S.stride(0) if has_lora else 0, S.stride(1) if has_lora else 0,
            B.stride(0) if has_lora else 0, B.stride(1) if has_lora else 0, y.stride(0), y.stride(1),
            float(scaling),
            BITS=bits, NF4=nf4, HAS_LORA=has_lora, HAS_BIAS=bias is not None, R_PAD=r_pad(rank),
            DOT_PRECISION=dot_precision(x.dtype),
            **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    launch(pick_config(x, N, K, bits, group_size, bench=launch))
    return y
