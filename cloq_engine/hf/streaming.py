"""Prepare a model larger than memory, one block at a time, from safetensors shards to disk; resumable.

:func:`prepare_pretrained` builds the model on ``meta`` (accelerate's ``init_empty_weights``),
loads what lies outside the block stack (embeddings, final norm, head), then for each block:
loads its weights from the shards, calibrates/quantizes it with the same driver as
:func:`prepare_model` (so the result is bitwise the same), runs it to feed the next block, writes
its tensors and frees it. Peak memory: one block, the calibration activations and the
embeddings, whatever the depth.

On a CPU, glibc's dynamic mmap threshold can keep freed block weights resident (RSS then grows
with depth though live memory does not); ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment
avoids it.

Work in progress lives in ``<out>.partial/``: one ``block-NNNNN.safetensors`` per finished block
(written to a temporary name, fsynced, renamed) and ``progress.json`` (the run's fingerprint and
the finished blocks, rewritten atomically after each block). ``<out>`` itself appears only when
everything is written, by an atomic rename, so an interrupted run never leaves something that
looks like a checkpoint. ``resume=True`` reloads the finished blocks from ``<out>.partial/`` (and
runs them forward to rebuild the next block's inputs) and continues; it refuses a partial output
of a different run. Each finished block's rows of the prepare report are kept beside it
(``block-NNNNN.report.json``), so a resumed run reports every layer, as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .. import calib as calib_mod
from ..config import LoRAConfig, QuantConfig
from ..layer_factory import cast_dense, stored_state
from ..formats import QUANT_BUFFERS
from . import moe
from .builder import LayerBuilder
from .checks import guarded
from .output_dir import check_free_space, write_dir_atomically
from .persistence import model_class_for, owned, read_generation_config, write_side_files
from .pipeline import finish, run_blocks
from .skeleton import swap_in_empty_layers
from .plan import check_configs, plan_prepare
from .record import (ALIASES_KEY, FORMAT_VERSION, WEIGHTS_NAME, hf_config_dict, quantization_record,
                     same_view, state_nbytes, storage_key, superseded_weights, tensor_checksum)
from .report import BlockReport, ExpertReport, LayerReport, PrepareReport

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
MANIFEST = "progress.json"
TAIL_FILE = "tail.safetensors"  # the targets outside the block stack, prepared after the last block
_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Reading the source shards
# ---------------------------------------------------------------------------------------------
class ShardReader:
    """Tensors of a Hugging Face checkpoint directory by name, read only when asked for."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, _INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            from safetensors import safe_open

            file = os.path.join(path, WEIGHTS_NAME)
            with safe_open(file, framework="pt") as f:
                self.where = {k: file for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} or {_INDEX} (safetensors weights are needed)")

    def check_finite(self) -> None:
        """Refuse NaN or Inf in any floating tensor of the shards, naming every bad one (one tensor
        in memory at a time)."""
        from safetensors import safe_open

        from .checks import nonfinite_counts, raise_nonfinite

        bad = []
        for file in sorted(set(self.where.values())):
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    found = nonfinite_counts(k, f.get_tensor(k))
                    if found is not None:
                        bad.append(found)
        raise_nonfinite(bad, self.path)

    def read(self, names: Iterable[str], device) -> Dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: Dict[str, List[str]] = {}
        for n in names:
            if n in self.where:
                by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for k in keys:
                    out[k] = owned(f.get_tensor(k))  # computed on: as the in-memory path's tensors
        return out


