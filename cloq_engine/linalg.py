"""Dense linear algebra for calibrated initialisation: damped Cholesky, triangular solves,
and truncated SVDs of the implicitly whitened error ``E = R·L`` (``R = W - Q``, ``H + λI = L L^T``).

Nothing here forms an inverse. The randomized SVD only touches ``E`` through the products
``E·Ω = R·(L·Ω)`` and ``E^T·Y = L^T·(R^T·Y)``, so the only in×in work is the Cholesky itself and
thin products with ``L``. Every function runs on the device of its inputs.

On a CPU shared with other processes, every multi-threaded MKL/OpenMP call pays for its thread
barriers whenever one of its threads is descheduled: about a scheduler time slice per barrier.
LAPACK's Householder QR, eigh and SVD (level-2 loops, a barrier per step) suffer most; so do the
thin products of a truncated SVD, whose work is a few ms. Measured on 2 cores beside one busy
process, 2 threads vs 1: QR of a 2048×128 panel 64-1200 ms vs 7-11 ms, eigh 1024² 1.5-5.2 s vs
0.23-0.35 s, SVD 1024² 3.0-3.5 s vs 0.38-0.57 s, a 2048²×64 GEMM 12 ms vs 4 ms, a 64×64 Cholesky
6.6 ms vs 0.02 ms. So tall panels are orthonormalised with GEMMs (:func:`orthonormalize`,
Cholesky-QR2, no Householder loop), and the truncated SVDs and the small solves run on one thread
(:func:`serial_threads`); only the in×in Cholesky (blocked, large) keeps every thread.

On a quiet CPU, though, one thread leaves the other cores idle during the products with ``E`` that
are most of a large solve (a 4096² Krylov solve is ~85% GEMMs). So those products, and only they,
take the idle cores (:func:`product_threads`: the caller's thread count, capped by the cores no
other process is running on, sampled from ``/proc/stat``); the factorisations inside the solve
(eigh, SVD, the k×k Cholesky, triangular solves), whose results depend on the thread count, stay
on one thread. MKL's GEMMs give the same bits on any thread count (``tests/test_linalg.py``), so
the solve's result does not depend on the load. ``CLOQ_SOLVE_THREADS=N`` fixes the count.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

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


_THREADS_LOCK = threading.RLock()
_CALLER_THREADS: list = []  # the thread count outside the outermost serial_threads (under the lock)


@contextlib.contextmanager
def serial_threads(like: torch.Tensor) -> Iterator[None]:
    """Run the block on one intra-op thread when ``like`` is a CPU tensor (a no-op elsewhere).

    For LAPACK factorisations and loops of small ops, whose thread barriers stall on a shared CPU
    (module docstring). The thread count is process-wide, so it is restored on exit and the lock
    keeps two Python threads from restoring each other's value.
    """
    if like.device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        _CALLER_THREADS.append(_CALLER_THREADS[-1] if _CALLER_THREADS else threads)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            _CALLER_THREADS.pop()


PRODUCT_THREADS_ENV = "CLOQ_SOLVE_THREADS"
_IDLE_TTL_S = 0.25  # the idle-core count is sampled at most this often
_idle_memo = {"at": -1e9, "idle": 1}


def _running_tasks(stat_path: str) -> int:
    with open(stat_path) as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    raise OSError(f"{stat_path} has no procs_running line")


def _own_running_tasks() -> int:
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):  # a thread that ended meanwhile
            continue
    return n


def idle_cores() -> int:
    """Cores of this process's CPU set that no other process is running on now (>= 0).

    ``procs_running`` of ``/proc/stat`` (runnable tasks, the whole machine) less this process's own
    running threads, taken three times and the median kept, so one transient task does not count;
    remembered for ``_IDLE_TTL_S``. Where ``/proc`` cannot be read: 0 (one thread, the safe side)."""
    now = time.monotonic()
    if now - _idle_memo["at"] < _IDLE_TTL_S:
        return _idle_memo["idle"]
    try:
        cores = len(os.sched_getaffinity(0))
        others = sorted(_running_tasks("/proc/stat") - _own_running_tasks() for _ in range(3))[1]
        idle = max(0, cores - max(0, others))
    except (OSError, AttributeError, ValueError):
        idle = 0
    _idle_memo.update(at=now, idle=idle)
    return idle


def product_threads_count() -> int:
    """Threads for a large product inside a solve: ``CLOQ_SOLVE_THREADS`` if set, else the caller's
    thread count (outside :func:`serial_threads`) capped by :func:`idle_cores`, at least 1."""
    caller = _CALLER_THREADS[-1] if _CALLER_THREADS else torch.get_num_threads()
    forced = os.environ.get(PRODUCT_THREADS_ENV)
    if forced:
        try:
            n = int(forced)
        except ValueError:
            raise ValueError(f"{PRODUCT_THREADS_ENV} must be a positive integer; got {forced!r}") from None
        if n < 1:
            raise ValueError(f"{PRODUCT_THREADS_ENV} must be a positive integer; got {forced!r}")
        return n
    return max(1, min(caller, idle_cores()))


@contextlib.contextmanager
def product_threads(like: torch.Tensor) -> Iterator[None]:
    """Run a large matrix product (a GEMM: the same bits on any thread count) on the cores that are
    idle now, inside a solve that otherwise runs on one thread (module docstring); a no-op off the CPU."""
    if like.device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(product_threads_count())
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _one_thread(fn):
    """Run ``fn`` under :func:`serial_threads` of its first (tensor) argument."""
    @functools.wraps(fn)
    def wrapper(X, *args, **kwargs):
        with serial_threads(X):
            return fn(X, *args, **kwargs)
    return wrapper


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


@_one_thread
def solve_right_lower(C: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``X`` with ``X·L = C`` for lower-triangular ``L``: ``C·L^{-1}`` by a triangular solve."""
    return torch.linalg.solve_triangular(L, C, upper=False, left=False)


