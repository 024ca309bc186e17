"""The GPTQ on-disk layout (AutoGPTQ, GPTQModel, transformers + optimum, vLLM): import and export.

Per quantized linear layer ``prefix`` (K = in_features, N = out_features, G = groups):

* ``prefix.qweight``: int32 [K·bits/32, N], codes packed along K;
* ``prefix.qzeros``: int32 [G, N·bits/32], zero points packed along N;
* ``prefix.scales``: float16 [G, N];
* ``prefix.g_idx``: int32 [K], the group of each input feature (``k // group_size`` unless the
  checkpoint was quantized with act-order, ``desc_act``).

Packing is a little-endian bit stream: value i of a column (or row, for ``qzeros``) occupies bits
``[bits·i, bits·(i+1))`` of the concatenated 32-bit words, least significant first. With 2 and 4
bits no value straddles a word; with 3 bits every 32 values fill 3 words and values 10 and 21 of
each run straddle two words. Dequantization: ``W[n, k] = scales[g, n] · (q[k, n] - z[g, n])`` with
``g = g_idx[k]``, where ``z`` is the stored zero + 1 in format v1 ("gptq", AutoGPTQ's historical
offset) and the stored zero itself in v2 ("gptq_v2", GPTQModel).

Import gives a :class:`~cloq_engine.formats.QuantizedWeight` bit-exactly (same codes, scales and
zeros). Act-order ``g_idx`` becomes an input-feature permutation ``perm`` that makes every group
contiguous: the weight is stored with its columns in ``perm`` order and the layer reads
``x[..., perm]``. Export is the inverse.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .formats import QuantizedWeight, check_group_size, group_count, pack_codes, unpack_codes

FORMATS = ("gptq", "gptq_v2")  # checkpoint_format values: v1 (zero - 1 stored) and v2 (exact zero)


# ---- bit streams --------------------------------------------------------------------------------
def _check_stream(bits: int, length: int, what: str) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"`bits` must be one of 2, 3, 4, 8; got {bits!r}")
    if (length * bits) % 32:
        unit = 32 if bits == 3 else 32 // bits
        raise ValueError(f"{what}={length} must be a multiple of {unit} for {bits}-bit GPTQ packing")


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values [L, M] (in [0, 2**bits)) along dim 0 into int32 words [L·bits/32, M]."""
    L = values.shape[0]
    _check_stream(bits, L, "length")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) for {bits} bits")
    off = torch.arange(L, device=v.device) * bits
    word, shift = off // 32, (off % 32).unsqueeze(1)
    out = torch.zeros(L * bits // 32, v.shape[1], dtype=torch.int64, device=v.device)
    out.index_add_(0, word, (v << shift) & 0xFFFFFFFF)  # fields never overlap: adding is OR
    spill = (off % 32) + bits > 32
    if bool(spill.any()):
        out.index_add_(0, word[spill] + 1, v[spill] >> (32 - shift[spill]))
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_stream(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_stream`: int32 [length·bits/32, M] -> int64 [length, M]."""
    _check_stream(bits, length, "length")
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[0] != length * bits // 32:
        raise ValueError(f"expected int32 words of {length * bits // 32} rows; got {words.dtype} {tuple(words.shape)}")
    u = words.to(torch.int64) & 0xFFFFFFFF
    off = torch.arange(length, device=words.device) * bits
    word, shift = off // 32, (off % 32).unsqueeze(1)
    val = u[word] >> shift
    spill = (off % 32) + bits > 32
    if bool(spill.any()):
        val[spill] |= u[word[spill] + 1] << (32 - shift[spill])
    return val & ((1 << bits) - 1)


# ---- one layer ----------------------------------------------------------------------------------
def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"`checkpoint_format` must be one of {FORMATS}; got {checkpoint_format!r}")


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
              bits: int, group_size: int, checkpoint_format: str = "gptq") -> QuantizedWeight:
    """A :class:`QuantizedWeight` holding exactly the weight a GPTQ layer's tensors describe.

    ``group_size`` is the checkpoint's (-1: one group). ``g_idx`` None means ``k // group_size``.
    """
    _check_format(checkpoint_format)
    if bits not in (2, 3, 4):
        raise ValueError(f"`bits` must be 2, 3 or 4 to import; got {bits!r}")
    n = scales.shape[1]
    k = qweight.shape[0] * 32 // bits
    check_group_size(k, group_size)
    g = k if group_size == -1 else group_size
    groups = group_count(k, group_size)
    if tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n * bits // 32):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match "
                         f"{groups} groups x {n} outputs at {bits} bits")
    codes = unpack_stream(qweight, bits, k)  # [K, N]
    zeros = unpack_stream(qzeros.t().contiguous(), bits, n).t()  # [G, N]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(device=codes.device, dtype=torch.int64)
        if tuple(g_idx.shape) != (k,):
            raise ValueError(f"`g_idx` must have shape ({k},); got {tuple(g_idx.shape)}")
        if not torch.equal(g_idx, torch.arange(k, device=codes.device) // g):
            if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.full((groups,), g, device=codes.device)):
                raise ValueError(f"`g_idx` must put exactly {g} input features in each of the {groups} groups")
            perm = torch.argsort(g_idx, stable=True)
            codes = codes[perm]
    return QuantizedWeight(
        qweight=pack_codes(codes, bits),
        scales=scales.to(torch.float16).contiguous(),
        zeros=zeros.to(torch.float16).contiguous(),
        bits=bits, group_size=group_size, in_features=k, out_features=n, method="gptq", perm=perm,
    )


def fits_v1(qw: QuantizedWeight) -> bool:
    """Whether v1 can store ``qw``'s zeros: v1 keeps zero - 1 in ``bits`` bits, so a zero of 0 (common
    for asymmetric 2-bit groups) cannot be written; GPTQModel's v2 stores the zero itself."""
    z = qw.zeros.float()
    return bool((z == z.round()).all()) and int(z.min()) >= 1 and int(z.max()) <= 1 << qw.bits


def to_gptq(qw: QuantizedWeight, checkpoint_format: str = "gptq") -> Dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` tensors for ``qw`` in the GPTQ layout."""
    _check_format(checkpoint_format)
    if qw.is_nf4:
        raise ValueError("NF4 weights have no GPTQ layout; quantize with method='gptq' or 'rtn'")
    k, n, bits = qw.in_features, qw.out_features, qw.bits
    _check_stream(bits, k, "in_features")
    _check_stream(bits, n, "out_features")
    zeros = qw.zeros.float()
    if not bool((zeros == zeros.round()).all()):
        raise ValueError("GPTQ stores integer zero points; this weight has fractional zeros")
    zeros = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if int(zeros.min()) < 1 or int(zeros.max()) > 1 << bits:
            raise ValueError(f"checkpoint_format='gptq' (v1) stores zero - 1 in {bits} bits, so zeros must lie in "
                             f"[1, {1 << bits}]; use checkpoint_format='gptq_v2' for this weight")
        zeros = zeros - 1
    elif int(zeros.min()) < 0 or int(zeros.max()) >= 1 << bits:
        raise ValueError(f"checkpoint_format='gptq_v2' stores zeros in {bits} bits: [0, {1 << bits})")
    codes = unpack_codes(qw.qweight, bits, k)  # [K, N] in stored (perm) order
    group = torch.arange(k, device=codes.device) // qw.effective_group_size
    if qw.perm is None:
        g_idx = group
    else:  # stored column i is input feature perm[i]
        perm = qw.perm.to(device=codes.device, dtype=torch.int64)
        original = torch.empty_like(codes)
        original[perm] = codes
        codes = original
        g_idx = torch.empty_like(group)
        g_idx[perm] = group
    return {
        "qweight": pack_stream(codes, bits),
        "qzeros": pack_stream(zeros.t(), bits).t().contiguous(),
        "scales": qw.scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


# ---- checkpoints --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTQCheckpointConfig:
    """The ``quantize_config.json`` fields the import and export use."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = False
    checkpoint_format: str = "gptq"

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym,
                "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
                "quant_method": "gptq", "checkpoint_format": self.checkpoint_format}


def read_gptq_config(path: str) -> GPTQCheckpointConfig:
    """``quantize_config.json``, or the ``quantization_config`` of ``config.json``, of a GPTQ directory."""
    d = None
    qc_path = os.path.join(path, "quantize_config.json")
    if os.path.isfile(qc_path):
        with open(qc_path) as f:
            d = json.load(f)
    elif os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f).get("quantization_config")
    if not d:
        raise ValueError(f"{path!r} has no quantize_config.json nor a quantization_config in config.json")
    if d.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{path!r} is not a GPTQ checkpoint (quant_method={d.get('quant_method')!r})")
    fmt = d.get("checkpoint_format", "gptq")
    _check_format(fmt)
    return GPTQCheckpointConfig(bits=int(d["bits"]), group_size=int(d.get("group_size", -1)),
                                desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", False)),
                                checkpoint_format=fmt)


def read_gptq_tensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files of a GPTQ checkpoint directory."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{path!r} has no .safetensors files")
    tensors: Dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(os.path.join(path, f)))
    return tensors


def load_gptq_weights(path: str) -> Dict[str, QuantizedWeight]:
    """``{layer name: QuantizedWeight}`` for every quantized layer of a GPTQ checkpoint directory."""
    cfg = read_gptq_config(path)
    tensors = read_gptq_tensors(path)
    out = {}
    for key in tensors:
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        out[name] = from_gptq(tensors[key], tensors[name + ".qzeros"], tensors[name + ".scales"],
                              tensors.get(name + ".g_idx"), cfg.bits, cfg.group_size, cfg.checkpoint_format)
    if not out:
        raise ValueError(f"{path!r} has no `*.qweight` tensors")
    return out
