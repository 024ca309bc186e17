"""Calibration: feed each target layer's inputs to a Gram accumulator, block by block.

Sequential mode (DESIGN.md §2) finds the model's stack of transformer blocks, records the inputs
of the first block, then for each block: accumulates H = X^T X for the block's target layers (one
H per distinct input tensor, so q/k/v and gate/up share one), quantizes and initialises them, and
runs the block again with its new layers to produce the next block's inputs. Only one block's
Gram matrices are alive at a time. Targets outside the stack (e.g. BERT's pooler) are handled in a
final full-model pass.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .gram import GramAccumulator

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are recorded."""


def as_model_inputs(sample, device) -> dict:
    """A calibration sample (input_ids tensor or dict of model inputs) as a kwargs dict on device."""
    if isinstance(sample, torch.Tensor):
        sample = {"input_ids": sample if sample.dim() == 2 else sample.unsqueeze(0)}
    elif isinstance(sample, (list, tuple)) and sample and isinstance(sample[0], int):
        sample = {"input_ids": torch.tensor([list(sample)])}
    elif not isinstance(sample, dict):
        raise ValueError(f"calibration samples must be input_ids tensors or dicts of model inputs; got {type(sample).__name__}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


def find_block_stack(model: nn.Module, targets: List[str]) -> Optional[Tuple[str, nn.ModuleList]]:
    """The nn.ModuleList of repeated blocks holding the most target layers (e.g. ``model.layers``)."""
    best, best_count = None, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        count = sum(1 for t in targets if t.startswith(name + "."))
        if count > best_count:
            best, best_count = (name, mod), count
    return best


@contextlib.contextmanager
def _no_cache(model: nn.Module):
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, calib: Iterable, device) -> List[Tuple[tuple, dict, Optional[torch.Tensor]]]:
    """Run the model on each sample up to ``block``; return its (args, kwargs, attention_mask) per sample."""
    records: List[Tuple[tuple, dict, Optional[torch.Tensor]]] = []
    current = {}

    def hook(_mod, args, kwargs):
        records.append((args, kwargs, current.get("mask")))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _no_cache(model):
            for sample in calib:
                inputs = as_model_inputs(sample, device)
                current["mask"] = inputs.get("attention_mask")
                try:
                    model(**inputs)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return records


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> Tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of x (..., in) at real (unpadded) positions."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class GramHooks:
    """Forward pre-hooks that accumulate one Gram matrix per distinct input of the named layers.

    Layers whose inputs are the very same tensor object in a forward pass (q/k/v, gate/up) share
    one accumulator; sharing is decided on the first recorded pass.
    """

    def __init__(self, root: nn.Module, names: List[str], dtype=torch.float32):
        self.root, self.names, self.dtype = root, names, dtype
        self.mask: Optional[torch.Tensor] = None
        self.leader: Dict[str, str] = {}  # layer name -> name of the layer owning its accumulator
        self.acc: Dict[str, GramAccumulator] = {}
        self._first_pass: Dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        for n in self.names:
            self._handles.append(self.root.get_submodule(n).register_forward_pre_hook(self._hook(n)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._first_pass.clear()

    def _hook(self, name: str):
        def hook(_mod, inputs):
            x = inputs[0]
            if name not in self.leader:
                owner = next((o for o, t in self._first_pass.items() if t is x), None)
                if owner is None:
                    self._first_pass[name] = x
                    self.acc[name] = GramAccumulator(x.shape[-1], dtype=self.dtype, device=x.device, name=name)
                    owner = name
                self.leader[name] = owner
            if self.leader[name] == name:
                self.acc[name].add(_tokens(x, self.mask))

        return hook

    def H(self, name: str) -> torch.Tensor:
        if name not in self.leader:
            raise RuntimeError(f"layer {name!r} saw no calibration input; is it used in the forward pass?")
        return self.acc[self.leader[name]].H

    def count(self, name: str) -> int:
        return self.acc[self.leader[name]].count if name in self.leader else 0


LayerFn = Callable[[str, nn.Module, Optional[torch.Tensor]], nn.Module]


@torch.no_grad()
def run_sequential(model: nn.Module, targets: List[str], calib: List, layer_fn: LayerFn, device,
                   progress: bool = False) -> None:
    """Quantize/initialise ``targets`` block by block; ``layer_fn(name, module, H)`` returns the new module."""
    from tqdm.auto import tqdm

    from .hf.targets import replace_modules

    stack = find_block_stack(model, targets)
    done = set()
    if stack is not None:
        stack_name, blocks = stack
        records = capture_block_inputs(model, blocks[0], calib, device)
        if not records:
            raise ValueError("calibration data is empty: pass at least one sample")
        for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            prefix = f"{stack_name}.{i}."
            names = [t for t in targets if t.startswith(prefix)]
            local = [n[len(prefix):] for n in names]
            if local:
                with GramHooks(block, local) as grams:
                    for args, kwargs, mask in records:
                        grams.mask = mask
                        block(*args, **kwargs)
                replace_modules(block, {ln: layer_fn(prefix + ln, block.get_submodule(ln), grams.H(ln)) for ln in local})
                del grams
                done.update(names)
            next_records = []
            for args, kwargs, mask in records:
                out = block(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                next_records.append((*_with_hidden(args, kwargs, hidden), mask))
            records = next_records
    rest = [t for t in targets if t not in done]
    if rest:
        run_full_pass(model, rest, calib, layer_fn, device)


@torch.no_grad()
def run_full_pass(model: nn.Module, targets: List[str], calib: List, layer_fn: LayerFn, device) -> None:
    """Accumulate Gram matrices for all ``targets`` in full forward passes, then replace them."""
    from .hf.targets import replace_modules

    with GramHooks(model, targets) as grams, _no_cache(model):
        for sample in calib:
            inputs = as_model_inputs(sample, device)
            grams.mask = inputs.get("attention_mask")
            model(**inputs)
    if not any(grams.count(t) for t in targets):
        raise ValueError("calibration data is empty: pass at least one sample")
    replace_modules(model, {t: layer_fn(t, model.get_submodule(t), grams.H(t)) for t in targets})
