"""Scale lattices: where RTN and GPTQ may put a group's (scale, zero).

Our own grid fits each group's float16 scale and integer zero freely (:func:`groups.fit_group`).
The llama.cpp grids constrain them so that the stored weight is *exactly* one of ggml's block
types, with our storage and kernels unchanged: a group still dequantizes as ``(q - z) · s`` with
``s`` and ``z`` float16, ``q`` the unsigned code; only the values ``s`` and ``z`` may take change.

========  ===========  ===============================================================
grid      ggml type    what the stored (s, z) of a group of 32 are
========  ===========  ===============================================================
``q4_1``  Q4_1         s float16, z an integer 0..15 with ``s·z`` a float16 (the min ``m = -s·z``)
``q4_k``  Q4_K         per 256 columns d, dmin powers of two; per group ``s = d·sc``
                       (sc 1..63) and ``s·z = dmin·m`` (m 0..63), z float16
``q3_k``  Q3_K         per 256 columns d with 6 significant bits; ``s = d·n`` (n 1..31,
                       ggml's 6-bit scale n + 32), z = 4 (symmetric)
``q2_k``  Q2_K         as q4_k with sc, m in 1..15 / 0..15; codes 0..3
``q4_0``  Q4_0         s float16 (either sign, as ggml's d), z = 8: ``d·(q - 8)``
========  ===========  ===============================================================

Q3_K and Q2_K have sub-blocks of 16; our kernels read one scale row per 32 rows of K, so a group
of 32 holds two sub-blocks with the same (scale, min): a sub-lattice of ggml's, exact all the same.
``z`` need not be an integer: dequantization ``(q - z)·s`` equals ggml's ``d·sc·q - dmin·m`` bit
for bit in float32 whenever ``s = d·sc`` and ``s·z = dmin·m`` hold exactly, since both round the
same real number once. With d and dmin powers of two, ``z = (m / sc)·2^k`` is a float16 exactly
when the odd part of sc divides m; the group fit searches the (sc, m) pairs near the min-max fit
that satisfy that, by squared error.

ggml's k-quants need rows of a multiple of 256; a layer with another in_features falls back as
llama.cpp's quantizer does for such tensors (``tensor_type_fallback`` in its ``llama-quant.cpp``),
at that type's bits (:func:`layer_config`): ``q2_k``/``q3_k`` to 4-bit ``q4_0`` (llama.cpp: Q4_0),
``q4_k`` to ``q4_1`` (llama.cpp: Q5_0, which would need 5-bit codes; Q4_1 is half a bit smaller).
So such a model holds layers of two widths; each layer's ``quant_config`` says its own. Records
made before ``QuantConfig.grid_fallback`` existed ("same-bits") kept the config's bits on our own
grid (written as Q4_0: 4.5 bits a weight for 2- or 3-bit codes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from ..config import GRID_LATTICES
from . import groups  # the per-group primitives (find_params, fit_group, quantize)

SUPER_BLOCK = 256  # ggml's QK_K
GROUP = 32  # the group size every llama.cpp grid stores


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of ``w`` [N, ...] for per-row scale/zero [N], zero possibly fractional."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape) + zero.view(shape)), 0, maxq)


def _sq_err(w, scale, zero, maxq):
    """Squared error per row of the grid (scale, zero) [..., N] on w [N, g] broadcast: [..., N]."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.clamp(torch.round(w / s + z), 0, maxq)
    return (((q - z) * s - w) ** 2).sum(-1)


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), at least float16's smallest subnormal 2^-24."""
    e = torch.ceil(torch.log2(x.clamp(min=2.0**-24)))
    p = torch.exp2(e)
    p = torch.where(p < x, p * 2, p)  # log2 rounding
    return torch.where(p / 2 >= x, p / 2, p).clamp(min=2.0**-24)


def _ceil_bits(x: torch.Tensor, nbits: int) -> torch.Tensor:
    """x rounded up to ``nbits`` significant bits (x > 0)."""
    m, e = torch.frexp(x)  # x = m·2^e, m in [0.5, 1)
    return torch.ldexp(torch.ceil(m * 2**nbits) / 2**nbits, e)


def _odd_part(n: torch.Tensor) -> torch.Tensor:
    """The odd factor of each positive integer (1 for 0)."""
    n = n.to(torch.int64).clamp(min=1)
    return n // (n & -n)


def fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Whether each value of float64 ``x`` is a finite float16 exactly."""
    return torch.isfinite(x) & (x.to(torch.float16).to(torch.float64) == x)


@dataclass(frozen=True)
class Grid:
    """A scale lattice. ``super_size`` columns share ``fit_super``'s state; each group of
    ``group`` columns gets ``fit_group(w, state) -> (scale, zero)`` (float32 [N] each, exactly
    the float16 values stored). ``ggml_type`` is the GGUF type the exporter writes."""

    name: str
    bits: int
    sym: bool
    ggml_type: Optional[str]
    super_size: int
    fit_super: Callable
    fit_group: Callable
    fallback: Optional[str] = None  # grid for a layer whose in_features is not a multiple of super_size
    codes: Callable = round_codes  # (w, scale, zero, maxq) -> codes; ours keeps groups.quantize's integer-zero rounding


def _own_fit_group(bits, sym, mse_clip):
    return lambda w, state: groups.fit_group(w, bits, sym, mse_clip)


def own_grid(bits: int, sym: bool, mse_clip: bool = False) -> Grid:
    """Our grid: float16 scale and integer zero per group, fitted freely."""
    return Grid("own", bits, sym, None, 1, lambda w: None, _own_fit_group(bits, sym, mse_clip), codes=groups.quantize)


# ---- Q4_1 ---------------------------------------------------------------------------------------
def _q4_1_group(w: torch.Tensor, state) -> tuple:
    """Min-max (scale, integer zero), the scale rounded up to the float16 precision that leaves
    ``s·z`` (the min) a float16: 11 significant bits less the bits of z's odd part."""
    w = w.float()
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    scale, zero = groups.find_params(w, 4, sym=False)
    for _ in range(3):  # z's odd part fixes the bits of s, s fixes z: settles in a step or two
        width = torch.floor(torch.log2(_odd_part(zero).double())).float() + 1
        scale = _ceil_bits(scale, 11 - width.to(torch.int64)).half().float()
        zero = torch.round(-xmin / scale).clamp(0, 15)
    ok = fp16_exact(scale.double() * zero.double())
    zero = torch.where(ok, zero, torch.exp2(torch.floor(torch.log2(zero.clamp(min=1)))))  # a power of two always fits
    return scale, zero


# ---- k-quants with a min (Q4_K, Q2_K) ---------------------------------------------------------
def _kquant_min_super(maxq: int, sc_max: int, m_max: int):
    def fit_super(w: torch.Tensor):
        n = w.shape[0]
        wg = w.float().reshape(n, -1, GROUP)
        xmin = torch.clamp(wg.min(dim=2).values, max=0)
        xmax = torch.clamp(wg.max(dim=2).values, min=0)
        d = _pow2_ceil(((xmax - xmin) / maxq).amax(dim=1) / sc_max)
        dmin = _pow2_ceil((-xmin).amax(dim=1) / m_max)
        return d, dmin

    return fit_super


def _kquant_min_group(maxq: int, sc_max: int, m_max: int, radius: int = 2):
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)

    def fit_group(w: torch.Tensor, state) -> tuple:
        d, dmin = state
        w = w.float()
        xmin = torch.clamp(w.min(dim=1).values, max=0)
        xmax = torch.clamp(w.max(dim=1).values, min=0)
        sc0 = torch.round((xmax - xmin) / maxq / d)
        sc = (sc0.unsqueeze(0) + offsets.view(-1, 1).to(w.device)).clamp(1, sc_max)  # [C, N]
        step = _odd_part(sc).float()  # m must be a multiple of sc's odd part (d, dmin powers of two)
        # GPTQ's error feedback can push a group past the super-block's range: clamp to the lattice
        m_lo = torch.floor((-xmin / dmin).clamp(max=m_max) / step) * step
        sc = torch.cat([sc, sc])
        m = torch.cat([m_lo, m_lo + step.float()]).clamp(max=m_max)
        m = torch.where(m % torch.cat([step, step]) == 0, m, m_lo.repeat(2, 1))  # clamped off the lattice
        scale = d * sc  # exact: d is a power of two
        zero = (dmin * m / scale).to(torch.float16).float()
        err = _sq_err(w, scale, zero, maxq)
        best = err.argmin(dim=0, keepdim=True)
        scale, zero = scale.gather(0, best)[0], zero.gather(0, best)[0]
        ok = fp16_exact(scale.double() * zero.double()) & fp16_exact(scale.double())
        return scale, torch.where(ok, zero, torch.zeros_like(zero))  # m = 0 always fits

    return fit_group


# ---- Q3_K ---------------------------------------------------------------------------------------
_Q3_N = 31  # |ggml scale - 32| of a positive sub-block scale


