"""Which modules to replace (by fully qualified name); ``layer_factory.replace_modules`` swaps them."""
from __future__ import annotations

import re
from typing import Callable, List

from torch import nn

from ..config import LoRAConfig
from ..layer_factory import is_linear_like, replace_modules  # noqa: F401  (replace_modules: re-exported)


def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_embedding_names(model: nn.Module) -> List[str]:
    """Names of modules tied to the output vocabulary (lm_head and similar), never targeted by 'all-linear'."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return [n for n, m in model.named_modules() if head is not None and m is head]


def find_targets(model: nn.Module, lora_config: LoRAConfig) -> List[str]:
    """Fully qualified names of the linear layers ``lora_config`` selects.

    ``target_modules``: "all-linear" (every nn.Linear/Conv1D but the output embedding), a list of
    names or name suffixes (``["q_proj", "v_proj"]``), or any other string as a regex that must
    match the whole name. ``exclude`` (names or suffixes) always wins.
    """
    spec = lora_config.target_modules
    heads = set(output_embedding_names(model))
    names = []
    for name, mod in model.named_modules():
        if not name or not is_linear_like(mod):
            continue
        if spec == "all-linear":
            chosen = name not in heads
        elif isinstance(spec, str):
            chosen = re.fullmatch(spec, name) is not None
        else:
            chosen = _matches(name, spec)
        if chosen and not _matches(name, lora_config.exclude):
            names.append(name)
    if not names:
        raise ValueError(f"`target_modules`={spec!r} selects no linear layer of {type(model).__name__}")
    return names


def map_modules(model: nn.Module, names: List[str], fn: Callable[[str, nn.Module], nn.Module]) -> None:
    """Replace each named submodule by ``fn(name, module)``."""
    replace_modules(model, {n: fn(n, model.get_submodule(n)) for n in names})