# ---------------------------------------------------------------------------------------------
# Writing safetensors without holding every tensor
# ---------------------------------------------------------------------------------------------
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def _checksums(sources: List[str], extra: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """sha256 of every tensor of the ``sources`` files and ``extra``, one tensor in memory at a time."""
    from safetensors import safe_open

    sums = {}
    for src in sources:
        with safe_open(src, framework="pt") as f:
            for k in f.keys():
                sums[k] = tensor_checksum(f.get_tensor(k))
    sums.update({k: tensor_checksum(t) for k, t in extra.items()})
    return sums


def write_safetensors_streaming(sources: List[str], extra: Dict[str, torch.Tensor], file: str, metadata: dict) -> None:
    """One safetensors ``file`` holding every tensor of the ``sources`` files and ``extra``,
    copied one tensor at a time (memory: the largest tensor)."""
    from safetensors import safe_open

    entries = []  # (name, dtype, shape, nbytes, loader)
    for src in sources:
        with safe_open(src, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = sl.get_dtype()
                shape = sl.get_shape()
                entries.append((k, dtype, shape, src))
    header: dict = {"__metadata__": metadata}
    offset, plan = 0, []
    for k, dtype, shape, src in entries:
        n = _nbytes(dtype, shape)
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        plan.append((k, src))
        offset += n
    for k, t in extra.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        plan.append((k, None))
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for src in sources:
            with safe_open(src, framework="pt") as f:
                for k in f.keys():
                    out.write(_tensor_bytes(f.get_tensor(k)))
        for k, t in extra.items():
            out.write(_tensor_bytes(t))
        out.flush()
        os.fsync(out.fileno())


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(dtype: str, shape) -> int:
    n = _ST_SIZES[dtype]
    for s in shape:
        n *= s
    return n


def _save_atomic(tensors: Dict[str, torch.Tensor], file: str) -> None:
    from safetensors.torch import save_file

    tmp = file + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _write_json_atomic(obj, file: str) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def _fingerprint(model_path, quant_config, lora_config, targets, batches, true_sequential, batch_size, dtype) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"model": os.path.abspath(model_path), "quant": quant_config.to_dict(),
                         "lora": lora_config.to_dict(), "targets": targets, "true_sequential": true_sequential,
                         "batch_size": batch_size, "dtype": str(dtype)}, sort_keys=True).encode())
    for b in batches:
        for k in sorted(b):
            v = b[k]
            h.update(k.encode())
            h.update(_tensor_bytes(v) if isinstance(v, torch.Tensor) else repr(v).encode())
    return h.hexdigest()


def _block_file(partial: str, i: int) -> str:
    return os.path.join(partial, f"block-{i:05d}.safetensors")


def _report_file(data_file: str) -> str:
    """The report rows of a finished block (or of the tail) live beside its tensors."""
    return data_file.rsplit(".", 1)[0] + ".report.json"


_ROWS = (("layers", LayerReport), ("experts", ExpertReport), ("blocks", BlockReport))


class _ReportRows:
    """The rows of a PrepareReport added since the last :meth:`save`, written beside a finished
    block; :meth:`load` puts an earlier run's rows back, in order."""

    def __init__(self, report: PrepareReport):
        self.report = report
        self.mark()

    def mark(self) -> None:
        self.seen = {k: len(getattr(self.report, k)) for k, _ in _ROWS}

    def save(self, data_file: str) -> None:
        rows = {k: [dataclasses.asdict(r) for r in getattr(self.report, k)[self.seen[k]:]] for k, _ in _ROWS}
        _write_json_atomic(rows, _report_file(data_file))
        self.mark()

    def load(self, data_file: str) -> None:
        path = _report_file(data_file)
        if not os.path.isfile(path):  # written by a version that did not keep them
            return
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        for k, cls in _ROWS:
            for r in rows.get(k, []):
                if "shape" in r:
                    r["shape"] = tuple(r["shape"])
                getattr(self.report, k).append(cls(**r))
        self.mark()


def _outside_state(model: nn.Module, stack_name: str):
    """State dict entries outside the block stack, each tensor once (tied ones as aliases)."""
    state, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(stack_name + "."):
            continue
        t = t.detach()
        key = storage_key(t)
        exact = next((k for k in seen.get(key, []) if same_view(state[k], t)), None)
        if exact is not None:
            aliases[name] = exact
            continue
        seen.setdefault(key, []).append(name)
        state[name] = t.contiguous()
    return state, aliases


