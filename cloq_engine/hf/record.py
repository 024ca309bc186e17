"""The cloq checkpoint record and the tensor helpers every reader and writer of it shares.

``config.json``'s ``quantization_config`` (:func:`quantization_record` / :func:`parse_record`),
tensor checksums, the deduplicated state dict (tied tensors stored once); the empty layers a
loader fills are :mod:`.skeleton`'s. :mod:`.persistence` (save/load), :mod:`.quantizer` (transformers'
``from_pretrained``) and :mod:`.streaming` (bounded-memory prepare) all build on this module, and
it on none of them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from typing import Dict, List, Tuple

import torch
from torch import nn

from ..config import LoRAConfig, QuantConfig
from ..formats import PackedBuffers
from ..nn import QuantLoRALinear

logger = logging.getLogger(__name__)

QUANT_METHOD = "cloq"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ALIASES_KEY = "cloq_aliases"  # safetensors metadata: {dropped name: kept name} for tied tensors
FORMAT_VERSION = 1  # of the quantization record; 1 added `format_version` and `checksums`


def quantization_record(model: nn.Module) -> dict:
    """``{"quant_method": "cloq", "quant", "lora", "targets"}`` for a prepared model."""
    record = getattr(model, "cloq_config", None)
    if not isinstance(record, dict) or not {"quant", "lora", "targets"} <= set(record):
        raise ValueError(
            f"{type(model).__name__} has no `cloq_config`: prepare it with cloq_engine.prepare_model first"
        )
    out = {"quant_method": QUANT_METHOD, "quant": dict(record["quant"]), "lora": dict(record["lora"]),
           "targets": list(record["targets"])}
    if record.get("base_model"):  # where the full-precision model lives, for `cloq eval`
        out["base_model"] = str(record["base_model"])
    if isinstance(record.get("finetuned"), dict):  # what training the LoRA factors had since the init, for `cloq eval`
        out["finetuned"] = dict(record["finetuned"])
    return out


def parse_record(record, source: str) -> Tuple[QuantConfig, LoRAConfig, List[str]]:
    """Validate a ``quantization_config`` dict read from ``source``; returns (QuantConfig, LoRAConfig, targets)."""
    if not isinstance(record, dict):
        raise ValueError(f"{source}: `quantization_config` is missing or not an object")
    if record.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{source}: `quantization_config.quant_method` must be {QUANT_METHOD!r}; "
                         f"got {record.get('quant_method')!r}")
    version = record.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{source}: `quantization_config.format_version` must be a non-negative integer; got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{source}: `quantization_config.format_version` is {version}, newer than the {FORMAT_VERSION} "
                         "this cloq-engine reads: upgrade cloq-engine")
    checksums = record.get("checksums", {})
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise ValueError(f"{source}: `quantization_config.checksums` must map tensor names to sha256 strings")
    for key in ("quant", "lora", "targets"):
        if key not in record:
            raise ValueError(f"{source}: `quantization_config.{key}` is missing")
    targets = record["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{source}: `quantization_config.targets` must be a non-empty list of module names")
    try:
        qc, lc = QuantConfig.from_dict(record["quant"]), LoRAConfig.from_dict(record["lora"])
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{source}: malformed `quantization_config`: {e}") from None
    except ValueError as e:
        raise ValueError(f"{source}: invalid `quantization_config`: {e}") from None
    return qc, lc, list(targets)


def check_targets_quantized(model: nn.Module, targets: List[str]) -> None:
    """Refuse a model whose recorded targets are not (all) quantized layers: its checkpoint would
    name layers it holds no packed weights for (e.g. a model densified after it was recorded)."""
    bad = []
    for t in targets:
        try:
            module = model.get_submodule(t)
        except AttributeError:
            module = None
        if not isinstance(module, PackedBuffers):
            bad.append(f"{t} ({type(module).__name__ if module is not None else 'absent'})")
    if bad:
        raise ValueError(f"`cloq_config.targets` names {len(bad)} layer(s) that are not quantized cloq layers, "
                         f"e.g. {bad[:3]}: the model is not (or no longer) a whole cloq model")


def checkpoint_shapes(files) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` of the tensors held by checkpoint ``files`` (safetensors headers only;
    other formats memory-mapped onto ``meta``)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files or []:
        file = str(file)
        if file.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except SafetensorError as e:
                raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        else:
            shapes.update({k: tuple(t.shape) for k, t in
                           torch.load(file, map_location="meta", weights_only=True, mmap=True).items()})
    return shapes


def read_aliases(checkpoint_files) -> dict:
    """The tied-tensor record (``{dropped: kept}``) of our safetensors file among ``checkpoint_files``."""
    from safetensors import SafetensorError, safe_open

    for file in checkpoint_files or []:
        if os.path.basename(str(file)) != WEIGHTS_NAME:
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                return json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        except (SafetensorError, json.JSONDecodeError, OSError):
            logger.warning("could not read tied-tensor metadata of %s", file)
    return {}


def add_perm_buffers(model: nn.Module, targets: List[str], shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Give each target whose checkpoint carries an input permutation (a GPTQ act-order import)
    an empty ``perm`` buffer to load it into (None otherwise, and a loader would drop it)."""
    for t in targets:
        if f"{t}.perm" in shapes and isinstance(model.get_submodule(t), QuantLoRALinear):
            model.get_submodule(t).perm = torch.empty(shapes[f"{t}.perm"], dtype=torch.int64, device="meta")


