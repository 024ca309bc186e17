"""The LoRA configuration fitted to the model's layers before any work, and a targeted tied head untied.

* A layer narrower than the LoRA rank (Qwen2-MoE's ``shared_expert_gate``: one output) gets the
  rank it can hold, ``min(in_features, out_features)``, recorded in ``rank_pattern`` under its full
  name (PEFT reads the same key), with one warning listing such layers.
* An output embedding tied to the input embedding (SmolLM2, GPT-2, OPT) is left alone by
  "all-linear"; targeting it unties it: the embedding keeps its full-precision matrix and the head
  gets its own packed weight and LoRA. :func:`warn_tied_heads` says what that costs before any work;
  :func:`untie_heads` records it (``tie_word_embeddings=False``) once the head is replaced, so that
  save, load and transformers' ``from_pretrained`` do not tie the packed head back.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from torch import nn

from ..config import LoRAConfig, QuantConfig
from ..layer_factory import linear_weight
from ..formats import packed_rows

logger = logging.getLogger(__name__)


def fit_ranks(model: nn.Module, targets: List[str], lora_config: LoRAConfig) -> LoRAConfig:
    """``lora_config`` with the rank of every target narrower than its rank clipped to
    ``min(in_features, out_features)`` (a rank-r factorisation of a smaller matrix has no more than
    that many directions), warning once; unchanged when every layer holds its rank."""
    clipped: Dict[str, int] = {}
    examples = []
    for name in targets:
        out_f, in_f = linear_weight(model.get_submodule(name)).shape
        rank = lora_config.rank_for(name)
        if rank > min(in_f, out_f):
            clipped[name] = min(in_f, out_f)
            examples.append(f"{name!r} ({out_f}x{in_f}): rank {rank} -> {clipped[name]}")
    if not clipped:
        return lora_config
    logger.warning("%d layer(s) are narrower than the LoRA rank: their rank is clipped to min(in_features, "
                   "out_features) and recorded in rank_pattern, e.g. %s", len(clipped), "; ".join(examples[:3]))
    # exact names first: LoRAConfig.rank_for (and PEFT) take the first matching key
    return LoRAConfig.from_dict({**lora_config.to_dict(), "rank_pattern": {**clipped, **lora_config.rank_pattern}})


def declared_ties(model: nn.Module) -> Dict[str, str]:
    """``{tied parameter: its source}`` as transformers declares them (``all_tied_weights_keys``),
    or found by identity with the input embedding for other models."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if isinstance(declared, dict):
        return dict(declared)
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, head = (get_in() if callable(get_in) else None), (get_out() if callable(get_out) else None)
    if emb is None or head is None or getattr(head, "weight", None) is not getattr(emb, "weight", None):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(head)]}.weight": f"{names[id(emb)]}.weight"}


def tied_heads(model: nn.Module, targets: List[str]) -> Dict[str, str]:
    """``{target: the parameter its weight is tied to}`` for targets whose weight is tied."""
    ties = declared_ties(model)
    return {t: ties[f"{t}.weight"] for t in targets if f"{t}.weight" in ties}


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def warn_tied_heads(model: nn.Module, targets: List[str], quant_config: QuantConfig, lora_config: LoRAConfig) -> None:
    """Say, before any work, what untying each targeted tied head costs in stored bytes."""
    for name, source in tied_heads(model, targets).items():
        module = model.get_submodule(name)
        out_f, in_f = linear_weight(module).shape
        groups = 1 if quant_config.group_size == -1 else in_f // quant_config.group_size
        grids = 1 if quant_config.method.value == "nf4" else 2  # scales (+ zeros), float16
        packed = packed_rows(in_f, quant_config.bits) * out_f * 4 + grids * groups * out_f * 2
        rank = min(lora_config.rank_for(name), in_f, out_f)
        lora = rank * (in_f + out_f) * module.weight.element_size()
        dense = module.weight.numel() * module.weight.element_size()
        logger.warning("targeting %r unties it from %r: %s keeps its %s %s matrix and %s stores its own %d-bit "
                       "weight and rank-%d LoRA, %s more than the tied model (%s packed + %s LoRA); the saved "
                       "config says tie_word_embeddings=False", name, source, source.rpartition(".")[0],
                       _mb(dense), str(module.weight.dtype).rpartition(".")[2], name, quant_config.bits, rank,
                       _mb(packed + lora), _mb(packed), _mb(lora))


def untie_heads(model: nn.Module, targets: List[str]) -> List[str]:
    """Record that the targeted tied heads are untied (their modules are already replaced): the
    tie is dropped from ``all_tied_weights_keys`` and the config says ``tie_word_embeddings=False``.
    Returns the untied parameter names."""
    ties = getattr(model, "all_tied_weights_keys", None)
    untied = [f"{t}.weight" for t in targets if isinstance(ties, dict) and f"{t}.weight" in ties]
    if not untied:
        return []
    for key in untied:
        ties.pop(key)
    if ties:  # other ties hang on the same flag (T5's encoder/decoder embeddings): keep it
        return untied
    config = getattr(model, "config", None)
    for cfg in {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)())}.values():
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return untied