def prepare_pretrained(model_path, out, quant_config: QuantConfig, lora_config: LoRAConfig,
                       calib: Optional[Iterable] = None, *, resume: bool = False, device=None,
                       dtype: Optional[torch.dtype] = None, true_sequential: bool = True, batch_size: int = 8,
                       report: str = "sampled", progress: bool = False, tokenizer=None,
                       storage_dtype: Optional[torch.dtype] = None,
                       return_report: bool = False) -> Union[str, Tuple[str, PrepareReport]]:
    """Prepare the Hugging Face checkpoint at ``model_path`` block by block and write the prepared
    checkpoint to ``out`` (as :func:`save_pretrained` would), in bounded memory.

    Args: as :func:`prepare_model`, plus ``device`` (where blocks are computed, default CPU),
    ``dtype`` (of the model's floating weights while it is calibrated; default the config's),
    ``storage_dtype`` (of the dense tensors written, embeddings, norms, biases; default ``dtype``;
    the LoRA factors keep their ``lora_dtype``) and ``resume`` (continue from ``<out>.partial/``
    after an interruption; otherwise any partial output is discarded).
    The calibration data is checked as :func:`prepare_model` checks it (token ids in the
    vocabulary, samples no longer than the model's positions, a warning when fewer tokens than a
    target's in_features).
    Returns the absolute path of ``out``; with ``return_report=True``, ``(path, report)``: the
    :class:`PrepareReport` that :func:`prepare_model` leaves in ``model.cloq_report`` (a resumed
    run's includes the blocks an earlier run finished).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    check_configs(quant_config, lora_config, report)  # before the config and shards are read
    model_path = os.path.abspath(os.fspath(model_path))
    out = os.path.abspath(os.fspath(out))
    partial = out + PARTIAL_SUFFIX
    device = torch.device(device or "cpu")
    config = AutoConfig.from_pretrained(model_path)
    cls = model_class_for(config)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    with init_empty_weights():  # parameters on meta, buffers (rotary inv_freq) computed for real
        model = build(config, dtype=dtype) if dtype is not None else build(config)
    model.eval()
    read_generation_config(model, model_path)  # written with the checkpoint, as prepare_model's source has it
    dtype = dtype or next(model.parameters()).dtype
    reader = ShardReader(model_path)


    def streamable(model: nn.Module, targets: List[str], expert_targets: List[str]) -> None:
        stack = calib_mod.find_block_stack(model, targets + expert_targets)
        if stack is None:
            raise ValueError(f"{type(model).__name__} has no stack of blocks holding the targets: use prepare_model")
        outside = [t for t in expert_targets if not t.startswith(stack[0] + ".")]
        if outside:
            raise ValueError(f"expert targets outside the block stack {outside[:3]} need the whole model in "
                             "memory: exclude them or use prepare_model")

    # the meta model has the vocabulary and positions the calibration checks need; the shards are
    # checked for NaN/Inf before any calibration (a NaN would surface only when its block is reached)
    plan = plan_prepare(model, quant_config, lora_config, calib, batch_size=batch_size, device=device, report=report,
                        check_finite=lambda _: reader.check_finite(), check_layout=streamable)
    quant_config, lora_config = plan.quant_config, plan.lora_config
    targets, expert_targets, batches = plan.targets, plan.expert_targets, plan.batches
    stack_name, blocks = calib_mod.find_block_stack(model, plan.all_targets)
    # Targets outside the stack (BERT's pooler, a targeted lm_head) are prepared after the last
    # block, from the stream's final hidden states (calib.tail_grams), and kept in <out>.partial/.
    outside_targets = [t for t in targets if not t.startswith(stack_name + ".")]

    # Everything outside the stack (embeddings, final norm, head) stays loaded.
    outside = [k for k in model.state_dict() if not k.startswith(stack_name + ".")]
    _load(model, reader.read(outside, device), device)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()

    storage_dtype = None if storage_dtype in (None, dtype) else storage_dtype
    fingerprint = _fingerprint(model_path, quant_config, lora_config, targets + expert_targets, batches,
                               true_sequential, batch_size, dtype if storage_dtype is None else f"{dtype}->{storage_dtype}")
    start = _open_partial(partial, fingerprint, resume, len(blocks))
    rep = plan.new_report()
    rows = _ReportRows(rep)
    for i in range(start):
        rows.load(_block_file(partial, i))
    builder = LayerBuilder(plan, rep)
    loaded = set()

    def before_block(i: int, block: nn.Module) -> None:
        if i in loaded:
            return
        prefix = f"{stack_name}.{i}."
        if i < start:  # finished earlier: its prepared tensors
            names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
            names += [t[len(prefix):] for t in expert_targets if t.startswith(prefix)]
            swap_in_empty_layers(block, quant_config, lora_config, names, dtype, prefix=prefix)
            from safetensors.torch import load_file

            state = load_file(_block_file(partial, i), device=str(device))
            block.load_state_dict({k[len(prefix):]: owned(v) for k, v in state.items()}, strict=True, assign=True)
            if storage_dtype is not None:  # stored in storage_dtype; it runs forward in dtype as in the first run
                cast_dense(block, dtype)
        else:
            keys = [prefix + k for k in block.state_dict()]
            state = reader.read(keys, device)
            for k in [k for k in keys if k not in state and moe.is_expert_target(model, k)]:
                fused = moe.read_per_expert(lambda ks: reader.read(ks, device), k,
                                            model.get_submodule(moe.split_target(k)[0]).num_experts)
                if fused is not None:  # a per-expert checkpoint (transformers' save_pretrained of Qwen3-MoE)
                    state[k] = fused
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"{model_path}: tensors {missing[:3]} missing from the checkpoint")
            _load(block, {k[len(prefix):]: v for k, v in state.items()}, device)
        loaded.add(i)

    def after_block(i: int, block: nn.Module) -> None:
        if i >= start:
            prefix = f"{stack_name}.{i}."
            state = stored_state({prefix + k: v for k, v in block.state_dict().items()}, storage_dtype, QUANT_BUFFERS)
            _check_space(partial, state)
            _save_atomic(state, _block_file(partial, i))
            rows.save(_block_file(partial, i))
            _write_json_atomic({"fingerprint": fingerprint, "blocks": len(blocks), "done": i + 1},
                               os.path.join(partial, MANIFEST))
        block.to("meta")  # free it: the next block's inputs are computed

    t0 = time.perf_counter()
    tail = os.path.join(partial, TAIL_FILE)
    tail_done = not outside_targets or os.path.isfile(tail)
    with guarded(model, plan, restore=False):  # our own skeleton: nothing to restore
        if not (start == len(blocks) and tail_done):  # else killed while assembling: everything is written
            # a resumed run with every block done still runs them forward, for the tail's inputs
            run_blocks(model, plan, builder, targets=[t for t in targets if t not in outside_targets or not tail_done],
                       true_sequential=true_sequential, progress=progress, start=start, before_block=before_block,
                       after_block=after_block)
        if outside_targets and tail_done:  # prepared by an earlier run
            swap_in_empty_layers(model, quant_config, lora_config, outside_targets, dtype)
            from safetensors.torch import load_file

            model.load_state_dict({k: owned(v) for k, v in load_file(tail, device=str(device)).items()}, strict=False,
                                  assign=True)
            rows.load(tail)
        elif outside_targets:
            _check_space(partial, {k: v for t in outside_targets for k, v in _prefixed(model, t).items()})
            _save_atomic({k: v for t in outside_targets for k, v in _prefixed(model, t).items()}, tail)
            rows.save(tail)
        rep.total_s = time.perf_counter() - t0
        finish(model, plan, rep, base_model=model_path)
    if storage_dtype is not None:  # the blocks are on meta by now: this casts the tensors outside the stack
        cast_dense(model, storage_dtype)
    state, aliases = _outside_state(model, stack_name)
    sources = [_block_file(partial, i) for i in range(len(blocks))]
    record = {**quantization_record(model), "format_version": FORMAT_VERSION,
              "checksums": _checksums(sources, state)}  # as save_pretrained records them: verified on load
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(aliases, sort_keys=True)}

    def write(tmp: str) -> None:
        write_safetensors_streaming(sources, state, os.path.join(tmp, WEIGHTS_NAME), metadata)
        write_side_files(tmp, model, hf_config_dict(model, record), tokenizer)

    nbytes = sum(os.path.getsize(f) for f in sources) + state_nbytes(state)
    write_dir_atomically(out, write, nbytes=nbytes, superseded=superseded_weights)
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("prepared %d blocks of %s into %s in %.1f s", len(blocks), model_path, out, rep.total_s)
    return (out, rep) if return_report else out


def _prefixed(model: nn.Module, name: str) -> Dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()}


def _check_space(directory: str, state: Dict[str, torch.Tensor]) -> None:
    """Before each block's file: a full disk stops the run with one line, resumable once space is freed."""
    check_free_space(os.path.join(directory, "block"), state_nbytes(state))


