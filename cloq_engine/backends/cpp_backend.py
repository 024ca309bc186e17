"""The C++ CPU backend: the ops of :mod:`cloq_engine.backends.torch_ref` on the ``cloq_engine._C``
extension, without ever holding a dense dequantized weight.

``x @ Ŵ^T`` and ``dy @ Ŵ`` run in one of two ways, picked by the number of rows M:

* forward with M <= ``FUSED_MAX_M`` (decode, small batches): a fused kernel dequantizes a few
  row segments of Ŵ^T at a time per thread and accumulates directly, so the packed weight is read
  once and no buffer is written;
* otherwise (and for every backward, where the fused dot-product kernel measured slower than
  MKL even at M = 1; set ``FUSED_MAX_M_BACKWARD`` to use it): K is processed in blocks of
  ``BLOCK_K`` rows of Ŵ^T, each dequantized in C++ into a [BLOCK_K, N] buffer and multiplied
  with ``addmm`` (``y += x[:, kblk] @ Ŵ^T[kblk]``, ``dx[:, kblk] += dy @ Ŵ^T[kblk]^T``).

The constants were chosen with ``benchmarks/cpu_backend.py --tune``. The small LoRA GEMMs run in torch.
Importing this module raises ImportError when the extension is unavailable (the dispatcher then
leaves ``cpp`` out of ``available_backends()``).
"""
from __future__ import annotations

import torch

from .. import _ext
from ..formats import NF4_CODEBOOK, QuantizedWeight
from . import torch_ref

_C = _ext.load()
if _C is None:
    raise ImportError(f"cpp backend unavailable: {_ext.unavailable_reason()}")

NAME = "cpp"
FUSED_MAX_M = 8  # forward rows up to which the fused kernel beats dequantize-a-block + addmm
FUSED_MAX_M_BACKWARD = 0  # the fused dx kernel never won in measurement: always blocked
BLOCK_K = 256  # rows of Ŵ^T dequantized per block (a 4 MiB fp32 buffer at N = 4096)

gram_add = torch_ref.gram_add


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_cpu(qw: QuantizedWeight, **tensors) -> None:
    if qw.qweight.device.type != "cpu":
        raise ValueError(f"the cpp backend needs CPU tensors; `qw` is on {qw.qweight.device}")
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the cpp backend needs CPU tensors; `{name}` is on {t.device}")


def _weight_args(qw: QuantizedWeight) -> tuple:
    codebook = NF4_CODEBOOK if qw.is_nf4 else None
    return qw.qweight, qw.scales, qw.zeros, codebook, qw.bits, qw.effective_group_size


def block_k_for(m: int, backward: bool = False) -> int:
    """The ``block_k`` argument of the C++ matmuls for M rows (0 selects the fused kernel)."""
    return 0 if m <= (FUSED_MAX_M_BACKWARD if backward else FUSED_MAX_M) else BLOCK_K


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    _check_cpu(qw)
    w_t = _C.dequantize_kn(*_weight_args(qw), qw.in_features, 0, qw.in_features, torch.float32)
    return w_t.t().contiguous()


def forward(x, qw: QuantizedWeight, lora_A, lora_B, scaling: float, bias=None, x_lora=None):
    if x.dim() != 2 or x.shape[1] != qw.in_features:
        raise ValueError(f"`x` must be 2-D [M, {qw.in_features}]; got shape {tuple(x.shape)}")
    _check_cpu(qw, x=x, x_lora=x_lora)
    acc = _acc_dtype(x)
    xf = x.to(acc).contiguous()
    s = (xf if x_lora is None else x_lora.to(acc)) @ lora_A.to(acc).t()
    y = torch.mm(s, lora_B.to(acc).t()).mul_(scaling)
    if bias is not None:
        y.add_(bias.to(acc))
    _C.qmm_(y, xf, *_weight_args(qw), block_k_for(x.shape[0]))
    return y.to(x.dtype), s


def backward(dy, x, S, qw: QuantizedWeight, lora_A, lora_B, scaling: float, x_lora=None, need_dx: bool = True):
    if dy.dim() != 2 or dy.shape[1] != qw.out_features:
        raise ValueError(f"`dy` must be 2-D [M, {qw.out_features}]; got shape {tuple(dy.shape)}")
    _check_cpu(qw, dy=dy, x=x)
    acc = _acc_dtype(x)
    dyf = dy.to(acc).contiguous()
    ds = scaling * (dyf @ lora_B.to(acc))  # [M, r]
    d_b = scaling * (dyf.t() @ S.to(acc))  # [N, r]
    d_a = ds.t() @ (x if x_lora is None else x_lora).to(acc)  # [r, K]
    dx = dx_lora = None
    if need_dx:
        if x_lora is None:
            dxf = ds @ lora_A.to(acc)
        else:
            dx_lora = (ds @ lora_A.to(acc)).to(x_lora.dtype)
            dxf = torch.zeros(dy.shape[0], qw.in_features, dtype=acc)
        _C.qmm_t_(dxf, dyf, *_weight_args(qw), block_k_for(dy.shape[0], backward=True))
        dx = dxf.to(x.dtype)
    return dx, dx_lora, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype)
