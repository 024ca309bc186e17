"""Split-K GEMV for small M (decode, M <= 16): Y = X·Ŵ^T + scaling·S·B^T (+ bias).

At small M the weight stream is the whole cost, so the grid is (N tiles) x (SPLIT_K slices of K):
enough programs to keep every SM reading. Each program walks its K slice (tiles interleaved with
stride SPLIT_K·BLOCK_K), dequantizes packed tiles in registers and accumulates in float32, then
atomically adds its partial sum into a float32 output; the program of slice 0 adds the LoRA
up-projection and the bias. With BLOCK_M == 1 the product is a broadcast multiply and a reduction
over K (pure fp32 arithmetic); with BLOCK_M == 16 it is a ``tl.dot`` on 16-bit operands.
The summation order across slices follows the atomics, so results are not bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, dot_precision, load_wt_tile, lora_up, m_bucket, r_pad

MAX_M = 16


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def gemv_configs() -> list:
    rows = [
        # BLOCK_N, BLOCK_K, SPLIT_K, warps, stages
        (64, 32, 4, 4, 2),
        (128, 32, 4, 4, 2),
        (64, 64, 8, 4, 2),
        (128, 64, 4, 4, 2),
        (256, 32, 8, 8, 2),
        (64, 128, 8, 4, 2),
        (128, 128, 16, 8, 2),
        (32, 128, 16, 4, 2),
    ]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
        for bn, bk, sk, w, s in rows
    ]


def _tuning_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4, num_stages=1)]
    return gemv_configs()


def prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    group_size, num_groups, K = args["group_size"], args["num_groups"], args["K"]
    kept = [
        c for c in configs
        if (num_groups == 1 or c.kwargs["BLOCK_K"] <= group_size)
        and c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"] <= max(K, 32)  # no empty K slices
    ]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"], c.kwargs["BLOCK_K"]))]


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def dequant_gemv_splitk_kernel(
    # ---- pointers
    x_ptr, q_ptr, scales_ptr, zeros_ptr, codebook_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    # ---- sizes
    M, N, K, KP, R, group_size, num_groups, m_bucket,
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
    # ---------------------------------------------------------------- program -> tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    # ---------------------------------------------------------------- K slice
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
        w = load_wt_tile(q_ptr, scales_ptr, zeros_ptr, codebook_ptr, k0, offs_n, mask_n, KP, group_size,
                         num_groups, stride_qk, stride_qn, stride_sg, stride_sn, BITS, NF4, BLOCK_K, BLOCK_N)
        if BLOCK_M == 1:
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w, axis=0)[None, :]
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    # ---------------------------------------------------------------- epilogue (slice 0 only)
    if pid_k == 0:
        if HAS_LORA:
            acc = lora_up(acc, s_ptr, b_ptr, offs_m, offs_n, M, N, R, stride_lm, stride_lr, stride_bn, stride_br,
                          scaling, R_PAD, BLOCK_M > 1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc,
                  mask=mask_m[:, None] & mask_n[None, :], sem="relaxed")


dequant_gemv_splitk_tuned = triton.autotune(
    configs=_tuning_configs(),
    key=["m_bucket", "N", "K", "group_size", "BITS", "NF4", "BLOCK_M"],
    prune_configs_by={"early_config_prune": prune_configs},
    reset_to_zero=["y_ptr"],
)(dequant_gemv_splitk_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def dequant_gemv_splitk(x, qweight, scales, zeros, codebook, S, B, bias, scaling: float, bits: int,
                        group_size: int, in_features: int) -> torch.Tensor:
    """Y [M, N] in x's dtype for M <= 16; arguments as :func:`.dequant_gemm.dequant_gemm`."""
    M, K = x.shape
    N = qweight.shape[1]
    if M > MAX_M:
        raise ValueError(f"split-K GEMV handles M <= {MAX_M}; got M={M}")
    if K != in_features:
        raise ValueError(f"x has {K} columns; in_features is {in_features}")
    kp = qweight.shape[0] * 32 // bits
    y32 = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    nf4 = zeros is None
    has_lora = S is not None
    rank = S.shape[1] if has_lora else 1
    dummy = scales
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    dequant_gemv_splitk_tuned[grid](
        x, qweight, scales, dummy if nf4 else zeros, codebook if nf4 else dummy,
        S if has_lora else dummy, B if has_lora else dummy, bias if bias is not None else dummy, y32,
        M, N, K, kp, rank, group_size, K // group_size, m_bucket(M),
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        S.stride(0) if has_lora else 0, S.stride(1) if has_lora else 0,
        B.stride(0) if has_lora else 0, B.stride(1) if has_lora else 0, y32.stride(0), y32.stride(1),
        float(scaling),
        BITS=bits, NF4=nf4, HAS_LORA=has_lora, HAS_BIAS=bias is not None, R_PAD=r_pad(rank),
        DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=1 if M == 1 else MAX_M,
    )
    return y32 if x.dtype == torch.float32 else y32.to(x.dtype)
