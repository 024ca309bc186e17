"""cloq-engine: calibrated LoRA initialisation (CLoQ, QuAILoRA) for 2/3/4-bit quantized LLMs."""
from .backends import active_backend, available_backends, set_backend
from .config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from .formats import QuantizedWeight, pack_codes, unpack_codes
from .gram import GramAccumulator
from .hf import prepare_model
from .hf import (dequantized_base, export_peft_adapter, load_pretrained, merge_and_unload,
                 register_peft_custom_module, register_transformers_quantizer, save_pretrained)
from .hf.quantizer import register_when_transformers_loads
from .init import init_lora
from .nn import QuantLoRALinear
from .quant import quantize_weight

__version__ = "0.1.0"

# `AutoModelForCausalLM.from_pretrained(<cloq checkpoint>)` works after `import cloq_engine`; the
# registration waits until transformers loads its quantizer registry (seconds of import time that
# a user of the kernels or of prepare_model alone does not pay). See hf/quantizer.py.
register_when_transformers_loads()

__all__ = [
    "QuantConfig", "LoRAConfig", "QuantMethod", "InitMethod",
    "QuantizedWeight", "pack_codes", "unpack_codes", "quantize_weight",
    "GramAccumulator", "init_lora",
    "QuantLoRALinear", "prepare_model",
    "set_backend", "active_backend", "available_backends",
]
__all__ += ["save_pretrained", "load_pretrained", "export_peft_adapter", "dequantized_base", "merge_and_unload",
            "register_peft_custom_module"]
