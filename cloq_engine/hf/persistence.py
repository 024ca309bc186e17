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
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..layer_factory import mark_trainable
from ..nn import QUANT_BUFFERS
from .skeleton import swap_in_empty_layers
from .output_dir import check_output_dir, recover_interrupted, write_dir_atomically
from .record import (ALIASES_KEY, CONFIG_NAME, FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME,  # noqa: F401 (re-exported)
                     add_perm_buffers, check_quantized_tensors, check_targets_quantized, checkpoint_shapes,
                     deduplicated_state_dict, hf_config_dict, parse_record, quantization_record, read_aliases,
                     same_view, state_nbytes, storage_key, superseded_weights, tensor_checksum,
                     tie_aliases, verify_checksums)
from .quantizer import set_cloq_config, update_cloq_config

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def protected_inputs(model: nn.Module) -> List[str]:
    """Local directories ``model`` was made from (its full-precision source), which a save must not touch."""
    from .output_dir import is_cloq_checkpoint

    record = getattr(model, "cloq_config", None) or {}
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    candidates = [record.get("base_model") if isinstance(record, dict) else None,
                  None if source and is_cloq_checkpoint(str(source)) else source]  # a checkpoint may be re-saved
    return [str(c) for c in candidates if c and os.path.isdir(str(c))]


def save_pretrained(model: nn.Module, save_directory, tokenizer=None, overwrite: bool = False) -> str:
    """Write a prepared model to ``save_directory``, atomically.

    Files: ``model.safetensors`` (the full state dict: packed base buffers, LoRA factors, all other
    weights), ``config.json`` (the model's config with the cloq ``quantization_config``, holding a
    sha256 of every stored tensor), the generation config when the model has one, and the
    tokenizer's files when ``tokenizer`` is given. Everything is written into a temporary
    directory next to ``save_directory`` and swapped into place (see :mod:`.output_dir`).

    Args:
        overwrite: replace the weights and config of a previous cloq checkpoint at
            ``save_directory`` (default False: it is refused with ValueError). Its other files (the
            tokenizer, an ``adapter/``, a user's notes) are kept. Anything else is never replaced:
            a non-empty directory that is not a cloq checkpoint, the working directory, the
            model's own source directory are refused with ValueError.

    Raises :class:`~cloq_engine.hf.output_dir.NoSpaceError` (an OSError) before writing when the
    file system lacks the space.

    Returns the absolute path of the checkpoint directory.
    """
    from safetensors.torch import save_file

    if os.path.isfile(os.fspath(save_directory)):
        raise ValueError(f"`save_directory` {os.fspath(save_directory)!r} exists and is not a directory")
    record = quantization_record(model)
    check_targets_quantized(model, record["targets"])
    target = check_output_dir(save_directory, overwrite=overwrite, inputs=protected_inputs(model))
    state, aliases = deduplicated_state_dict(model)
    record = {**record, "format_version": FORMAT_VERSION,
              "checksums": {k: tensor_checksum(t) for k, t in state.items()}}
    config_dict = hf_config_dict(model, record)
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(aliases, sort_keys=True)}

    def write(tmp: str) -> None:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata=metadata)
        write_side_files(tmp, model, config_dict, tokenizer)

    write_dir_atomically(target, write, nbytes=state_nbytes(state), superseded=superseded_weights)
    update_cloq_config(model, checkpoint=target)  # what an exported adapter names as its base
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


GENERATION_CONFIG_NAME = "generation_config.json"


