"""Start from and ship to the GPTQ ecosystem.

* :func:`prepare_from_gptq`: keep the Q of an existing GPTQ checkpoint (AutoGPTQ / GPTQModel
  layout, :mod:`.gptq_format`) and compute the calibrated LoRA init against the original W.
* :func:`export_gptq`: write a prepared model's base in the GPTQ layout (``model.safetensors``,
  ``config.json`` with its ``quantization_config``, ``quantize_config.json``) plus the PEFT
  adapter in ``adapter/``, which transformers (with optimum/gptqmodel), vLLM and TGI load.
* :func:`export_merged`: the dense merge (``merge_and_unload``) saved with ``save_pretrained``.

``cmd_export`` and ``cmd_prepare_from_gptq`` are the ``cloq export`` / ``cloq prepare --from-gptq``
commands.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from . import gptq_format
from .hf.output_dir import EXPORT_MARKER, check_output_dir, is_cloq_export, write_dir_atomically
from .hf.record import state_nbytes, superseded_weights
from .config import LoRAConfig, QuantConfig, QuantMethod
from .formats import QuantizedWeight
from .nn import QuantLoRALinear, linear_weight

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


# ---- import -------------------------------------------------------------------------------------
def quant_config_for(cfg: gptq_format.GPTQCheckpointConfig) -> QuantConfig:
    """The QuantConfig that describes a GPTQ checkpoint's layers (ValueError if we cannot hold them)."""
    try:
        return QuantConfig(bits=cfg.bits, group_size=cfg.group_size, method="gptq", sym=cfg.sym)
    except ValueError as e:
        raise ValueError(f"this GPTQ checkpoint cannot be imported: {e}") from None


def prepare_from_gptq(model: nn.Module, gptq_dir: str, lora_config: LoRAConfig, calib: Optional[Iterable] = None,
                      progress: bool = False, max_error: Optional[float] = None) -> nn.Module:
    """Replace the layers that ``gptq_dir`` quantized by :class:`QuantLoRALinear` holding exactly its Q,
    with LoRA factors initialised by ``lora_config.init`` against ``model``'s original weights.

    ``model`` is the original full-precision model the checkpoint was made from (layer names must
    match). Calibrated inits ("cloq", "quailora") need ``calib`` and run block by block as
    :func:`~cloq_engine.hf.prepare_model` does; ``requant_rounds`` is ignored (Q is kept).

    Refused with ValueError before any work (:func:`check_checkpoint_fits`): a checkpoint whose
    layer names or shapes differ from ``model``'s, that leaves out layers ``lora_config`` targets,
    or whose Q is farther from ``model``'s W than ``max_error`` (default: per layer, the smaller of
    1 and 4x the error of quantizing W itself at the checkpoint's bits and group size).
    """
    from . import calib as calib_mod
    from . import init as init_mod
    from .convert import mark_trainable, replace_modules
    from .hf.prepare import LayerBuilder, PrepareReport, run_sequential

    from .hf.checks import check_finite_weights

    cfg = gptq_format.read_gptq_config(gptq_dir)
    quant_config = quant_config_for(cfg)
    check_finite_weights(model)
    imported: Dict[str, QuantizedWeight] = gptq_format.load_gptq_weights(gptq_dir)
    check_checkpoint_fits(model, imported, quant_config, lora_config, max_error=max_error)
    modules = dict(model.named_modules())
    targets = list(imported)
    spec = init_mod.get_init(lora_config.init)
    if spec.requantizes:
        raise ValueError(f"init={lora_config.init.value!r} re-quantizes W; an imported Q is kept: use cloq, quailora, svd or zero")
    opts = init_mod.init_options(lora_config)

    def layer_fn(name, module, H):
        W = linear_weight(module).float()
        qw = imported[name].to(W.device)
        rank = lora_config.rank_for(name)
        A, B = init_mod.init_lora(W, qw, None if H is None else H.float(), rank, method=lora_config.init,
                                  scaling=lora_config.scaling_for_rank(rank), **opts)
        layer_config = LoRAConfig.from_dict({**lora_config.to_dict(), "rank": rank, "rank_pattern": {},
                                             "requant_rounds": 0})
        dtype = module.weight.dtype if module.weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        return QuantLoRALinear.from_quantized(qw, A, B, layer_config, quant_config, bias=module.bias, dtype=dtype)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    calib_list = None if calib is None else list(calib)
    if spec.needs_H:
        if not calib_list:
            raise ValueError(f"init={lora_config.init.value!r} needs calibration data: pass `calib`")
        class KeepQ(LayerBuilder):  # the sequential driver, building layers around the imported Q
            def build(self, root, grams, prefix=""):
                return {n: layer_fn(prefix + n, root.get_submodule(n), H) for n, H in grams.items()}

        builder = KeepQ(quant_config, lora_config, PrepareReport(), report_mode="off")
        run_sequential(model, targets, calib_mod.batch_samples(calib_list, 8, device), builder, progress=progress)
    else:
        replace_modules(model, {n: layer_fn(n, modules[n], None) for n in targets})
    mark_trainable(model)
    model.train(was_training)
    model.cloq_config = {"quant": quant_config.to_dict(), "lora": lora_config.to_dict(), "targets": targets,
                         "gptq_source": os.path.abspath(gptq_dir)}
    return model