def check_quantized_tensors(model: nn.Module, targets: List[str], present, source: str) -> None:
    """Refuse a checkpoint that lacks any tensor of a quantized layer (packed buffers, LoRA factors,
    bias): a loader would leave it uninitialised (transformers' loader only reports it). ``present``:
    the tensor names the checkpoint holds, including tied names it stores once."""
    present = set(present)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def held(name: str) -> bool:  # transformers maps a base model's keys onto a head model and back
        return (name in present or f"{prefix}.{name}" in present
                or (bool(prefix) and name.startswith(prefix + ".") and name[len(prefix) + 1:] in present))

    missing = [f"{t}.{k}" for t in targets for k in model.get_submodule(t).state_dict() if not held(f"{t}.{k}")]
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} tensor(s) of the quantized layers its "
                         f"`quantization_config.targets` lists, e.g. {missing[:5]}: not a complete cloq checkpoint "
                         "(a dense model saved with a stale `quantization_config`?)")


def tensor_checksum(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as stored (row-major, its own dtype)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def verify_checksums(names, get, checksums: Dict[str, str], file: str) -> None:
    """Refuse a file whose tensors differ from the checksums recorded when it was saved.

    ``names``: the tensors the file holds; ``get(name)``: one tensor (read one at a time, so a
    lazy reader never holds the whole file twice)."""
    missing = sorted(set(checksums) - set(names))
    if missing:
        raise ValueError(f"{file}: missing {len(missing)} tensor(s) recorded in `quantization_config.checksums`, "
                         f"e.g. {missing[:5]}")
    bad = [k for k, want in checksums.items() if tensor_checksum(get(k)) != want]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"{file}: tensor {bad[0]!r} fails its checksum{more}: the file is corrupted; "
                         "save or copy the checkpoint again")


def storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def deduplicated_state_dict(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state dict with each tensor stored once: exact aliases (tied weights) are dropped and
    returned as ``{dropped: kept}``; other tensors sharing storage are cloned."""
    state, aliases = {}, {}
    seen: Dict[tuple, List[str]] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: the model is not fully loaded")
        key = storage_key(t)
        exact = next((k for k in seen.get(key, []) if same_view(state[k], t)), None)
        if exact is not None:
            aliases[name] = exact
            continue
        if key in seen:
            t = t.clone()
        seen.setdefault(storage_key(t), []).append(name)
        state[name] = t.contiguous()
    return state, aliases


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            and a.dtype == b.dtype)


def hf_config_dict(model: nn.Module, record: dict) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"{type(model).__name__} has no Hugging Face `config`: save_pretrained needs a transformers model")
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]  # as transformers' save_pretrained records it
    config.quantization_config = record
    d = config.to_dict()
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        d["dtype"] = str(dtype).rpartition(".")[2]
    d["quantization_config"] = record
    return d


_OLD_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def superseded_weights(rel: str) -> bool:
    """Weight files of a previous checkpoint that a new ``model.safetensors`` replaces (shards
    written by transformers' own save_pretrained would otherwise shadow or contradict it)."""
    return _OLD_WEIGHTS.fullmatch(rel) is not None


def state_nbytes(state: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def tie_aliases(model: nn.Module, aliases: Dict[str, str]) -> None:
    for dropped, kept in aliases.items():
        mod_name, _, attr = dropped.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        src_mod, _, src_attr = kept.rpartition(".")
        source = getattr(model.get_submodule(src_mod) if src_mod else model, src_attr)
        if attr in module._parameters:
            module._parameters[attr] = source
        else:
            module._buffers[attr] = source
