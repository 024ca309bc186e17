"""GPTQ / OPTQ (Frantar et al. 2023): quantize W column by column, feeding each column's error back
into the columns not yet quantized through the inverse Hessian of the layer's calibrated loss.

Math names follow IST-DASLab's ``gptq.py``: ``W`` (out, in) as in ``nn.Linear``, ``H = X^T X``
(in, in), ``Hinv`` the upper Cholesky factor of ``(H + λI)^{-1}``, ``Q`` the quantized weight, and
per column block ``[i1, i2)`` the working copies ``W1``, ``Q1``, ``Err1``, ``Hinv1``.

Groups. A group's (scale, zero) is fitted with :func:`rtn.fit_group` when its first column is
reached, on the *current* columns (error feedback from earlier columns included, also the lazy,
not yet applied part from the current block). With ``group_size=-1`` the single group is fitted on
all columns at the start. With ``act_order`` columns are processed by decreasing ``diag(H)``, but
groups are *static* (fitted on the original column order before the loop, GPTQ's
``static_groups``), so the packed format is the same as without act-order (no ``g_idx``).

Grids. ``config.grid`` puts each group's (scale, zero) on a llama.cpp lattice (:mod:`.grids`):
a super-block's shared scales (ggml's d, dmin) are fitted when its first column is reached, on
the current columns as a group's are, then each group on that lattice.

Everything is computed in float32 on W's device; scales are rounded to float16 inside
``find_params`` before codes are chosen, so ``QuantizedWeight.dequantize()`` is exactly the ``Q``
GPTQ decided.
"""
from __future__ import annotations

import math

import torch

from .. import linalg
from ..config import QuantConfig, QuantMethod
from ..formats import QuantizedWeight, pack_codes
from .registry import register_quantizer
from .grids import grid_for
from .groups import dequantize

_MAX_REL_DAMP = 10.0  # never damp by more than 10·mean(diag H)


def damped_inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)^{-1}`` with ``λ = damp · mean(diag H)``.

    The damping is :func:`linalg.damped_cholesky`'s: grown x10 while the Cholesky fails (one
    :class:`~cloq_engine.linalg.DampingWarning` names the damping that worked), but never past
    ``10 · mean(diag H)``, where a Gram matrix cannot still be indefinite; then ValueError.
    """
    first = damp if damp > 0 else 1e-8  # damped_cholesky's first non-zero damping
    max_tries = (1 if damp > 0 else 2) + int(math.floor(math.log10(_MAX_REL_DAMP / first) + 1e-9))
    try:
        L, _ = linalg.damped_cholesky(H, damp=damp, max_tries=max(1, max_tries), growth=10.0)
    except ValueError as e:
        raise ValueError(f"GPTQ: {e}; is H really X^T X?") from None
    with linalg.serial_threads(L):  # LAPACK's threaded potri stalls on a shared CPU (linalg module docstring)
        Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(Hinv).all()):
        raise ValueError("GPTQ: Cholesky of (H + λI)^{-1} failed; H is too ill-conditioned in float32")
    return Hinv


def _pending(W, W1, Err1, Hinv, i1, i, i2, j2):
    """Current values of columns ``[i1+i, j2)``: block columns from ``W1``, later ones with the
    block's lazy error feedback ``Err1[:, :i] @ Hinv[i1:i1+i, i2:j2]`` applied."""
    cur = W1[:, i:]
    if j2 > i2:
        rest = W[:, i2:j2] - Err1[:, :i] @ Hinv[i1 : i1 + i, i2:j2]
        cur = torch.cat([cur, rest], dim=1)
    return cur[:, : j2 - i1 - i]


@register_quantizer(QuantMethod.GPTQ, needs_H=True)
@torch.no_grad()
def quantize_gptq(W: torch.Tensor, config: QuantConfig, H: torch.Tensor) -> QuantizedWeight:
    """GPTQ-quantize ``W`` (out, in) given ``H = X^T X`` (in, in); returns method="gptq" storage."""
    n, k = W.shape
    g = k if config.group_size == -1 else config.group_size
    maxq = 2**config.bits - 1
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()

    # Dead input channels never see a non-zero input: their weights do not matter.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grid = grid_for(config, k)  # our own lattice, or a llama.cpp one (quant.grids)
    sup = grid.super_size
    scale = torch.zeros(k // g, n, device=W.device)
    zero = torch.zeros(k // g, n, device=W.device)
    static_groups = config.act_order or config.group_size == -1
    state = None
    if static_groups:
        for gi in range(k // g):
            if sup > 1 and (gi * g) % sup == 0:
                state = grid.fit_super(W[:, gi * g : gi * g + sup])
            scale[gi], zero[gi] = grid.fit_group(W[:, gi * g : (gi + 1) * g], state)

    perm = torch.arange(k, device=W.device)
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // g).tolist()  # group of the column processed at each position

    Hinv = damped_inverse_cholesky(H, config.damp)
    del H

    codes = torch.zeros(k, n, device=W.device)  # K-major, as packed; row = processing position
    B = config.block_size
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        # One column at a time: many small ops whose thread barriers stall on a shared CPU
        # (linalg.serial_threads); the block's error feedback below is one GEMM and keeps the threads.
        with linalg.serial_threads(W):
            for i in range(i2 - i1):
                col = i1 + i
                gi = group_of[col]
                if not static_groups and sup > 1 and col % sup == 0:  # a super-block's d, dmin
                    state = grid.fit_super(_pending(W, W1, Err1, Hinv, i1, i, i2, col + sup))
                if not static_groups and col % g == 0:
                    cur = _pending(W, W1, Err1, Hinv, i1, i, i2, col + g)
                    scale[gi], zero[gi] = grid.fit_group(cur, state)

                w = W1[:, i]
                d = Hinv1[i, i]
                q = grid.codes(w, scale[gi], zero[gi], maxq)
                codes[col] = q
                Q1[:, i] = dequantize(q, scale[gi], zero[gi])
                err1 = (w - Q1[:, i]) / d
                W1[:, i:] -= torch.outer(err1, Hinv1[i, i:])
                Err1[:, i] = err1

        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if config.act_order:
        invperm = torch.argsort(perm)
        codes = codes[invperm]

    return QuantizedWeight(
        qweight=pack_codes(codes.to(torch.int64), config.bits),
        scales=scale.half(),
        zeros=zero.half(),
        bits=config.bits,
        group_size=config.group_size,
        in_features=k,
        out_features=n,
        method="gptq",
    )