def _load(module: nn.Module, state: Dict[str, torch.Tensor], device) -> None:
    """Assign ``state`` into a (meta) module, casting floats to the module's dtypes."""
    own = module.state_dict(keep_vars=True)
    fixed = {}
    for k, v in state.items():
        if k not in own:
            continue
        ref = own[k]
        fixed[k] = v.to(device=device, dtype=ref.dtype if v.dtype.is_floating_point else v.dtype)
    module.load_state_dict(fixed, strict=False, assign=True)


def _open_partial(partial: str, fingerprint: str, resume: bool, num_blocks: int) -> int:
    """The first block to compute: 0 for a fresh run, the number of finished blocks on resume."""
    manifest = os.path.join(partial, MANIFEST)
    if resume and os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            m = json.load(f)
        if m.get("fingerprint") != fingerprint or m.get("blocks") != num_blocks:
            raise ValueError(f"{partial}: partial output of a different run (model, configs or calibration "
                             "differ); remove it or run without `resume`")
        done = int(m["done"])
        for i in range(done):
            if not os.path.isfile(_block_file(partial, i)):
                raise ValueError(f"{partial}: block {i} is listed as finished but its file is missing")
        for name in os.listdir(partial):  # a block being written when the run died
            if name.endswith(".tmp"):
                os.remove(os.path.join(partial, name))
        logger.info("resuming from block %d of %d (%s)", done, num_blocks, partial)
        return done
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    return 0
