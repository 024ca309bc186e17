"""A transformers quantizer for cloq checkpoints: ``AutoModelForCausalLM.from_pretrained(dir)``.

After ``import cloq_engine`` a checkpoint written by :func:`cloq_engine.save_pretrained` loads
through transformers' own ``from_pretrained``.

Registering needs ``transformers.quantizers.auto``, which takes seconds to import, so
``import cloq_engine`` does not import it (:func:`register_when_transformers_loads`): when
transformers has already loaded its quantizer registry the cloq quantizer is registered at once,
otherwise a one-shot import hook registers it right after transformers imports that registry
(which ``from_pretrained`` always does first; see :mod:`cloq_engine.import_hooks`). Then the config's ``quantization_config``
(``quant_method="cloq"``) selects :class:`CloqHfQuantizer`, which swaps the recorded target
layers of the skeleton (built on ``meta`` by transformers) for empty :class:`QuantLoRALinear`
modules before the weights are loaded, then freezes everything but the LoRA factors.

Only pre-quantized checkpoints load this way: quantizing needs calibration data, which
``from_pretrained`` has no place for (use :func:`cloq_engine.prepare_model`).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

import torch
from torch import nn

from ..layer_factory import mark_trainable
from .skeleton import swap_in_empty_layers
from .record import (FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME, add_perm_buffers, check_quantized_tensors,
                     checkpoint_shapes, parse_record, quantization_record, read_aliases, tie_aliases,
                     verify_checksums)

logger = logging.getLogger(__name__)

_REGISTERED = False


def _classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class CloqQuantizationConfig(QuantizationConfigMixin):
        """transformers' view of a cloq ``quantization_config``.

        Args:
            quant: QuantConfig.to_dict() of the base weights.
            lora: LoRAConfig.to_dict() of the adapters.
            targets: fully qualified names of the QuantLoRALinear modules.
            base_model: the full-precision model it was made from.
            format_version: of the record (see persistence.FORMAT_VERSION).
            checksums: sha256 of every tensor of the checkpoint being loaded; verified on load and
                never written back (the tensors change with training).
        """

        def __init__(self, quant: Optional[dict] = None, lora: Optional[dict] = None, targets=None,
                     base_model: Optional[str] = None, format_version: int = FORMAT_VERSION,
                     checksums: Optional[dict] = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.base_model = base_model
            record = {"quant_method": QUANT_METHOD, "quant": quant, "lora": lora, "targets": targets,
                      "format_version": format_version, "checksums": checksums or {}}
            self.quant_config, self.lora_config, self.targets = parse_record(record, "quantization_config")
            self.checksums = dict(checksums or {})

        def to_dict(self) -> dict:
            d = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "quant": self.quant_config.to_dict(),
                 "lora": self.lora_config.to_dict(), "targets": list(self.targets)}
            if self.base_model:
                d["base_model"] = self.base_model
            return d

        def __iter__(self):
            yield from self.to_dict().items()

    class CloqHfQuantizer(HfQuantizer):
        """Loads cloq checkpoints: empty QuantLoRALinear modules are filled by transformers' loader."""

        requires_calibration = True

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self._aliases = {}

        def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
            qc = self.quantization_config
            # the load dtype is the layers' base dtype; their LoRA factors take the recorded `lora_dtype`
            base = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
            swap_in_empty_layers(model, qc.quant_config, qc.lora_config, qc.targets, base)
            shapes = checkpoint_shapes(checkpoint_files)
            add_perm_buffers(model, qc.targets, shapes)
            _skip_weight_init(model, qc.targets)
            self._aliases = read_aliases(checkpoint_files)
            # transformers' loader only reports what is missing and leaves it uninitialised: refuse here
            check_quantized_tensors(model, qc.targets, set(shapes) | set(self._aliases), _source(checkpoint_files))
            _verify_files(checkpoint_files, qc.checksums)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            qc = self.quantization_config
            tie_aliases(model, self._aliases)
            mark_trainable(model)
            # base_model kept through a re-save: `cloq eval` and PEFT export find the original there;
            # transformers has put this record on the config already
            set_cloq_config(model, qc.quant_config, qc.lora_config, qc.targets, base_model=qc.base_model or None,
                            attach=False)
            return model

        def _dequantize(self, model, dtype=None):
            """transformers' ``model.dequantize()``: every quantized layer becomes the dense layer it
            replaced holding Ŵ + scaling·B·A, so the dense model computes what this one does
            (:func:`cloq_engine.merge_and_unload`); ``dtype``: transformers passes the config's."""
            from .merge import merge_and_unload

            if isinstance(dtype, str):
                dtype = getattr(torch, dtype, None)
            return merge_and_unload(model, dtype=dtype if isinstance(dtype, torch.dtype) else None)

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_qat_trainable(self) -> bool:
            # The trainable LoRA factors live inside the quantized modules: no PEFT wrapper is needed.
            return True

    return CloqQuantizationConfig, CloqHfQuantizer


