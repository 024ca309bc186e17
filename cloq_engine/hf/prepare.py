"""``prepare_model``: a model goes in, a quantized model with calibrated LoRA comes out (in memory).

The in-memory driver of the prepare pipeline (docs/design.md §2): the plan (``hf/plan.py``:
targets, checks, calibration batches), the block loop (``hf/pipeline.py``) with the layer
builder (``hf/builder.py``: quantize, init, swap in, report), guarded (``hf/checks.guarded``),
then ``finish``. The streaming driver (``hf/streaming.py``) and the GPTQ import
(``hf/from_gptq.py``) run the same steps.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional

from torch import nn

from ..config import LoRAConfig, QuantConfig
from ..layer_factory import build_layer, mark_trainable, needs_calibration, quantize_and_init  # noqa: F401 (re-exported)
from .builder import LayerBuilder
from .checks import guarded
from .pipeline import finish, prepare_experts, run_blocks  # noqa: F401 (re-exported)
from .plan import check_targets, plan_prepare
from .report import (REPORT_MODES, REPORT_ROWS, BlockReport, ExpertReport, LayerReport,  # noqa: F401 (re-exported)
                     PrepareReport, relative_error)


def prepare_model(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                  calib: Optional[Iterable] = None, progress: bool = False, sequential: bool = True,
                  true_sequential: bool = True, batch_size: int = 8, report: str = "sampled") -> nn.Module:
    """Replace the target linear layers of ``model`` by :class:`QuantLoRALinear`, in place.

    Args:
        model: a Hugging Face (or any) model with nn.Linear / Conv1D layers.
        quant_config: how to quantize the base weights.
        lora_config: rank, scaling, init method and which layers to target.
        calib: iterable of input_ids tensors or of dicts of model inputs (a DataLoader works);
            required by GPTQ and the calibrated inits (cloq, quailora).
        progress: show tqdm progress bars.
        sequential: process transformer blocks in order, feeding each block the outputs of the
            already-quantized ones (GPTQ's scheme); otherwise one pass over the original model.
        true_sequential: inside a block, calibrate each group of layers sharing an input after the
            earlier groups were quantized (o_proj sees quantized q/k/v; GPTQ's true-sequential).
        batch_size: calibration sequences per forward pass (samples of equal shape are batched).
        report: per-layer errors in ``model.cloq_report``: "sampled" (at most 256 rows of each
            weight: cheap), "exact" (all rows: costs about as much as GPTQ on wide layers) or "off".

    Returns the same model with everything but the LoRA factors frozen. ``model.cloq_report``
    holds a :class:`PrepareReport` (per-layer errors, per-block timings).
    """
    plan = plan_prepare(model, quant_config, lora_config, calib, batch_size=batch_size, report=report)
    rep = plan.new_report()
    t0 = time.perf_counter()
    with guarded(model, plan):  # the caller's model put back if anything raises
        run_blocks(model, plan, LayerBuilder(plan, rep), sequential=sequential, true_sequential=true_sequential,
                   progress=progress)
        rep.total_s = time.perf_counter() - t0
        finish(model, plan, rep)
    return model


check_layers = _check_layers = check_targets  # the names used before
__all__ = ["prepare_model", "PrepareReport", "LayerReport", "BlockReport", "ExpertReport", "mark_trainable",
           "needs_calibration"]
