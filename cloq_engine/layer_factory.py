"""Dense linear layers into quantized LoRA layers: quantize, initialise, swap in, freeze.

Every path that makes a quantized layer goes through here (``QuantLoRALinear.from_linear``,
``prepare_model``, the streaming prepare), so a layer is built the same way everywhere.

This module sits below ``nn.py``: it never imports the layer class. Callers pass it as
``layer_cls``, which also lets a subclass's ``from_linear`` build the subclass.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import init as init_mod
from . import linalg
from .config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from .formats import QuantizedWeight
from .quant import get_quantizer, quantize_weight


# ---------------------------------------------------------------------------------------------
# Dense layers
# ---------------------------------------------------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or Conv1D in nn.Linear's (out, in) orientation."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if is_conv1d(module):
        return module.weight.detach().t()
    raise TypeError(f"expected nn.Linear or Conv1D; got {type(module).__name__}")


def base_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the new layer's frozen floats (bias, weight view): the dense weight's float dtype."""
    dtype = module.weight.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def factor_dtype(lora_config: LoRAConfig, base: torch.dtype) -> torch.dtype:
    """The dtype of a layer's trainable LoRA factors under ``lora_config.lora_dtype``, for a layer
    replacing a dense one of dtype ``base``."""
    choice = lora_config.lora_dtype
    if choice == "base":
        return base
    if choice == "auto":  # PEFT's autocast_adapter_dtype=True: half precision up to float32
        return torch.float32 if base in (torch.float16, torch.bfloat16) else base
    return getattr(torch, choice)


# ---------------------------------------------------------------------------------------------
# Quantize and initialise
# ---------------------------------------------------------------------------------------------
def needs_calibration(quant_config: QuantConfig, lora_config: LoRAConfig, keeps_q: bool = False) -> bool:
    """Whether preparing with these configs reads the calibration Gram matrix H: the quantizer's
    or the init's registry entry says so (``needs_H``). ``keeps_q``: the Q is given (an imported
    GPTQ checkpoint), so only the init counts."""
    return (not keeps_q and get_quantizer(quant_config.method).needs_H) or init_mod.get_init(lora_config.init).needs_H


@dataclass
class LayerInit:
    """What a layer is built from: its quantized weight, LoRA factors (float32) and timings."""

    qw: QuantizedWeight
    A: torch.Tensor
    B: torch.Tensor
    quantize_s: float = 0.0
    init_s: float = 0.0
    one_shot_qw: Optional[QuantizedWeight] = None  # the plain quantizer's Q when re-quantization replaced it


def split_rows(qw: QuantizedWeight, sizes: Sequence[int]) -> List[QuantizedWeight]:
    """Split a quantized weight by output rows. Rows are independent in the packed format
    (``qweight``, ``scales`` and ``zeros`` are all [*, N]), so each part is exactly what that
    row range was quantized to."""
    if sum(sizes) != qw.out_features:
        raise ValueError(f"row sizes {list(sizes)} do not add up to out_features={qw.out_features}")
    parts, start = [], 0
    for n in sizes:
        cols = slice(start, start + n)
        parts.append(QuantizedWeight(
            qweight=qw.qweight[:, cols].contiguous(), scales=qw.scales[:, cols].contiguous(),
            zeros=None if qw.zeros is None else qw.zeros[:, cols].contiguous(), bits=qw.bits,
            group_size=qw.group_size, in_features=qw.in_features, out_features=n, method=qw.method))
        start += n
    return parts


def quantize_group(weights: Sequence[torch.Tensor], quant_config: QuantConfig,
                   H: Optional[torch.Tensor] = None) -> List[QuantizedWeight]:
    """Quantize weights that share one ``H`` (q/k/v, gate/up).

    GPTQ runs once on the weights stacked by rows: one damped Cholesky and one column sweep
    instead of one per layer. GPTQ treats rows independently (error feedback and group fits are
    per row), so this is the same algorithm as layer by layer. Other methods need no H and run
    per layer.
    """
    if len(weights) > 1 and quant_config.method == QuantMethod.GPTQ:
        stacked = torch.cat([W.float() for W in weights], dim=0)
        return split_rows(quantize_weight(stacked, quant_config, H=H), [W.shape[0] for W in weights])
    return [quantize_weight(W.float(), quant_config, H=H) for W in weights]


def init_layer(W: torch.Tensor, qw: QuantizedWeight, lora_config: LoRAConfig,
               H: Optional[torch.Tensor], name: Optional[str] = None) -> LayerInit:
    """LoRA factors of one layer whose quantized weight is known (a calibrated or SVD init), at the
    layer's own rank (``lora_config.rank_pattern``) with the config's init options."""
    t0 = time.perf_counter()
    rank = lora_config.rank if name is None else lora_config.rank_for(name)
    A, B = init_mod.init_lora(W.float(), qw, H, rank, method=lora_config.init.value,
                              scaling=lora_config.scaling_for_rank(rank), **init_mod.init_options(lora_config))
    A, B = balance_factors(A, B, lora_config, rank)
    return LayerInit(qw, A, B, init_s=time.perf_counter() - t0)


