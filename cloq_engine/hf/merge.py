"""Dense models from prepared ones: the dequantized base Ŵ, or Ŵ + scaling·B·A merged.

One pass over both packed kinds (``packed_layer.packed_layers``): every :class:`QuantLoRALinear`
becomes the layer type it replaced (``nn.Linear``, or transformers' ``Conv1D`` for GPT-2 style
models, whose weight is stored (in, out)) with the same bias, the original type read from a
``meta`` skeleton of the model built from its config; every :class:`QuantLoRAExperts` becomes
the frozen 3-D parameter it replaced, in its original layout.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Optional

import torch
from torch import nn

from ..layer_factory import is_factor
from ..experts import QuantLoRAExperts
from ..nn import QuantLoRALinear, is_conv1d
from ..packed_layer import packed_layers
from .moe import split_target
from .targets import replace_modules

logger = logging.getLogger(__name__)


def quant_layers(model: nn.Module) -> Dict[str, QuantLoRALinear]:
    return packed_layers(model, QuantLoRALinear)


def conv1d_names(model: nn.Module, names) -> set:
    """Which of ``names`` were Conv1D in the unprepared model (from a meta skeleton of its class)."""
    config = getattr(model, "config", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return set()
    if config is None or not isinstance(model, PreTrainedModel):
        return set()
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(config))
    found = set()
    for name in names:
        try:
            if is_conv1d(skeleton.get_submodule(name)):
                found.add(name)
        except AttributeError:
            continue
    return found


def dense_layer(layer: QuantLoRALinear, weight: torch.Tensor, conv1d: bool) -> nn.Module:
    """An nn.Linear (or Conv1D) holding ``weight`` (out, in) and ``layer``'s bias, frozen."""
    out_f, in_f = weight.shape
    bias = layer.bias
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            dense = Conv1D(out_f, in_f)
        dense.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        dense.bias = nn.Parameter(bias.detach().clone() if bias is not None else
                                  torch.zeros(out_f, dtype=weight.dtype, device=weight.device), requires_grad=False)
    else:
        with torch.device("meta"):
            dense = nn.Linear(in_f, out_f, bias=bias is not None)
        dense.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return dense


def check_unwrapped(model: nn.Module, action: str) -> None:
    """Refuse, before anything changes, a model that is not the cloq model itself: a PeftModel or
    another wrapper that forwards attribute reads to the model inside it (``hasattr`` sees the inner
    model's ``cloq_config``, ``delattr`` fails on the wrapper), or a model whose cloq layers sit
    inside PEFT's adapter layers (densifying them would leave PEFT's layers over a dense base)."""
    wrapped = getattr(model, "cloq_config", None) is not None and "cloq_config" not in vars(model)
    if wrapped:
        hint = (" PEFT's adapters on cloq layers cannot be folded into a dense weight here: keep them with "
                "`peft_model.save_pretrained(dir)`, or drop them with "
                f"`cloq_engine.{action}(peft_model.unload())`") if _is_peft_model(model) else ""
        raise ValueError(f"{action} needs the cloq model itself; got a {type(model).__name__} wrapping it.{hint}")
    tuner = next((n for n, m in model.named_modules() if _is_peft_layer(m)), None)
    if tuner is not None:
        raise ValueError(f"{action}: {type(model).__name__} holds PEFT adapter layers ({tuner!r}): call "
                         f"`{action}` on the model before `peft.get_peft_model`, or on `peft_model.unload()`")


def _is_peft_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("peft.") for c in type(model).__mro__)


def _is_peft_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (``BaseTunerLayer``), checked without importing peft when it is not loaded."""
    import sys

    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is not None and isinstance(module, tuners.BaseTunerLayer)


def _forget_quantization(model: nn.Module) -> None:
    """Drop the quantization record so the dense model saves and loads as a plain model."""
    for attr in ("cloq_config", "hf_quantizer", "quantization_method"):
        if attr in vars(model):  # the model's own attributes: never one a wrapper forwards
            delattr(model, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if hasattr(config, "_is_quantized"):
            config._is_quantized = False


def dense_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter that is not a LoRA factor (its embeddings)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not is_factor(name):
            return p.dtype
    return torch.float32


def _densify(model: nn.Module, merge: bool, dtype: Optional[torch.dtype]) -> nn.Module:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating-point torch.dtype; got {dtype!r}")
    check_unwrapped(model, "merge_and_unload" if merge else "dequantized_base")
    packed = packed_layers(model)
    if not packed:
        raise ValueError(f"{type(model).__name__} has no QuantLoRALinear layer to convert")
    layers = {n: m for n, m in packed.items() if isinstance(m, QuantLoRALinear)}
    conv1d = conv1d_names(model, list(layers))
    new = {}
    with torch.no_grad():
        for name, layer in layers.items():
            target_dtype = dtype or layer.base_dtype  # as PEFT merges: into the base weight's dtype
            new[name] = dense_layer(layer, layer.dense_weight(merge).to(target_dtype), name in conv1d)
            if new[name].bias is not None:
                new[name].bias.data = new[name].bias.data.to(target_dtype)
        replace_modules(model, new)
        experts_dtype = dtype or dense_dtype(model)  # that of the (now dense) model's embeddings
        for name, layer in packed.items():
            if isinstance(layer, QuantLoRAExperts):  # back to the 3-D parameter it replaced
                mod_name, proj = split_target(name)
                module = model.get_submodule(mod_name)
                w = layer.dense_parameter(merge, experts_dtype)
                delattr(module, proj)
                module.register_parameter(proj, nn.Parameter(w, requires_grad=False))
    _forget_quantization(model)
    return model


def dequantized_base(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A copy of ``model`` whose QuantLoRALinear layers are plain layers with weight Ŵ (no LoRA).

    This is the base a PEFT adapter exported by :func:`export_peft_adapter` applies to: PEFT's
    LoRA on top of it computes what the quantized model computes. ``dtype`` defaults to each
    layer's base dtype (that of the dense layer it replaced). The input model is left unchanged.
    """
    check_unwrapped(model, "dequantized_base")  # before copying a wrapper for nothing
    return _densify(copy.deepcopy(model), merge=False, dtype=dtype)


def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Merge each QuantLoRALinear into a dense layer with weight Ŵ + scaling·B·A, in place.

    Like PEFT's ``merge_and_unload``: the model itself is modified and returned, its parameters keep
    their (frozen) ``requires_grad``, and the cloq quantization record is removed from the model and
    its config, so ``model.save_pretrained`` writes a plain dense checkpoint. ``dtype`` defaults to
    each layer's base dtype (that of the dense layer it replaced), as PEFT merges into the base
    weight's dtype.
    """
    return _densify(model, merge=True, dtype=dtype)
