"""Ship a prepared model to the GPTQ ecosystem and to plain transformers.

* :func:`export_gptq`: write a prepared model's base in the GPTQ layout (``model.safetensors``,
  ``config.json`` with its ``quantization_config``, ``quantize_config.json``) plus the PEFT
  adapter in ``adapter/``, which transformers (with optimum/gptqmodel), vLLM and TGI load.
* :func:`export_merged`: the dense merge (``merge_and_unload``) saved with ``save_pretrained``.

The way in from a GPTQ checkpoint, :func:`prepare_from_gptq`, is a prepare driver and lives in
``hf/from_gptq.py``; it is importable from here under its old name.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch
from torch import nn

from . import gptq_format
from .config import QuantMethod
from .hf.from_gptq import check_checkpoint_fits, prepare_from_gptq, quant_config_for  # noqa: F401 (old names)
from .hf.output_dir import EXPORT_MARKER, check_output_dir, is_cloq_export, write_dir_atomically
from .hf.record import state_nbytes, superseded_weights
from .nn import QuantLoRALinear
from .packed_layer import packed_layers

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


# ---- export -------------------------------------------------------------------------------------
def gptq_state_dict(model: nn.Module, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """The base model's tensors in the GPTQ layout: quantized layers as qweight/qzeros/scales/g_idx
    (+ bias), every other parameter and buffer as is; LoRA factors left out."""
    layers = packed_layers(model, QuantLoRALinear)
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
    layers = packed_layers(model, QuantLoRALinear)
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

    layers = packed_layers(model, QuantLoRALinear)
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

