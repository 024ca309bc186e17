"""The Triton backend for CUDA tensors: packed-weight kernels where they win, cuBLAS elsewhere.

Same functions and conventions as :mod:`.torch_ref` (the spec), except that ``S`` comes back in
x's dtype (the dtype cuBLAS consumes it in; float32 for float32 inputs). This module is the only
place that picks a kernel by M, from the tables below. Three paths compute a product with Ŵ:

* ``gemv`` (decode): :mod:`..kernels.gemv` streams the packed words once; ``S = x·Aᵀ`` is one
  tiny cuBLAS call, the LoRA up-projection and the bias are the GEMV's epilogue (two launches).
* ``fused`` (mid M): the tiled dequant-in-registers GEMMs (:mod:`..kernels.dequant_gemm`,
  :mod:`..kernels.dequant_gemm_t`): they read only the packed weight, which pays while the GEMM
  is too small to hide writing and re-reading a dense Ŵ.
* ``dequant_mm`` (training, prefill): :func:`..kernels.dequant.dequant_into` writes Ŵᵀ in x's
  dtype into a per-device workspace (:mod:`.workspace`), laid out for ONE cuBLAS call per product
  with the LoRA folded in: forward ``y = [x | S]·[Ŵᵀ ; s·Bᵀ] (+ bias)``, backward
  ``dX = [dY | dS]·[Ŵᵀ | Aᵀ]ᵀ``, where copying the activation side costs less than one more pass
  over the output; otherwise (inner > outer: down_proj's forward, gate/up's dX) the LoRA term is a
  separate ``addmm_`` (``y = x·Ŵᵀ; y += s·S·Bᵀ``). ``CLOQ_LORA_FOLD`` forces one form, to measure both.

``S``, ``dS``, ``dA``, ``dB`` are always ``torch.mm`` (cuBLAS), in x's dtype with float32
accumulation (as PEFT LoRA computes them), then cast to the parameters' dtypes. Nothing
dequantized is saved for backward: the backward dequantizes again into the same workspace.
The launches are ``torch.library.custom_op``s with fake implementations, so ``torch.compile``
traces through them. Inputs the kernels do not cover (float64, for gradcheck) use the reference.
Importing this module requires triton; the dispatcher treats an import failure as "unavailable".
"""
from __future__ import annotations

import logging
import math
import os
from enum import Enum
from typing import List, Optional, Tuple

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)
from torch import Tensor

from ..formats import QuantizedWeight
from ..kernels.dequant import dequant, dequant_into
from ..kernels.dequant_gemm import dequant_gemm
from ..kernels.dequant_gemm_t import dequant_gemm_t
from ..kernels.gemv import MAX_M as GEMV_MAX_M
from ..kernels.gemv import gemv
from ..kernels.gram_syrk import gram_syrk
from ..kernels.utils import codebook_on
from . import torch_ref, workspace

logger = logging.getLogger(__name__)

NAME = "triton"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Kernel policy: the path by M (tokens in the call). Every crossover below is TO BE MEASURED on
# the target GPU with `cloq bench kernels` (its `path` column times each path at each M).
# What is measured (H100, bf16, issue 9): dequant + cuBLAS beats the tiled fused GEMM at M = 2048
# and 8192 (forward and backward); the GEMV is the decode path (M <= 16). The mid-M bound is an
# estimate: writing and re-reading a dense bf16 Ŵ costs about as much as a fused GEMM running at
# 17% of the bf16 peak (as measured at large M) somewhere near M ~ 170 for a 4096x14336 layer.
# ---------------------------------------------------------------------------------------------
class Path(str, Enum):
    GEMV = "gemv"
    FUSED = "fused"
    DEQUANT_MM = "dequant_mm"


class LoraFold(str, Enum):
    CONCAT = "concat"  # one GEMM per product over [x | S] and [Ŵᵀ ; s·Bᵀ]
    ADDMM = "addmm"  # base GEMM, then a rank-r addmm_


FORWARD_PATHS = ((GEMV_MAX_M, Path.GEMV), (128, Path.FUSED), (math.inf, Path.DEQUANT_MM))  # (max M, path)
BACKWARD_PATHS = ((128, Path.FUSED), (math.inf, Path.DEQUANT_MM))


def _forced(var: str, allowed) -> Optional[str]:
    value = os.environ.get(var, "").strip().lower()
    if not value:
        return None
    if value not in allowed:
        raise ValueError(f"{var} must be one of {sorted(allowed)}; got {value!r}")
    return value


def forward_path(m: int) -> Path:
    """Path for a forward over ``m`` rows (``CLOQ_TRITON_PATH`` forces one, for measurements;
    the GEMV only ever takes M <= 16)."""
    forced = _forced("CLOQ_TRITON_PATH", {p.value for p in Path})
    if forced is not None and (forced != Path.GEMV or m <= GEMV_MAX_M):
        return Path(forced)
    return next(path for max_m, path in FORWARD_PATHS if m <= max_m)