@_one_thread
def spd_solve_right(G: torch.Tensor, C: torch.Tensor, damp: float = 1e-10) -> torch.Tensor:
    """``X`` with ``X·G = C`` for a small symmetric PSD ``G`` (r×r), through a damped Cholesky.

    ``G = 0`` (factors that are exactly zero, e.g. ``W - Q = 0``) gives ``X = 0``.
    """
    if mean_diag(G) <= 0:
        return torch.zeros_like(C)
    L, _ = damped_cholesky(G, damp=damp, warn=False, max_tries=20)
    # X G = C  <=>  G X^T = C^T (G symmetric)
    return torch.cholesky_solve(C.transpose(0, 1), L).transpose(0, 1)


@_one_thread
def spd_solve_left(G: torch.Tensor, C: torch.Tensor, damp: float = 1e-10) -> torch.Tensor:
    """``X`` with ``G·X = C`` for a small symmetric PSD ``G`` (r×r), through a damped Cholesky (``G = 0``: 0)."""
    if mean_diag(G) <= 0:
        return torch.zeros_like(C)
    L, _ = damped_cholesky(G, damp=damp, warn=False, max_tries=20)
    return torch.cholesky_solve(C, L)


# Cholesky-QR accepts its second pass when the first left ||Q^T Q - I||_max below this: then
# kappa(Q) <= ~1.2 and one more pass is orthonormal to working precision (Yamamoto et al. 2015).
CHOLQR_MAX_DEFECT = 0.1


