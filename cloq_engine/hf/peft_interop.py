"""PEFT interoperability: export our adapters in PEFT's format, and a PEFT LoRA layer for ours.

* :func:`export_peft_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with
  PEFT's key names, naming a base ``AutoPeftModel`` can load (:data:`BASES`). PEFT's LoRA on the
  dequantized base Ŵ, or on our quantized layers, computes what the quantized model computes.
* :class:`PeftQuantLoRALinear` (``peft_layer_class()``) is PEFT's LoRA layer over a
  :class:`QuantLoRALinear`. When the adapter's rank equals the layer's, the PEFT adapter starts
  from the layer's calibrated factors (CLoQ/QuAILoRA init through PEFT) and the layer's own LoRA
  branch is switched off; otherwise the layer's LoRA stays in the frozen base and PEFT's adapter
  starts with PEFT's init.
* :func:`install_peft_integration` (run by ``import cloq_engine`` once peft is imported) makes
  PEFT find that layer by itself: every ``LoraConfig`` carries the custom-module mapping
  (``get_peft_model`` and a plain ``PeftModel.from_pretrained`` work), and
  ``target_modules="all-linear"`` includes our layers. PEFT has no global registry for either, so
  two of its functions are wrapped, each calling PEFT's own first. A third, PEFT's pre-merge check
  ``LoraModel._check_merge_allowed``, also refuses adapters on our layers, before any layer merges.
  :func:`register_peft_custom_module` does the first for one config, where the wrap is unwanted.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from ..layer_forward import packed_forward
from ..nn import QuantLoRAFunction, QuantLoRALinear
from .moe import peft_expert_factors, peft_wrapper_prefixes, quant_experts
from .merge import conv1d_names, quant_layers
from .output_dir import check_output_dir, is_cloq_adapter, write_dir_atomically
from .record import quantization_record

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEQUANTIZED_BASE = "cloq-dequantized-base-of:{source}"


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def _task_type(model: nn.Module) -> Optional[str]:
    from types import SimpleNamespace

    from ..models import is_causal_lm

    config = getattr(model, "config", None)
    if config is None:
        return None
    view = SimpleNamespace(architectures=[type(model).__name__], is_decoder=getattr(config, "is_decoder", False))
    return "CAUSAL_LM" if is_causal_lm(view) else "FEATURE_EXTRACTION"


def _checkpoint_of(model: nn.Module) -> Optional[str]:
    """The cloq checkpoint ``model`` was loaded from or last saved to, if any."""
    from .output_dir import is_cloq_checkpoint

    record = getattr(model, "cloq_config", None) or {}
    for path in (record.get("checkpoint"), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if path and is_cloq_checkpoint(str(path)):
            return os.path.abspath(str(path))
    return None


def _original_of(model: nn.Module) -> Optional[str]:
    record = getattr(model, "cloq_config", None) or {}
    return record.get("base_model") or None


# base= of export_peft_adapter -> what the adapter names as its base model, and what that means
BASES = {
    "checkpoint": "the cloq checkpoint the model was loaded from or saved to: exact; AutoPeftModel loads it "
                  "through transformers after `import cloq_engine`, and the adapter replaces its LoRA factors",
    "dequantized": "the dequantized base Ŵ, written to <adapter>/base: exact; plain transformers + peft load it",
    "original": "the full-precision model it was prepared from: NOT what the adapter was fitted to (it "
                "compensates W - Ŵ, so on W it adds the quantization error back); for experiments only",
}


def _resolve_base(model: nn.Module, base: str) -> str:
    """The base_model_name_or_path for ``base`` ("auto": the checkpoint when there is one)."""
    if base not in ("auto", *BASES):
        if os.path.isdir(os.fspath(base)) or os.path.isabs(os.fspath(base)):
            return os.path.abspath(os.fspath(base))
        raise ValueError(f"`base` must be 'auto', one of {sorted(BASES)} or a directory; got {base!r}")
    if base in ("auto", "checkpoint"):
        found = _checkpoint_of(model)
        if found or base == "checkpoint":
            if not found:
                raise ValueError("base='checkpoint': the model was neither loaded from nor saved to a cloq checkpoint: "
                                 "save it first (cloq_engine.save_pretrained) or pass base='dequantized'")
            return found
        # Not saved anywhere: a name AutoPeftModel refuses rather than a base that silently differs
        logger.info("the model has no checkpoint on disk: the adapter's base_model_name_or_path is a marker; "
                    "save the model first or pass base='dequantized' for an adapter AutoPeftModel loads")
        return DEQUANTIZED_BASE.format(source=_original_of(model) or getattr(model.config, "_name_or_path", None))
    if base == "original":
        original = _original_of(model)
        if not original:
            raise ValueError("base='original': the model records no full-precision source (`cloq_config['base_model']`)")
        logger.warning("the adapter names the full-precision model %s as its base: %s", original, BASES["original"])
        return original
    return "dequantized"  # the caller writes it and names its final path


def peft_adapter_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """The ``adapter_config.json`` contents describing ``model``'s LoRA adapters."""
    record = quantization_record(model)
    lora = record["lora"]
    experts = sorted(t for t in record["targets"] if t in quant_experts(model))
    targets = [t for t in record["targets"] if t not in experts]
    if base_model_name_or_path is None:
        base_model_name_or_path = _resolve_base(model, "auto")
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora["rank"],
        "rank_pattern": dict(lora.get("rank_pattern") or {}),
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "use_rslora": lora["use_rslora"],
        "target_modules": sorted(targets),
        # packed expert projections are 3-D parameters to PEFT (its ParamWrapper)
        **({"target_parameters": experts} if experts else {}),
        "bias": "none",
        "fan_in_fan_out": bool(conv1d_names(model, targets)),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_peft_adapter(model: nn.Module, save_directory, overwrite: bool = False, base: str = "auto") -> str:
    """Write ``model``'s LoRA factors as a PEFT adapter directory, atomically.

    ``adapter_model.safetensors`` holds ``base_model.model.<name>.lora_A.weight`` (r, in) and
    ``...lora_B.weight`` (out, r) per layer; its metadata records the cloq init method
    (``cloq_init``) and quantization (``cloq_quant``). The adapter applies to
    :func:`dequantized_base` (model) — not to the original full-precision model, whose W differs
    from Ŵ by exactly the error the calibrated init compensates.
    """
    from safetensors.torch import save_file

    if os.path.isfile(os.fspath(save_directory)):
        raise ValueError(f"`save_directory` {os.fspath(save_directory)!r} exists and is not a directory")
    record = quantization_record(model)
    target = check_output_dir(save_directory, overwrite=overwrite, inputs=[record.get("base_model")],
                              recognise=is_cloq_adapter, what="cloq PEFT adapter")
    base_name = _resolve_base(model, base)
    dense = None
    if base_name == "dequantized":
        from .merge import dequantized_base

        dense = dequantized_base(model)
        base_name = os.path.join(target, "base")  # where the swap puts it
    adapter_config = peft_adapter_config(model, base_name)
    layers = quant_layers(model)
    experts = quant_experts(model)
    missing = [t for t in record["targets"] if t not in layers and t not in experts]
    if missing:
        raise ValueError(f"`cloq_config.targets` names layers that are not QuantLoRALinear: {missing[:5]}")
    expert_names = [t for t in record["targets"] if t in experts]
    if expert_names and record["lora"]["dropout"]:
        raise ValueError("PEFT's adapters on expert parameters (ParamWrapper) do not support lora_dropout != 0: "
                         f"the model has dropout={record['lora']['dropout']} on {expert_names[0]!r}")
    state = {}
    for name in record["targets"]:
        if name in experts:
            continue
        layer = layers[name]
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    for name, prefix in peft_wrapper_prefixes(model, expert_names).items():
        A, B = peft_expert_factors(experts[name])
        state[f"{PEFT_PREFIX}{prefix}.lora_A.weight"] = A.cpu()
        state[f"{PEFT_PREFIX}{prefix}.lora_B.weight"] = B.cpu()
    metadata = {"format": "pt", "cloq_init": str(record["lora"]["init"]),
                "cloq_quant": json.dumps(record["quant"], sort_keys=True),
                "cloq_base_model": str(record.get("base_model") or ""),
                "cloq_base": base_name,
                "cloq_load_with": "peft.AutoPeftModel*.from_pretrained(adapter_dir) after `import cloq_engine`, or "
                                  "peft.PeftModel.from_pretrained(cloq_engine.dequantized_base(model), adapter_dir)"}

    def write(tmp: str) -> None:
        save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        if dense is not None:
            dense.save_pretrained(os.path.join(tmp, "base"))
        with open(os.path.join(tmp, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")

    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if dense is not None:
        nbytes += sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    write_dir_atomically(target, write, nbytes=nbytes, superseded=lambda rel: rel == "adapter_model.bin")
    logger.info("exported a PEFT adapter of %d layers to %s", len(layers), target)
    return target


# ---------------------------------------------------------------------------------------------
# PEFT custom module
# ---------------------------------------------------------------------------------------------
def quantized_forward(layer: QuantLoRALinear, x: torch.Tensor) -> torch.Tensor:
    """x·Ŵ^T + bias: the layer without its own LoRA branch (gradients still reach x), through the
    layer's own forward wrapper (input checks, act-order permutation, autocast)."""
    qw = layer.quantized_weight
    return packed_forward(layer, x, lambda x2, x_lora: QuantLoRAFunction.apply(
        x2, x_lora, layer.lora_A.detach(), layer.lora_B.detach(), layer.bias, qw, 0.0), perm=layer.perm, dropout=False)


@functools.lru_cache(maxsize=1)
def peft_layer_class():
    """The PEFT LoRA layer class wrapping a QuantLoRALinear (built on first use: imports peft)."""
    from peft.tuners.lora.layer import LoraLayer

    class PeftQuantLoRALinear(nn.Module, LoraLayer):
        """PEFT LoRA adapters over a :class:`QuantLoRALinear` base layer (no merging: use
        :func:`cloq_engine.merge_and_unload` on a cloq model instead)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            if config.use_dora:
                raise ValueError("`use_dora` is not supported on QuantLoRALinear layers")
            quant = self.get_base_layer()
            quant.lora_A.requires_grad_(False)
            quant.lora_B.requires_grad_(False)
            self.absorbed_base_lora = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            quant = self.get_base_layer()
            if config.init_lora_weights is True and r == quant.rank:
                self._start_from_base_lora(adapter_name)

        def _start_from_base_lora(self, adapter_name: str) -> None:
            """Copy the layer's calibrated factors into the adapter: s'·B'·A' = s·B·A."""
            quant = self.get_base_layer()
            lora_A, lora_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            with torch.no_grad():
                lora_A.copy_(quant.lora_A.to(lora_A.dtype))
                lora_B.copy_((quant.lora_B.float() * (quant.scaling / self.scaling[adapter_name])).to(lora_B.dtype))
            self.absorbed_base_lora = True

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            quant = self.get_base_layer()
            result = quantized_forward(quant, x) if self.absorbed_base_lora else quant(x)
            if self.disable_adapters:
                return result
            for active_adapter in self.active_adapters:
                if active_adapter not in self.lora_A.keys():
                    continue
                lora_A, lora_B = self.lora_A[active_adapter], self.lora_B[active_adapter]
                dropout, scaling = self.lora_dropout[active_adapter], self.scaling[active_adapter]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + (lora_B(lora_A(dropout(xa))) * scaling).to(result.dtype)
            return result

        def merge(self, *args, **kwargs):
            raise NotImplementedError("PEFT merging of QuantLoRALinear is not supported: "
                                      "use cloq_engine.merge_and_unload on the cloq model")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return PeftQuantLoRALinear


def register_peft_custom_module(lora_config):
    """Register QuantLoRALinear with ``lora_config`` (a ``peft.LoraConfig``) so that
    ``peft.get_peft_model`` wraps our layers in :class:`PeftQuantLoRALinear`. Returns the config."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("register_peft_custom_module needs the `peft` package") from e
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"`lora_config` must be a peft.LoraConfig; got {type(lora_config).__name__}")
    lora_config._register_custom_module({QuantLoRALinear: peft_layer_class()})
    return lora_config


# ---------------------------------------------------------------------------------------------
# PEFT finds our layer by itself
# ---------------------------------------------------------------------------------------------
def _all_linear_names(model: nn.Module) -> set:
    """Our layers "all-linear" should add: not the output embedding, not inside a PEFT layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .targets import output_embedding_names

    heads = set(output_embedding_names(model))
    wrapped = [n + "." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return {n for n, m in model.named_modules() if isinstance(m, QuantLoRALinear) and n not in heads
            and not any(n.startswith(w) for w in wrapped)}


def install_peft_integration() -> bool:
    """Make PEFT dispatch :class:`QuantLoRALinear` without per-config registration, and let
    ``target_modules="all-linear"`` match it (idempotent). Returns False without peft."""
    try:
        from peft import LoraConfig
        from peft.tuners import tuners_utils
    except ImportError:
        return False
    if getattr(LoraConfig, "_cloq_integration", False):
        return True
    post_init = LoraConfig.__post_init__

    @functools.wraps(post_init)
    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        self._register_custom_module({QuantLoRALinear: peft_layer_class()})

    include_all_linear = tuners_utils._maybe_include_all_linear_layers

    @functools.wraps(include_all_linear)
    def _maybe_include_all_linear_layers(peft_config, model):
        spec = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(spec, str) and spec.lower() == "all-linear"
        peft_config = include_all_linear(peft_config, model)
        if all_linear:
            peft_config.target_modules = set(peft_config.target_modules) | _all_linear_names(model)
        return peft_config

    from peft.tuners.lora import LoraModel

    check_merge = LoraModel._check_merge_allowed

    @functools.wraps(check_merge)
    def _check_merge_allowed(self):
        # PEFT merges layer by layer and calls this check first: refusing here, before any layer
        # merges, keeps a PeftModel whole (otherwise an embedding adapter ahead of our layers is
        # merged and unloaded before our layer's merge raises).
        check_merge(self)
        ours = next((n for n, m in self.model.named_modules() if isinstance(m, peft_layer_class())), None)
        if ours is not None:
            raise ValueError(f"PEFT cannot merge adapters into cloq's packed layer {ours!r} (nothing was merged): "
                             "keep the adapters with `peft_model.save_pretrained(dir)`, or drop them with "
                             "`peft_model.unload()`")

    LoraConfig.__post_init__ = __post_init__
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    LoraModel._check_merge_allowed = _check_merge_allowed
    LoraConfig._cloq_integration = True
    return True