def backward_path(m: int) -> Path:
    forced = _forced("CLOQ_TRITON_PATH", {p.value for p in Path})
    if forced is not None and forced != Path.GEMV:
        return Path(forced)
    return next(path for max_m, path in BACKWARD_PATHS if m <= max_m)


def lora_fold(inner: int, outer: int) -> LoraFold:
    """How the LoRA term joins a product ``out[M, outer] = a[M, inner]·W``: concatenation copies the
    activation side ``a`` (M x inner elements) once, ``addmm_`` re-reads and re-writes the output
    (M x outer) once more; the cheaper one wins (``CLOQ_LORA_FOLD`` forces one, for measurements).
    Forward: inner K, outer N; dX: inner N, outer K (so down_proj's forward and gate/up's dX addmm)."""
    forced = _forced("CLOQ_LORA_FOLD", {f.value for f in LoraFold})
    if forced is not None:
        return LoraFold(forced)
    return LoraFold.CONCAT if inner <= outer else LoraFold.ADDMM


def uses_gemv(m: int) -> bool:
    return forward_path(m) == Path.GEMV


def _codebook(scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    return codebook_on(scales.device) if zeros is None else scales


def _gemv_scratch(device):
    def scratch(numel, dtype, zeroed):
        return workspace.buffer((numel,), dtype, device, slot="gemv_lock" if zeroed else "gemv_part", zeroed=zeroed)
    return scratch


# ---------------------------------------------------------------------------------------------
# The dequant + cuBLAS products
# ---------------------------------------------------------------------------------------------
def _padded_rank(r: int) -> int:
    """The rank rounded up to 8, so the concatenated operands keep 16-byte aligned rows for cuBLAS
    (the pad rows/columns are zero in both operands)."""
    return -(-r // 8) * 8


def _concat_forward(x, S, B, bias, scaling, fill):
    """y = [x | S | 0]·[Ŵᵀ ; s·Bᵀ ; 0] (+ bias): one GEMM, x copied once (M x K)."""
    M, K = x.shape
    N, r = B.shape
    rp = _padded_rank(r)
    W1 = workspace.buffer((K + rp, N), x.dtype, x.device)
    fill(W1[:K])
    torch.mul(B.t(), scaling, out=W1[K:K + r])
    xs = torch.empty((M, K + rp), dtype=x.dtype, device=x.device)
    xs[:, :K].copy_(x)
    xs[:, K:K + r].copy_(S)
    if rp > r:
        W1[K + r:].zero_()
        xs[:, K + r:].zero_()
    return torch.mm(xs, W1) if bias is None else torch.addmm(bias, xs, W1)


def _addmm_forward(x, S, B, bias, scaling, fill):
    """y = x·Ŵᵀ (+ bias), then y += s·S·Bᵀ in place: y (M x N) is read and written once more."""
    K, N = x.shape[1], B.shape[0]
    Wt = workspace.buffer((K, N), x.dtype, x.device)
    fill(Wt)
    y = torch.mm(x, Wt) if bias is None else torch.addmm(bias, x, Wt)
    return y.addmm_(S, B.t(), alpha=scaling)


def _concat_input_grad(dy, dS, A, K, fill):
    """dX = [dY | dS | 0]·[Ŵᵀ | Aᵀ | 0]ᵀ: one GEMM, dY copied once (M x N)."""
    M, N = dy.shape
    r = dS.shape[1]
    rp = _padded_rank(r)
    W2 = workspace.buffer((K, N + rp), dy.dtype, dy.device)
    fill(W2[:, :N])
    W2[:, N:N + r].copy_(A.t())
    dys = torch.empty((M, N + rp), dtype=dy.dtype, device=dy.device)
    dys[:, :N].copy_(dy)
    dys[:, N:N + r].copy_(dS)
    if rp > r:
        W2[:, N + r:].zero_()
        dys[:, N + r:].zero_()
    return torch.mm(dys, W2.t())


def _addmm_input_grad(dy, dS, A, K, fill):
    """dX = dY·Ŵ, then dX += dS·A in place: dX (M x K) is read and written once more."""
    Wt = workspace.buffer((K, dy.shape[1]), dy.dtype, dy.device)
    fill(Wt)
    dx = torch.mm(dy, Wt.t())
    return dx if dS is None else dx.addmm_(dS, A)


FORWARD_FOLDS = {LoraFold.CONCAT: _concat_forward, LoraFold.ADDMM: _addmm_forward}
INPUT_GRAD_FOLDS = {LoraFold.CONCAT: _concat_input_grad, LoraFold.ADDMM: _addmm_input_grad}


def _dequant_fill(qweight, scales, zeros, bits: int, group_size: int, K: int):
    codebook = _codebook(scales, zeros)
    return lambda dst: dequant_into(dst, qweight, scales, zeros, codebook, bits, group_size, K)


def _dequant_mm_forward(x: Tensor, qweight, scales, zeros, S: Tensor, B: Tensor, bias: Optional[Tensor],
                        scaling: float, bits: int, group_size: int) -> Tensor:
    """y = x·Ŵᵀ + scaling·S·Bᵀ (+ bias) with one dequant launch and one (or two) cuBLAS calls."""
    K, N = x.shape[1], qweight.shape[1]
    bias = None if bias is None else bias.to(x.dtype)
    fold = FORWARD_FOLDS[lora_fold(inner=K, outer=N)]
    return fold(x, S, B, bias, scaling, _dequant_fill(qweight, scales, zeros, bits, group_size, K))


def _dequant_mm_input_grad(dy: Tensor, qweight, scales, zeros, dS: Optional[Tensor], A: Tensor, bits: int,
                           group_size: int, K: int) -> Tensor:
    """dX = dY·Ŵ (+ dS·A) with one dequant launch and one (or two) cuBLAS calls."""
    fill = _dequant_fill(qweight, scales, zeros, bits, group_size, K)
    fold = LoraFold.ADDMM if dS is None else lora_fold(inner=dy.shape[1], outer=K)
    return INPUT_GRAD_FOLDS[fold](dy, dS, A, K, fill)


# ---------------------------------------------------------------------------------------------
# Custom ops (tensors and scalars only; a QuantizedWeight is passed as its buffers)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("cloq_engine::triton_forward", mutates_args=())
def _forward_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, bias: Optional[Tensor], x_lora: Optional[Tensor], scaling: float, bits: int,
                group_size: int) -> Tuple[Tensor, Tensor]:
    K = x.shape[1]
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    S = torch.mm(x if x_lora is None else x_lora, A.t())
    path = forward_path(x.shape[0])
    if x.shape[0] == 0:  # nothing to launch
        y = x.new_zeros((0, qweight.shape[1]))
    elif path == Path.GEMV:
        y = gemv(x, qweight, scales, zeros, _codebook(scales, zeros), S, B, bias, scaling, bits, group_size, K,
                 scratch=_gemv_scratch(x.device))
    elif path == Path.FUSED:
        y = dequant_gemm(x, qweight, scales, zeros, _codebook(scales, zeros), S, B, bias, scaling, bits,
                         group_size, K)
    else:
        y = _dequant_mm_forward(x, qweight, scales, zeros, S, B, bias, scaling, bits, group_size)
    return y, S


@_forward_op.register_fake
def _(x, qweight, scales, zeros, lora_A, lora_B, bias, x_lora, scaling, bits, group_size):
    return x.new_empty((x.shape[0], qweight.shape[1])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("cloq_engine::triton_lora_grads", mutates_args=())
def _lora_grads_op(dy: Tensor, x_lora: Tensor, S: Tensor, lora_A: Tensor, lora_B: Tensor,
                   scaling: float) -> Tuple[Tensor, Tensor, Tensor]:
    dt = dy.dtype
    dS = torch.mm(dy, lora_B.to(dt)).mul_(scaling)  # [M, r]
    dB = torch.mm(dy.t(), S.to(dt)).mul_(scaling).to(lora_B.dtype)  # [N, r]
    dA = torch.mm(dS.t(), x_lora.to(dt)).to(lora_A.dtype)  # [r, K]
    return dS, dA, dB


@_lora_grads_op.register_fake
def _(dy, x_lora, S, lora_A, lora_B, scaling):
    return dy.new_empty((dy.shape[0], lora_B.shape[1])), torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.custom_op("cloq_engine::triton_input_grad", mutates_args=())
def _input_grad_op(dy: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], dS: Optional[Tensor],
                   lora_A: Tensor, bits: int, group_size: int, in_features: int, out_dtype: torch.dtype) -> Tensor:
    A = lora_A.to(dy.dtype)
    if dy.shape[0] == 0:
        dx = dy.new_zeros((0, in_features))
    elif backward_path(dy.shape[0]) == Path.FUSED:
        dx = dequant_gemm_t(dy, qweight, scales, zeros, _codebook(scales, zeros), dS, A, bits, group_size,
                            in_features, out_dtype)
    else:
        dx = _dequant_mm_input_grad(dy, qweight, scales, zeros, dS, A, bits, group_size, in_features)
    return dx.to(out_dtype)


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
            dx_lora = torch.mm(dS, lora_A.to(dS.dtype)).to(x_lora.dtype).reshape(x_lora.shape)
    return dx, dx_lora, dA, dB


def gram_add(H: Tensor, x: Tensor) -> Tensor:
    if H.dtype != torch.float32 or x.dim() != 2:
        return torch_ref.gram_add(H, x)
    if x.dtype not in KERNEL_DTYPES:
        x = x.to(torch.float32)
    _gram_add_op(H, x)
    return H


__all__: List[str] = ["NAME", "Path", "LoraFold", "FORWARD_PATHS", "BACKWARD_PATHS", "forward_path", "backward_path",
                      "lora_fold", "dequantize", "forward", "backward", "gram_add", "uses_gemv"]
