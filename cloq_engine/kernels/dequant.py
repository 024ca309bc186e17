"""Standalone dequantization: the dense float32 Ŵ (out_features, in_features) from packed storage.

Only for merging, export and tests; the matmul kernels never write a dequantized weight. Each
program dequantizes one [BLOCK_K, BLOCK_N] K-major tile in registers and stores it transposed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import load_wt_tile

BLOCK_K = 32  # divides every group size
BLOCK_N = 64


@triton.jit
def dequant_kernel(
    # ---- pointers
    q_ptr, scales_ptr, zeros_ptr, codebook_ptr, w_ptr,
    # ---- sizes
    N, K, KP, group_size, num_groups,
    # ---- strides
    stride_qk, stride_qn, stride_sg, stride_sn, stride_wn, stride_wk,
    # ---- meta
    BITS: tl.constexpr, NF4: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_t = load_wt_tile(q_ptr, scales_ptr, zeros_ptr, codebook_ptr, k0, offs_n, mask_n, KP, group_size, num_groups,
                       stride_qk, stride_qn, stride_sg, stride_sn, BITS, NF4, BLOCK_K, BLOCK_N)
    tl.store(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, w_t,
             mask=(offs_k[:, None] < K) & mask_n[None, :])


def dequant(qweight, scales, zeros, codebook, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """float32 Ŵ [N, K]; ``group_size`` is the effective one; ``zeros`` None means NF4."""
    N = qweight.shape[1]
    K = in_features
    kp = qweight.shape[0] * 32 // bits
    w = torch.empty((N, K), dtype=torch.float32, device=qweight.device)
    nf4 = zeros is None
    grid = (triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
    dequant_kernel[grid](
        qweight, scales, scales if nf4 else zeros, codebook if nf4 else scales, w,
        N, K, kp, group_size, K // group_size,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), w.stride(0), w.stride(1),
        BITS=bits, NF4=nf4, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
    )
    return w
