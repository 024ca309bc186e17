"""What the block loop does with each group of layers: build the packed layers, swap them in, report them.

A builder is the block loop's processor (GPTQModel's ``LoopProcessor``): the loop
(``hf/pipeline.py``) hands it ``{name: H}`` for each group of layers sharing an input, and the
builder quantizes, initialises and builds them and adds their report rows. :class:`LayerBuilder`
quantizes (one GPTQ per group sharing H); :class:`ImportedQBuilder` keeps the Q of a GPTQ
checkpoint and only initialises the LoRA factors. Both build through ``layer_factory.build_layer`` and
report through the same rows, so every driver's report reads the same.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
from torch import nn

from ..layer_factory import LayerInit, build_layer, init_layer, linear_weight, quantize_and_init
from ..formats import QuantizedWeight
from ..nn import QuantLoRALinear
from . import moe
from .report import BlockReport, ExpertReport, LayerReport, PrepareReport, init_errors


class LayerBuilder:
    """Quantizes, initialises and builds the layers of one group sharing H, and reports them."""

    def __init__(self, plan, report: PrepareReport):
        self.plan, self.report = plan, report
        self.quant_config, self.lora_config = plan.quant_config, plan.lora_config
        self.report_mode = plan.report_mode
        self.block: Optional[BlockReport] = None  # the block being prepared, for its timings

    def inits(self, names: List[str], weights: List[torch.Tensor], H: Optional[torch.Tensor]) -> List[LayerInit]:
        """Quantized weights and LoRA factors of layers sharing ``H`` (qualified ``names``)."""
        return quantize_and_init(weights, self.quant_config, self.lora_config, H, names=names)

    def build(self, root: nn.Module, grams: Dict[str, Optional[torch.Tensor]], prefix: str = "") -> Dict[str, nn.Module]:
        """New layers for ``grams`` = ``{name under root: H}``, one quantization per distinct H."""
        groups: Dict[int, List[str]] = {}
        for name, H in grams.items():
            groups.setdefault(id(H) if H is not None else id(name), []).append(name)
        out = {}
        for names in groups.values():
            H = grams[names[0]]
            modules = [root.get_submodule(n) for n in names]
            Ws = [linear_weight(m) for m in modules]
            inits = self.inits([prefix + n for n in names], Ws, H)
            for n, m, W, init in zip(names, modules, Ws, inits):
                out[n] = build_layer(m, self.quant_config, self.lora_config, H, layer_cls=QuantLoRALinear, init=init)
                self._record(prefix + n, W, H, init)
        return out

    def build_experts(self, root: nn.Module, names: List[str], grams: Dict[str, Optional["moe.ExpertGrams"]],
                      prefix: str = "") -> None:
        """Quantize, initialise and swap in the packed expert projections ``names`` (under
        ``root``), expert e on its own ``grams[name].H[e]``, and report every expert."""
        for name in names:
            mod_name, proj = moe.split_target(name)
            module = root.get_submodule(mod_name)
            layer, builds = moe.quantize_experts(module, proj, prefix + name, grams.get(name), self.quant_config,
                                                 self.lora_config)
            moe.replace_projection(module, proj, layer)
            for e, b in enumerate(builds):
                err_q, err_i = self._errors(b.W, b.H, b.init)
                self.report.experts.append(ExpertReport(
                    name=prefix + name, expert=e, tokens=b.tokens, shape=tuple(b.init.qw.shape), err_quant=err_q,
                    err_init=err_i, bits_per_weight=b.init.qw.bits_per_weight, fallback=b.fallback,
                    quantize_s=b.init.quantize_s, init_s=b.init.init_s))
                if self.block is not None:
                    self.block.quantize_s += b.init.quantize_s
                    self.block.init_s += b.init.init_s

    def _errors(self, W, H, init):
        return init_errors(W, H, init, self.lora_config.scaling_for_rank(init.A.shape[0]), self.report_mode)

    def _record(self, name, W, H, init) -> None:
        t0 = time.perf_counter()
        err_q, err_i = self._errors(W, H, init)
        self.report.layers.append(LayerReport(
            name=name, shape=tuple(init.qw.shape), err_quant=err_q, err_init=err_i,
            bits_per_weight=init.qw.bits_per_weight, quantize_s=init.quantize_s, init_s=init.init_s))
        if self.block is not None:
            self.block.quantize_s += init.quantize_s
            self.block.init_s += init.init_s
            self.block.report_s += time.perf_counter() - t0


class ImportedQBuilder(LayerBuilder):
    """Builds each layer around the Q an existing GPTQ checkpoint holds for it (``imported``:
    ``{qualified name: QuantizedWeight}``); only the LoRA factors are computed, by the same
    ``init_layer`` as :class:`LayerBuilder`'s (joint re-quantization does not apply: Q is kept)."""

    def __init__(self, plan, report: PrepareReport, imported: Dict[str, QuantizedWeight]):
        super().__init__(plan, report)
        self.imported = imported

    def inits(self, names, weights, H):
        Hf = None if H is None else H.float()
        return [init_layer(W, self.imported[n].to(W.device), self.lora_config, Hf, n) for n, W in zip(names, weights)]
