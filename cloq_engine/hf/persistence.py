"""Save and load prepared models: one ``model.safetensors`` + ``config.json`` (+ tokenizer files).

The checkpoint holds the model's full state dict with the packed buffers (``qweight``, ``scales``,
``zeros``) and LoRA factors of every :class:`QuantLoRALinear`, and every other weight as is.
``config.json`` is the Hugging Face config with ``quantization_config = {"quant_method": "cloq",
"format_version": 1, "quant": ..., "lora": ..., "targets": [...], "checksums": {tensor: sha256}}``;
the checksums of every stored tensor are verified on load, so a corrupted tensor is refused by name.

Loading is two-phase (gpt-fast): the model is built from its config with parameters on ``meta``
(buffers such as rotary ``inv_freq`` are computed for real), the recorded targets are swapped for
empty :class:`QuantLoRALinear` modules on ``meta``, then the checkpoint is loaded with
``assign=True``. Tensors that share storage (tied embeddings) are written once; the dropped names
are recorded in the safetensors metadata and re-tied on load.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import LoRAConfig, QuantConfig
from ..convert import linear_weight, mark_trainable, replace_modules
from ..experts import use_cloq_experts
from ..nn import QUANT_BUFFERS, QuantLoRALinear
from .experts import is_expert_target, swap_in_empty_experts
from .output_dir import check_output_dir, recover_interrupted, write_dir_atomically

logger = logging.getLogger(__name__)

QUANT_METHOD = "cloq"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ALIASES_KEY = "cloq_aliases"  # safetensors metadata: {dropped name: kept name} for tied tensors
FORMAT_VERSION = 1  # of the quantization record; 1 added `format_version` and `checksums`


# ---------------------------------------------------------------------------------------------
# The quantization record
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
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


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


def deduplicated_state_dict(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state dict with each tensor stored once: exact aliases (tied weights) are dropped and
    returned as ``{dropped: kept}``; other tensors sharing storage are cloned."""
    state, aliases = {}, {}
    seen: Dict[tuple, List[str]] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: the model is not fully loaded")
        key = _storage_key(t)
        exact = next((k for k in seen.get(key, []) if _same_view(state[k], t)), None)
        if exact is not None:
            aliases[name] = exact
            continue
        if key in seen:
            t = t.clone()
        seen.setdefault(_storage_key(t), []).append(name)
        state[name] = t.contiguous()
    return state, aliases


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            and a.dtype == b.dtype)


def _hf_config_dict(model: nn.Module, record: dict) -> dict:
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


def protected_inputs(model: nn.Module) -> List[str]:
    """Local directories ``model`` was made from (its full-precision source), which a save must not touch."""
    from .output_dir import is_cloq_checkpoint

    record = getattr(model, "cloq_config", None) or {}
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    candidates = [record.get("base_model") if isinstance(record, dict) else None,
                  None if source and is_cloq_checkpoint(str(source)) else source]  # a checkpoint may be re-saved
    return [str(c) for c in candidates if c and os.path.isdir(str(c))]


def save_pretrained(model: nn.Module, save_directory, tokenizer=None, overwrite: bool = True) -> str:
    """Write a prepared model to ``save_directory``, atomically.

    Files: ``model.safetensors`` (the full state dict: packed base buffers, LoRA factors, all other
    weights), ``config.json`` (the model's config with the cloq ``quantization_config``, holding a
    sha256 of every stored tensor), the generation config when the model has one, and the
    tokenizer's files when ``tokenizer`` is given. Everything is written into a temporary
    directory next to ``save_directory`` and swapped into place (see :mod:`.output_dir`).

    Args:
        overwrite: replace a previous cloq checkpoint at ``save_directory`` (the whole directory).
            Anything else is never replaced: a non-empty directory that is not a cloq checkpoint,
            the working directory, the model's own source directory are refused with ValueError.

    Returns the absolute path of the checkpoint directory.
    """
    from safetensors.torch import save_file

    if os.path.isfile(os.fspath(save_directory)):
        raise ValueError(f"`save_directory` {os.fspath(save_directory)!r} exists and is not a directory")
    record = quantization_record(model)
    target = check_output_dir(save_directory, overwrite=overwrite, inputs=protected_inputs(model))
    state, aliases = deduplicated_state_dict(model)
    record = {**record, "format_version": FORMAT_VERSION,
              "checksums": {k: tensor_checksum(t) for k, t in state.items()}}
    config_dict = _hf_config_dict(model, record)
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(aliases, sort_keys=True)}

    def write(tmp: str) -> None:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata=metadata)
        write_side_files(tmp, model, config_dict, tokenizer)

    write_dir_atomically(target, write)
    logger.info("saved %d tensors (%d tied) to %s", len(state), len(aliases), target)
    return target


