"""Dense linear algebra for calibrated initialisation: damped Cholesky, triangular solves,
and truncated SVDs of the implicitly whitened error ``E = R·L`` (``R = W - Q``, ``H + λI = L L^T``).

Nothing here forms an inverse. The randomized SVD only touches ``E`` through the products
``E·Ω = R·(L·Ω)`` and ``E^T·Y = L^T·(R^T·Y)``, so the only in×in work is the Cholesky itself and
thin products with ``L``. Every function runs on the device of its inputs.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)


class DampingWarning(RuntimeWarning):
    """The Cholesky of ``H + λI`` failed at the requested damping and λ had to be increased."""


@dataclass(frozen=True)
class TruncatedSVD:
    """Top-``rank`` singular triplets: ``U`` (m, r), ``S`` (r,), ``Vh`` (r, n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def mean_diag(H: torch.Tensor) -> float:
    """mean(diag H) in float64 (the unit damping is measured in)."""
    return float(torch.diagonal(H).double().mean())


def damped_cholesky(H: torch.Tensor, damp: float = 1e-6, max_tries: int = 12, growth: float = 10.0,
                    warn: bool = True) -> Tuple[torch.Tensor, float]:
    """Lower Cholesky factor ``L`` of ``H + λI`` with ``λ = damp · mean(diag H)``, and λ.

    If the factorisation fails, λ grows geometrically (×``growth``, starting at no less than
    ``1e-8 · mean(diag H)`` when ``damp`` is 0) for up to ``max_tries`` attempts in all; one
    :class:`DampingWarning` says where it ended. ``H`` must be symmetric; it is factorised in its
    own dtype and device.
    """
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"`damp` must be a finite number >= 0; got {damp!r}")
    if not (isinstance(max_tries, int) and max_tries >= 1):
        raise ValueError(f"`max_tries` must be a positive integer; got {max_tries!r}")
    if not (isinstance(growth, (int, float)) and growth > 1):
        raise ValueError(f"`growth` must be a number > 1; got {growth!r}")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"`H` must be a square matrix; got shape {tuple(H.shape)}")
    unit = mean_diag(H)
    if not math.isfinite(unit) or unit <= 0:
        raise ValueError(f"`H` must have a positive mean diagonal (a Gram matrix of real activations); got {unit!r}")
    eye_diag = torch.diagonal
    lam = damp * unit
    for attempt in range(max_tries):
        Hd = H.clone()
        eye_diag(Hd).add_(lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
            if attempt and warn:
                warnings.warn(
                    f"Cholesky of H + λI failed at damp={damp:g}; succeeded after {attempt} increase(s) "
                    f"at damp={lam / unit:.3g} (λ={lam:.3g})",
                    DampingWarning,
                    stacklevel=2,
                )
            return L, lam
        lam = max(lam * growth, 1e-8 * unit)
    raise ValueError(
        f"`H` could not be factorised: Cholesky of H + λI failed {max_tries} times up to damp={lam / unit / growth:.3g}"
    )


def solve_right_lower(C: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X·L = C`` for lower-triangular ``L``: ``C·L^{-1}`` by a triangular solve."""
    return torch.linalg.solve_triangular(L, C, upper=False, left=False)


def spd_solve_right(G: torch.Tensor, C: torch.Tensor, damp: float = 1e-10) -> torch.Tensor:
    """``X`` with ``X·G = C`` for a small symmetric PSD ``G`` (r×r), through a damped Cholesky.

    ``G = 0`` (factors that are exactly zero, e.g. ``W - Q = 0``) gives ``X = 0``.
    """
    if mean_diag(G) <= 0:
        return torch.zeros_like(C)
    L, _ = damped_cholesky(G, damp=damp, warn=False, max_tries=20)
    # X G = C  <=>  G X^T = C^T (G symmetric)
    return torch.cholesky_solve(C.transpose(0, 1), L).transpose(0, 1)


def spd_solve_left(G: torch.Tensor, C: torch.Tensor, damp: float = 1e-10) -> torch.Tensor:
    """``X`` with ``G·X = C`` for a small symmetric PSD ``G`` (r×r), through a damped Cholesky (``G = 0``: 0)."""
    if mean_diag(G) <= 0:
        return torch.zeros_like(C)
    L, _ = damped_cholesky(G, damp=damp, warn=False, max_tries=20)
    return torch.cholesky_solve(C, L)


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _gaussian(rows: int, cols: int, like: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    gen = None
    if seed is not None:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(int(seed))
    return torch.randn(rows, cols, generator=gen, device=like.device, dtype=like.dtype)


def exact_svd(R: torch.Tensor, rank: int, L: Optional[torch.Tensor] = None) -> TruncatedSVD:
    """Top-``rank`` SVD of ``E = R·L`` (``R`` alone when ``L`` is None), via a full thin SVD."""
    E = R if L is None else R @ L
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    return TruncatedSVD(U[:, :rank], S[:rank], Vh[:rank])


def randomized_svd(R: torch.Tensor, rank: int, L: Optional[torch.Tensor] = None, oversample: Optional[int] = None,
                   power_iters: int = 4, seed: Optional[int] = 0) -> TruncatedSVD:
    """Top-``rank`` SVD of ``E = R·L`` by a randomized range finder (Halko, Martinsson, Tropp).

    ``E`` is never formed: ``E·Ω = R·(L·Ω)`` and ``E^T·Y = L^T·(R^T·Y)``. ``oversample`` extra
    columns (default ``max(16, rank)``: the whitened quantization error has a flat spectrum, so a
    wide sketch pays) and ``power_iters`` subspace iterations, each re-orthonormalised by QR.
    """
    m, n = R.shape
    if oversample is None:
        oversample = max(16, rank)
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"`oversample` must be a non-negative integer; got {oversample!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"`power_iters` must be a non-negative integer; got {power_iters!r}")
    k = min(rank + oversample, m, n)

    def E_times(X):  # E·X, X (n, k)
        return R @ (X if L is None else L @ X)

    def Et_times(Y):  # E^T·Y, Y (m, k)
        Z = R.transpose(0, 1) @ Y
        return Z if L is None else L.transpose(0, 1) @ Z

    Qy = _orthonormal(E_times(_gaussian(n, k, R, seed)))
    for _ in range(power_iters):
        Qz = _orthonormal(Et_times(Qy))
        Qy = _orthonormal(E_times(Qz))
    Bt = Et_times(Qy)  # (n, k) = (Qy^T E)^T
    Ub_t, S, Vh_b = torch.linalg.svd(Bt, full_matrices=False)  # Bt = Ub_t S Vh_b  => Qy^T E = Vh_b^T S Ub_t^T
    U = Qy @ Vh_b.transpose(0, 1)[:, :rank]
    Vh = Ub_t[:, :rank].transpose(0, 1)
    return TruncatedSVD(U.contiguous(), S[:rank], Vh.contiguous())


def truncated_svd(R: torch.Tensor, rank: int, L: Optional[torch.Tensor] = None, method: str = "auto",
                  oversample: Optional[int] = None, power_iters: int = 4, seed: Optional[int] = 0) -> TruncatedSVD:
    """Dispatch between :func:`exact_svd` and :func:`randomized_svd` (``method``: auto|exact|randomized)."""
    if method == "auto":
        method = choose_svd(R.shape, rank)
    if method == "exact":
        return exact_svd(R, rank, L)
    if method == "randomized":
        return randomized_svd(R, rank, L, oversample=oversample, power_iters=power_iters, seed=seed)
    raise ValueError(f"`svd` must be one of 'auto', 'exact', 'randomized'; got {method!r}")


# Layers whose smaller side is at most this use the exact SVD under svd="auto".
EXACT_SVD_MAX_DIM = 1024


def choose_svd(shape, rank: int) -> str:
    """svd="auto": exact for small layers (or ranks near full), randomized for large ones."""
    small = min(shape)
    return "exact" if small <= EXACT_SVD_MAX_DIM or 4 * rank >= small else "randomized"


def balanced_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``scaling·B·A = U·diag(S)·Vh`` and equal singular values in B and A."""
    root = (S.clamp(min=0) / scaling).sqrt()
    return U * root, root.unsqueeze(1) * Vh


def rebalance(P: torch.Tensor, A: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced ``(B, A)`` with ``scaling·B·A = P·A`` for any factors P (m, r), A (r, n): r×r work only."""
    Qp, Rp = torch.linalg.qr(P, mode="reduced")
    Qa, Ra = torch.linalg.qr(A.transpose(0, 1), mode="reduced")
    u, s, vh = torch.linalg.svd(Rp @ Ra.transpose(0, 1))
    return balanced_split(Qp @ u, s, vh @ Qa.transpose(0, 1), scaling)
