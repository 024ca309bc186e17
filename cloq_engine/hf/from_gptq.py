"""``prepare_from_gptq``: keep the Q of an existing GPTQ checkpoint, calibrate the LoRA init against the original W.

The GPTQ-import driver of the prepare pipeline (docs/design.md §2): the same plan
(``hf/plan.py``) with the checkpoint's layers as the targets (its layout read by
:mod:`cloq_engine.gptq_format`, AutoGPTQ / GPTQModel), the same block loop and guard, with a
builder that keeps each layer's imported Q (``hf/builder.ImportedQBuilder``) instead of
quantizing, the same report.
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from .. import gptq_format
from .. import init as init_mod
from ..config import LoRAConfig, QuantConfig
from ..layer_factory import linear_weight
from ..formats import QuantizedWeight
from .builder import ImportedQBuilder
from .checks import guarded
from .pipeline import finish, run_blocks
from .plan import plan_prepare
from .report import relative_error


def quant_config_for(cfg: gptq_format.GPTQCheckpointConfig) -> QuantConfig:
    """The QuantConfig that describes a GPTQ checkpoint's layers (ValueError if we cannot hold them)."""
    try:
        return QuantConfig(bits=cfg.bits, group_size=cfg.group_size, method="gptq", sym=cfg.sym)
    except ValueError as e:
        raise ValueError(f"this GPTQ checkpoint cannot be imported: {e}") from None


def prepare_from_gptq(model: nn.Module, gptq_dir: str, lora_config: LoRAConfig, calib: Optional[Iterable] = None,
                      progress: bool = False, max_error: Optional[float] = None, batch_size: int = 8,
                      report: str = "sampled") -> nn.Module:
    """Replace the layers that ``gptq_dir`` quantized by :class:`QuantLoRALinear` holding exactly its Q,
    with LoRA factors initialised by ``lora_config.init`` against ``model``'s original weights.

    ``model`` is the original full-precision model the checkpoint was made from (layer names must
    match). Calibrated inits ("cloq", "quailora") need ``calib`` and run block by block as
    :func:`~cloq_engine.hf.prepare_model` does; ``requant_rounds`` is ignored (Q is kept). The
    factors are those :func:`~cloq_engine.hf.prepare_model` computes for the same Q (balanced as
    ``lora_config.balance`` says), and ``model.cloq_report`` holds the same report.

    Refused with ValueError before any work (:func:`check_checkpoint_fits`): a checkpoint whose
    layer names or shapes differ from ``model``'s, that leaves out layers ``lora_config`` targets,
    or whose Q is farther from ``model``'s W than ``max_error`` (default: per layer, the smaller of
    1 and 4x the error of quantizing W itself at the checkpoint's bits and group size).
    """
    cfg = gptq_format.read_gptq_config(gptq_dir)
    quant_config = quant_config_for(cfg)
    if isinstance(lora_config, LoRAConfig) and init_mod.get_init(lora_config.init).requantizes:
        raise ValueError(f"init={lora_config.init.value!r} re-quantizes W; an imported Q is kept: use cloq, quailora, "
                         "svd or zero")
    imported: Dict[str, QuantizedWeight] = gptq_format.load_gptq_weights(gptq_dir)

    def checkpoint_layers(wanted: List[str]) -> List[str]:
        check_checkpoint_fits(model, imported, quant_config, lora_config, max_error=max_error, wanted=wanted)
        return [n for n, _ in model.named_modules() if n in imported]  # in the model's order

    plan = plan_prepare(model, quant_config, lora_config, calib, batch_size=batch_size, report=report,
                        select=checkpoint_layers, experts=False, keeps_q=True)
    rep = plan.new_report()
    t0 = time.perf_counter()
    with guarded(model, plan):
        run_blocks(model, plan, ImportedQBuilder(plan, rep, imported), progress=progress)
        rep.total_s = time.perf_counter() - t0
        finish(model, plan, rep, gptq_source=os.path.abspath(gptq_dir))
    return model


FIT_ROWS = 256  # rows of each weight the fit check measures (rows quantize independently)
FIT_VS_RTN = 4.0  # a checkpoint made from this W is within this factor of W's own RTN error


def _relative_error(W: torch.Tensor, Q: torch.Tensor) -> float:
    """||W - Q|| / ||W||: the report's weight-space error (``relative_error`` without H), as a norm ratio."""
    return math.sqrt(relative_error(W - Q, W, None))


def check_checkpoint_fits(model: nn.Module, imported: Dict[str, QuantizedWeight], quant_config: QuantConfig,
                          lora_config: LoRAConfig, max_error: Optional[float] = None,
                          wanted: Optional[List[str]] = None) -> None:
    """Refuse a GPTQ checkpoint that was not made from ``model``, saying by how much it differs:
    layer names, shapes, layers it leaves out of ``lora_config``'s targets, and the relative
    weight error ||W - Q|| / ||W|| (Q of another model is farther from W than zero is: >= 1).
    ``wanted``: the targets ``lora_config`` selects (resolved by the caller's plan; found here if None)."""
    from ..quant import quantize_weight
    from .targets import find_targets

    modules = dict(model.named_modules())
    unknown = [n for n in imported if n not in modules]
    if unknown:
        raise ValueError(f"the GPTQ checkpoint has {len(unknown)} of its {len(imported)} layers under names the model "
                         f"lacks, e.g. {unknown[:3]}: it was made from another model (pass the original)")
    shapes = [(n, tuple(linear_weight(modules[n]).shape), tuple(q.shape)) for n, q in imported.items()
              if tuple(linear_weight(modules[n]).shape) != tuple(q.shape)]
    if shapes:
        n, mine, theirs = shapes[0]
        raise ValueError(f"{len(shapes)} of the GPTQ checkpoint's {len(imported)} layers differ in shape from the "
                         f"model's, e.g. {n!r}: the model's weight is {mine}, the checkpoint's {theirs}")
    if wanted is None:
        wanted = find_targets(model, lora_config)
    left_out = [t for t in wanted if t not in imported]
    if left_out:
        raise ValueError(f"the GPTQ checkpoint quantizes {len(wanted) - len(left_out)} of the {len(wanted)} layers "
                         f"the LoRA config targets; {len(left_out)} are missing, e.g. {left_out[:3]}: was it made from "
                         "this model? (or narrow `target_modules` / `exclude` to the layers it holds)")
    rtn = QuantConfig(bits=quant_config.bits, group_size=quant_config.group_size, method="rtn", sym=quant_config.sym)
    bad = []
    with torch.no_grad():
        for name, qw in imported.items():
            W = linear_weight(modules[name]).detach().float()
            rows = torch.linspace(0, W.shape[0] - 1, min(FIT_ROWS, W.shape[0])).long()
            Q = qw.dequantize(torch.float32).to(W.device)[rows]
            W = W[rows]
            err = _relative_error(W, Q)
            own = _relative_error(W, quantize_weight(W, rtn).dequantize(torch.float32))
            limit = max_error if max_error is not None else min(1.0, FIT_VS_RTN * own)
            if err > limit:
                bad.append((err, name, own, limit))
    if bad:
        err, name, own, limit = max(bad)
        raise ValueError(f"the GPTQ checkpoint's Q does not fit the model's weights in {len(bad)} of {len(imported)} "
                         f"layers, worst {name!r}: ||W - Q|| / ||W|| = {err:.3f} where {quant_config.bits}-bit "
                         f"g{quant_config.group_size} rounding of W itself gives {own:.3f} (limit {limit:.3f}): "
                         "was it made from another model?")


