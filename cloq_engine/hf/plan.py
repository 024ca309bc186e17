"""The plan step every prepare driver runs first: what to quantize and with what, checked before any work.

:func:`plan_prepare` resolves the targets once (linear layers, then the 3-D expert projections),
fits the LoRA ranks to them, checks every target against the configs, checks the weights and the
calibration samples, warns where the result cannot be trusted, batches the calibration samples,
and decides from the quantizer and init registries (``needs_H``) whether calibration is needed.
The in-memory (:func:`~cloq_engine.hf.prepare.prepare_model`), streaming
(:func:`~cloq_engine.hf.streaming.prepare_pretrained`) and GPTQ-import
(:func:`~cloq_engine.hf.from_gptq.prepare_from_gptq`) drivers all start here, so a new option
or check touches this file only (docs/design.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

from torch import nn

from .. import calib as calib_mod
from ..config import LoRAConfig, QuantConfig
from ..layer_factory import needs_calibration
from ..packed_layer import check_layer_shape
from . import moe
from .checks import (check_calibration, check_finite_weights, check_not_prepared, warn_underdetermined,
                     warn_untargeted)
from .fit import fit_ranks, warn_tied_heads
from .report import REPORT_MODES, PrepareReport
from .targets import find_targets


@dataclass
class PreparePlan:
    """What a prepare does: the configs (ranks fitted to the layers), the targets, the calibration
    batches, and what the checks found (copied into every report)."""

    quant_config: QuantConfig
    lora_config: LoRAConfig
    targets: List[str]  # linear layers (nn.Linear / Conv1D), in the model's order
    expert_targets: List[str]  # packed expert projections (hf/moe.py)
    batches: List[dict]  # calibration samples batched on the model's device; [] without calibration
    needs_calibration: bool  # the quantizer or the init reads H (their registries' needs_H)
    report_mode: str = "sampled"
    calib_tokens: int = 0
    underdetermined: Dict[str, int] = field(default_factory=dict)
    full_precision: List[str] = field(default_factory=list)

    @property
    def all_targets(self) -> List[str]:
        return self.targets + self.expert_targets

    def new_report(self) -> PrepareReport:
        return PrepareReport(calib_tokens=self.calib_tokens, underdetermined=dict(self.underdetermined),
                             full_precision=list(self.full_precision))


Select = Callable[[List[str]], List[str]]
LayoutCheck = Callable[[nn.Module, List[str], List[str]], None]


def check_targets(model: nn.Module, targets: List[str], quant_config: QuantConfig, lora_config: LoRAConfig) -> None:
    """Fail before any work if a target cannot take this configuration."""
    from ..layer_factory import linear_weight

    experts = [t for t in targets if moe.is_expert_target(model, t)]
    for name in targets:
        if name in experts:
            continue
        out_f, in_f = linear_weight(model.get_submodule(name)).shape
        check_layer_shape(in_f, out_f, quant_config.group_size, lora_config.rank_for(name), f"layer {name!r}: ")
    moe.check_expert_targets(model, experts, quant_config, lora_config)


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    check_not_prepared(model)


def check_configs(quant_config, lora_config, report: str = "sampled") -> None:
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig; got {type(quant_config).__name__}")
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"`lora_config` must be a LoRAConfig; got {type(lora_config).__name__}")
    if report not in REPORT_MODES:
        raise ValueError(f"`report` must be one of {REPORT_MODES}; got {report!r}")


def plan_prepare(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                 calib: Optional[Iterable] = None, *, batch_size: int = 8, device=None, report: str = "sampled",
                 select: Optional[Select] = None, experts: bool = True, keeps_q: bool = False,
                 check_finite: Optional[Callable[[nn.Module], None]] = None,
                 check_layout: Optional[LayoutCheck] = None) -> PreparePlan:
    """Check everything before any work and say what the prepare will do.

    In order: the model (an nn.Module, not prepared already) and the configs; the targets
    (``find_targets``, then ``select(targets)`` where a driver narrows or replaces them: the GPTQ
    import takes the checkpoint's layers) with their ranks fitted (``hf/fit.py``) and each checked
    against the configs; ``check_layout(model, targets, expert_targets)`` (the streaming driver's
    own refusals); the weights' finiteness (``check_finite``, default the model's parameters); the
    calibration samples (vocabulary, positions; a warning when fewer tokens than a target's
    in_features) and the weights left in full precision. ``experts=False`` leaves the 3-D expert
    projections alone; ``keeps_q``: the quantized weights are given, so only the init decides
    whether calibration is needed. Raises ValueError when it is needed and ``calib`` is empty.
    """
    check_model(model)
    check_configs(quant_config, lora_config, report)
    targets = find_targets(model, lora_config)
    if select is not None:
        targets = select(targets)
    lora_config = fit_ranks(model, targets, lora_config)
    expert_targets = moe.find_expert_targets(model, lora_config) if experts else []
    check_targets(model, targets + expert_targets, quant_config, lora_config)
    warn_tied_heads(model, targets, quant_config, lora_config)
    if check_layout is not None:
        check_layout(model, targets, expert_targets)
    (check_finite or check_finite_weights)(model)
    calib = None if calib is None else list(calib)
    tokens = check_calibration(model, calib) if calib else 0
    needed = needs_calibration(quant_config, lora_config, keeps_q=keeps_q)
    underdetermined = warn_underdetermined(model, targets, tokens, needed)
    untargeted = warn_untargeted(model, targets + expert_targets)
    if device is None:
        device = next(model.parameters()).device
    batches = calib_mod.batch_samples(calib, batch_size, device) if calib else []
    if not batches and needed:
        what = f"init={lora_config.init.value!r}" if keeps_q else \
            f"method={quant_config.method.value!r} with init={lora_config.init.value!r}"
        raise ValueError(f"{what} needs calibration data: pass `calib` (input_ids tensors or dicts of model inputs)")
    return PreparePlan(quant_config, lora_config, targets, expert_targets, batches, needed, report, tokens,
                       underdetermined, untargeted)
