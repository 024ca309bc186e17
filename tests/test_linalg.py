"""cloq_engine.linalg: damped Cholesky, triangular solves, truncated SVDs of R·L, balanced splits."""
import math
import warnings

import pytest
import torch

from cloq_engine import linalg


def _gram(t, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(t, n, generator=g, dtype=dtype)
    return X.T @ X


def _low_rank_plus_noise(m, n, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (U * s) @ V.T


def test_damped_cholesky_pd_uses_requested_damping_without_warning():
    H = _gram(200, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L, lam = linalg.damped_cholesky(H, damp=1e-3)
    assert lam == pytest.approx(1e-3 * float(H.diagonal().mean()))
    torch.testing.assert_close(L @ L.T, H + lam * torch.eye(40, dtype=H.dtype), rtol=1e-10, atol=1e-10)
    assert torch.equal(L, L.tril())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_damped_cholesky_singular_H_warns_once_and_succeeds(dtype):
    H = _gram(5, 32, dtype=dtype)  # rank 5 of 32
    H[3, :] = 0
    H[:, 3] = 0  # a dead channel
    with pytest.warns(linalg.DampingWarning) as record:
        L, lam = linalg.damped_cholesky(H, damp=0.0)
    assert len(record) == 1
    assert lam > 0
    assert torch.isfinite(L).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(L @ L.T, H + lam * torch.eye(32, dtype=dtype), rtol=tol, atol=tol * float(H.abs().max()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(H=torch.eye(3), damp=-1.0), "damp"),
        (dict(H=torch.eye(3), max_tries=0), "max_tries"),
        (dict(H=torch.eye(3), growth=1.0), "growth"),
        (dict(H=torch.ones(3, 4)), "square"),
        (dict(H=torch.zeros(3, 3)), "mean diagonal"),
    ],
)
def test_damped_cholesky_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linalg.damped_cholesky(**kwargs)


def test_solve_right_lower_matches_inverse():
    L, _ = linalg.damped_cholesky(_gram(100, 30), damp=1e-2)
    C = torch.randn(7, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(linalg.solve_right_lower(C, L), C @ torch.linalg.inv(L), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solve", [linalg.spd_solve_left, linalg.spd_solve_right])
def test_spd_solves_match_dense_solve(solve):
    G = _gram(50, 8)
    C = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    X = solve(G, C)
    torch.testing.assert_close(G @ X if solve is linalg.spd_solve_left else X @ G, C, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", [linalg.randomized_svd, linalg.block_krylov_svd], ids=["randomized", "krylov"])
@pytest.mark.parametrize("m, n, rank, whiten", [(120, 80, 10, False), (60, 150, 8, True), (100, 100, 30, True)])
def test_sketched_svd_matches_exact_on_decaying_spectrum(m, n, rank, whiten, solver):
    R = _low_rank_plus_noise(m, n, decay=0.85)
    L = linalg.damped_cholesky(_gram(3 * n, n, seed=3), damp=1e-3)[0] if whiten else None
    ex = linalg.exact_svd(R, rank, L)
    rs = solver(R, rank, L, seed=0)
    torch.testing.assert_close(rs.S, ex.S, rtol=1e-6, atol=1e-12)
    E = R if L is None else R @ L
    # same rank-r approximation
    torch.testing.assert_close((rs.U * rs.S) @ rs.Vh, (ex.U * ex.S) @ ex.Vh, rtol=1e-5, atol=1e-8 * float(E.norm()))
    torch.testing.assert_close(rs.U.T @ rs.U, torch.eye(rank, dtype=R.dtype), rtol=0, atol=1e-10)
    if solver is linalg.block_krylov_svd:
        torch.testing.assert_close(rs.Vh @ rs.Vh.T, torch.eye(rank, dtype=R.dtype), rtol=0, atol=1e-10)


def test_randomized_svd_more_power_iterations_help_on_flat_spectrum():
    R = _low_rank_plus_noise(200, 200, decay=0.995)
    exact_tail = float(R.pow(2).sum() - linalg.exact_svd(R, 20).S.pow(2).sum())
    tails = [float(R.pow(2).sum() - linalg.randomized_svd(R, 20, oversample=4, power_iters=q).S.pow(2).sum())
             for q in (0, 4)]
    assert tails[1] < tails[0]
    assert tails[1] >= exact_tail * (1 - 1e-9)


@pytest.mark.parametrize("kwargs, match", [(dict(oversample=-1), "oversample"), (dict(power_iters=-2), "power_iters")])
def test_randomized_svd_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linalg.randomized_svd(torch.randn(10, 10), 2, **kwargs)


def _flat_whitened(m=600, n=400, seed=5):
    """A flat spectrum like a whitened quantization error: Gaussian noise times a correlated L."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5).double()
    return R, linalg.damped_cholesky(X.T @ X, 1e-6)[0]


def test_block_krylov_beats_subspace_iteration_at_the_same_number_of_products_on_a_flat_spectrum():
    R, L = _flat_whitened()
    rank = 16
    S = torch.linalg.svdvals(R @ L)
    total, best = float(S.pow(2).sum()), float(S[:rank].pow(2).sum())

    def gap(t):  # extra objective, relative to the optimal objective
        return (best - float(t.S.pow(2).sum())) / (total - best)

    # both take 10 products with E or E^T of width rank + oversample
    rs = linalg.randomized_svd(R, rank, L, power_iters=4)
    ks = linalg.block_krylov_svd(R, rank, L, power_iters=4)
    assert gap(ks) < 0.25 * gap(rs), (gap(ks), gap(rs))
    adaptive = linalg.block_krylov_svd(R, rank, L)
    assert 0 <= gap(adaptive) < 2e-4, gap(adaptive)


def test_block_krylov_svd_of_zero_is_zero_and_options_are_checked():
    ks = linalg.block_krylov_svd(torch.zeros(50, 40), 4, power_iters=2)
    assert torch.isfinite(ks.U).all() and float(ks.S.abs().max()) == 0.0
    with pytest.raises(ValueError, match="power_iters"):
        linalg.block_krylov_svd(torch.randn(10, 10), 2, power_iters=-1)
    with pytest.raises(ValueError, match="oversample"):
        linalg.block_krylov_svd(torch.randn(10, 10), 2, oversample=-1)


def test_truncated_svd_rejects_unknown_method():
    with pytest.raises(ValueError, match="svd"):
        linalg.truncated_svd(torch.randn(10, 10), 2, method="lanczos")


@pytest.mark.parametrize(
    "shape, rank, expected",
    [((384, 384), 16, "exact"), ((4096, 4096), 64, "krylov"), ((11008, 4096), 64, "krylov"),
     ((4096, 1536), 512, "exact"), ((2048, 2048), 16, "krylov")],
)
def test_choose_svd(shape, rank, expected):
    assert linalg.choose_svd(shape, rank) == expected


@pytest.mark.parametrize("scaling", [1.0, 0.25, 4.0])
def test_balanced_split_and_rebalance_keep_the_product(scaling):
    g = torch.Generator().manual_seed(4)
    P, A0 = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    B, A = linalg.rebalance(P, A0, scaling)
    torch.testing.assert_close(scaling * B @ A, P @ A0, rtol=1e-10, atol=1e-10)
    # balanced: B^T B and A A^T are the same diagonal matrix
    torch.testing.assert_close(B.T @ B, A @ A.T, rtol=1e-8, atol=1e-10)


def _panel(m, k, cond, dtype=torch.float32, seed=0):
    """A tall (m, k) panel with singular values spread log-evenly over [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return ((U * s) @ V.t()).to(dtype)


@pytest.mark.parametrize("dtype,cond", [(torch.float32, 1e2), (torch.float32, 1e5), (torch.float64, 1e6)])
def test_orthonormalize_is_a_qr_by_cholesky_qr2(monkeypatch, dtype, cond):
    Y = _panel(300, 40, cond, dtype)
    calls, householder = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(a) or householder(*a, **k))
    Q, R = linalg.orthonormalize(Y)
    eps = torch.finfo(dtype).eps
    assert calls == []  # Cholesky-QR2 sufficed: no Householder QR
    assert torch.allclose(torch.triu(R), R)
    assert (Q.t() @ Q - torch.eye(40, dtype=dtype)).abs().max() < 50 * eps
    assert (Q @ R - Y).norm() < 50 * eps * Y.norm()


@pytest.mark.parametrize("make,householder_calls", [
    (lambda: torch.cat([_panel(200, 10, 10.0)] * 2, dim=1), [1]),  # exactly rank 10 of 20 columns
    (lambda: torch.cat([_panel(200, 10, 10.0), torch.zeros(200, 5)], dim=1), [1]),  # zero columns
    (lambda: _panel(200, 20, 1e9), [0, 1]),  # rank lost to float32 rounding
], ids=["duplicate-columns", "zero-columns", "cond-1e9"])
def test_orthonormalize_stays_orthonormal_on_rank_loss(monkeypatch, make, householder_calls):
    """Where Cholesky-QR breaks down, the Householder fallback completes Q to orthonormal columns."""
    Y = make()
    calls, householder = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **k: calls.append(a) or householder(*a, **k))
    Q, R = linalg.orthonormalize(Y)
    assert Q.shape == Y.shape and bool(torch.isfinite(Q).all())
    assert (Q.t() @ Q - torch.eye(Y.shape[1])).abs().max() < 1e-4  # still orthonormal
    assert (Q @ R - Y).norm() < 1e-5 * Y.norm()
    assert len(calls) in householder_calls


def test_products_inside_a_solve_take_the_idle_cores_up_to_the_callers_count(monkeypatch):
    monkeypatch.delenv(linalg.PRODUCT_THREADS_ENV, raising=False)
    x = torch.zeros(1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for idle, want in ((0, 1), (1, 1), (5, 2)):  # busy machine, one core free, quiet: capped at the caller's 2
            monkeypatch.setattr(linalg, "idle_cores", lambda idle=idle: idle)
            with linalg.serial_threads(x):
                with linalg.product_threads(x):
                    assert torch.get_num_threads() == want
                assert torch.get_num_threads() == 1  # back to one thread for the factorisations
        monkeypatch.setenv(linalg.PRODUCT_THREADS_ENV, "3")
        assert linalg.product_threads_count() == 3
        monkeypatch.setenv(linalg.PRODUCT_THREADS_ENV, "two")
        with pytest.raises(ValueError, match="CLOQ_SOLVE_THREADS must be a positive integer"):
            linalg.product_threads_count()
    finally:
        torch.set_num_threads(before)


def test_idle_cores_counts_the_cores_other_processes_do_not_run_on(monkeypatch):
    cores = len(__import__("os").sched_getaffinity(0))
    monkeypatch.setattr(linalg, "_own_running_tasks", lambda: 1)
    for others, want in ((0, cores), (1, max(0, cores - 1)), (cores + 3, 0)):
        monkeypatch.setattr(linalg, "_running_tasks", lambda path, others=others: others + 1)
        linalg._idle_memo["at"] = -1e9  # no remembered sample
        assert linalg.idle_cores() == want
    monkeypatch.setattr(linalg, "_running_tasks", lambda path: (_ for _ in ()).throw(OSError("no /proc")))
    linalg._idle_memo["at"] = -1e9
    assert linalg.idle_cores() == 0  # unreadable: one thread
    linalg._idle_memo["at"] = -1e9


@pytest.mark.parametrize("method", ["krylov", "randomized"])
def test_the_truncated_svd_has_the_same_bits_on_any_product_thread_count(monkeypatch, method):
    """The load picks the product threads, so a prepare run twice on a machine whose load changed
    must still give the same factors: only GEMMs (the same bits on any thread count) get threads."""
    g = torch.Generator().manual_seed(3)
    R = torch.randn(384, 256, generator=g)
    L = torch.linalg.cholesky(_gram(512, 256, dtype=torch.float32) + 1e-3 * torch.eye(256))
    before = torch.get_num_threads()
    out = []
    try:
        torch.set_num_threads(2)
        for threads in ("1", "2"):
            monkeypatch.setenv(linalg.PRODUCT_THREADS_ENV, threads)
            t = linalg.truncated_svd(R, 8, L, method=method)
            out.append(torch.cat([t.U.flatten(), t.S, t.Vh.flatten()]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])


def test_serial_threads_runs_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    with linalg.serial_threads(torch.zeros(1)):
        assert torch.get_num_threads() == 1
        with linalg.serial_threads(torch.zeros(1)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        with linalg.serial_threads(torch.zeros(1)):
            1 / 0
    assert torch.get_num_threads() == before
    with linalg.serial_threads(torch.zeros(1, device="meta")):  # not a CPU tensor: left alone
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_krylov_through_the_gram_matrix_equals_the_route_through_its_cholesky_factor(dtype):
    """CLoQ's solve multiplies by H + λI once per step instead of by L and L^T: the same operator
    E E^T, so the same subspace and the same top singular triplets up to rounding."""
    g = torch.Generator().manual_seed(5)
    R = torch.randn(300, 520, generator=g, dtype=dtype)
    H = _gram(700, 520, dtype=dtype)
    L, lam = linalg.damped_cholesky(H, damp=1e-3)
    rank = 12
    for power_iters in (3, None):
        plain = linalg.block_krylov_svd(R, rank, L, power_iters=power_iters)
        fused = linalg.block_krylov_svd(R, rank, L, power_iters=power_iters, gram=(H, lam))
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        assert torch.allclose(fused.S, plain.S, rtol=tol), (fused.S - plain.S).abs().max()
        E = R @ L
        for t in (plain, fused):  # both are singular triplets of E = R·L: E^T u = σ v
            assert torch.allclose(E.T @ t.U, t.Vh.T * t.S, atol=50 * tol * float(t.S[0]))
        P_plain = plain.U @ plain.U.T
        P_fused = fused.U @ fused.U.T
        assert float((P_plain - P_fused).abs().max()) < 100 * tol
    with pytest.raises(ValueError, match="gram"):
        linalg.block_krylov_svd(R, rank, None, gram=(H, lam))
