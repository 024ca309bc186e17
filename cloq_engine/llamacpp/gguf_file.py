"""A prepared (or fine-tuned) cloq model as llama.cpp files: the quantized base as one GGUF with every
quantized layer in its exact ggml type, and the LoRA factors as a GGUF LoRA adapter beside it.

What is written, as llama.cpp's ``convert_hf_to_gguf.py`` does for the same architecture:

* tensor names from gguf-py's own map (``gguf.get_tensor_name_map``), q/k rows permuted for the
  Llama family (``permute_qk``: rows of the packed blocks, i.e. of the codes and their scales,
  move with them; Qwen2 is not permuted);
* quantized layers: the ggml type ``blocks`` finds exact (the grid's, then the fallbacks), each
  one read back through gguf-py's numpy dequantizer and compared with ours bit for bit before
  anything is written; a layer that fits none is refused by name, with the reason;
* other tensors: 1-D (norms, biases) as F32, 2-D (the token embedding, an unquantized output) as
  F16, as the converter's ``--outtype f16`` (``float_type="f32"`` keeps them exact);
* hyper-parameters, tokenizer (``tokenizer.ggml.*``: the converter's GPT-2 BPE vocabulary, its
  pre-tokenizer check string, gguf-py's ``SpecialVocab`` for merges, special ids and chat template);
* the adapter: ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha`` with
  llama.cpp's scale alpha/rank equal to ours (rsLoRA's alpha/sqrt(r) folded into alpha, a layer whose
  scale still differs gets it folded into its B), tensors ``<name>.lora_a`` [r, in] and ``.lora_b``
  [out, r] in F32, B's rows permuted as the base's for q/k.

Files are written next to their target and renamed over it (atomic); an existing file is replaced
only with ``overwrite=True`` and only when it is a GGUF this exporter wrote (``cloq.exported_by``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..nn import QuantLoRALinear
from ..packed_layer import packed_layers
from . import blocks

logger = logging.getLogger(__name__)

MARKER = "cloq.exported_by"


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


# HF architectures -> llama.cpp's (convert_hf_to_gguf.py's LlamaModel / Qwen2Model)
ARCHS: Dict[str, Arch] = {
    "LlamaForCausalLM": Arch("LLAMA", True),
    "MistralForCausalLM": Arch("LLAMA", True),
    "Qwen2ForCausalLM": Arch("QWEN2", False),
}

# tokenizer.ggml.pre names by llama.cpp's check: sha256 of str(tokenizer.encode(CHKTXT)) (from
# convert_hf_to_gguf.py's get_vocab_base_pre)
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 '
          '3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF export needs gguf-py: pip install gguf==0.19.0") from None
    return gguf


def arch_of(model: nn.Module) -> Tuple[str, Arch]:
    config = getattr(model, "config", None)
    names = list(getattr(config, "architectures", None) or [type(model).__name__])
    for name in names:
        if name in ARCHS:
            return name, ARCHS[name]
    raise ValueError(f"GGUF export supports {', '.join(ARCHS)}; this model is {', '.join(names)}")


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q (n_head) or k (n_kv_head) weights:
    ``w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)``, as indices of the HF rows."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"GGUF export writes plain RoPE; this model uses rope_type={kind!r}")


class _Names:
    """HF parameter name -> GGUF tensor name (gguf-py's map) and the q/k row permutation."""

    def __init__(self, model: nn.Module, arch: Arch):
        gguf = _gguf()
        config = model.config
        self.config = config
        self.arch = arch
        self.map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.gguf_arch), config.num_hidden_layers)
        self.n_head = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_head

    def gguf_name(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{hf_name!r} has no GGUF tensor name for {self.arch.gguf_arch.lower()}")
        return name

    def row_perm(self, gguf_name: str, rows: int) -> Optional[torch.Tensor]:
        if not self.arch.permute_qk:
            return None
        if ".attn_q." in gguf_name:
            return qk_permutation(rows, self.n_head)
        if ".attn_k." in gguf_name:
            return qk_permutation(rows, self.n_kv)
        return None


# ---- tensors ------------------------------------------------------------------------------------
@dataclass
class Tensor:
    name: str
    data: np.ndarray  # float32/float16 values, or uint8 blocks [rows, row_bytes]
    raw_type: Optional[str]  # ggml type name for raw blocks


def _grid_types(layer: QuantLoRALinear) -> Tuple[str, ...]:
    grid = getattr(layer.quant_config, "grid", None)
    if grid is not None:
        return blocks.GRID_TYPES[grid]
    return blocks.DEFAULT_TYPES[layer.bits]


def quantized_tensor(name: str, hf_name: str, layer: QuantLoRALinear, perm: Optional[torch.Tensor],
                     verify: bool = True) -> Tensor:
    """One quantized layer as exact ggml blocks (rows permuted), checked through gguf-py."""
    qw = layer.quantized_weight.to("cpu")
    try:
        type_name, raw = blocks.encode_first(qw, _grid_types(layer))
    except blocks.NotRepresentable as e:
        raise ValueError(f"layer {hf_name!r} ({qw.bits}-bit g{qw.group_size}) cannot be written exactly: {e}") from None
    if verify:
        gguf = _gguf()
        ours = qw.dequantize().numpy()
        theirs = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, type_name))
        if not np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)):
            raise ValueError(f"layer {hf_name!r}: gguf-py's {type_name} dequantization differs from ours "
                             "(an exporter bug; nothing written)")
    if perm is not None:
        raw = raw[perm.numpy()]
    return Tensor(name, np.ascontiguousarray(raw), type_name)