def _q3_k_super(w: torch.Tensor):
    amax = w.float().abs().reshape(w.shape[0], -1, GROUP).amax(dim=2).amax(dim=1)
    return _ceil_bits((2 * amax / 7 / _Q3_N).clamp(min=2.0**-24), 6).clamp(min=2.0**-24)


def _q3_k_group(w: torch.Tensor, d) -> tuple:
    w = w.float()
    amax = w.abs().amax(dim=1)
    n0 = torch.round(2 * amax / 7 / d)
    n = (n0.unsqueeze(0) + torch.tensor([-1.0, 0.0, 1.0], device=w.device).view(-1, 1)).clamp(1, _Q3_N)
    scale = d * n  # 6 + 5 significant bits: a float16 (rounded below if d is subnormal)
    scale = scale.to(torch.float16).float()
    zero = torch.full_like(scale, 4.0)
    best = _sq_err(w, scale, zero, 7).argmin(dim=0, keepdim=True)
    return scale.gather(0, best)[0], zero[0]


# ---- Q4_0 ---------------------------------------------------------------------------------------
_Q4_0_SHRINK = (1.0, 0.96, 0.92, 0.88, 0.84)


def _q4_0_group(w: torch.Tensor, state) -> tuple:
    """ggml's d = max / -8 (``max`` the value of largest magnitude, sign kept: it lands on code 0),
    and a few shrinks of it, the one of least squared error per row; z = 8."""
    w = w.float()
    idx = w.abs().argmax(dim=1, keepdim=True)
    vmax = w.gather(1, idx)[:, 0]
    base = vmax / -8
    base = torch.where(base.abs() < 2.0**-24, torch.full_like(base, 2.0**-24), base)
    scale = torch.stack([(base * f).half().float() for f in _Q4_0_SHRINK])  # [C, N], float16 values
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-24), scale)
    zero = torch.full_like(scale, 8.0)
    best = _sq_err(w, scale, zero, 15).argmin(dim=0, keepdim=True)
    return scale.gather(0, best)[0], zero[0]


GRIDS: Dict[str, Grid] = {}


def register_grid(grid: Grid) -> Grid:
    if GRID_LATTICES.get(grid.name) != (grid.bits, grid.sym):
        raise ValueError(f"grid {grid.name!r} must be listed in config.GRID_LATTICES as {(grid.bits, grid.sym)}")
    if grid.name in GRIDS:
        raise ValueError(f"grid {grid.name!r} is already registered")
    GRIDS[grid.name] = grid
    return grid


register_grid(Grid("q4_1", 4, False, "Q4_1", 1, lambda w: None, _q4_1_group))
register_grid(Grid("q4_k", 4, False, "Q4_K", SUPER_BLOCK, _kquant_min_super(15, 63, 63),
                   _kquant_min_group(15, 63, 63), fallback="q4_1"))
register_grid(Grid("q3_k", 3, True, "Q3_K", SUPER_BLOCK, _q3_k_super, _q3_k_group, fallback="q4_0"))
register_grid(Grid("q2_k", 2, False, "Q2_K", SUPER_BLOCK, _kquant_min_super(3, 15, 15),
                   _kquant_min_group(3, 15, 15), fallback="q4_0"))
register_grid(Grid("q4_0", 4, True, "Q4_0", 1, lambda w: None, _q4_0_group))


def grid_names() -> tuple:
    return tuple(GRIDS)


def layer_config(config, in_features: int):
    """The QuantConfig a layer of ``in_features`` inputs is quantized and stored with under
    ``config``: ``config`` itself, or for a k-quant grid the row length does not fit, its fallback
    (``grid_fallback="llama.cpp"``: the fallback grid at its own bits and symmetry; "same-bits":
    our own grid at the config's bits)."""
    name = getattr(config, "grid", None)
    if name is None or in_features % GRIDS[name].super_size == 0:
        return config
    fb = GRIDS[GRIDS[name].fallback]
    if config.grid_fallback == "same-bits" and fb.bits != config.bits:
        return dataclasses.replace(config, grid=None)
    return dataclasses.replace(config, bits=fb.bits, sym=fb.sym, grid=fb.name)


def grid_for(config, in_features: int) -> Grid:
    """The lattice a layer of ``in_features`` inputs is quantized on under ``config``."""
    config = layer_config(config, in_features)
    if config.grid is None:
        return own_grid(config.bits, config.sym, config.mse_clip)
    return GRIDS[config.grid]
