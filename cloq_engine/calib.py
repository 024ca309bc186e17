"""Calibration: the Gram matrices ``H = X^T X`` of target layers, block by block.

A pure stage: it runs forward passes and hands back ``{layer name: H}``; the caller quantizes
and swaps the layers (``layer_factory.py``), so the inputs of later layers come from quantized ones.

Sequential use (docs/design.md §2), as ``hf/prepare.py`` drives it::

    stack = find_block_stack(model, targets)                # e.g. ("model.layers", ModuleList)
    inputs = capture_block_inputs(model, blocks, batches)   # every block's forward kwargs
    for i, block in enumerate(blocks):
        for grams in block_grams(block, names, inputs[i]):  # {name: H}, one per input group
            ...swap those layers of `block` before asking for the next group...
        inputs.advance(i)                                   # run block i to feed block i+1

Layers reading the very same input tensor (q/k/v, gate/up) form a group sharing one H. With
``true_sequential`` (the default) the groups of a block are calibrated in execution order and
each group's H is accumulated after the earlier groups were swapped: o_proj sees the outputs of
the quantized q/k/v, down_proj those of the quantized gate/up (GPTQ's ``true-sequential``). A
pass for one group stops as soon as the group has its input.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .gram import GramAccumulator

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are recorded."""


# ---------------------------------------------------------------------------------------------
# Calibration samples
# ---------------------------------------------------------------------------------------------
def as_model_inputs(sample, device) -> dict:
    """A calibration sample (input_ids tensor or dict of model inputs) as a kwargs dict on device."""
    if isinstance(sample, torch.Tensor):
        sample = {"input_ids": sample if sample.dim() == 2 else sample.unsqueeze(0)}
    elif isinstance(sample, (list, tuple)) and sample and isinstance(sample[0], int):
        sample = {"input_ids": torch.tensor([list(sample)])}
    elif not isinstance(sample, dict):
        raise ValueError(f"calibration samples must be input_ids tensors or dicts of model inputs; got {type(sample).__name__}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}


def _stackable(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor):
            return False
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[1:] != w.shape[1:] or v.dtype != w.dtype:
                return False
        elif v != w:
            return False
    return True


def batch_samples(calib: Iterable, batch_size: int, device) -> List[dict]:
    """Model-input dicts, consecutive samples of equal shapes concatenated along the batch
    dimension, at most ``batch_size`` sequences each (forwards in batches, not one by one)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}")
    batches: List[List[dict]] = []
    for sample in calib:
        inputs = as_model_inputs(sample, device)
        cur = batches[-1] if batches else None
        rows = sum(_rows(d) for d in cur) if cur else 0
        if cur and rows + _rows(inputs) <= batch_size and _stackable(cur[0], inputs):
            cur.append(inputs)
        else:
            batches.append([inputs])
    return [_concat(group) for group in batches]


def _rows(inputs: dict) -> int:
    t = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return 1 if t is None else t.shape[0]


def _concat(group: List[dict]) -> dict:
    if len(group) == 1:
        return group[0]
    return {k: torch.cat([d[k] for d in group]) if isinstance(v, torch.Tensor) else v for k, v in group[0].items()}


@contextlib.contextmanager
def no_cache(model: nn.Module):
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


# ---------------------------------------------------------------------------------------------
# Block inputs
# ---------------------------------------------------------------------------------------------
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


@dataclass
class BlockCall:
    """How a block is called on one batch, its hidden states left out (they flow down the stack)."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments, ``hidden_states`` excluded
    hidden_in_kwargs: bool
    mask: Optional[torch.Tensor]  # the model-level attention mask (B, T): which tokens are real

    def __call__(self, block: nn.Module, hidden: torch.Tensor):
        if self.hidden_in_kwargs:
            return block(*self.args, hidden_states=hidden, **self.kwargs)
        return block(hidden, *self.args, **self.kwargs)


class BlockInputs:
    """Per batch, the hidden states entering the current block, and every block's own call
    arguments (attention masks and position embeddings can differ per block, e.g. Gemma 2's
    sliding-window layers)."""

    def __init__(self, hidden: List[torch.Tensor], calls: List[List[BlockCall]], blocks: nn.ModuleList):
        self.hidden, self.calls, self.blocks = hidden, calls, blocks
        self.output_arity = 0  # how the last block run returns its hidden states: 0 bare, n a tuple of n

    def __len__(self) -> int:
        return len(self.hidden)

    def batches(self, i: int) -> List[Tuple[BlockCall, torch.Tensor]]:
        """(call, hidden) per batch for block ``i`` (the hidden states currently held)."""
        return list(zip(self.calls[i], self.hidden))

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Run block ``i`` (as it now is) on the held hidden states: they become block i+1's."""
        outs = [call(self.blocks[i], h) for call, h in self.batches(i)]
        self.output_arity = len(outs[0]) if outs and isinstance(outs[0], (tuple, list)) else 0
        self.hidden = [_first(out) for out in outs]
        self.calls[i] = []  # block i's arguments are no longer needed


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _split_hidden(args: tuple, kwargs: dict, mask) -> Tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), False, mask)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs, True, mask)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[dict]) -> BlockInputs:
    """Run the model on each batch and record every block's call arguments, and the hidden states
    entering block 0, without computing any block but block 0 (whose output is passed on
    unchanged, so the model's own code between blocks sees well-formed values)."""
    if not batches:
        raise ValueError("calibration data is empty: pass at least one sample")
    n = len(blocks)
    hidden: List[torch.Tensor] = []
    calls: List[List[BlockCall]] = [[] for _ in range(n)]
    state: dict = {}

    def stub(i: int, block: nn.Module, real_forward):
        def forward(*args, **kwargs):
            h, call = _split_hidden(args, kwargs, state["mask"])
            calls[i].append(call)
            if i == 0:
                hidden.append(h)
                state["out"] = real_forward(*args, **kwargs)
            if i == n - 1:
                raise _StopForward
            return state["out"]

        return forward

    saved = []
    for i, block in enumerate(blocks):
        saved.append(block.__dict__.get("forward"))  # accelerate's hooks patch the instance too
        block.forward = stub(i, block, block.forward)
    try:
        with no_cache(model):
            for inputs in batches:
                state["mask"] = inputs.get("attention_mask")
                try:
                    model(**inputs)
                except _StopForward:
                    pass
    finally:
        for block, old in zip(blocks, saved):
            del block.forward
            if old is not None:
                block.forward = old
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise RuntimeError("the model did not call every block once per forward pass; "
                           "sequential calibration needs a plain stack of blocks (use sequential=False)")
    return BlockInputs(hidden, calls, blocks)