def write_side_files(directory: str, model: nn.Module, config_dict: dict, tokenizer=None) -> None:
    """Everything of a checkpoint but its weights: ``config.json``, the generation config when the
    model has one, the tokenizer's files when given (shared by the in-memory and streaming writers)."""
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_config(path: str) -> dict:
    """``config.json`` of checkpoint directory ``path`` as a dict, with errors naming the file."""
    if not os.path.lexists(path):
        recover_interrupted(os.path.abspath(path))  # a save killed mid-swap left it aside
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (not a cloq checkpoint?)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return d


def read_safetensors(file: str, device="cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, aliases) of a checkpoint file, with errors naming the file and the problem."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing")
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    try:
        aliases = json.loads(meta.get(ALIASES_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: corrupt `{ALIASES_KEY}` metadata ({e})") from None
    if not isinstance(aliases, dict):
        raise ValueError(f"{file}: `{ALIASES_KEY}` metadata must map names to names")
    return tensors, aliases


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with every Parameter on ``meta`` and buffers computed for real (on CPU)."""
    original = nn.Module.register_parameter

    def register_parameter(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_quant_layer(name: str, module: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                      dtype: Optional[torch.dtype]) -> QuantLoRALinear:
    """An empty QuantLoRALinear on ``meta`` shaped like ``module`` (nn.Linear or Conv1D)."""
    try:
        out_f, in_f = linear_weight(module).shape
    except TypeError:
        raise ValueError(f"target {name!r} is a {type(module).__name__}, not a linear layer") from None
    dtype = dtype or module.weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    if lora_config.rank_pattern:  # this layer's own rank (PEFT's rank_pattern)
        lora_config = dataclasses.replace(lora_config, rank=lora_config.rank_for(name), rank_pattern={})
    try:
        return QuantLoRALinear(in_f, out_f, quant_config, lora_config, bias=module.bias is not None,
                               device="meta", dtype=dtype)
    except ValueError as e:
        raise ValueError(f"target {name!r}: {e}") from None


def swap_in_empty_layers(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig, targets: List[str],
                         dtype: Optional[torch.dtype] = None) -> None:
    """Replace each target of a skeleton model by an empty QuantLoRALinear on ``meta`` (an empty
    QuantLoRAExperts for a packed expert projection, with the model's experts implementation set
    to cloq's)."""
    experts = [t for t in targets if is_expert_target(model, t)]
    if experts:
        swap_in_empty_experts(model, quant_config, lora_config, experts, dtype)
        use_cloq_experts(model)
    layers = {}
    for name in targets:
        if name in experts:
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"target {name!r} does not exist in {type(model).__name__}") from None
        layers[name] = empty_quant_layer(name, module, quant_config, lora_config, dtype)
    replace_modules(model, layers)


def model_class_for(config):
    """The class recorded in ``config.architectures`` when transformers has it (the saved model's
    exact class, e.g. a sequence classifier); otherwise AutoModelForCausalLM for causal LMs, else
    AutoModel."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from ..data import is_causal_lm

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if len(archs) == 1 else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


def _check_state(model: nn.Module, state: Dict[str, torch.Tensor], aliases: Dict[str, str], file: str,
                 packed: set) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in aliases]
    unexpected = [k for k in state if k not in expected]
    bad_alias = [k for k, v in aliases.items() if k not in expected or v not in state]
    if missing:
        raise ValueError(f"{file}: missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"{file}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    if bad_alias:
        raise ValueError(f"{file}: tied-tensor metadata names unknown tensors {bad_alias[:5]}")
    for k, t in state.items():
        ref = expected[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{file}: tensor {k!r} has shape {tuple(t.shape)}; the model needs {tuple(ref.shape)}")
        if k in packed and t.dtype != ref.dtype:
            raise ValueError(f"{file}: packed tensor {k!r} has dtype {t.dtype}; expected {ref.dtype}")
        if t.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ValueError(f"{file}: tensor {k!r} has dtype {t.dtype}; expected a {ref.dtype}-like dtype")


def _declared_ties(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Ties the model class declares (transformers' ``all_tied_weights_keys``) whose target is absent
    from ``state``: checkpoints re-saved by transformers' own save_pretrained drop them without our
    metadata."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(declared, dict):
        return {}
    return {k: v for k, v in declared.items() if k not in state and v in state}


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


def load_pretrained(path, dtype: Optional[torch.dtype] = None, device=None) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained`.

    Args:
        path: the checkpoint directory.
        dtype: cast the floating-point weights and LoRA factors to this dtype (packed ``scales`` /
            ``zeros`` stay float16); default: as saved.
        device: where the tensors go (default CPU).

    Returns the model in eval mode with only the LoRA factors trainable, ``cloq_config`` set, and
    the cloq ``quantization_config`` on its config (so transformers' ``save_pretrained`` and Trainer
    checkpoints stay loadable).
    Raises FileNotFoundError / ValueError naming the file and the problem for missing or corrupt
    files, missing or unexpected tensors and shape mismatches.
    """
    from transformers import AutoConfig

    path = os.path.abspath(os.fspath(path))
    raw = read_config(path)
    cfg_file = os.path.join(path, CONFIG_NAME)
    qc, lc, targets = parse_record(raw.get("quantization_config"), cfg_file)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: missing")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating-point torch.dtype; got {dtype!r}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{cfg_file}: not a usable transformers config ({e})") from None
    state, aliases = read_safetensors(weights, device=device or "cpu")

    auto = model_class_for(config)
    build = auto.from_config if hasattr(auto, "from_config") else auto._from_config  # Auto class / model class
    with parameters_on_meta():
        model = build(config, dtype=dtype) if dtype is not None else build(config)
    swap_in_empty_layers(model, qc, lc, targets, dtype)
    for t in targets:  # a GPTQ act-order import carries an input permutation (None otherwise)
        if f"{t}.perm" in state:
            model.get_submodule(t).perm = torch.empty_like(state[f"{t}.perm"], device="meta")
    aliases = {**_declared_ties(model, state), **aliases}
    packed = {f"{t}.{b}" for t in targets for b in QUANT_BUFFERS}
    _check_state(model, state, aliases, weights, packed)
    checksums = raw["quantization_config"].get("checksums")
    if checksums:
        verify_checksums(state.keys(), state.__getitem__, checksums, weights)
    else:
        logger.info("%s records no checksums (written by transformers' save_pretrained or an older cloq-engine): "
                    "not verified", cfg_file)
    if dtype is not None:
        state = {k: (t.to(dtype) if t.dtype.is_floating_point and k not in packed else t) for k, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    tie_aliases(model, aliases)
    if device is not None:
        model.to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise ValueError(f"{weights}: tensors left unloaded: {leftover[:5]}")
    mark_trainable(model)
    model.cloq_config = {"quant": qc.to_dict(), "lora": lc.to_dict(), "targets": targets}
    if raw["quantization_config"].get("base_model"):
        model.cloq_config["base_model"] = raw["quantization_config"]["base_model"]
    from .quantizer import attach_quantization_config  # quantizer imports this module

    attach_quantization_config(model)
    model.eval()
    return model
