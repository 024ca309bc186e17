"""The block loop every prepare driver runs, and its last step.

:func:`run_blocks` prepares a plan's targets block by block (GPTQ's scheme, docs/design.md §2):
the inputs of block i come from blocks < i already quantized, true-sequential inside a block, the
expert projections of a block after its linear layers, the targets outside the block stack
(BERT's pooler, a targeted lm_head) last. Without calibration it visits the same blocks in the
same order with H = None. A driver hooks in before and after each block (GPTQModel's
``ModuleLooper`` lifecycle: the streaming driver loads a block's weights there, then writes and
frees it). :func:`finish` freezes all but the LoRA factors and records the configuration, for
every driver the same way.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import calib as calib_mod
from ..layer_factory import mark_trainable, replace_modules
from . import moe
from .builder import LayerBuilder
from .fit import untie_heads
from .quantizer import set_cloq_config
from .report import BlockReport, PrepareReport

BlockHook = Callable[[int, nn.Module], None]


def prepare_experts(root: nn.Module, names: List[str], builder: LayerBuilder, prefix: str = "",
                    run: Optional[Callable] = None, stop: bool = True) -> None:
    """Prepare the expert projections ``names`` (under ``root``): every (gate_)up first, then every
    down, calibrated on the outputs of the already-quantized (gate_)up (true-sequential).

    ``run(recorder)`` runs the calibration forward passes (None: no calibration data); see
    ``hf/moe.collect_expert_grams``."""
    wanted: Dict[str, List[str]] = {}
    for n in names:
        mod_name, proj = moe.split_target(n)
        wanted.setdefault(mod_name, []).append(proj)
    modules = {m: root.get_submodule(m) for m in wanted}
    for step in (0, 1):
        projs = {m: moe.projection_names(mod)[step] for m, mod in modules.items()
                 if moe.projection_names(mod)[step] in wanted[m]}
        if not projs:
            continue
        grams = {} if run is None else moe.collect_expert_grams(root, {m: modules[m] for m in projs}, projs, run, stop)
        builder.build_experts(root, [f"{m}.{p}" for m, p in projs.items()],
                              {f"{m}.{p}": grams.get(m) for m, p in projs.items()}, prefix)


def _block_runner(block: nn.Module, batches):
    def run(recorder):
        for call, h in batches:
            recorder.new_pass(call.mask)
            moe.run_stopping(call, block, h)

    return run


def _model_runner(model: nn.Module, batches):
    def run(recorder):
        with calib_mod.no_cache(model):
            for inputs in batches:
                recorder.new_pass(inputs.get("attention_mask"))
                model(**inputs)

    return run


def _build_block(block: nn.Module, builder: LayerBuilder, rep: BlockReport, prefix: str, names: List[str],
                 enames: List[str], batches, true_sequential: bool) -> None:
    """Prepare one block's targets (``names``, ``enames`` under ``block``), calibrated on
    ``batches`` (its inputs from the blocks before it; None: no calibration)."""
    builder.block = rep
    t0 = time.perf_counter()
    if batches is None:
        for n in names:
            replace_modules(block, builder.build(block, {n: None}, prefix))
    elif names:
        for grams in calib_mod.block_grams(block, names, batches, true_sequential):
            t1 = time.perf_counter()
            rep.capture_s += t1 - t0
            replace_modules(block, builder.build(block, grams, prefix))
            t0 = time.perf_counter()
        rep.capture_s += time.perf_counter() - t0
    if enames:
        t0, work0 = time.perf_counter(), rep.quantize_s + rep.init_s
        prepare_experts(block, enames, builder, prefix, run=None if batches is None else _block_runner(block, batches))
        if batches is not None:
            rep.capture_s += time.perf_counter() - t0 - (rep.quantize_s + rep.init_s - work0)
    builder.block = None


@torch.no_grad()
def run_blocks(model: nn.Module, plan, builder: LayerBuilder, *, targets: Optional[Sequence[str]] = None,
               sequential: bool = True, true_sequential: bool = True, progress: bool = False, start: int = 0,
               before_block: Optional[BlockHook] = None, after_block: Optional[BlockHook] = None) -> None:
    """Prepare ``plan``'s targets (``targets``: the linear ones to prepare, default all) of ``model``.

    ``before_block(i, block)`` runs before block i is calibrated (the streaming path loads its
    weights there), ``after_block(i, block)`` once it is prepared and has fed the next block
    (the streaming path writes and frees it there). Blocks before ``start`` are only run forward
    (already prepared: a resumed run). ``sequential=False``: one calibration pass over the
    original model instead of block by block.
    """
    from tqdm.auto import tqdm

    targets = list(plan.targets if targets is None else targets)
    expert_targets = list(plan.expert_targets)
    report, batches = builder.report, plan.batches
    if batches and not sequential:
        t0 = time.perf_counter()
        grams = calib_mod.full_pass_grams(model, targets, batches)
        report.capture_s += time.perf_counter() - t0
        replace_modules(model, builder.build(model, grams))
        # experts after the linear layers: their H_e come from the quantized attention's outputs
        prepare_experts(model, expert_targets, builder, run=_model_runner(model, batches), stop=False)
        return
    stack = calib_mod.find_block_stack(model, targets + expert_targets)
    done = set()
    inputs = None
    if stack is not None:
        stack_name, blocks = stack
        if batches:
            if before_block is not None:
                before_block(0, blocks[0])  # block 0 runs while its inputs are captured
            t0 = time.perf_counter()
            inputs = calib_mod.capture_block_inputs(model, blocks, batches)
            report.capture_s += time.perf_counter() - t0
        for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            prefix = f"{stack_name}.{i}."
            names = [t for t in targets if t.startswith(prefix)]
            enames = [t for t in expert_targets if t.startswith(prefix)]
            if before_block is not None:
                before_block(i, block)
            work = i >= start and (names or enames)
            if work:
                rep = BlockReport(i)
                _build_block(block, builder, rep, prefix, [n[len(prefix):] for n in names],
                             [n[len(prefix):] for n in enames], None if inputs is None else inputs.batches(i),
                             true_sequential)
            if inputs is not None:
                t0 = time.perf_counter()
                inputs.advance(i)
                if work:
                    rep.forward_s = time.perf_counter() - t0
            if work:
                report.blocks.append(rep)
                report.capture_s += rep.capture_s + rep.forward_s
            done.update(names)
            done.update(enames)
            if after_block is not None:
                after_block(i, block)
    rest = [t for t in targets if t not in done]
    if rest and batches:
        t0 = time.perf_counter()
        # Outside the stack (BERT's pooler, a targeted lm_head): from the stream's final hidden
        # states, without running the blocks again (the streaming path has freed them).
        grams = (calib_mod.tail_grams(model, inputs, rest, batches) if inputs is not None
                 else calib_mod.full_pass_grams(model, rest, batches))
        report.capture_s += time.perf_counter() - t0
        replace_modules(model, builder.build(model, grams))
    else:
        for n in rest:
            replace_modules(model, builder.build(model, {n: None}))
    rest_experts = [t for t in expert_targets if t not in done]
    if rest_experts:
        prepare_experts(model, rest_experts, builder, run=_model_runner(model, batches) if batches else None,
                        stop=False)


def finish(model: nn.Module, plan, report: PrepareReport, **record) -> None:
    """Freeze all but LoRA, record a targeted tied head as untied, record the configuration on the
    model (and its HF config; ``record``: more fields, e.g. ``base_model``) and leave the report in
    ``model.cloq_report``."""
    mark_trainable(model)
    targets = plan.all_targets
    untie_heads(model, targets)
    set_cloq_config(model, plan.quant_config, plan.lora_config, targets, **record)
    model.cloq_report = report
