"""cloq-engine: calibrated LoRA initialisation (CLoQ, QuAILoRA) for 2/3/4-bit quantized LLMs.

The public names load on first use (PEP 562): ``import cloq_engine`` imports neither torch nor
transformers, so ``cloq --help`` answers at once; ``ce.prepare_model`` and the rest import what
they need when first touched.
"""
from __future__ import annotations

import importlib

from .import_hooks import after_import

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QuantConfig": ".config", "LoRAConfig": ".config", "QuantMethod": ".config", "InitMethod": ".config",
    "QuantizedWeight": ".formats", "pack_codes": ".formats", "unpack_codes": ".formats",
    "quantize_weight": ".quant",
    "GramAccumulator": ".gram",
    "init_lora": ".init",
    "QuantLoRALinear": ".nn",
    "set_backend": ".backends", "active_backend": ".backends", "available_backends": ".backends",
    "mark_trainable": ".layer_factory",
    "QuantLoRAExperts": ".experts",
    "prepare_model": ".hf", "PrepareReport": ".hf.prepare",
    "prepare_pretrained": ".hf.streaming", "plan_ranks": ".rank_plan",
    "save_pretrained": ".hf", "load_pretrained": ".hf", "empty_model": ".hf",
    "export_peft_adapter": ".hf", "dequantized_base": ".hf", "merge_and_unload": ".hf",
    "export_gptq": ".export", "prepare_from_gptq": ".export",
    "register_peft_custom_module": ".hf", "register_transformers_quantizer": ".hf",
}

__all__ = list(_EXPORTS)

# Submodules reachable as attributes (``ce.hf``, ``ce.init``, ...): the engine's layers. The command
# line's internals (cli, commands, finetune) and the research harness (research/: the fine-tuning
# study) are not part of the API: import them by their full name where they are needed.
_SUBMODULES = {"config", "formats", "quant", "gram", "linalg", "init", "calib", "layer_factory", "nn", "experts",
               "layer_forward", "backends", "kernels", "hf", "export", "gptq_format", "rank_plan", "data",
               "models", "eval"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _register_transformers_quantizer() -> None:
    from .hf.quantizer import register_transformers_quantizer

    register_transformers_quantizer()


def _install_peft_integration() -> None:
    from .hf.peft_interop import install_peft_integration

    install_peft_integration()


# `AutoModelForCausalLM.from_pretrained(<cloq checkpoint>)` works after `import cloq_engine`, and PEFT
# dispatches our layers (PeftModel.from_pretrained, target_modules="all-linear"), each plugged in
# right after that library loads: seconds of import time a user of the kernels does not pay.
after_import("transformers.quantizers.auto", _register_transformers_quantizer)
after_import("peft", _install_peft_integration)
