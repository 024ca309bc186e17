"""Hugging Face integration: target selection, model preparation, persistence, PEFT interop."""
from .prepare import LayerReport, PrepareReport, prepare_model
from .targets import find_targets

__all__ = ["prepare_model", "find_targets", "PrepareReport", "LayerReport"]