def balance_factors(A: torch.Tensor, B: torch.Tensor, lora_config: LoRAConfig, rank: int):
    """``(A, B)`` re-split with equal singular values when ``lora_config.balances()`` (same product);
    a zero B (QLoRA's init) is left as it is: its A is the random direction training starts from."""
    if not lora_config.balances() or not bool(B.any()):
        return A, B
    s = lora_config.scaling_for_rank(rank)
    B2, A2 = linalg.rebalance(s * B.double(), A.double(), s)
    return A2.to(A.dtype).contiguous(), B2.to(B.dtype).contiguous()


def quantize_and_init(weights: Sequence[torch.Tensor], quant_config: QuantConfig, lora_config: LoRAConfig,
                      H: Optional[torch.Tensor] = None, names: Optional[Sequence[str]] = None) -> List[LayerInit]:
    """Quantize and initialise layers that share one ``H`` (or a single layer); ``names`` (qualified)
    pick each layer's rank from ``lora_config.rank_pattern``."""
    Hf = None if H is None else H.float()
    names = list(names) if names is not None else [None] * len(weights)
    if init_mod.get_init(lora_config.init).requantizes or lora_config.requant_rounds:
        # LoftQ and joint re-quantization quantize inside their alternation: one layer at a time.
        out = []
        for W, name in zip(weights, names):
            t, plain = {}, []
            qw, A, B = init_mod.initialize(W.float(), quant_config, lora_config, Hf, name=name, timings=t,
                                           one_shot=plain)
            A, B = balance_factors(A, B, lora_config, lora_config.rank if name is None else lora_config.rank_for(name))
            out.append(LayerInit(qw, A, B, quantize_s=t["quantize_s"], init_s=t["init_s"],
                                 one_shot_qw=plain[0] if plain and lora_config.requant_rounds else None))
        return out
    t0 = time.perf_counter()
    qws = quantize_group(weights, quant_config, Hf)
    rows = sum(W.shape[0] for W in weights)
    t_q = time.perf_counter() - t0
    out = []
    for W, qw, name in zip(weights, qws, names):
        li = init_layer(W, qw, lora_config, Hf, name)
        li.quantize_s = t_q * W.shape[0] / rows  # a shared GPTQ is charged by rows
        out.append(li)
    return out


def build_layer(module: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                H: Optional[torch.Tensor] = None, *, layer_cls, init: Optional[LayerInit] = None,
                name: Optional[str] = None) -> nn.Module:
    """A ``layer_cls`` (QuantLoRALinear) replacing the dense ``module``: quantized, LoRA
    initialised (or from ``init`` when already computed), bias and dtype kept."""
    if init is None:
        (init,) = quantize_and_init([linear_weight(module)], quant_config, lora_config, H,
                                    names=None if name is None else [name])
    rank = init.A.shape[0]
    if rank != lora_config.rank or lora_config.rank_pattern:  # the layer carries its own rank
        lora_config = dataclasses.replace(lora_config, rank=rank, rank_pattern={})
    return layer_cls.from_quantized(init.qw, init.A, init.B, lora_config, quant_config, bias=module.bias,
                                    dtype=base_dtype(module))


# ---------------------------------------------------------------------------------------------
# Swapping and freezing
# ---------------------------------------------------------------------------------------------
def replace_modules(model: nn.Module, replacements: Dict[str, nn.Module]) -> None:
    """Swap each named submodule for its replacement, in place."""
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def is_factor(name: str) -> bool:
    """A LoRA factor's state-dict name (``...lora_A`` / ``...lora_B``: PEFT's ``lora_`` prefix)."""
    return name.rpartition(".")[2].startswith("lora_")


def stored_state(state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype], keep=()) -> Dict[str, torch.Tensor]:
    """``state`` with its dense floats in ``dtype`` (None: as they are): the LoRA factors and the
    names in ``keep`` (packed buffers) stay as they are."""
    if dtype is None:
        return state
    return {k: (v.to(dtype) if v.is_floating_point() and not is_factor(k) and k.rpartition(".")[2] not in keep
                else v) for k, v in state.items()}


def cast_dense(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's floating parameters to ``dtype`` except the LoRA factors, which keep their
    configured dtype (``model.to(dtype)`` would cast them too). Packed buffers never change, and
    other buffers (rotary frequencies) stay as the model computed them."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not is_factor(name):
            p.data = p.data.to(dtype)
    for m in model.modules():
        if hasattr(m, "base_dtype"):
            m.base_dtype = dtype


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA factors (PEFT's ``lora_`` prefix convention)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
