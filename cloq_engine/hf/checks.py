"""Checks around every prepare driver: refuse bad input before any work, warn where the result
cannot be trusted, and leave the caller's model as it was when preparation fails.

The plan step (``hf/plan.py``) runs the checks below; :func:`guarded` is the context every driver
does its work in: it snapshots what preparation changes (the target modules, ``requires_grad``,
train/eval modes and the attributes it sets) and puts it all back if anything raises,
KeyboardInterrupt included.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from ..nn import QuantLoRALinear, linear_weight
from .moe import experts_modules
from .targets import is_linear_like, output_embedding_names, replace_modules

logger = logging.getLogger(__name__)

_SET_BY_PREPARE = ("cloq_report", "cloq_config")


# ---------------------------------------------------------------------------------------------
# Before any work
# ---------------------------------------------------------------------------------------------
def check_not_prepared(model: nn.Module) -> None:
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)]
    if layers:
        raise ValueError(f"{type(model).__name__} is already prepared ({len(layers)} QuantLoRALinear layers, "
                         f"e.g. {layers[0]!r}): load the full-precision model again to prepare it differently")


def nonfinite_counts(name: str, t: torch.Tensor) -> Optional[str]:
    """``"name (3 NaN, 1 Inf)"`` when the floating tensor ``t`` holds NaN or Inf values, else None."""
    if not t.is_floating_point() or t.device.type == "meta" or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = t.numel() - nan - int(torch.isfinite(t).sum())
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"{name} ({', '.join(parts)})"


def raise_nonfinite(bad: List[str], source: str) -> None:
    if bad:
        raise ValueError(f"{source} has NaN or Inf weights in {len(bad)} tensor(s): {'; '.join(bad)}: "
                         "quantizing them gives NaN outputs; repair or re-download the model")


@torch.no_grad()
def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with NaN or Inf in any parameter before calibration (which would only reach
    the bad layer after every block before it), naming every bad tensor."""
    bad = [b for n, p in model.named_parameters() if (b := nonfinite_counts(n, p)) is not None]
    raise_nonfinite(bad, "the model")


def _input_ids(sample) -> Optional[torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(sample, dict):
        ids = sample.get("input_ids")
        return ids if isinstance(ids, torch.Tensor) else None
    if isinstance(sample, (list, tuple)) and all(isinstance(t, int) for t in sample):
        return torch.tensor(sample)
    return None


def _tokens(sample, ids: torch.Tensor) -> int:
    mask = sample.get("attention_mask") if isinstance(sample, dict) else None
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else ids.numel()


def _vocab_size(model: nn.Module) -> Optional[int]:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_calibration(model: nn.Module, calib: List) -> int:
    """Refuse empty samples, token ids outside the vocabulary and samples longer than the model's
    positions, naming the sample; returns the number of calibration tokens."""
    vocab = _vocab_size(model)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    total = 0
    for i, sample in enumerate(calib):
        ids = _input_ids(sample)
        if ids is None:
            continue  # other model inputs (e.g. inputs_embeds): calib.py says what it accepts
        if ids.numel() == 0:
            raise ValueError(f"calibration sample {i} is empty (input_ids of shape {tuple(ids.shape)})")
        if ids.is_floating_point():
            raise ValueError(f"calibration sample {i}: input_ids must be integer token ids; got {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if vocab is not None and (lo < 0 or hi >= vocab):
            bad = lo if lo < 0 else hi
            raise ValueError(f"calibration sample {i} has token id {bad} outside the model's vocabulary "
                             f"(vocab_size={vocab}): was it tokenized with this model's tokenizer?")
        length = ids.shape[-1]
        if isinstance(positions, int) and length > positions:
            raise ValueError(f"calibration sample {i} has {length} tokens; the model's max_position_embeddings "
                             f"is {positions}: use shorter samples")
        total += _tokens(sample, ids)
    return total


def underdetermined_layers(model: nn.Module, targets: List[str], tokens: int) -> Dict[str, int]:
    """Targets whose in_features exceed the calibration tokens: their H = X^T X is singular, and
    GPTQ/CLoQ fit the calibration data itself (the calibrated error reads ~0 and means nothing)."""
    out = {}
    for name in targets:
        in_f = linear_weight(model.get_submodule(name)).shape[1]
        if tokens < in_f:
            out[name] = in_f
    return out


def warn_underdetermined(model: nn.Module, targets: List[str], tokens: int, calibrated: bool) -> Dict[str, int]:
    """Warn (once, naming the worst layer) when a calibrated method (``calibrated``: the quantizer
    or the init reads H) gets fewer tokens than some target's in_features; returns those targets
    (the report's ``underdetermined``)."""
    if not tokens or not calibrated:
        return {}
    thin = underdetermined_layers(model, targets, tokens)
    if thin:
        worst = max(thin.values())
        logger.warning("calibration has %d tokens, fewer than in_features of %d layer(s) (up to %d, e.g. %r): "
                       "H is singular there and the calibrated errors fit the calibration data itself; "
                       "use at least %d tokens (more samples or longer ones)",
                       tokens, len(thin), worst, next(iter(thin)), worst)
    return thin


def untargeted_weights(model: nn.Module, targets: List[str]) -> List[str]:
    """Weight matrices preparation leaves in full precision that are not plain leftovers: stacked
    (3-D) tensors that are not targeted expert projections, and 2-D weights of modules that are
    neither linear layers, embeddings nor normalisations (custom projections, routers).
    ``targets``: every target, linear layers and expert projections."""
    target_set = set(targets)
    heads = set(output_embedding_names(model))
    left = []
    for mod_name, module in model.named_modules():
        if mod_name in target_set or mod_name in heads or is_linear_like(module):
            continue  # linear layers left out were left out by `target_modules` / `exclude`
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm)) or "norm" in type(module).__name__.lower():
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.dim() >= 3 or (p.dim() == 2 and min(p.shape) > 1 and "embed" not in p_name):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if full not in target_set:
                    left.append(full)
    return left


