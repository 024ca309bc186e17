"""A :class:`QuantizedWeight` as ggml's raw blocks, exactly, or a reason why it cannot be.

Each encoder reads the stored codes, scales and zeros (float16, so float64 holds every product
of two of them exactly) and finds ggml's block fields with

* Q4_0 / Q5_0: ``d = s``, ``q' = code - z + 8`` (``+ 16``), z an integer;
* Q4_1: ``d = s``, ``m = -s·z`` a float16;
* Q4_K / Q2_K: per 256 columns a float16 d and dmin with ``s = d·sc`` and ``s·z = dmin·m``
  (sc, m integers of 6 / 4 bits); Q3_K: ``s = d·(sc - 32)`` and z = 4.

When these hold as equalities of reals, ggml's dequantization (``d·q' `` products that are exact in
float32, one rounding at the end) and ours (``(q - z)·s``, one rounding) give the same float32
bits; ``encode`` then packs the fields in ggml's byte layout (``ggml-common.h``; gguf-py's
``quants.py`` decodes them). Sub-blocks of 16 (Q2_K, Q3_K) take their group's parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import torch

from ..formats import QuantizedWeight

QK = 32  # ggml's 32-blocks
QK_K = 256  # and super-blocks


class NotRepresentable(ValueError):
    """The weight is not exactly this ggml type (the message says why)."""


@dataclass(frozen=True)
class BlockType:
    name: str  # gguf.GGMLQuantizationType member
    block: int
    bits: Tuple[int, ...]  # code widths it can hold
    encode: Callable  # (codes [N, K] int64, s [N, K] f64, z [N, K] f64) -> uint8 [N, row_bytes]


def _per_column(qw: QuantizedWeight):
    """codes [N, K] int64 and each column's scale and zero [N, K] float64 (the stored values)."""
    g = qw.effective_group_size
    c = qw.codes().t().contiguous()
    s = qw.scales.double().repeat_interleave(g, dim=0).t().contiguous()
    z = qw.zeros.double().repeat_interleave(g, dim=0).t().contiguous()
    return c, s, z


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """float values [..., ] that are float16 exactly -> uint8 [..., 2] (little-endian)."""
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: torch.Tensor, half: int) -> torch.Tensor:
    """Codes [..., 2·half] (values < 16) -> bytes [..., half]: low nibble j, high nibble j + half."""
    return q[..., :half] | (q[..., half:] << 4)


def _crumbs(q: torch.Tensor) -> torch.Tensor:
    """2-bit values [..., 128·c] -> bytes [..., 32·c]: byte 32·c + l holds value 128·c + 32·j + l at bit 2j."""
    q = q.reshape(*q.shape[:-1], -1, 4, 32)
    return (q[..., 0, :] | q[..., 1, :] << 2 | q[..., 2, :] << 4 | q[..., 3, :] << 6).flatten(-2)


def _integer(x: torch.Tensor) -> torch.Tensor:
    return x == torch.round(x)


