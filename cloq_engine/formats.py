"""The packed weight format and ``QuantizedWeight``.

Codes are packed along the input dimension K into int32 words, K-major like GPTQ's ``qweight``
(the kernels compute ``X @ W^T`` and read W^T tiles of shape [BLOCK_K, BLOCK_N]):

* 2 and 4 bits: ``32 // bits`` codes per word; code k sits at bit ``bits * (k % per_word)`` of
  word ``k // per_word`` (GPTQ's order).
* 3 bits: two bit-planes stacked along the rows of one tensor, so that no code straddles a word:
  rows ``[0, Kp/16)`` hold the low 2 bits as a 2-bit plane, rows ``[Kp/16, 3Kp/32)`` the high bit
  as a 1-bit plane (32 codes per word).

K is padded with zero codes to ``Kp``, a multiple of 32, so every plane has whole words and a
kernel tile of 32 rows of K never straddles a word. Padding only occurs with ``group_size=-1``
(a group size of 32/64/128 must divide K).

Dequantisation (integer methods): ``W[n, k] = (code[k, n] - zeros[g, n]) * scales[g, n]`` with
``g = k // group_size``. The zero is stored as a float (exact for integer zero points, GPTQ-v2
semantics: no ``-1`` offset). NF4: ``W[n, k] = NF4_CODEBOOK[code[k, n]] * scales[g, n]`` where
``scales`` holds the per-block absmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

PACK_ALIGN = 32  # K is padded to a multiple of this

# The 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

_METHOD_IDS = {"rtn": 0, "gptq": 1, "nf4": 2}
_METHOD_NAMES = {v: k for k, v in _METHOD_IDS.items()}


def padded_k(in_features: int) -> int:
    return math.ceil(in_features / PACK_ALIGN) * PACK_ALIGN


def packed_rows(in_features: int, bits: int) -> int:
    """Number of int32 rows of ``qweight`` for ``in_features`` codes of ``bits`` bits."""
    return padded_k(in_features) * bits // 32


def check_group_size(in_features: int, group_size: int, where: str = "") -> None:
    """The one check that groups of ``group_size`` input columns tile ``in_features`` (-1: one
    group); ``where`` prefixes the message (a layer's name)."""
    if group_size != -1 and in_features % group_size:
        raise ValueError(f"{where}in_features={in_features} is not divisible by group_size={group_size}; "
                         f"use a divisor of {in_features} or -1")


def group_count(in_features: int, group_size: int) -> int:
    """Rows of ``scales`` / ``zeros``: one per group of ``group_size`` input columns (-1: one group)."""
    return 1 if group_size == -1 else in_features // group_size


def _check_bits(bits: int) -> None:
    if bits not in (2, 3, 4):
        raise ValueError(f"`bits` must be one of (2, 3, 4); got {bits!r}")


def _to_int32_words(acc: torch.Tensor) -> torch.Tensor:
    """Wrap non-negative int64 values < 2**32 into int32 with the same bit pattern."""
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


# Integer dtypes the C++ pack_codes accepts.
_EXT_CODE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _extension(t: torch.Tensor):
    """The loaded C++ extension for a CPU tensor ``t`` (fast pack/unpack), else None."""
    if t.device.type != "cpu":
        return None
    from . import _ext

    return _ext.load()


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """codes: int64 [Kp, N] with values < 2**width, Kp a multiple of 32 -> int32 [Kp*width/32, N]."""
    per_word = 32 // width
    kp, n = codes.shape
    c = codes.reshape(kp // per_word, per_word, n)
    shifts = (torch.arange(per_word, device=codes.device, dtype=torch.int64) * width).view(1, per_word, 1)
    return _to_int32_words((c << shifts).sum(dim=1))


def _unpack_plane(words: torch.Tensor, width: int) -> torch.Tensor:
    """int32 [R, N] -> int64 codes [R * 32/width, N]."""
    per_word = 32 // width
    r, n = words.shape
    shifts = (torch.arange(per_word, device=words.device, dtype=torch.int64) * width).view(1, per_word, 1)
    w = words.to(torch.int64).unsqueeze(1) & 0xFFFFFFFF
    return ((w >> shifts) & ((1 << width) - 1)).reshape(r * per_word, n)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [K, N]; got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor; got {codes.dtype}")


def _check_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> None:
    _check_bits(bits)
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32; got {qweight.dtype}")
    rows = padded_k(in_features) * bits // 32
    if qweight.dim() != 2 or qweight.shape[0] != rows:
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)}; {bits}-bit codes for in_features={in_features} need {rows} rows"
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes of shape [K, N] (K-major, values in [0, 2**bits)) into int32 words.

    CPU tensors go through the C++ extension when it is loaded (bit-identical to
    :func:`pack_codes_torch`, the spec).
    """
    _check_codes(codes, bits)
    ext = _extension(codes)
    if ext is not None and codes.dtype in _EXT_CODE_DTYPES:
        return ext.pack_codes(codes, bits)  # same words, range check included
    return pack_codes_torch(codes, bits)


def pack_codes_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The pure-PyTorch :func:`pack_codes` (the spec the C++ fast path is tested against)."""
    _check_codes(codes, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    k, n = c.shape
    kp = padded_k(k)
    if kp != k:
        c = torch.cat([c, c.new_zeros(kp - k, n)], dim=0)
    if bits == 3:
        return torch.cat([_pack_plane(c & 3, 2), _pack_plane(c >> 2, 1)], dim=0)
    return _pack_plane(c, bits)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 [rows, N] -> int64 codes [in_features, N].

    CPU tensors go through the C++ extension when it is loaded (see :func:`unpack_codes_torch`).
    """
    _check_qweight(qweight, bits, in_features)
    ext = _extension(qweight)
    if ext is not None:
        return ext.unpack_codes(qweight, bits, in_features)
    return unpack_codes_torch(qweight, bits, in_features)


def unpack_codes_torch(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The pure-PyTorch :func:`unpack_codes` (the spec the C++ fast path is tested against)."""
    _check_qweight(qweight, bits, in_features)
    kp = padded_k(in_features)
    if bits == 3:
        lo_rows = kp // 16
        codes = _unpack_plane(qweight[:lo_rows], 2) | (_unpack_plane(qweight[lo_rows:], 1) << 2)
    else:
        codes = _unpack_plane(qweight, bits)
    return codes[:in_features]


def dequantize_stored(qw: "QuantizedWeight") -> torch.Tensor:
    """The reference dequantization, float32 (out_features, in_features) in stored column order
    (before ``perm``): ``(code - zero) · scale`` per group, or ``NF4_CODEBOOK[code] · scale``.
    The spec every backend's ``dequantize`` is tested against (``backends.torch_ref`` re-exports it)."""
    codes = unpack_codes(qw.qweight, qw.bits, qw.in_features)  # [K, N]
    g = qw.effective_group_size
    K, N = codes.shape
    G = qw.scales.shape[0]
    if G * g == K:  # groups broadcast over their rows ([G, g, N] views): the same values, no [K, N] copies
        scales = qw.scales.float().unsqueeze(1)
        zeros = None if qw.is_nf4 else qw.zeros.float().unsqueeze(1)
        codes = codes.view(G, g, N)
    else:
        scales = qw.scales.float().repeat_interleave(g, dim=0)[:K]
        zeros = None if qw.is_nf4 else qw.zeros.float().repeat_interleave(g, dim=0)[:K]
    if qw.is_nf4:
        w_t = NF4_CODEBOOK.to(codes.device)[codes] * scales
    else:
        w_t = (codes.float() - zeros) * scales
    return w_t.reshape(K, N).t().contiguous()


@dataclass
class QuantizedWeight:
    """A truly packed quantized weight of logical shape (out_features, in_features).

    Buffers (K = in_features, N = out_features, Kp = K rounded up to 32, G = number of groups):

    * ``qweight``: int32 [Kp * bits / 32, N], packed codes (see the module docstring).
    * ``scales``: float16 [G, N], per-group scale (NF4: per-block absmax).
    * ``zeros``: float16 [G, N], per-group zero point in code units; ``None`` for NF4.

    * ``perm``: int64 [K] or None. When set (a GPTQ act-order import), stored column i is input
      feature ``perm[i]``: the buffers describe ``W[:, perm]`` and a layer computes
      ``x[..., perm] @ Ŵ_stored^T``; :meth:`dequantize` returns the weight in input order.

    ``group_size`` is the configured value (-1 means one group over all of K);
    ``effective_group_size`` is the number of K columns per group.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bits: int
    group_size: int
    in_features: int
    out_features: int
    method: str = "rtn"
    perm: Optional[torch.Tensor] = None

    def __post_init__(self):
        _check_bits(self.bits)
        if self.perm is not None and (tuple(self.perm.shape) != (self.in_features,) or self.perm.dtype != torch.int64):
            raise ValueError(f"perm must be int64 of shape ({self.in_features},); got {self.perm.dtype} "
                             f"{tuple(self.perm.shape)}")
        if self.method not in _METHOD_IDS:
            raise ValueError(f"`method` must be one of {tuple(_METHOD_IDS)}; got {self.method!r}")
        n, k = self.out_features, self.in_features
        check_group_size(k, self.group_size)
        if tuple(self.qweight.shape) != (packed_rows(k, self.bits), n) or self.qweight.dtype != torch.int32:
            raise ValueError(
                f"qweight must be int32 of shape {(packed_rows(k, self.bits), n)}; "
                f"got {self.qweight.dtype} {tuple(self.qweight.shape)}"
            )
        if tuple(self.scales.shape) != (self.num_groups, n):
            raise ValueError(f"scales must have shape {(self.num_groups, n)}; got {tuple(self.scales.shape)}")
        if self.is_nf4:
            if self.zeros is not None:
                raise ValueError("NF4 weights have no zeros")
        elif self.zeros is None or self.zeros.shape != self.scales.shape:
            raise ValueError(f"zeros must have shape {(self.num_groups, n)} for method {self.method!r}")

    # -- shape facts ---------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def effective_group_size(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def num_groups(self) -> int:
        return group_count(self.in_features, self.group_size)

    @property
    def is_nf4(self) -> bool:
        return self.method == "nf4"

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage actually held: packed codes plus per-group parameters."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        if self.perm is not None:
            total += self.perm.numel() * self.perm.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.in_features * self.out_features)

    # -- conversions ---------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked integer codes, int64 [in_features, out_features] (K-major)."""
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight Ŵ of shape (out_features, in_features), float32 unless ``dtype``."""
        w = dequantize_stored(self)
        if self.perm is not None:  # stored column i is input feature perm[i]
            w = torch.empty_like(w).index_copy_(1, self.perm.to(w.device), w)
        return w if dtype is None else w.to(dtype)

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(
            self.qweight.to(device),
            self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device),
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
            self.method,
            None if self.perm is None else self.perm.to(device),
        )

    def state_dict(self, prefix: str = "") -> dict:
        """Tensors only (safetensors-friendly); ``meta`` is int32 [bits, group_size, out, in, method]."""
        sd = {
            prefix + "qweight": self.qweight,
            prefix + "scales": self.scales,
            prefix + "meta": torch.tensor(
                [self.bits, self.group_size, self.out_features, self.in_features, _METHOD_IDS[self.method]],
                dtype=torch.int32,
            ),
        }
        if self.zeros is not None:
            sd[prefix + "zeros"] = self.zeros
        if self.perm is not None:
            sd[prefix + "perm"] = self.perm
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "QuantizedWeight":
        try:
            meta = [int(v) for v in sd[prefix + "meta"].tolist()]
            bits, group_size, out_features, in_features, method_id = meta
            if method_id not in _METHOD_NAMES:
                raise ValueError(f"unknown `method` id {method_id} in meta")
            return cls(
                qweight=sd[prefix + "qweight"],
                scales=sd[prefix + "scales"],
                zeros=sd.get(prefix + "zeros"),
                bits=bits,
                group_size=group_size,
                in_features=in_features,
                out_features=out_features,
                method=_METHOD_NAMES[method_id],
                perm=sd.get(prefix + "perm"),
            )
        except KeyError as e:
            raise ValueError(f"incomplete QuantizedWeight state dict: missing {e}") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"corrupt QuantizedWeight state dict at {prefix!r}: {e}") from None


QUANT_BUFFERS = ("qweight", "scales", "zeros")


class PackedBuffers:
    """Mixin for modules holding packed buffers: they follow device moves only, never dtype casts
    (``model.half()``, ``.to(torch.bfloat16)``), so the packed format stays what it is."""

    def _apply(self, fn, recurse=True):
        packed = {n: self._buffers.pop(n) for n in QUANT_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in packed.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self