def warn_untargeted(model: nn.Module, targets: List[str]) -> List[str]:
    left = untargeted_weights(model, targets)
    if left:
        params = dict(model.named_parameters())
        n_left = sum(params[n].numel() for n in left if n in params)
        n_all = sum(p.numel() for p in model.parameters())
        logger.warning("%d weight tensor(s) holding %.0f%% of the parameters stay in FULL PRECISION: cloq quantizes "
                       "nn.Linear / Conv1D layers and the 3-D expert projections of transformers' experts modules "
                       "that `target_modules` selects, e.g. %s", len(left), 100 * n_left / max(n_all, 1),
                       ", ".join(left[:4]))
    return left


# ---------------------------------------------------------------------------------------------
# Restore on failure
# ---------------------------------------------------------------------------------------------
class _Snapshot:
    """What prepare_model changes on the caller's model, to put back after a failure."""

    def __init__(self, model: nn.Module, targets: List[str]):
        self.model = model
        self.modules = {n: model.get_submodule(n) for n in targets}
        # packed expert projections replace parameters of the experts modules (hf/moe.py)
        self.expert_params = {(m, n): p for m in experts_modules(model).values()
                              for n, p in m._parameters.items() if p is not None}
        get_impl = getattr(model, "get_experts_implementation", None)
        self.experts_impl = get_impl() if callable(get_impl) and self.expert_params else None
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        self.attrs = {a: model.__dict__[a] for a in _SET_BY_PREPARE if a in model.__dict__}
        config = getattr(model, "config", None)
        self.config = config
        self.quantization_config = getattr(config, "quantization_config", None) if config is not None else None
        self.had_quantization_config = config is not None and hasattr(config, "quantization_config")

    def restore(self) -> None:
        replace_modules(self.model, self.modules)
        for (module, name), p in self.expert_params.items():
            module._modules.pop(name, None)
            module._parameters[name] = p
        if self.experts_impl is not None:
            self.model.set_experts_implementation(self.experts_impl)
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        for m, flag in self.training:
            m.training = flag
        for a in _SET_BY_PREPARE:
            self.model.__dict__.pop(a, None)
        self.model.__dict__.update(self.attrs)
        if self.config is not None:
            if self.had_quantization_config:
                self.config.quantization_config = self.quantization_config
            elif hasattr(self.config, "quantization_config"):
                delattr(self.config, "quantization_config")


@contextlib.contextmanager
def guarded(model: nn.Module, plan, restore: bool = True):
    """Around a prepare driver's work on ``model`` (after its plan, ``hf/plan.py``): the model in
    eval mode while it is calibrated, its train/eval mode given back after, and its experts modules
    run by cloq's experts implementation (which records their inputs, dense or packed); if anything
    raises, KeyboardInterrupt included, the caller's model is put back as it was (every driver, the
    same way).

    ``restore=False`` for a model the driver built itself (the streaming path's meta skeleton): there
    is no caller's model to put back, and a snapshot would hold every replaced layer's weights
    (loaded block by block) until the end, the whole model in memory."""
    from ..experts import use_cloq_experts

    snapshot = _Snapshot(model, plan.targets) if restore else None
    was_training = model.training
    model.eval()
    if plan.expert_targets:
        use_cloq_experts(model)
    try:
        yield
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    model.train(was_training)