# ---------------------------------------------------------------------------------------------
# Gram matrices
# ---------------------------------------------------------------------------------------------
def _tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of x (..., in) at real (unpadded) positions."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]) and not bool(mask.all()):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class GramHooks:
    """Forward pre-hooks that accumulate one Gram matrix per distinct input of the named layers.

    Layers whose inputs are the very same tensor object in a forward pass (q/k/v, gate/up) share
    one accumulator; sharing is decided on the first recorded pass. ``order`` lists the layers in
    the order they were first called; ``calls`` counts calls per layer.
    """

    def __init__(self, root: nn.Module, names: List[str], dtype=torch.float32):
        self.root, self.names, self.dtype = root, names, dtype
        self.mask: Optional[torch.Tensor] = None
        self.leader: Dict[str, str] = {}  # layer name -> name of the layer owning its accumulator
        self.acc: Dict[str, GramAccumulator] = {}
        self.order: List[str] = []
        self.calls: Dict[str, int] = {}
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
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.leader:
                self.order.append(name)
                owner = next((o for o, t in self._first_pass.items() if t is x), None)
                if owner is None:
                    self._first_pass[name] = x
                    self.acc[name] = GramAccumulator(x.shape[-1], dtype=self.dtype, device=x.device, name=name)
                    owner = name
                self.leader[name] = owner
            if self.leader[name] == name:
                self.acc[name].add(_tokens(x, self.mask))

        return hook

    def groups(self) -> List[List[str]]:
        """Layers sharing an input, groups in the order they ran."""
        out: Dict[str, List[str]] = {}
        for n in self.order:
            out.setdefault(self.leader[n], []).append(n)
        return list(out.values())

    def H(self, name: str) -> torch.Tensor:
        if name not in self.leader:
            raise RuntimeError(f"layer {name!r} saw no calibration input; is it used in the forward pass?")
        return self.acc[self.leader[name]].H

    def count(self, name: str) -> int:
        return self.acc[self.leader[name]].count if name in self.leader else 0


