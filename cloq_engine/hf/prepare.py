"""``prepare_model``: a model goes in, a quantized model with calibrated LoRA comes out."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
from torch import nn

from .. import calib as calib_mod
from ..config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from .. import init as init_mod
from ..nn import QuantLoRALinear, linear_weight
from .targets import find_targets, replace_modules

logger = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What preparation did to one layer. Errors are relative: ||X (W - Ŵ')^T||^2 / ||X W^T||^2,
    with Ŵ' = Q (quantized only) and Q + scaling·B·A (after init); weight-space when no H."""

    name: str
    shape: tuple
    err_quant: float
    err_init: float
    bits_per_weight: float
    quantize_s: float
    init_s: float


@dataclass
class PrepareReport:
    layers: List[LayerReport] = field(default_factory=list)
    capture_s: float = 0.0
    total_s: float = 0.0

    @property
    def quantize_s(self) -> float:
        return sum(r.quantize_s for r in self.layers)

    @property
    def init_s(self) -> float:
        return sum(r.init_s for r in self.layers)


def needs_calibration(quant_config: QuantConfig, lora_config: LoRAConfig) -> bool:
    return quant_config.method == QuantMethod.GPTQ or lora_config.init in (InitMethod.CLOQ, InitMethod.QUAILORA)


def _relative_error(M: torch.Tensor, W: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    if H is None:
        return float(M.pow(2).sum() / W.pow(2).sum().clamp(min=1e-30))
    num = ((M @ H) * M).sum()
    den = ((W @ H) * W).sum().clamp(min=1e-30)
    return float(num / den)


def build_layer(name: str, module: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                H: Optional[torch.Tensor], report: Optional[PrepareReport] = None) -> QuantLoRALinear:
    """Quantize one linear layer, initialise its LoRA factors, and record what happened."""
    W = linear_weight(module).float()
    Hf = None if H is None else H.float()
    timings = {}
    qw, A, B = init_mod.initialize(W, quant_config, lora_config, Hf, name=name, timings=timings)
    t_q, t_i = timings["quantize_s"], timings["init_s"]
    lora_config = dataclasses.replace(lora_config, rank=A.shape[0], rank_pattern={})  # this layer's rank
    dtype = module.weight.dtype if module.weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    layer = QuantLoRALinear.from_quantized(qw, A, B, lora_config, quant_config, bias=module.bias, dtype=dtype)
    if report is not None:
        Q = qw.dequantize()
        report.layers.append(LayerReport(
            name=name, shape=tuple(W.shape),
            err_quant=_relative_error(W - Q, W, Hf),
            err_init=_relative_error(W - Q - lora_config.scaling * (B.float() @ A.float()), W, Hf),
            bits_per_weight=qw.bits_per_weight, quantize_s=t_q, init_s=t_i,
        ))
    return layer


def prepare_model(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                  calib: Optional[Iterable] = None, progress: bool = False, sequential: bool = True) -> nn.Module:
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

    Returns the same model with everything but the LoRA factors frozen. ``model.cloq_report``
    holds a :class:`PrepareReport` (per-layer errors and timings).
    """
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig; got {type(quant_config).__name__}")
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"`lora_config` must be a LoRAConfig; got {type(lora_config).__name__}")
    targets = find_targets(model, lora_config)
    _check_layers(model, targets, quant_config, lora_config)
    device = next(model.parameters()).device
    report = PrepareReport()
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()

    def layer_fn(name, module, H):
        return build_layer(name, module, quant_config, lora_config, H, report)

    calib_list = None if calib is None else list(calib)
    if calib_list is None or len(calib_list) == 0:
        if needs_calibration(quant_config, lora_config):
            raise ValueError(
                f"method={quant_config.method.value!r} with init={lora_config.init.value!r} needs calibration data: "
                "pass `calib` (input_ids tensors or dicts of model inputs)"
            )
        from tqdm.auto import tqdm

        replace_modules(model, {n: layer_fn(n, model.get_submodule(n), None)
                                for n in tqdm(targets, desc="layers", disable=not progress)})
    elif sequential:
        calib_mod.run_sequential(model, targets, calib_list, layer_fn, device, progress=progress)
    else:
        calib_mod.run_full_pass(model, targets, calib_list, layer_fn, device)
    report.total_s = time.perf_counter() - t_start
    report.capture_s = max(0.0, report.total_s - report.quantize_s - report.init_s)
    mark_trainable(model)
    model.train(was_training)
    model.cloq_report = report
    model.cloq_config = {"quant": quant_config.to_dict(), "lora": lora_config.to_dict(), "targets": targets}
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        from .quantizer import attach_quantization_config

        attach_quantization_config(model)  # so transformers' own save_pretrained / Trainer checkpoints reload
    return model


def _check_layers(model: nn.Module, targets: List[str], quant_config: QuantConfig, lora_config: LoRAConfig) -> None:
    """Fail before any work if a target layer cannot take this configuration."""
    for name in targets:
        out_f, in_f = linear_weight(model.get_submodule(name)).shape
        if quant_config.group_size != -1 and in_f % quant_config.group_size:
            raise ValueError(f"layer {name!r}: in_features={in_f} is not divisible by group_size={quant_config.group_size}")
        rank = lora_config.rank_for(name)
        if rank > min(in_f, out_f):
            raise ValueError(f"layer {name!r}: rank={rank} exceeds min(in_features, out_features)={min(in_f, out_f)}")


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA factors (PEFT's ``lora_`` prefix convention)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
