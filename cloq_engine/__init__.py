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
    "mark_trainable": ".convert",
    "prepare_model": ".hf",
    "save_pretrained": ".hf", "load_pretrained": ".hf", "empty_model": ".hf",
    "export_peft_adapter": ".hf", "dequantized_base": ".hf", "merge_and_unload": ".hf",
    "register_peft_custom_module": ".hf", "register_transformers_quantizer": ".hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        try:  # a submodule: cloq_engine.hf, cloq_engine.export, ...
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
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