def _cholesky_qr_pass(Y: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One pass: ``G = Y^T Y`` (float64), ``R = chol(G)^T``, ``Q = Y R^{-1}``; (Q, R, G), or None
    when the Cholesky fails (Y has lost rank to rounding)."""
    Yd = Y.double()
    G = Yd.transpose(0, 1) @ Yd
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    R = L.transpose(0, 1).to(Y.dtype)
    return torch.linalg.solve_triangular(R, Y, upper=True, left=False), R, G


def orthonormalize(Y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall ``Y`` (m, k), m >= k: ``Q`` (m, k) with orthonormal columns and upper ``R``
    (k, k) with ``Q R = Y``.

    Cholesky-QR2 (two passes of :func:`_cholesky_qr_pass`): two GEMMs, a k×k Cholesky and a
    triangular solve per pass, which keep their speed on a shared CPU. When ``Y`` is too close to
    rank-deficient for it (the Cholesky fails, or the first pass is far from orthonormal), it falls
    back to Householder QR on one thread, which completes a rank-deficient ``Y`` to an orthonormal Q.
    """
    first = _cholesky_qr_pass(Y)
    if first is not None:
        Q1, R1, _ = first
        second = _cholesky_qr_pass(Q1)
        if second is not None:
            Q, R2, G = second
            defect = (G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device)).abs().max()
            if float(defect) <= CHOLQR_MAX_DEFECT:
                return Q, R2 @ R1
    logger.debug("orthonormalize: Cholesky-QR lost rank on a %s panel; Householder QR", tuple(Y.shape))
    with serial_threads(Y):
        return torch.linalg.qr(Y, mode="reduced")


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    return orthonormalize(Y)[0]


def _gaussian(rows: int, cols: int, like: torch.Tensor, seed: Optional[int]) -> torch.Tensor:
    gen = None
    if seed is not None:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(int(seed))
    return torch.randn(rows, cols, generator=gen, device=like.device, dtype=like.dtype)


@_one_thread
def exact_svd(R: torch.Tensor, rank: int, L: Optional[torch.Tensor] = None) -> TruncatedSVD:
    """Top-``rank`` SVD of ``E = R·L`` (``R`` alone when ``L`` is None), via a full thin SVD."""
    E = R if L is None else R @ L
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    return TruncatedSVD(U[:, :rank], S[:rank], Vh[:rank])


@_one_thread
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
        with product_threads(R):
            return R @ (X if L is None else L @ X)

    def Et_times(Y):  # E^T·Y, Y (m, k)
        with product_threads(R):
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


# Block Krylov stops when a step adds less than this fraction of the objective still left
# (estimated ||E||_F^2 minus the captured energy). On flat whitened spectra the steps shrink ~5x
# each, so what is left to gain is then a few 1e-5 of the objective (benchmarks/init.py).
KRYLOV_TOL = 5e-4
KRYLOV_MIN_STEPS = 4  # convergence is never checked before (each check is an eigh of the k×k Gram)
KRYLOV_MAX_STEPS = 12


