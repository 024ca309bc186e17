"""``QuantLoRALinear``: a packed quantized base weight plus a trainable LoRA branch.

The forward and backward run through :class:`QuantLoRAFunction`, which saves only ``x`` and the
small ``S = x·A^T`` and calls the active backend (torch reference, Triton, C++): no dequantized
weight is ever kept between forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import backends
from .config import LoRAConfig, QuantConfig
from .layer_factory import build_layer, is_conv1d, linear_weight  # noqa: F401  (is_conv1d, linear_weight: re-exported)
from .formats import QUANT_BUFFERS, QuantizedWeight  # noqa: F401 (QUANT_BUFFERS re-exported)
from .layer_forward import autocast_dtype, backend_region, packed_forward  # noqa: F401 (autocast_dtype re-exported)
from .packed_layer import PackedLoRALayer


class QuantLoRAFunction(torch.autograd.Function):
    """y = x·Ŵ^T + scaling·x_lora·A^T·B^T + bias, with x_lora = dropout(x) (None: x itself)."""

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, bias, qw: QuantizedWeight, scaling: float):
        backend = backends.get_backend(x.device)
        y, S = backend.forward(x, qw, lora_A, lora_B, scaling, bias=bias, x_lora=x_lora)
        ctx.save_for_backward(x, x_lora, S, lora_A, lora_B)
        ctx.qw, ctx.scaling, ctx.has_bias = qw, scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_lora, S, lora_A, lora_B = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        backend = backends.get_backend(dy.device)
        with backend_region(dy.device.type):
            dx, dx_lora, dA, dB = backend.backward(
                dy.contiguous(), x, S, ctx.qw, lora_A, lora_B, ctx.scaling, x_lora=x_lora, need_dx=need_dx
            )
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(dy.dtype) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (
            dx if ctx.needs_input_grad[0] else None,
            dx_lora if ctx.needs_input_grad[1] else None,
            dA if ctx.needs_input_grad[2] else None,
            dB if ctx.needs_input_grad[3] else None,
            dbias,
            None,
            None,
        )


class QuantLoRALinear(PackedLoRALayer):
    """A linear layer with a packed 2/3/4-bit (or NF4) base weight and a LoRA adapter.

    Buffers ``qweight``, ``scales``, ``zeros`` (see :class:`QuantizedWeight`) are never
    Parameters, so trainers do not upcast or train them, and they keep their dtypes under
    ``model.half()`` / ``model.to(torch.bfloat16)`` (only device moves apply). ``lora_A``
    (rank, in) and ``lora_B`` (out, rank) are the only trainable Parameters, in
    ``lora_config.lora_dtype`` (float32 unless asked otherwise, whatever ``dtype``); ``bias`` is
    frozen. ``dtype`` (``base_dtype``) is the dtype of the dense layer replaced: the bias, the
    ``weight`` view and a merge's default. What it shares with the experts kind (checks, buffers,
    factors, dropout, dense views) is :class:`~cloq_engine.packed_layer.PackedLoRALayer`; the
    forward wrapper is ``layer_forward.packed_forward``.

    Build it with :meth:`from_linear` (quantize + calibrated init), :meth:`from_quantized`, or
    empty (e.g. on ``meta``) from shapes and configs, then ``load_state_dict(..., assign=True)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant_config: QuantConfig,
        lora_config: LoRAConfig,
        bias: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(in_features, out_features, quant_config, lora_config, device=device, dtype=dtype)
        self.register_buffer("perm", None)  # input permutation of a GPTQ act-order import (QuantizedWeight.perm)
        self.base_dtype = dtype
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, lora_A, lora_B, lora_config: LoRAConfig,
                       quant_config: Optional[QuantConfig] = None, bias: Optional[torch.Tensor] = None,
                       dtype: Optional[torch.dtype] = None) -> "QuantLoRALinear":
        if quant_config is None:
            quant_config = QuantConfig(bits=qw.bits, group_size=qw.group_size, method=qw.method)
        dtype = dtype or lora_A.dtype
        layer = cls(qw.in_features, qw.out_features, quant_config, lora_config, bias=bias is not None,
                    device="meta", dtype=dtype)
        packed = {"qweight": qw.qweight, "scales": qw.scales, **({} if qw.zeros is None else {"zeros": qw.zeros})}
        layer._load_packed(packed, lora_A, lora_B, None if bias is None else {"bias": bias.detach().to(dtype)})
        if qw.perm is not None:
            layer.perm = qw.perm.clone()
        if layer.bias is not None:  # assign=True keeps the loaded tensor's requires_grad
            layer.bias.requires_grad_(False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                    H: Optional[torch.Tensor] = None) -> "QuantLoRALinear":
        """Quantize ``linear`` (nn.Linear or transformers' Conv1D) and initialise its LoRA factors."""
        return build_layer(linear, quant_config, lora_config, H, layer_cls=cls)

    # -- views ---------------------------------------------------------------------------------
    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                               self.in_features, self.out_features, self.method, self.perm)

    def dequantize(self) -> torch.Tensor:
        """Ŵ (out, in), float32."""
        return self.quantized_weight.dequantize()

    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Ŵ + scaling·B·A (out, in), float32 unless ``dtype``."""
        w = self.dense_weight(merge=True)
        return w if dtype is None else w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized base weight Ŵ (out, in) in ``base_dtype``: a read-only copy made on
        every access, for model code that reads ``layer.weight`` (T5 checks its dtype). The
        forward and backward never use it."""
        if self.qweight.is_meta:
            return torch.empty(self.out_features, self.in_features, dtype=self.base_dtype, device="meta")
        return self.quantized_weight.dequantize().to(self.base_dtype)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        try:  # what the cast does to a float tensor (model.half(), .to(bf16)) it does to base_dtype
            self.base_dtype = fn(torch.empty(0, dtype=self.base_dtype)).dtype
        except Exception:  # an fn for real tensors only (e.g. a distributed one): a device move
            pass
        return self

    # -- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qw = self.quantized_weight
        return packed_forward(self, x, lambda x2, x_lora: QuantLoRAFunction.apply(
            x2, x_lora, self.lora_A, self.lora_B, self.bias, qw, self.scaling), perm=self.perm)

    def extra_repr(self) -> str:
        return f"{self._repr_fields()}, bias={self.bias is not None}"

