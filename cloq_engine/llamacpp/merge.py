"""The calibrated merge, for engines that cannot apply a LoRA adapter: fold ``s·B·A`` into the
dequantized base and re-quantize the sum on the layer's own grid with GPTQ, against the Gram
matrix ``H = X^T X`` of that layer's calibration inputs.

A checkpoint keeps no Grams (they are as large as the weights squared), so they are captured again
as prepare captures them (:func:`cloq_engine.hf.pipeline.run_blocks`): the calibration blocks run
through the model block by block, each block's layers are merged and re-quantized, and the block's
output, computed with the merged layers, feeds the next block (GPTQ's sequential calibration).

Per layer it reports the relative output error ``||(W' - Q) X||² / ||W' X||²`` against the function
being served, ``W' = Q₀ + s·B·A`` (what keeping the adapter computes exactly, error 0), of:

* ``drop_adapter``: the base alone, ``Q₀`` (the adapter thrown away);
* ``merge_gptq``: the calibrated merge written (GPTQ on the grid, with H);
* ``merge_rtn``: the naive merge, round-to-nearest of ``W'`` on the same grid (what re-quantizing
  a merged 16-bit model with llama-quantize does, without an importance matrix).

The merged layers keep their LoRA factors' shapes with ``B = 0``, so the result is a cloq model whose
GGUF export has no adapter to carry.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from torch import nn

from ..config import QuantMethod
from ..nn import QuantLoRALinear

METHODS = ("gptq", "rtn")


def _rel(E: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    num = float(((E @ H) * E).sum())
    den = float(((W @ H) * W).sum())
    return num / den if den > 0 else float("nan")


def _merged_layer(layer: QuantLoRALinear, qw) -> QuantLoRALinear:
    A = torch.zeros_like(layer.lora_A.detach())
    B = torch.zeros_like(layer.lora_B.detach())
    new = QuantLoRALinear.from_quantized(qw, A, B, layer.lora_config, layer.quant_config,
                                         bias=None if layer.bias is None else layer.bias.detach(),
                                         dtype=layer.base_dtype)
    return new.to(layer.qweight.device)


class _MergeBuilder:
    """run_blocks' builder: each QuantLoRALinear -> its merge, re-quantized with its Gram."""

    def __init__(self, method: str, report):
        self.method, self.report, self.block = method, report, None
        self.rows: List[Dict[str, float]] = []

    def build(self, root: nn.Module, grams: Dict[str, Optional[torch.Tensor]], prefix: str = "") -> Dict[str, nn.Module]:
        from ..quant import quantize_weight

        out = {}
        for name, H in grams.items():
            layer = root.get_submodule(name)
            if not isinstance(layer, QuantLoRALinear):
                continue
            if H is None:
                raise ValueError(f"layer {prefix + name!r} saw no calibration input: nothing to merge against")
            H = H.float()
            Q0 = layer.quantized_weight.dequantize(torch.float32)
            Wm = layer.merged_weight(torch.float32)
            qc = layer.quant_config
            gptq = quantize_weight(Wm, dataclasses.replace(qc, method=QuantMethod.GPTQ), H=H)
            rtn = quantize_weight(Wm, dataclasses.replace(qc, method=QuantMethod.RTN))
            self.rows.append({
                "layer": prefix + name, "bits": gptq.bits,
                "drop_adapter": _rel(Wm - Q0, Wm, H),
                "merge_gptq": _rel(Wm - gptq.dequantize(torch.float32), Wm, H),
                "merge_rtn": _rel(Wm - rtn.dequantize(torch.float32), Wm, H),
            })
            out[name] = _merged_layer(layer, gptq if self.method == "gptq" else rtn)
        return out


def calibrated_merge(model: nn.Module, calib: List[torch.Tensor], method: str = "gptq", batch_size: int = 8,
                     progress: bool = False) -> List[Dict[str, float]]:
    """Merge every QuantLoRALinear of ``model`` in place (``method`` "gptq": the calibrated merge;
    "rtn": the naive one) with Grams captured from ``calib`` (token blocks); returns the per-layer
    errors (module docstring)."""
    from .. import calib as calib_mod
    from ..hf.pipeline import run_blocks
    from ..hf.report import PrepareReport

    if method not in METHODS:
        raise ValueError(f"merge method must be one of {METHODS}; got {method!r}")
    targets = [n for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)]
    if not targets:
        raise ValueError("the model has no QuantLoRALinear layers: prepare or load a cloq model first")
    if not calib:
        raise ValueError("the calibrated merge needs calibration data (the Grams are captured from it)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    builder = _MergeBuilder(method, PrepareReport())
    with torch.no_grad():
        # the merge's plan: its layers, no experts, the calibration batches (prepare's plan_prepare
        # also checks and fits configs, which a prepared model no longer needs)
        plan = SimpleNamespace(targets=targets, expert_targets=[],
                               batches=calib_mod.batch_samples(list(calib), batch_size, device))
        run_blocks(model, plan, builder, progress=progress)
    model.train(was_training)
    record = getattr(model, "cloq_config", None)
    if isinstance(record, dict):
        record["merged"] = {"method": method, "calibration_blocks": len(calib)}
    return builder.rows


def summarize(rows: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and worst of each error column over the layers."""
    out = {}
    for key in ("drop_adapter", "merge_gptq", "merge_rtn"):
        vals = [r[key] for r in rows]
        out[key] = {"mean": sum(vals) / len(vals), "max": max(vals)}
    return out


def table(rows: List[Dict[str, float]]) -> str:
    s = summarize(rows)
    lines = ["| layer error ||(W'-Q)X||²/||W'X||² | mean | worst |", "|---|---|---|",
             "| keep the adapter (GGUF base + LoRA) | 0 | 0 |"]
    names = {"merge_gptq": "calibrated merge (GPTQ on the grid)", "merge_rtn": "naive merge (RTN on the grid)",
             "drop_adapter": "base alone (adapter dropped)"}
    for key in ("merge_gptq", "merge_rtn", "drop_adapter"):
        lines.append(f"| {names[key]} | {s[key]['mean']:.3e} | {s[key]['max']:.3e} |")
    return "\n".join(lines)