@_one_thread
def block_krylov_svd(R: torch.Tensor, rank: int, L: Optional[torch.Tensor] = None, oversample: Optional[int] = None,
                     power_iters: Optional[int] = None, seed: Optional[int] = 0,
                     gram: Optional[Tuple[torch.Tensor, float]] = None) -> TruncatedSVD:
    """Top-``rank`` SVD of ``E = R·L`` by block Krylov iteration (Musco & Musco 2015) with Rayleigh–Ritz.

    The subspace is the whole Krylov space ``K = [EΩ, (EE^T)EΩ, ...]`` with block width
    ``rank + oversample`` (default ``max(16, rank)`` extra), kept orthonormal by two passes of
    block Gram–Schmidt. It captures far more energy per product with ``E`` than subspace
    iteration (:func:`randomized_svd`), which keeps only the last block, and ``E^T K`` is built
    along the way, so no product is spent on the final projection. ``E`` is never formed.

    ``power_iters`` fixes the number of Krylov steps; None (default) steps until one adds less
    than ``KRYLOV_TOL`` of the objective still left (the captured energy, the top-``rank``
    eigenvalues of ``K^T E E^T K``, against ``||E||_F^2`` estimated from the first sketch),
    checked from step ``KRYLOV_MIN_STEPS`` on, at most ``KRYLOV_MAX_STEPS`` steps.

    ``gram=(H, λ)`` with ``L L^T = H + λI`` (CLoQ's whitening): the iteration only needs ``E E^T =
    R (H + λI) R^T``, so each step takes three products with an in×in or out×in matrix (``R^T Q``,
    ``H P``, ``R (H P)``) instead of four (``L`` and ``R`` both ways); ``L`` is used for the first
    sketch and the final ``r`` columns only. ``E^T K = L^T P`` is never formed: ``K^T E E^T K =
    P^T (H + λI) P``.
    """
    m, n = R.shape
    if oversample is None:
        oversample = max(16, rank)
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"`oversample` must be a non-negative integer; got {oversample!r}")
    if power_iters is not None and (isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0):
        raise ValueError(f"`power_iters` must be None or a non-negative integer; got {power_iters!r}")
    b = min(rank + oversample, m, n)

    def E_times(X):
        with product_threads(R):
            return R @ (X if L is None else L @ X)

    def Et_times(Y):
        with product_threads(R):
            Z = R.transpose(0, 1) @ Y
            return Z if L is None else L.transpose(0, 1) @ Z

    def project_out(Y):  # Y - K·(K^T·Y)
        with product_threads(R):
            return Y - K @ (K.transpose(0, 1) @ Y)

    if gram is not None and L is None:
        raise ValueError("`gram` needs the Cholesky factor `L` of H + λI")
    Hg, lam = gram if gram is not None else (None, 0.0)

    def right_factor(K_):  # (Z, ZtZ-ready) for new orthonormal columns K_: Z = E^T K_, or P = R^T K_ and H·P
        if Hg is None:
            Zn = Et_times(K_)
            return Zn, Zn
        with product_threads(R):
            Pn = R.transpose(0, 1) @ K_
            HPn = torch.addmm(Pn, Hg, Pn, beta=lam) if lam else Hg @ Pn
        return Pn, HPn

    def gram_block(A_, B_):  # A_^T·B_ in float64: Z^T Zq, or P^T (H + λI) Pq
        with product_threads(R):
            return (A_.transpose(0, 1) @ B_).double()

    Y = E_times(_gaussian(n, b, R, seed))
    total = float(Y.double().pow(2).sum()) / b  # E||EΩ||^2 = b·||E||_F^2 for a Gaussian Ω
    K = _orthonormal(Y)  # (m, k), orthonormal
    Z, HZ = right_factor(K)  # Z = E^T K, HZ = Z  |  Z = P = R^T K, HZ = (H + λI) P
    G = gram_block(Z, HZ)  # K^T E E^T K
    if Hg is not None:  # P^T (H P): symmetric only up to rounding
        G = (G + G.transpose(0, 1)) / 2
    steps = KRYLOV_MAX_STEPS if power_iters is None else power_iters
    captured = None
    for step in range(1, steps + 1):
        width = min(b, min(m, n) - K.shape[1])  # the last block may fill the space exactly
        if width <= 0:
            break
        if Hg is None:
            Y = E_times(Z[:, -b:])[:, :width]
        else:
            with product_threads(R):
                Y = (R @ HZ[:, -b:])[:, :width]  # E E^T K_last = R (H + λI) P_last
        for _ in range(2):
            Y = project_out(Y)
        Q = _orthonormal(Y)
        # Once the space nearly fills (or the spectrum decays fast) Y is mostly rounding noise, and
        # normalising it magnifies its residual overlap with K; one more pass after the QR keeps
        # K orthonormal, which the Rayleigh–Ritz step below assumes (fp32: 2.6e-4 -> 1e-12 of the gap).
        Q = _orthonormal(project_out(Q))
        Zq, HZq = right_factor(Q)
        C = gram_block(Z, HZq)
        D = gram_block(Zq, HZq)
        if Hg is not None:
            D = (D + D.transpose(0, 1)) / 2
        G = torch.cat([torch.cat([G, C], 1), torch.cat([C.transpose(0, 1), D], 1)], 0)
        K, Z = torch.cat([K, Q], 1), torch.cat([Z, Zq], 1)
        HZ = Z if Hg is None else torch.cat([HZ, HZq], 1)
        if power_iters is None and step >= KRYLOV_MIN_STEPS:
            # the check needs eigenvalues only; the eigenvectors are computed once, at the end
            prev, captured = captured, float(torch.linalg.eigvalsh(G)[-rank:].sum())
            logger.debug("block_krylov_svd: step %d, width %d, captured %.6g of ~%.6g", step, K.shape[1], captured, total)
            if prev is not None and captured - prev <= KRYLOV_TOL * max(total - captured, 1e-3 * captured):
                break
    eig = torch.linalg.eigh(G)
    # Rayleigh–Ritz: the top-r eigenvectors of G, then an exact small SVD (no division by σ).
    Vr = eig.eigenvectors[:, -rank:].flip(1).to(R.dtype)  # (k, r)
    ZVr = Z @ Vr
    if Hg is not None:
        with product_threads(R):
            ZVr = L.transpose(0, 1) @ ZVr  # E^T K Vr = L^T P Vr
    Uz, S, Vzh = torch.linalg.svd(ZVr, full_matrices=False)  # E^T K Vr = Uz S Vz^T
    U = K @ (Vr @ Vzh.transpose(0, 1))
    return TruncatedSVD(U.contiguous(), S, Uz.transpose(0, 1).contiguous())


