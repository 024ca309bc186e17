"""Hugging Face integration: target selection, model preparation, persistence, PEFT interop."""
from .prepare import LayerReport, PrepareReport, prepare_model
from .targets import find_targets
from .persistence import empty_model, load_pretrained, save_pretrained
from .merge import dequantized_base, merge_and_unload
from .peft_interop import export_peft_adapter, register_peft_custom_module
from .quantizer import attach_quantization_config, register_transformers_quantizer

__all__ = ["prepare_model", "find_targets", "PrepareReport", "LayerReport"]
__all__ += ["save_pretrained", "load_pretrained", "empty_model", "export_peft_adapter", "dequantized_base", "merge_and_unload",
            "register_peft_custom_module", "register_transformers_quantizer", "attach_quantization_config"]