def _check_all_called(grams: GramHooks, names: List[str]) -> None:
    for n in names:
        grams.H(n)  # raises naming the layer


@torch.no_grad()
def block_grams(block: nn.Module, names: List[str], batches: List[Tuple[BlockCall, torch.Tensor]],
                true_sequential: bool = True) -> Iterator[Dict[str, torch.Tensor]]:
    """``{name: H}`` for each group of ``names`` (layers of ``block`` sharing an input), in
    execution order. With ``true_sequential``, swap a group's layers before asking for the next
    group: its H is accumulated through the swapped layers."""
    if not batches:
        raise ValueError("calibration data is empty: pass at least one sample")
    if not true_sequential:
        with GramHooks(block, names) as grams:
            for call, h in batches:
                grams.mask = call.mask
                call(block, h)
        _check_all_called(grams, names)
        for group in grams.groups():
            yield {n: grams.H(n) for n in group}
        return

    # A first batch finds the groups and their order; the GPTQ-style passes below stop early.
    call0, h0 = batches[0]
    with GramHooks(block, names) as probe:
        probe.mask = call0.mask
        call0(block, h0)
    _check_all_called(probe, names)
    groups = probe.groups()
    if any(c > 1 for c in probe.calls.values()):
        # A layer runs more than once per pass: early stops would miss calls; one pass per group.
        logger.info("a target layer runs several times per block pass; calibrating without early stops")
        stop = False
    else:
        stop = True
    for group in groups:
        yield {n: H for n, H in _group_gram(block, group, batches, stop).items()}


def _group_gram(block: nn.Module, group: List[str], batches, stop: bool) -> Dict[str, torch.Tensor]:
    leader = block.get_submodule(group[0])
    acc: Dict[str, GramAccumulator] = {}
    mask: dict = {}

    def hook(_mod, inputs):
        x = inputs[0]
        if "acc" not in acc:
            acc["acc"] = GramAccumulator(x.shape[-1], device=x.device, name=group[0])
        acc["acc"].add(_tokens(x, mask.get("m")))
        if stop:
            raise _StopForward

    handle = leader.register_forward_pre_hook(hook)
    try:
        for call, h in batches:
            mask["m"] = call.mask
            try:
                call(block, h)
            except _StopForward:
                pass
    finally:
        handle.remove()
    H = acc["acc"].H
    return {n: H for n in group}


@torch.no_grad()
def tail_grams(model: nn.Module, inputs: BlockInputs, names: List[str], batches: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """``{name: H}`` for ``names`` outside the block stack (BERT's pooler, a targeted lm_head),
    once every block has run: the model runs with each block replaced by a stub, the last one
    returning the stream's own final hidden states, so no block is computed again (the streaming
    path has freed them) and the layers after the stack see what the prepared blocks produce."""
    blocks, n = inputs.blocks, len(inputs.blocks)
    if len(inputs.hidden) != len(batches):
        raise RuntimeError("the block stream holds no final hidden states for these calibration batches")
    state = {"batch": 0}

    def stub(i: int):
        def forward(*args, **kwargs):
            h, _ = _split_hidden(args, kwargs, None)
            out = inputs.hidden[state["batch"]] if i == n - 1 else h  # earlier blocks: a well-formed stand-in
            return (out,) + (None,) * (inputs.output_arity - 1) if inputs.output_arity else out

        return forward

    saved = []
    for i, block in enumerate(blocks):
        saved.append(block.__dict__.get("forward"))
        block.forward = stub(i)
    try:
        with GramHooks(model, names) as grams, no_cache(model):
            for b, batch in enumerate(batches):
                state["batch"] = b
                grams.mask = batch.get("attention_mask")
                model(**batch)
    finally:
        for block, old in zip(blocks, saved):
            del block.forward
            if old is not None:
                block.forward = old
    return {n_: grams.H(n_) for n_ in names}


@torch.no_grad()
def full_pass_grams(model: nn.Module, names: List[str], batches: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """``{name: H}`` for ``names`` from full forward passes of ``model`` (layers outside any
    block stack, e.g. BERT's pooler, or everything when not sequential)."""
    with GramHooks(model, names) as grams, no_cache(model):
        for inputs in batches:
            grams.mask = inputs.get("attention_mask")
            model(**inputs)
    if not any(grams.count(t) for t in names):
        raise ValueError("calibration data is empty: pass at least one sample")
    return {n: grams.H(n) for n in names}