def truncated_svd(R: torch.Tensor, rank: int, L: Optional[torch.Tensor] = None, method: str = "auto",
                  oversample: Optional[int] = None, power_iters: Optional[int] = None,
                  seed: Optional[int] = 0, gram: Optional[Tuple[torch.Tensor, float]] = None) -> TruncatedSVD:
    """Dispatch between :func:`exact_svd`, :func:`block_krylov_svd` and :func:`randomized_svd`
    (``method``: auto|exact|krylov|randomized; auto = exact for small layers, krylov for large).

    ``power_iters`` None: Krylov iterates until converged; randomized uses ``DEFAULT_POWER_ITERS``.
    ``gram=(H, λ)`` (``L L^T = H + λI``) lets block Krylov multiply by ``H`` instead of ``L`` twice.
    """
    if method == "auto":
        method = choose_svd(R.shape, rank)
    if method == "exact":
        return exact_svd(R, rank, L)
    if method == "krylov":
        return block_krylov_svd(R, rank, L, oversample=oversample, power_iters=power_iters, seed=seed, gram=gram)
    if method == "randomized":
        iters = DEFAULT_POWER_ITERS if power_iters is None else power_iters
        return randomized_svd(R, rank, L, oversample=oversample, power_iters=iters, seed=seed)
    raise ValueError(f"`svd` must be one of 'auto', 'exact', 'krylov', 'randomized'; got {method!r}")


DEFAULT_POWER_ITERS = 4  # randomized_svd's subspace iterations when none are given


# Layers whose smaller side is at most this use the exact SVD under svd="auto".
EXACT_SVD_MAX_DIM = 1024


def choose_svd(shape, rank: int) -> str:
    """svd="auto": exact for small layers (or ranks near full), block Krylov for large ones."""
    small = min(shape)
    return "exact" if small <= EXACT_SVD_MAX_DIM or 4 * rank >= small else "krylov"


def balanced_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``scaling·B·A = U·diag(S)·Vh`` and equal singular values in B and A."""
    root = (S.clamp(min=0) / scaling).sqrt()
    return U * root, root.unsqueeze(1) * Vh


@_one_thread
def rebalance(P: torch.Tensor, A: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Balanced ``(B, A)`` with ``scaling·B·A = P·A`` for any factors P (m, r), A (r, n): r×r work only."""
    Qp, Rp = orthonormalize(P)
    Qa, Ra = orthonormalize(A.transpose(0, 1))
    u, s, vh = torch.linalg.svd(Rp @ Ra.transpose(0, 1))
    return balanced_split(Qp @ u, s, vh @ Qa.transpose(0, 1), scaling)