def _float_tensor(name: str, t: torch.Tensor, perm, float_type: str) -> Tensor:
    t = t.detach().float().cpu()
    if perm is not None:
        t = t[perm]
    arr = t.numpy()
    if arr.ndim >= 2 and float_type == "f16":
        arr = arr.astype(np.float16)
    return Tensor(name, np.ascontiguousarray(arr), None)


def base_tensors(model: nn.Module, names: _Names, float_type: str = "f16", verify: bool = True,
                 allow_dense: bool = False) -> List[Tensor]:
    layers = packed_layers(model, QuantLoRALinear)
    if not layers and not allow_dense:
        raise ValueError("the model has no QuantLoRALinear layers: prepare or load a cloq model first")
    own = {f"{n}.{b}" for n in layers for b in ("qweight", "scales", "zeros", "perm", "lora_A", "lora_B")}
    out, seen = [], set()
    tied = bool(getattr(names.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        if key in own or (tied and key == "lm_head.weight"):
            continue
        ptr = (t.data_ptr(), tuple(t.shape))
        if t.numel() and ptr in seen:  # a tied weight: llama.cpp reuses token_embd when output is absent
            continue
        seen.add(ptr)
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = names.gguf_name(key)
        out.append(_float_tensor(name, t, names.row_perm(name, t.shape[0]), float_type))
    for hf, layer in layers.items():
        name = names.gguf_name(hf + ".weight")
        out.append(quantized_tensor(name, hf, layer, names.row_perm(name, layer.out_features), verify))
    return out


def adapter_tensors(model: nn.Module, names: _Names) -> Tuple[float, List[Tensor]]:
    """(alpha, tensors) of the LoRA adapter: llama.cpp's scale alpha / rank equals each layer's
    ``scaling`` (folded into B where one alpha cannot give every layer its own)."""
    layers = packed_layers(model, QuantLoRALinear)
    ref = next(iter(layers.values()))
    alpha = float(ref.scaling * ref.rank)  # rsLoRA: alpha/sqrt(r) = (alpha·sqrt(r))/r
    out = []
    for hf, layer in layers.items():
        name = names.gguf_name(hf + ".weight")
        A = layer.lora_A.detach().float().cpu()
        B = layer.lora_B.detach().float().cpu()
        fold = layer.scaling * layer.rank / alpha
        if fold != 1.0:
            B = B * fold
        perm = names.row_perm(name, B.shape[0])
        if perm is not None:
            B = B[perm]
        out.append(Tensor(name + ".lora_a", np.ascontiguousarray(A.numpy()), None))
        out.append(Tensor(name + ".lora_b", np.ascontiguousarray(B.numpy()), None))
    return alpha, out


# ---- metadata -----------------------------------------------------------------------------------
def _hparams(w, config) -> None:
    _check_rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(int(head_dim))
    w.add_vocab_size(int(config.vocab_size))


def pre_tokenizer(tokenizer) -> str:
    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(chkhsh)
    if name is None:
        logger.warning("the tokenizer's pre-tokenizer is not one llama.cpp's converter knows here (chkhsh %s); "
                       "writing tokenizer.ggml.pre='default'", chkhsh)
        return "default"
    return name


def _vocab(w, tokenizer, tokenizer_dir: str, vocab_size: int) -> None:
    """The converter's GPT-2 BPE vocabulary (``_set_vocab_gpt2``)."""
    gguf = _gguf()
    vocab = tokenizer.get_vocab()
    if not tokenizer.is_fast or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError("GGUF export writes BPE (GPT-2 style) tokenizers from tokenizer.json")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            special = tokenizer.added_tokens_decoder[i].special or (tok.startswith("<|") and tok.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(w, quiet=True)


# ---- files --------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"cloq-engine {version('cloq-engine')}"
    except PackageNotFoundError:
        return "cloq-engine"


def written_by_us(path: str) -> bool:
    """Whether ``path`` is a GGUF file this exporter wrote."""
    try:
        reader = _gguf().GGUFReader(path)
    except Exception:  # not a GGUF at all
        return False
    return MARKER in reader.fields


def check_target(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a file name (FILE.gguf)")
    if os.path.exists(path):
        if not overwrite:
            raise ValueError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace a GGUF cloq wrote")
        if not written_by_us(path):
            raise ValueError(f"{path!r} exists and was not written by cloq export; refusing to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"no such directory: {parent!r}")


def _write(path: str, arch: Arch, fill, tensors: List[Tensor]) -> None:
    """Write a GGUF at ``path`` through a sibling temporary file renamed over it."""
    gguf = _gguf()
    parent = os.path.dirname(os.path.abspath(path))
    need = sum(t.data.nbytes for t in tensors) + (1 << 20)
    free = _free_bytes(parent)
    if free is not None and free < need:
        raise ValueError(f"not enough free space in {parent!r}: {need} bytes needed, {free} free")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.gguf_arch)])
        w.add_string(MARKER, _version())
        fill(w)
        for t in tensors:
            if t.raw_type is None:
                w.add_tensor(t.name, t.data)
            else:
                w.add_tensor(t.name, t.data, raw_dtype=getattr(gguf.GGMLQuantizationType, t.raw_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _free_bytes(directory: str) -> Optional[int]:
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def export_gguf(model: nn.Module, out_file: str, adapter_file: Optional[str] = None, tokenizer=None,
                tokenizer_dir: Optional[str] = None, float_type: str = "f16", overwrite: bool = False,
                verify: bool = True, name: Optional[str] = None, allow_dense: bool = False) -> Dict[str, str]:
    """Write the quantized base of ``model`` as ``out_file`` (GGUF) and, with ``adapter_file``, its LoRA
    factors as a GGUF LoRA adapter. Returns {GGUF tensor name: ggml type} of the base.

    ``tokenizer`` (a fast BPE tokenizer) and ``tokenizer_dir`` (its files, for merges and the chat
    template) add the vocabulary; ``float_type`` "f16" (llama.cpp's converter) or "f32" for the
    tensors that are not quantized; ``verify`` reads every quantized tensor back through gguf-py.
    """
    if float_type not in ("f16", "f32"):
        raise ValueError(f"`float_type` must be 'f16' or 'f32'; got {float_type!r}")
    gguf = _gguf()
    hf_arch, arch = arch_of(model)
    targets = [out_file] + ([adapter_file] if adapter_file else [])
    if adapter_file and os.path.abspath(adapter_file) == os.path.abspath(out_file):
        raise ValueError("the adapter file and the model file must differ")
    for t in targets:
        check_target(t, overwrite)
    names = _Names(model, arch)
    config = model.config
    tensors = base_tensors(model, names, float_type, verify, allow_dense)
    if adapter_file and not packed_layers(model, QuantLoRALinear):
        raise ValueError("the model has no LoRA layers: there is no adapter to write")
    types = {t.name: t.raw_type or ("F16" if t.data.dtype == np.float16 else "F32") for t in tensors}
    if adapter_file:
        alpha, lora = adapter_tensors(model, names)
    model_name = name or getattr(config, "_name_or_path", None) or hf_arch
    model_name = os.path.basename(str(model_name).rstrip("/")) or hf_arch

    def fill_base(w):
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_name)
        _hparams(w, config)
        w.add_file_type(_file_type(gguf, types))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is not None and tokenizer_dir is not None:
            _vocab(w, tokenizer, tokenizer_dir, int(config.vocab_size))

    _write(out_file, arch, fill_base, tensors)
    if adapter_file:
        def fill_adapter(w):
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_name(model_name + " LoRA")
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

        _write(adapter_file, arch, fill_adapter, lora)
    return types


def _file_type(gguf, types: Dict[str, str]):
    """general.file_type: the most common quantized type of the file (llama.cpp's "mostly X")."""
    from collections import Counter

    quant = Counter(t for t in types.values() if t not in ("F16", "F32"))
    top = quant.most_common(1)[0][0] if quant else "F16"
    if not quant and all(t == "F32" for t in types.values()):
        return gguf.LlamaFileType.ALL_F32
    ftype = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S"}.get(top, top)  # ggml has no plain "mostly Q3_K/Q4_K"
    return getattr(gguf.LlamaFileType, "MOSTLY_" + ftype)