FIT_ROWS = 256  # rows of each weight the fit check measures (rows quantize independently)
FIT_VS_RTN = 4.0  # a checkpoint made from this W is within this factor of W's own RTN error


def _relative_error(W: torch.Tensor, Q: torch.Tensor) -> float:
    return float((W - Q).norm() / W.norm().clamp(min=1e-30))


def check_checkpoint_fits(model: nn.Module, imported: Dict[str, QuantizedWeight], quant_config: QuantConfig,
                          lora_config: LoRAConfig, max_error: Optional[float] = None) -> None:
    """Refuse a GPTQ checkpoint that was not made from ``model``, saying by how much it differs:
    layer names, shapes, layers it leaves out of ``lora_config``'s targets, and the relative
    weight error ||W - Q|| / ||W|| (Q of another model is farther from W than zero is: >= 1)."""
    from .hf.targets import find_targets
    from .quant import quantize_weight

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


# ---- export -------------------------------------------------------------------------------------
def _quant_layers(model: nn.Module) -> Dict[str, QuantLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}


def gptq_state_dict(model: nn.Module, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """The base model's tensors in the GPTQ layout: quantized layers as qweight/qzeros/scales/g_idx
    (+ bias), every other parameter and buffer as is; LoRA factors left out."""
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLoRALinear layers: prepare or load a cloq model first")
    from .experts import QuantLoRAExperts

    experts = [n for n, m in model.named_modules() if isinstance(m, QuantLoRAExperts)]
    if experts:
        # GPTQ checkpoints describe nn.Linear layers (qweight/qzeros/scales/g_idx each); transformers 5 holds
        # experts as fused 3-D parameters that no GPTQ loader reads packed: refuse rather than write a
        # checkpoint whose experts nothing can load.
        raise ValueError(f"GPTQ export does not support packed mixture-of-experts projections ({experts[0]!r} and "
                         f"{len(experts) - 1} more): the GPTQ format has no fused 3-D expert layout; export the "
                         "merged model (`cloq export --format merged`) or save the cloq checkpoint")
    own = {f"{n}.{b}" for n in layers for b in ("qweight", "scales", "zeros", "perm", "lora_A", "lora_B")}
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        if key in own:
            continue
        ptr = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and ptr in seen:  # a tied weight: transformers re-ties it on load
            continue
        seen.add(ptr)
        state[key] = t.detach().contiguous().cpu()
    for name, layer in layers.items():
        for key, t in gptq_format.to_gptq(layer.quantized_weight.to("cpu"), checkpoint_format).items():
            state[f"{name}.{key}"] = t
    return state


def resolve_checkpoint_format(model: nn.Module, checkpoint_format: str = "auto") -> str:
    """"auto": v1 ("gptq", the widest-read layout) when every layer's zeros fit it, else "gptq_v2"."""
    if checkpoint_format != "auto":
        return checkpoint_format
    layers = _quant_layers(model)
    misfits = [n for n, m in layers.items() if not gptq_format.fits_v1(m.quantized_weight)]
    if not misfits:
        return "gptq"
    bits = layers[misfits[0]].bits
    # Our asymmetric zeros lie in [0, 2^bits - 1]; v1 keeps zero - 1 in `bits` bits, i.e. zeros in
    # [1, 2^bits]: what it cannot store is a zero of 0 (or a fractional zero, from an import).
    logger.warning("%d layer(s) (first: %s) have a zero point of 0 (or a fractional one), which GPTQ v1 cannot "
                   "store: it keeps zero - 1 in %d bits, so its zeros lie in [1, %d]; writing "
                   "checkpoint_format='gptq_v2' (GPTQModel; vLLM reads v1 only)", len(misfits), misfits[0], bits,
                   1 << bits)
    return "gptq_v2"


def export_gptq(model: nn.Module, out_dir: str, checkpoint_format: str = "auto", tokenizer=None,
                overwrite: bool = False) -> str:
    """Write ``model``'s quantized base in the GPTQ layout and its LoRA factors as a PEFT adapter.

    ``out_dir/model.safetensors``, ``config.json`` (``quantization_config``: quant_method "gptq"),
    ``quantize_config.json``; ``out_dir/adapter/`` the PEFT adapter. Format "gptq" (v1) is what
    AutoGPTQ, transformers/optimum and vLLM read; "gptq_v2" (GPTQModel) stores exact zeros; "auto"
    (default) writes v1 when the zeros fit it and v2 otherwise. ``overwrite``: replace a previous
    export at ``out_dir`` (its other files are kept); anything else there is refused.
    """
    from safetensors.torch import save_file

    from .hf.peft_interop import export_peft_adapter

    layers = _quant_layers(model)
    first = next(iter(layers.values()), None)
    if first is None:
        raise ValueError("the model has no QuantLoRALinear layers: prepare or load a cloq model first")
    bits_set = {(m.bits, m.group_size, m.method) for m in layers.values()}
    if len(bits_set) != 1:
        raise ValueError(f"GPTQ checkpoints hold one bits/group_size for all layers; this model mixes {sorted(bits_set)}")
    if first.method == QuantMethod.NF4.value:
        raise ValueError("NF4 weights have no GPTQ layout; prepare with --quantizer gptq or rtn")
    checkpoint_format = resolve_checkpoint_format(model, checkpoint_format)
    state = gptq_state_dict(model, checkpoint_format)
    gcfg = gptq_format.GPTQCheckpointConfig(
        bits=first.bits, group_size=first.group_size, desc_act=any(m.perm is not None for m in layers.values()),
        sym=bool(first.quant_config.sym), checkpoint_format=checkpoint_format)
    target = _safe_target(model, out_dir, overwrite)

    def write(tmp: str) -> None:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_marker(tmp, "gptq", model)
        with open(os.path.join(tmp, "quantize_config.json"), "w") as f:
            json.dump(gcfg.to_json(), f, indent=2)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            d = config.to_dict()
            d["quantization_config"] = gcfg.to_json()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(d, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)  # sampling defaults, eos/pad ids: a served model needs them
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(tmp)
        export_peft_adapter(model, os.path.join(tmp, ADAPTER_DIR), base=target)  # the GPTQ base beside it

    lora_bytes = sum(m.lora_A.numel() * m.lora_A.element_size() + m.lora_B.numel() * m.lora_B.element_size()
                     for m in layers.values())
    write_dir_atomically(target, write, nbytes=state_nbytes(state) + lora_bytes, superseded=superseded_weights)
    logger.info("exported %d GPTQ layers (%d-bit, %s) and the adapter to %s", len(layers), gcfg.bits,
                checkpoint_format, out_dir)
    return out_dir


def export_merged(model: nn.Module, out_dir: str, tokenizer=None, dtype: Optional[torch.dtype] = None,
                  overwrite: bool = False) -> str:
    """The dense model with the adapter merged in (``merge_and_unload``), saved with ``save_pretrained``.
    ``overwrite`` as in :func:`export_gptq`."""
    from .hf.merge import merge_and_unload

    target = _safe_target(model, out_dir, overwrite)
    dense = merge_and_unload(model, dtype=dtype)

    def write(tmp: str) -> None:
        dense.save_pretrained(tmp)
        _write_marker(tmp, "merged", model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    nbytes = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    write_dir_atomically(target, write, nbytes=nbytes, superseded=superseded_weights)
    return out_dir


def _write_marker(directory: str, fmt: str, model: nn.Module) -> None:
    """What tells a later export that this directory is ours to replace (``--overwrite``)."""
    record = getattr(model, "cloq_config", None) or {}
    with open(os.path.join(directory, EXPORT_MARKER), "w", encoding="utf-8") as f:
        json.dump({"format": fmt, "base_model": record.get("base_model")}, f, indent=2)
        f.write("\n")


def _safe_target(model: nn.Module, out_dir: str, overwrite: bool) -> str:
    """Exports go to a new or empty directory, or replace a previous export with ``overwrite``
    (never the source checkpoint, the working directory or a directory holding anything else);
    written next to it and swapped in atomically."""
    from .hf.persistence import protected_inputs

    return check_output_dir(out_dir, overwrite=overwrite, inputs=protected_inputs(model), recognise=is_cloq_export,
                            what="cloq export")