def _first_scale(vals: torch.Tensor, top: int, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A float16 super-scale D per row of ``vals`` [..., n] (float64, >= 0) with every ``vals / D``
    an integer in 0..top: D = max / c for the first c in top..1 that works; D = 0 for all-zero rows.
    Returns (D [...], integers [..., n])."""
    vmax = vals.amax(dim=-1)
    D = torch.zeros_like(vmax)
    found = vmax == 0
    for c in range(top, 0, -1):
        cand = vmax / c
        ok = ~found & (cand.to(torch.float16).double() == cand)
        ints = vals / cand.unsqueeze(-1)
        ok &= (_integer(ints) & (ints <= top)).all(dim=-1)
        D = torch.where(ok, cand, D)
        found |= ok
    if not bool(found.all()):
        raise NotRepresentable(f"{int((~found).sum())} super-block(s) have {what} that are no float16 multiple of "
                               f"one super-scale (integers up to {top})")
    safe = torch.where(D == 0, torch.ones_like(D), D)
    return D, torch.round(vals / safe.unsqueeze(-1)).to(torch.int64)


def _need_integer_zero(z: torch.Tensor, t: str) -> None:
    if not bool(_integer(z).all()):
        raise NotRepresentable(f"{t} needs integer zero points; this weight has fractional ones")


def _encode_q4_0(c, s, z, offset=8, top=15):
    _need_integer_zero(z, "Q4_0" if top == 15 else "Q5_0")
    q = c - z.to(torch.int64) + offset
    if int(q.min()) < 0 or int(q.max()) > top:
        raise NotRepresentable(f"code - zero spans {int(q.min()) - offset}..{int(q.max()) - offset}, "
                               f"outside {-offset}..{top - offset}")
    n, k = c.shape
    q = q.reshape(n, k // QK, QK)
    d = _f16_bytes(s[:, ::QK].reshape(n, k // QK))
    if top == 15:
        body = [_nibbles(q, 16).to(torch.uint8).numpy()]
    else:  # Q5_0: d | qh (bit j: 5th bit of value j, uint32 LE) | low nibbles
        qh = ((q >> 4) << torch.arange(QK, dtype=torch.int64)).sum(-1)
        qh = torch.stack([(qh >> (8 * b)) & 255 for b in range(4)], dim=-1)
        body = [qh.to(torch.uint8).numpy(), _nibbles(q & 15, 16).to(torch.uint8).numpy()]
    return np.concatenate([d] + body, axis=-1).reshape(n, -1)


def _encode_q4_1(c, s, z):
    m = -s * z
    if not bool((m.to(torch.float16).double() == m).all()):
        raise NotRepresentable("a group's min -scale·zero is not a float16 (prepare with grid='q4_1')")
    n, k = c.shape
    d = _f16_bytes(s[:, ::QK].reshape(n, k // QK))
    mins = _f16_bytes(m[:, ::QK].reshape(n, k // QK))
    qs = _nibbles(c.reshape(n, k // QK, QK), 16).to(torch.uint8).numpy()
    return np.concatenate([d, mins, qs], axis=-1).reshape(n, -1)


def _superblocks(c, s, z, sub: int):
    """Per super-block views: codes [N, B, 256], sub-block scale and zero [N, B, 256/sub]."""
    n, k = c.shape
    b = k // QK_K
    return c.reshape(n, b, QK_K), s[:, ::sub].reshape(n, b, QK_K // sub), z[:, ::sub].reshape(n, b, QK_K // sub)


def _scale_min(s, z, top: int, t: str):
    if bool((z < 0).any()):
        raise NotRepresentable(f"{t} stores unsigned mins; this weight has negative zero points")
    d, sc = _first_scale(s, top, "sub-block scales")
    dmin, m = _first_scale(s * z, top, "sub-block mins (scale·zero)")
    if bool((sc == 0).any()):
        raise NotRepresentable(f"{t}: a zero sub-block scale")
    return d, sc, dmin, m


def _encode_q4_k(c, s, z):
    cb, sb, zb = _superblocks(c, s, z, 32)
    d, sc, dmin, m = _scale_min(sb, zb, 63, "Q4_K")
    lo = (sc[..., :4] | ((sc[..., 4:] >> 4) << 6))
    mid = (m[..., :4] | ((m[..., 4:] >> 4) << 6))
    hi = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    scales = torch.cat([lo, mid, hi], dim=-1).to(torch.uint8).numpy()
    qs = _nibbles(cb.reshape(*cb.shape[:2], 4, 64), 32).flatten(-2).to(torch.uint8).numpy()
    n = c.shape[0]
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=-1).reshape(n, -1)


def _encode_q2_k(c, s, z):
    cb, sb, zb = _superblocks(c, s, z, 16)
    d, sc, dmin, m = _scale_min(sb, zb, 15, "Q2_K")
    scales = (sc | (m << 4)).to(torch.uint8).numpy()
    qs = _crumbs(cb).to(torch.uint8).numpy()
    n = c.shape[0]
    return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=-1).reshape(n, -1)


def _encode_q3_k(c, s, z):
    if not bool((z == 4).all()):
        raise NotRepresentable("Q3_K is symmetric: every zero must be 4 (prepare with grid='q3_k' or --sym)")
    cb, sb, _ = _superblocks(c, s, z, 16)
    d, n_ = _first_scale(sb, 31, "sub-block scales")
    u = n_ + 32  # ggml's 6-bit scale, sc - 32 = n
    low = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)
    high = sum(((u[..., 4 * j: 4 * j + 4] >> 4) << (2 * j)) for j in range(4))
    scales = torch.cat([low, high], dim=-1).to(torch.uint8).numpy()
    hb = (cb >> 2).reshape(*cb.shape[:2], 8, 32)  # hmask byte l, bit j: high bit of value 32·j + l
    hmask = sum(hb[..., j, :] << j for j in range(8)).to(torch.uint8).numpy()
    qs = _crumbs(cb & 3).to(torch.uint8).numpy()
    rows = c.shape[0]
    return np.concatenate([hmask, qs, scales, _f16_bytes(d)], axis=-1).reshape(rows, -1)


BLOCK_TYPES: Dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q2_K", QK_K, (2,), _encode_q2_k),
        BlockType("Q3_K", QK_K, (3,), _encode_q3_k),
        BlockType("Q4_K", QK_K, (4,), _encode_q4_k),
        BlockType("Q4_0", QK, (2, 3, 4), _encode_q4_0),
        BlockType("Q4_1", QK, (4,), _encode_q4_1),
        BlockType("Q5_0", QK, (4,), lambda c, s, z: _encode_q4_0(c, s, z, offset=16, top=31)),
    )
}

# What a weight with no llama.cpp grid is tried as, smallest file first.
DEFAULT_TYPES = {2: ("Q2_K", "Q4_0"), 3: ("Q3_K", "Q4_0"), 4: ("Q4_K", "Q4_0", "Q4_1", "Q5_0")}
GRID_TYPES = {"q2_k": ("Q2_K", "Q4_0"), "q3_k": ("Q3_K", "Q4_0"), "q4_k": ("Q4_K", "Q4_1"), "q4_1": ("Q4_1",),
              "q4_0": ("Q4_0",)}


def check_layout(qw: QuantizedWeight, t: BlockType) -> None:
    """The reasons a weight cannot be ``t`` whatever its values."""
    if qw.is_nf4:
        raise NotRepresentable("NF4 has no ggml block type (its levels are not an integer lattice)")
    if qw.perm is not None:
        raise NotRepresentable("its columns are act-order permuted (an imported GPTQ g_idx): ggml blocks "
                               "are contiguous along in_features")
    if qw.bits not in t.bits:
        raise NotRepresentable(f"{t.name} holds {'/'.join(map(str, t.bits))}-bit codes, not {qw.bits}-bit")
    k, g = qw.in_features, qw.effective_group_size
    if k % t.block:
        raise NotRepresentable(f"in_features={k} is not a multiple of {t.name}'s block of {t.block}")
    if g % QK:
        raise NotRepresentable(f"group size {g} is not a multiple of 32")


def encode(qw: QuantizedWeight, type_name: str) -> np.ndarray:
    """``qw`` as ggml ``type_name`` blocks, uint8 [out_features, row_bytes]; NotRepresentable if it is not."""
    t = BLOCK_TYPES[type_name]
    check_layout(qw, t)
    c, s, z = _per_column(qw.to("cpu"))
    return t.encode(c, s, z)


def encode_first(qw: QuantizedWeight, type_names) -> Tuple[str, np.ndarray]:
    """The first of ``type_names`` that holds ``qw`` exactly, and its blocks; else NotRepresentable
    giving each type's reason."""
    reasons = []
    for name in type_names:
        try:
            return name, encode(qw, name)
        except NotRepresentable as e:
            reasons.append(f"not {name}: {e}")
    raise NotRepresentable("; ".join(reasons))
