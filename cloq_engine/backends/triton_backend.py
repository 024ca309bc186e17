"""The Triton backend: fused dequant-matmul + LoRA kernels for CUDA tensors.

Same functions and conventions as :mod:`.torch_ref` (the spec). This module is the only place that
picks a kernel by M: split-K GEMV for M <= 16 (decode), tiled ``tl.dot`` GEMM otherwise. The kernel
launches are wrapped as ``torch.library.custom_op`` ops (``cloq_engine::...``) with fake (meta)
implementations, so ``torch.compile`` traces through them.

Inputs the kernels do not cover fall back to the torch reference: float64 tensors (gradcheck) and
a float64 Gram matrix. NF4 runs in the kernels (codebook gathered from a 16-entry table).
Importing this module requires triton; the dispatcher treats an import failure as "unavailable".
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
from torch import Tensor

from ..formats import QuantizedWeight
from ..kernels.dequant import dequant
from ..kernels.dequant_gemm import dequant_gemm
from ..kernels.dequant_gemm_t import dequant_gemm_t
from ..kernels.dequant_gemv_splitk import MAX_M as GEMV_MAX_M
from ..kernels.dequant_gemv_splitk import dequant_gemv_splitk
from ..kernels.gram_syrk import gram_syrk
from ..kernels.lora_matmul import lora_matmul
from ..kernels.utils import codebook_on
from . import torch_ref

logger = logging.getLogger(__name__)

NAME = "triton"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Kernel policy
# ---------------------------------------------------------------------------------------------
def uses_gemv(m: int) -> bool:
    """Split-K GEMV for decode-sized M, tiled GEMM above."""
    return m <= GEMV_MAX_M


def _codebook(scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    return codebook_on(scales.device) if zeros is None else scales


# ---------------------------------------------------------------------------------------------
# Custom ops (tensors and scalars only; a QuantizedWeight is passed as its buffers)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("cloq_engine::triton_forward", mutates_args=())
def _forward_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, bias: Optional[Tensor], x_lora: Optional[Tensor], scaling: float, bits: int,
                group_size: int) -> Tuple[Tensor, Tensor]:
    K = x.shape[1]
    S = lora_matmul(x if x_lora is None else x_lora, lora_A.t())
    launch = dequant_gemv_splitk if uses_gemv(x.shape[0]) else dequant_gemm
    y = launch(x, qweight, scales, zeros, _codebook(scales, zeros), S, lora_B, bias, scaling, bits, group_size, K)
    return y, S


@_forward_op.register_fake
def _(x, qweight, scales, zeros, lora_A, lora_B, bias, x_lora, scaling, bits, group_size):
    return x.new_empty((x.shape[0], qweight.shape[1])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("cloq_engine::triton_lora_grads", mutates_args=())
def _lora_grads_op(dy: Tensor, x_lora: Tensor, S: Tensor, lora_A: Tensor, lora_B: Tensor,
                   scaling: float) -> Tuple[Tensor, Tensor, Tensor]:
    dS = lora_matmul(dy, lora_B, scaling)  # [M, r] float32
    dB = lora_matmul(dy.t(), S, scaling, out_dtype=lora_B.dtype)  # [N, r]
    dA = lora_matmul(dS.t(), x_lora, 1.0, out_dtype=lora_A.dtype)  # [r, K]
    return dS, dA, dB


@_lora_grads_op.register_fake
def _(dy, x_lora, S, lora_A, lora_B, scaling):
    return dy.new_empty((dy.shape[0], lora_B.shape[1]), dtype=torch.float32), torch.empty_like(lora_A), \
        torch.empty_like(lora_B)


@torch.library.custom_op("cloq_engine::triton_input_grad", mutates_args=())
def _input_grad_op(dy: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], dS: Optional[Tensor],
                   lora_A: Tensor, bits: int, group_size: int, in_features: int, out_dtype: torch.dtype) -> Tensor:
    return dequant_gemm_t(dy, qweight, scales, zeros, _codebook(scales, zeros), dS, lora_A, bits, group_size,
                          in_features, out_dtype)


@_input_grad_op.register_fake
def _(dy, qweight, scales, zeros, dS, lora_A, bits, group_size, in_features, out_dtype):
    return dy.new_empty((dy.shape[0], in_features), dtype=out_dtype)


@torch.library.custom_op("cloq_engine::triton_gram_add", mutates_args=("H",))
def _gram_add_op(H: Tensor, x: Tensor) -> None:
    gram_syrk(H, x)


@_gram_add_op.register_fake
def _(H, x):
    return None


# ---------------------------------------------------------------------------------------------
# Backend API (see torch_ref for the contract)
# ---------------------------------------------------------------------------------------------
def _kernel_ok(*tensors) -> bool:
    return all(t is None or t.dtype in KERNEL_DTYPES for t in tensors)


def dequantize(qw: QuantizedWeight) -> Tensor:
    return dequant(qw.qweight, qw.scales, qw.zeros, _codebook(qw.scales, qw.zeros), qw.bits,
                   qw.effective_group_size, qw.in_features)


def forward(x, qw: QuantizedWeight, lora_A, lora_B, scaling: float, bias=None, x_lora=None):
    if not _kernel_ok(x, x_lora, lora_A, lora_B, bias):
        return torch_ref.forward(x, qw, lora_A, lora_B, scaling, bias=bias, x_lora=x_lora)
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"x has last dimension {x.shape[-1]}; expected in_features={qw.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, qw.in_features)
    xl2 = None if x_lora is None else x_lora.reshape(-1, qw.in_features)
    y, S = _forward_op(x2, qw.qweight, qw.scales, qw.zeros, lora_A, lora_B, bias, xl2, float(scaling), qw.bits,
                       qw.effective_group_size)
    return y.reshape(*lead, qw.out_features), S.reshape(*lead, S.shape[-1])


def backward(dy, x, S, qw: QuantizedWeight, lora_A, lora_B, scaling: float, x_lora=None, need_dx: bool = True):
    if not _kernel_ok(dy, x, x_lora, lora_A, lora_B):
        return torch_ref.backward(dy, x, S, qw, lora_A, lora_B, scaling, x_lora=x_lora, need_dx=need_dx)
    K, N = qw.in_features, qw.out_features
    dy2 = dy.reshape(-1, N)
    x2 = x.reshape(-1, K)
    xl2 = x2 if x_lora is None else x_lora.reshape(-1, K)
    S2 = S.reshape(-1, S.shape[-1])
    dS, dA, dB = _lora_grads_op(dy2, xl2, S2, lora_A, lora_B, float(scaling))
    dx = dx_lora = None
    if need_dx:
        fused = x_lora is None
        dx = _input_grad_op(dy2, qw.qweight, qw.scales, qw.zeros, dS if fused else None, lora_A, qw.bits,
                            qw.effective_group_size, K, x.dtype).reshape(x.shape)
        if not fused:
            dx_lora = lora_matmul(dS, lora_A, out_dtype=x_lora.dtype).reshape(x_lora.shape)
    return dx, dx_lora, dA, dB


def gram_add(H: Tensor, x: Tensor) -> Tensor:
    if H.dtype != torch.float32 or x.dim() != 2:
        return torch_ref.gram_add(H, x)
    if x.dtype not in KERNEL_DTYPES:
        x = x.to(torch.float32)
    _gram_add_op(H, x)
    return H


__all__: List[str] = ["NAME", "dequantize", "forward", "backward", "gram_add", "uses_gemv"]
