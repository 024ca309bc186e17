"""Strided small GEMM for the LoRA factors: C[P, Q] = alpha · L[P, T] @ R[T, Q], float32.

One kernel serves every low-rank product of the forward and backward passes (transposes are just
strides): ``S = X·A^T``, ``dS = s·dY·B``, ``dB = s·dY^T·S``, ``dA = dS^T·X`` and ``dX_lora = dS·A``.
Operands are upcast to float32 before the product (exact products, ``ieee`` dot), so half and
bfloat16 activations lose nothing here; one side of each product has the LoRA rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def lora_matmul_configs() -> list:
    """Shipped block shapes (picked by :func:`pick_blocks`; the compile check covers each)."""
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_T": bt}, num_warps=w, num_stages=2)
        for bp, bq, bt, w in [(16, 16, 32, 4), (16, 64, 64, 4), (64, 16, 64, 4), (64, 64, 32, 4), (16, 128, 32, 4)]
    ]


def pick_blocks(P: int, Q: int) -> dict:
    """The shipped config whose tile best fits a [P, Q] output (one side is usually the rank)."""
    def cost(cfg):
        bp, bq = cfg.kwargs["BLOCK_P"], cfg.kwargs["BLOCK_Q"]
        waste = triton.cdiv(P, bp) * bp * triton.cdiv(Q, bq) * bq
        return (waste, -(bp * bq))

    return min(lora_matmul_configs(), key=cost)


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def lora_matmul_kernel(
    # ---- pointers
    l_ptr, r_ptr, c_ptr,
    # ---- sizes
    P, Q, T,
    # ---- strides
    stride_lp, stride_lt, stride_rt, stride_rq, stride_cp, stride_cq,
    # ---- scalars
    alpha,
    # ---- meta
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, BLOCK_T)
    mask_p = offs_p < P
    mask_q = offs_q < Q

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + offs_t
        a = tl.load(l_ptr + offs_p[:, None] * stride_lp + tt[None, :] * stride_lt,
                    mask=mask_p[:, None] & (tt[None, :] < T), other=0.0).to(tl.float32)
        b = tl.load(r_ptr + tt[:, None] * stride_rt + offs_q[None, :] * stride_rq,
                    mask=(tt[:, None] < T) & mask_q[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")

    tl.store(c_ptr + offs_p[:, None] * stride_cp + offs_q[None, :] * stride_cq,
             (alpha * acc).to(c_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
def lora_matmul(L: torch.Tensor, R: torch.Tensor, alpha: float = 1.0, out_dtype=torch.float32) -> torch.Tensor:
    """alpha · L @ R for 2-D ``L`` [P, T] and ``R`` [T, Q] (any strides), accumulated in float32."""
    if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0]:
        raise ValueError(f"lora_matmul needs [P, T] @ [T, Q]; got {tuple(L.shape)} and {tuple(R.shape)}")
    P, T = L.shape
    Q = R.shape[1]
    c = torch.empty((P, Q), dtype=out_dtype, device=L.device)
    if P == 0 or Q == 0:
        return c
    cfg = pick_blocks(P, Q)
    grid = (triton.cdiv(P, cfg.kwargs["BLOCK_P"]), triton.cdiv(Q, cfg.kwargs["BLOCK_Q"]))
    lora_matmul_kernel[grid](
        L, R, c, P, Q, T,
        L.stride(0), L.stride(1), R.stride(0), R.stride(1), c.stride(0), c.stride(1),
        float(alpha),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs,
    )
    return c
