"""SYRK-style Gram accumulation: H += X^T X, float32 accumulation, each symmetric tile computed once.

The grid enumerates the tiles (i, j) with i <= j of the BLOCK x BLOCK tiling of H (a triangular
index recovered from the program id). A program reduces X[:, i-block]^T X[:, j-block] over the
rows of X in float32, adds it into H[i-block, j-block] and, off the diagonal, its transpose into
H[j-block, i-block]. No two programs touch the same tile, so no atomics are needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, dot_precision, m_bucket


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def syrk_configs() -> list:
    rows = [
        # BLOCK, BLOCK_T, warps, stages
        (64, 32, 4, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 3),
    ]
    return [triton.Config({"BLOCK": b, "BLOCK_T": bt}, num_warps=w, num_stages=s) for b, bt, w, s in rows]


def _tuning_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK": 32, "BLOCK_T": 32}, num_warps=4, num_stages=1)]
    return syrk_configs()


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def gram_syrk_kernel(
    # ---- pointers
    x_ptr, h_ptr,
    # ---- sizes
    T, K, t_bucket,
    # ---- strides
    stride_xt, stride_xk, stride_hi, stride_hj,
    # ---- meta
    DOT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # ---------------------------------------------------------------- program -> tile (i <= j)
    pid = tl.program_id(0)
    j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)  # guard float rounding
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2
    offs_i = i * BLOCK + tl.arange(0, BLOCK)
    offs_j = j * BLOCK + tl.arange(0, BLOCK)
    mask_i = offs_i < K
    mask_j = offs_j < K
    offs_t = tl.arange(0, BLOCK_T)

    # ---------------------------------------------------------------- T loop
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        mask_t = tt < T
        tt = tt.to(tl.int64)  # T·K can pass 2^31 (long calibration runs of wide layers)
        xi = tl.load(x_ptr + tt[:, None] * stride_xt + offs_i[None, :] * stride_xk,
                     mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        xj = tl.load(x_ptr + tt[:, None] * stride_xt + offs_j[None, :] * stride_xk,
                     mask=mask_t[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(tl.trans(xi), xj, acc, input_precision=DOT_PRECISION)

    # ---------------------------------------------------------------- H[i, j] += acc; H[j, i] += acc^T
    # A diagonal tile is a general product of two loads, and the MMA (or BLAS in the interpreter)
    # need not round (r, c) and (c, r) alike; averaging with its transpose makes it exactly
    # symmetric (float addition commutes, the halving is exact), so H stays symmetric bit for bit.
    if i == j:
        acc = (acc + tl.trans(acc)) * 0.5
    mask = mask_i[:, None] & mask_j[None, :]
    p_ij = h_ptr + offs_i[:, None] * stride_hi + offs_j[None, :] * stride_hj
    tl.store(p_ij, tl.load(p_ij, mask=mask, other=0.0) + acc, mask=mask)
    if i != j:
        p_ji = h_ptr + offs_j[None, :] * stride_hi + offs_i[:, None] * stride_hj
        tl.store(p_ji, tl.load(p_ji, mask=mask, other=0.0) + acc, mask=mask)


gram_syrk_tuned = triton.autotune(
    configs=_tuning_configs(),
    key=["t_bucket", "K"],
    restore_value=["h_ptr"],
)(gram_syrk_kernel)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def gram_syrk(H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``H += x^T x`` in place for float32 ``H`` [K, K] and 2-D ``x`` [T, K] (fp16/bf16/fp32)."""
    if H.dtype != torch.float32:
        raise ValueError(f"H must be float32 for the SYRK kernel; got {H.dtype}")
    if x.dim() != 2 or H.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"need x [T, K] and H [K, K]; got x {tuple(x.shape)} and H {tuple(H.shape)}")
    T, K = x.shape
    if T == 0:
        return H

    def grid(meta):
        nt = triton.cdiv(K, meta["BLOCK"])
        return (nt * (nt + 1) // 2,)

    gram_syrk_tuned[grid](
        x, H, T, K, m_bucket(T), x.stride(0), x.stride(1), H.stride(0), H.stride(1),
        DOT_PRECISION=dot_precision(x.dtype),
    )
    return H