def _skip_weight_init(model, targets) -> None:
    """Keep transformers' post-load weight init away from our layers and their parents: model
    ``_init_weights`` functions reach into children (GPT-2 rescales ``c_proj.weight``), which
    QuantLoRALinear does not have. A parent holding buffers of its own is left alone (they may
    need that init)."""
    for name in targets:
        model.get_submodule(name)._is_hf_initialized = True
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        if parent is not model and not any(b is not None for b in parent._buffers.values()):
            parent._is_hf_initialized = True


def _source(checkpoint_files) -> str:
    files = [str(f) for f in checkpoint_files or []]
    return os.path.dirname(files[0]) if files else "the checkpoint"


def _verify_files(checkpoint_files, checksums: dict) -> None:
    """Check our safetensors file against the recorded checksums before transformers loads it."""
    from safetensors import safe_open

    if not checksums:
        return
    for file in checkpoint_files or []:
        if os.path.basename(str(file)) == WEIGHTS_NAME:
            with safe_open(str(file), framework="pt") as f:
                verify_checksums(list(f.keys()), f.get_tensor, checksums, str(file))


def attach_quantization_config(model) -> None:
    """Put the cloq ``quantization_config`` on ``model.config`` so that transformers' own
    ``model.save_pretrained`` (and so Trainer checkpoints) writes a checkpoint that
    ``from_pretrained`` / :func:`cloq_engine.load_pretrained` can load."""
    record = quantization_record(model)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no Hugging Face `config`")
    config_cls, _ = _classes_registered()
    config.quantization_config = config_cls(**{k: record[k] for k in ("quant", "lora", "targets", "base_model") if k in record})


# ---------------------------------------------------------------------------------------------
# The record on a prepared model (``model.cloq_config``) and its mirror on the HF config
# ---------------------------------------------------------------------------------------------
RECORD_FIELDS = ("base_model", "gptq_source", "checkpoint", "finetuned")  # beside quant, lora, targets
_MIRRORED = ("base_model",)  # the fields the HF config's quantization_config carries too


def set_cloq_config(model: nn.Module, quant_config, lora_config, targets: List[str], *, attach: bool = True,
                    **fields) -> dict:
    """Record what a model was prepared with in ``model.cloq_config`` (the one place that writes
    it): ``quant`` and ``lora`` (configs or their dicts), ``targets``, and the ``fields`` of
    :data:`RECORD_FIELDS` that are given. ``attach``: put the record on the model's HF config
    too (:func:`attach_quantization_config`), so transformers' own save_pretrained and
    Trainer checkpoints reload; the loader that transformers drives has put it there already."""
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise TypeError(f"unknown cloq_config field(s) {sorted(unknown)}; known: {RECORD_FIELDS}")
    as_dict = lambda c: c.to_dict() if hasattr(c, "to_dict") else dict(c)  # noqa: E731
    record = {"quant": as_dict(quant_config), "lora": as_dict(lora_config), "targets": list(targets)}
    record.update({k: v for k, v in fields.items() if v is not None})
    model.cloq_config = record
    if attach:
        _attach(model)
    return record


def update_cloq_config(model: nn.Module, **fields) -> None:
    """Set ``fields`` (of :data:`RECORD_FIELDS`) of a prepared model's record: where it was saved,
    its full-precision source, its fine-tuning; the HF config follows where it mirrors a field."""
    record = getattr(model, "cloq_config", None)
    if not isinstance(record, dict):
        raise ValueError(f"{type(model).__name__} has no `cloq_config`: prepare it with cloq_engine.prepare_model first")
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise TypeError(f"unknown cloq_config field(s) {sorted(unknown)}; known: {RECORD_FIELDS}")
    record.update(fields)
    if set(fields) & set(_MIRRORED):
        _attach(model)


def _attach(model: nn.Module) -> None:
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        attach_quantization_config(model)


def _classes_registered():
    register_transformers_quantizer()
    from transformers.quantizers import auto

    return auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD], auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD]


def register_transformers_quantizer() -> bool:
    """Register the ``cloq`` quantization config and quantizer with transformers (idempotent).

    Returns False (and logs why) when this transformers version has no quantizer registry.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers import auto
    except ImportError as e:
        logger.warning("transformers quantizer registry unavailable (%s): use cloq_engine.load_pretrained", e)
        return False
    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    _REGISTERED = True
    return True


REGISTRY_MODULE = "transformers.quantizers.auto"


def register_when_transformers_loads() -> None:
    """Register the cloq quantizer now if transformers' quantizer registry is loaded, else right
    after it is (see the module docstring and :mod:`cloq_engine.import_hooks`); idempotent."""
    from ..import_hooks import after_import

    if not _REGISTERED:
        after_import(REGISTRY_MODULE, register_transformers_quantizer)


__all__ = ["register_transformers_quantizer", "register_when_transformers_loads", "attach_quantization_config",
           "set_cloq_config", "update_cloq_config"]