def read_generation_config(model: nn.Module, directory: str) -> None:
    """Give ``model`` the generation config saved in ``directory`` (the counterpart of
    :func:`write_side_files`): a model built from its config gets one derived from it, which
    forgets the sampling defaults and stop tokens the model was shipped with."""
    file = os.path.join(directory, GENERATION_CONFIG_NAME)
    if not os.path.isfile(file) or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a usable generation config ({e})") from None


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


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory of its own, as torch allocates it (64-byte aligned), not a view into the
    safetensors file's mmap: a tensor there starts at any 8-byte boundary, and BLAS kernels may
    sum in another order for a misaligned operand (MKL's SSE4.2 path does), so a loaded model
    would compute differently from the one saved, by rounding (docs/design.md §6)."""
    return t.clone() if t.device.type == "cpu" else t


def read_safetensors(file: str, device="cpu") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, aliases) of a checkpoint file, with errors naming the file and the problem; every
    tensor in memory of its own (:func:`owned`)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing")
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: owned(f.get_tensor(k)) for k in f.keys()}
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


def model_class_for(config):
    """The class recorded in ``config.architectures`` when transformers has it (the saved model's
    exact class, e.g. a sequence classifier); otherwise AutoModelForCausalLM for causal LMs, else
    AutoModel."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from ..models import is_causal_lm

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


def load_pretrained(path, dtype: Optional[torch.dtype] = None, device=None) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained`.

    Args:
        path: the checkpoint directory.
        dtype: cast the floating-point weights to this dtype (packed ``scales`` / ``zeros`` stay
            float16; the LoRA factors take their recorded ``lora_dtype``, float32 unless the model
            was prepared with another); default: as saved.
        device: where the tensors go (default CPU).

    Returns the model in eval mode with only the LoRA factors trainable, ``cloq_config`` set, and
    the cloq ``quantization_config`` on its config (so transformers' ``save_pretrained`` and Trainer
    checkpoints stay loadable).
    Raises FileNotFoundError / ValueError naming the file and the problem for missing or corrupt
    files, missing or unexpected tensors and shape mismatches.
    """
    path = os.path.abspath(os.fspath(path))
    weights = os.path.join(path, WEIGHTS_NAME)
    model, raw = _skeleton(path, dtype)
    state, aliases = read_safetensors(weights, device=device or "cpu")
    qc, lc, targets = parse_record(raw.get("quantization_config"), os.path.join(path, CONFIG_NAME))
    cfg_file = os.path.join(path, CONFIG_NAME)
    aliases = {**_declared_ties(model, state), **aliases}
    packed = {f"{t}.{b}" for t in targets for b in QUANT_BUFFERS}
    _check_state(model, state, aliases, weights, packed)
    checksums = raw["quantization_config"].get("checksums")
    if checksums:
        verify_checksums(state.keys(), state.__getitem__, checksums, weights)
    else:
        logger.info("%s records no checksums (written by transformers' save_pretrained or an older cloq-engine): "
                    "not verified", cfg_file)
    factors = {k: t.dtype for k, t in model.state_dict().items() if k.rpartition(".")[2] in ("lora_A", "lora_B")}
    state = {k: _load_dtype(k, t, dtype, packed, factors) for k, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    tie_aliases(model, aliases)
    if device is not None:
        model.to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise ValueError(f"{weights}: tensors left unloaded: {leftover[:5]}")
    model.eval()
    return model


def _load_dtype(name: str, t: torch.Tensor, dtype: Optional[torch.dtype], packed: set, factors: dict) -> torch.Tensor:
    """A stored tensor in the dtype it loads as: packed buffers as stored; LoRA factors in the
    skeleton's (their recorded ``lora_dtype``, whatever ``dtype`` and the stored dtype); other
    floats in ``dtype`` when given."""
    if not t.dtype.is_floating_point or name in packed:
        return t
    if name in factors:
        return t.to(factors[name])
    return t if dtype is None else t.to(dtype)


def _skeleton(path: str, dtype: Optional[torch.dtype]) -> Tuple[nn.Module, dict]:
    """Checkpoint ``path``'s model with every parameter on ``meta`` (buffers computed for real), its
    targets empty QuantLoRALinear layers, frozen but for LoRA, ``cloq_config`` set; and the raw config."""
    from transformers import AutoConfig

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
    shapes = checkpoint_shapes([weights])  # names and shapes only
    auto = model_class_for(config)
    build = auto.from_config if hasattr(auto, "from_config") else auto._from_config  # Auto class / model class
    with parameters_on_meta():
        model = build(config, dtype=dtype) if dtype is not None else build(config)
    read_generation_config(model, path)
    swap_in_empty_layers(model, qc, lc, targets, dtype)
    add_perm_buffers(model, targets, shapes)
    check_quantized_tensors(model, targets, set(shapes) | set(read_aliases([weights])) | set(_declared_ties(model, shapes)),
                            weights)
    mark_trainable(model)
    recorded = raw["quantization_config"]
    set_cloq_config(model, qc, lc, targets, checkpoint=path, base_model=recorded.get("base_model") or None,
                    finetuned=recorded.get("finetuned") or None)
    return model, raw


def empty_model(path, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model of cloq checkpoint ``path`` with nothing loaded: every parameter and packed buffer
    on ``meta``, the recorded targets empty :class:`QuantLoRALinear` layers (phase one of
    :func:`load_pretrained`). Fill it with accelerate, which places each tensor where its
    ``device_map`` says::

        with accelerate.init_empty_weights():
            model = cloq_engine.empty_model(path)
        model = accelerate.load_checkpoint_and_dispatch(model, path, device_map="auto")

    or with ``model.load_state_dict(state, assign=True)``. Unlike :func:`load_pretrained` this does
    not verify the recorded checksums nor re-tie tensors stored once (call ``model.tie_weights()``).
    """
    model, _ = _skeleton(os.path.abspath(os.fspath(path)), dtype)
    return model
