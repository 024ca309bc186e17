"""Empty packed layers on ``meta`` in place of a model's targets, for both layer kinds: the one
dispatch every loader uses before it assigns a checkpoint's tensors (``load_pretrained`` /
``empty_model``, transformers' ``from_pretrained`` through the cloq quantizer, the streaming
prepare's finished blocks and tail).

A target is a linear layer (nn.Linear / Conv1D: an empty :class:`~cloq_engine.nn.QuantLoRALinear`)
or a 3-D expert projection (``<experts module>.<proj>``: an empty
:class:`~cloq_engine.experts.QuantLoRAExperts`, with the model's experts implementation set to
cloq's). Both are shaped like what they replace, take that target's own rank (``rank_pattern``),
and refuse a configuration the shape cannot take naming the target.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
from torch import nn

from ..config import LoRAConfig, QuantConfig
from ..layer_factory import factor_dtype, linear_weight, replace_modules
from ..experts import QuantLoRAExperts, dense_expert_weight, use_cloq_experts
from ..nn import QuantLoRALinear
from . import moe


def _own_rank(lora_config: LoRAConfig, name: str) -> LoRAConfig:
    if not lora_config.rank_pattern:
        return lora_config
    return dataclasses.replace(lora_config, rank=lora_config.rank_for(name), rank_pattern={})


def _float_or_fp32(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.float32


def empty_layer(root: nn.Module, name: str, quant_config: QuantConfig, lora_config: LoRAConfig,
                dtype: Optional[torch.dtype] = None, prefix: str = "") -> nn.Module:
    """An empty packed layer on ``meta`` for target ``name`` of ``root`` (``prefix + name`` is its
    name in the whole model, for ``rank_pattern`` and messages). ``dtype``: the dense dtype it
    replaces (default: that of the weight it replaces)."""
    full = prefix + name
    lc = _own_rank(lora_config, full)
    if moe.is_expert_target(root, name):
        mod_name, proj = moe.split_target(name)
        module = root.get_submodule(mod_name)
        param = getattr(module, proj)
        E, out_f, in_f = dense_expert_weight(param, module.is_transposed).shape
        build = lambda: QuantLoRAExperts(E, in_f, out_f, quant_config, lc, transposed=module.is_transposed,  # noqa: E731
                                         device="meta", dtype=factor_dtype(lc, dtype or _float_or_fp32(param.dtype)))
    else:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"target {full!r} does not exist in {type(root).__name__}") from None
        try:
            out_f, in_f = linear_weight(module).shape
        except TypeError:
            raise ValueError(f"target {full!r} is a {type(module).__name__}, not a linear layer") from None
        build = lambda: QuantLoRALinear(in_f, out_f, quant_config, lc, bias=module.bias is not None,  # noqa: E731
                                        device="meta", dtype=_float_or_fp32(dtype or module.weight.dtype))
    try:
        return build()
    except ValueError as e:
        raise ValueError(f"target {full!r}: {e}") from None


def swap_in_empty_layers(root: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig, targets: List[str],
                         dtype: Optional[torch.dtype] = None, prefix: str = "") -> None:
    """Replace each of ``targets`` (names under ``root``) by :func:`empty_layer`; where any is an
    expert projection, route the experts modules through cloq's experts implementation."""
    layers = {name: empty_layer(root, name, quant_config, lora_config, dtype, prefix) for name in targets}
    experts = {n: m for n, m in layers.items() if isinstance(m, QuantLoRAExperts)}
    for name, layer in experts.items():
        mod_name, proj = moe.split_target(name)
        moe.replace_projection(root.get_submodule(mod_name), proj, layer)
    replace_modules(root, {n: m for n, m in layers.items() if n not in experts})
    if experts:
        use_cloq_experts(root)
