"""The triton backend against the torch reference (the spec), forward and backward, under the
Triton interpreter: bits 2/3/4, groups 32/128, M in {1, 5, 33} (GEMV and fused paths by the table),
every path forced (dequant + matmul with both LoRA folds), an N that is not a multiple of the
block, fp32 and fp16, (batch, seq, in) inputs; the path table and the shared workspace."""
import pytest
import torch
from kernel_testing import REL_TOL, assert_rel_close, make_lora, make_weight, randn

from cloq_engine import backends
from cloq_engine.backends import torch_ref
from cloq_engine.backends import triton_backend as tb

N = 48  # not a multiple of the 32-wide interpreter tile
RANK = 8  # padded to 16 inside the kernels
SCALING = 2.0
LEAD = {1: (1, 1), 5: (1, 5), 33: (3, 11)}  # M -> (batch, seq)

TABLE = [
    (bits, group, m, dtype)
    for bits in (2, 3, 4)
    for group in (32, 128)
    for m in (1, 5, 33)
    for dtype in (torch.float32, torch.float16)
]


def _in_features(group: int) -> int:
    return 4 * group if group == 32 else 2 * group  # several groups each


@pytest.mark.parametrize("bits,group,m,dtype", TABLE, ids=lambda v: str(v).replace("torch.", ""))
def test_forward_and_backward_match_reference(bits, group, m, dtype):
    K = _in_features(group)
    _, qw = make_weight(bits, group, N, K)
    A, B = make_lora(RANK, N, K)
    bias = randn(N, seed=5)
    x = randn(*LEAD[m], K, dtype=dtype)
    tol = REL_TOL[dtype]

    y, S = tb.forward(x, qw, A, B, SCALING, bias=bias)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING, bias=bias)
    assert y.dtype == dtype and S.dtype == dtype  # S in the dtype cuBLAS consumes it in
    assert_rel_close(y, y_ref, tol, "y")
    assert_rel_close(S, S_ref, tol, "S")

    dy = randn(*LEAD[m], N, dtype=dtype, seed=3)
    dx, dx_lora, dA, dB = tb.backward(dy, x, S, qw, A, B, SCALING)
    flat = lambda t: t.reshape(m, t.shape[-1])  # noqa: E731  (the reference is 2-D only)
    dx_ref, _, dA_ref, dB_ref = torch_ref.backward(flat(dy), flat(x), flat(S_ref), qw, A, B, SCALING)
    assert dx_lora is None and dx.dtype == dtype and dA.dtype == A.dtype and dB.dtype == B.dtype
    assert_rel_close(dx, dx_ref.reshape(x.shape), tol, "dx")
    assert_rel_close(dA, dA_ref, tol, "dA")
    assert_rel_close(dB, dB_ref, tol, "dB")


@pytest.mark.parametrize("m", [5, 33])
def test_dropout_input_gives_separate_lora_input_gradient(m):
    K = 128
    _, qw = make_weight(4, 32, N, K)
    A, B = make_lora(RANK, N, K)
    x = randn(m, K)
    x_lora = x * (randn(m, K, seed=9) > 0) * 2.0  # what dropout(p=0.5) produces
    y, S = tb.forward(x, qw, A, B, SCALING, x_lora=x_lora)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING, x_lora=x_lora)
    assert_rel_close(y, y_ref, 2e-5, "y")
    dy = randn(m, N, seed=4)
    got = tb.backward(dy, x, S, qw, A, B, SCALING, x_lora=x_lora)
    ref = torch_ref.backward(dy, x, S_ref, qw, A, B, SCALING, x_lora=x_lora)
    for name, a, b in zip(("dx", "dx_lora", "dA", "dB"), got, ref):
        assert_rel_close(a, b, 2e-5, name)


@pytest.mark.parametrize("m", [1, 33])
def test_nf4_forward_and_backward_match_reference(m):
    K = 128
    _, qw = make_weight(4, 64, N, K, method="nf4")
    A, B = make_lora(RANK, N, K)
    x = randn(m, K, dtype=torch.float16)
    y, S = tb.forward(x, qw, A, B, SCALING)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING)
    assert_rel_close(y, y_ref, REL_TOL[torch.float16], "y")
    dy = randn(m, N, dtype=torch.float16, seed=3)
    dx, _, dA, dB = tb.backward(dy, x, S, qw, A, B, SCALING)
    dx_ref, _, dA_ref, dB_ref = torch_ref.backward(dy, x, S_ref, qw, A, B, SCALING)
    assert_rel_close(dx, dx_ref, REL_TOL[torch.float16], "dx")
    assert_rel_close(dA, dA_ref, REL_TOL[torch.float16], "dA")
    assert_rel_close(dB, dB_ref, REL_TOL[torch.float16], "dB")


@pytest.mark.parametrize("bits", [2, 3])
def test_single_group_with_padded_in_features(bits):
    K = 80  # padded to 96 in storage; one group of 80 columns
    _, qw = make_weight(bits, -1, N, K)
    A, B = make_lora(RANK, N, K)
    x = randn(33, K)
    y, S = tb.forward(x, qw, A, B, SCALING)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING)
    assert_rel_close(y, y_ref, 2e-5, "y")
    dy = randn(33, N, seed=3)
    dx, _, _, _ = tb.backward(dy, x, S, qw, A, B, SCALING)
    assert_rel_close(dx, torch_ref.backward(dy, x, S_ref, qw, A, B, SCALING)[0], 2e-5, "dx")


def test_need_dx_false_skips_input_gradient():
    K = 64
    _, qw = make_weight(4, 32, N, K)
    A, B = make_lora(RANK, N, K)
    x, dy = randn(5, K), randn(5, N, seed=3)
    _, S = tb.forward(x, qw, A, B, SCALING)
    dx, dx_lora, dA, dB = tb.backward(dy, x, S, qw, A, B, SCALING, need_dx=False)
    assert dx is None and dx_lora is None
    assert_rel_close(dA, torch_ref.backward(dy, x, S, qw, A, B, SCALING)[2], 2e-5, "dA")


def test_float64_falls_back_to_reference():
    K = 64
    _, qw = make_weight(3, 32, N, K)
    A, B = make_lora(RANK, N, K)
    x = randn(5, K, dtype=torch.float64)
    y, S = tb.forward(x, qw, A.double(), B.double(), SCALING)
    y_ref, _ = torch_ref.forward(x, qw, A.double(), B.double(), SCALING)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits,method", [(3, "rtn"), (4, "nf4")])
def test_dequantize_matches_reference(bits, method):
    _, qw = make_weight(bits, 32, N, 96, method=method)
    torch.testing.assert_close(tb.dequantize(qw), torch_ref.dequantize(qw), rtol=0, atol=0)


def test_gram_add_accumulates_like_reference():
    x = randn(70, 100)
    H = randn(100, 100, seed=7)
    expected = torch_ref.gram_add(H.clone(), x)
    assert tb.gram_add(H, x) is H
    assert_rel_close(H, expected, 2e-6, "H")


def test_custom_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    K = 64
    _, qw = make_weight(4, 32, N, K)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(7, K, dtype=torch.float16)
        A, B = torch.empty(RANK, K), torch.empty(N, RANK)
        y, S = tb.forward(x, qw, A, B, SCALING)
        dx, _, dA, dB = tb.backward(torch.empty(7, N, dtype=torch.float16), x, S, qw, A, B, SCALING)
    assert (tuple(y.shape), y.dtype, tuple(S.shape), S.dtype) == ((7, N), torch.float16, (7, RANK), torch.float16)
    assert (tuple(dx.shape), dx.dtype, tuple(dA.shape), tuple(dB.shape)) == ((7, K), torch.float16, (RANK, K), (N, RANK))


def test_dispatcher_selects_triton_when_requested(monkeypatch):
    monkeypatch.setenv("CLOQ_BACKEND", "triton")
    assert backends.get_backend("cpu") is tb  # CPU tensors are allowed under TRITON_INTERPRET=1


def test_path_table_by_m(monkeypatch):
    monkeypatch.delenv("CLOQ_TRITON_PATH", raising=False)
    assert [tb.forward_path(m) for m in (1, 16, 17, 128, 129, 8192)] == [
        tb.Path.GEMV, tb.Path.GEMV, tb.Path.FUSED, tb.Path.FUSED, tb.Path.DEQUANT_MM, tb.Path.DEQUANT_MM]
    assert [tb.backward_path(m) for m in (1, 128, 129)] == [tb.Path.FUSED, tb.Path.FUSED, tb.Path.DEQUANT_MM]
    assert tb.uses_gemv(16) and not tb.uses_gemv(17)
    monkeypatch.setenv("CLOQ_TRITON_PATH", "gemv")  # forced, but never above M = 16
    assert tb.forward_path(8) == tb.Path.GEMV and tb.forward_path(64) == tb.Path.FUSED
    assert tb.backward_path(8) == tb.Path.FUSED
    monkeypatch.setenv("CLOQ_TRITON_PATH", "dequant_mm")
    assert tb.forward_path(1) == tb.backward_path(1) == tb.Path.DEQUANT_MM
    monkeypatch.setenv("CLOQ_TRITON_PATH", "tiled")
    with pytest.raises(ValueError, match="CLOQ_TRITON_PATH"):
        tb.forward_path(1)


@pytest.mark.parametrize("path,fold", [("dequant_mm", "concat"), ("dequant_mm", "addmm"), ("fused", "concat"),
                                       ("gemv", "concat")])
@pytest.mark.parametrize("bits,method,dtype", [(2, "rtn", torch.float32), (3, "rtn", torch.float16),
                                               (4, "nf4", torch.float16)])
def test_every_path_matches_reference(monkeypatch, path, fold, bits, method, dtype):
    monkeypatch.setenv("CLOQ_TRITON_PATH", path)
    monkeypatch.setenv("CLOQ_LORA_FOLD", fold)
    K, m = 128, 9
    _, qw = make_weight(bits, 64, N, K, method=method)
    A, B = make_lora(RANK, N, K)
    bias = randn(N, seed=5)
    x = randn(m, K, dtype=dtype)
    tol = REL_TOL[dtype]
    y, S = tb.forward(x, qw, A, B, SCALING, bias=bias)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING, bias=bias)
    assert_rel_close(y, y_ref, tol, "y")
    dy = randn(m, N, dtype=dtype, seed=3)
    dx, _, dA, dB = tb.backward(dy, x, S, qw, A, B, SCALING)
    dx_ref, _, dA_ref, dB_ref = torch_ref.backward(dy, x, S_ref, qw, A, B, SCALING)
    assert_rel_close(dx, dx_ref, tol, "dx")
    assert_rel_close(dA, dA_ref, tol, "dA")
    assert_rel_close(dB, dB_ref, tol, "dB")


def test_large_m_takes_dequant_mm_and_reuses_one_workspace_across_layers(monkeypatch):
    from cloq_engine.backends import workspace

    monkeypatch.delenv("CLOQ_TRITON_PATH", raising=False)
    monkeypatch.delenv("CLOQ_LORA_FOLD", raising=False)
    workspace.clear()
    K, m = 64, 130  # M above the fused range
    layers = [make_weight(4, 32, n, K, seed=n) for n in (N, 24)]
    A = randn(RANK, K, seed=6)
    x = randn(m, K)
    for n, (_, qw) in zip((N, 24), layers):
        B = randn(n, RANK, seed=7)
        y, S = tb.forward(x, qw, A, B, SCALING)
        assert_rel_close(y, torch_ref.forward(x, qw, A, B, SCALING)[0], 2e-5, "y")
        dy = randn(m, n, seed=3)
        dx = tb.backward(dy, x, S, qw, A, B, SCALING)[0]
        assert_rel_close(dx, torch_ref.backward(dy, x, S, qw, A, B, SCALING)[0], 2e-5, "dx")
    # one live buffer, grown once (geometrically) to the largest product, then reused: K > N, so the
    # forward adds the LoRA by addmm ([K, N]) and dX concatenates ([K, N + r])
    need = 4 * K * (N + RANK)
    assert need <= workspace.nbytes("cpu", retired=False) <= 1.5 * need
    assert workspace.nbytes("cpu") - workspace.nbytes("cpu", retired=False) == 4 * K * N  # kept for graphs
    workspace.clear()
    assert workspace.nbytes("cpu") == 0


@pytest.mark.parametrize("inner,outer,fold", [(4096, 14336, "concat"), (14336, 4096, "addmm"), (4096, 4096, "concat"),
                                              (4096, 1024, "addmm")])
def test_lora_fold_copies_the_smaller_side(monkeypatch, inner, outer, fold):
    monkeypatch.delenv("CLOQ_LORA_FOLD", raising=False)
    assert tb.lora_fold(inner, outer) == fold
    monkeypatch.setenv("CLOQ_LORA_FOLD", "addmm")
    assert tb.lora_fold(inner, outer) == "addmm"


def test_an_outgrown_workspace_buffer_stays_allocated_for_captured_graphs():
    from cloq_engine.backends import workspace

    workspace.clear()
    small = workspace.buffer((100,), torch.float32, "cpu")
    small.fill_(3.0)
    ptr = small.data_ptr()
    big = workspace.buffer((1000,), torch.float32, "cpu")
    assert big.data_ptr() != ptr
    assert any(b.data_ptr() == ptr for b in workspace._retired)  # not freed, not moved
    assert (small == 3.0).all()
    assert workspace.buffer((120,), torch.float32, "cpu").data_ptr() == big.data_ptr()
    workspace.clear()


def test_zero_tokens_give_empty_outputs_and_zero_gradients():
    K = 64
    _, qw = make_weight(4, 32, N, K)
    A, B = make_lora(RANK, N, K)
    x = torch.zeros(0, K)
    y, S = tb.forward(x, qw, A, B, SCALING)
    assert y.shape == (0, N) and S.shape == (0, RANK)
    dx, _, dA, dB = tb.backward(torch.zeros(0, N), x, S, qw, A, B, SCALING)
    assert dx.shape == (0, K) and not dA.any() and not dB.any()


@pytest.mark.parametrize("rank", [5, 8])
def test_concat_fold_pads_an_odd_rank_with_zeros(monkeypatch, rank):
    from cloq_engine.backends import workspace

    monkeypatch.setenv("CLOQ_TRITON_PATH", "dequant_mm")
    monkeypatch.setenv("CLOQ_LORA_FOLD", "concat")
    K, m = 64, 6
    _, qw = make_weight(2, 32, N, K)
    A, B = make_lora(rank, N, K)
    workspace.clear()
    workspace.buffer((4096,), torch.float32, "cpu").fill_(float("nan"))  # stale contents must not leak in
    x, dy = randn(m, K), randn(m, N, seed=3)
    y, S = tb.forward(x, qw, A, B, SCALING)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING)
    assert_rel_close(y, y_ref, 2e-5, "y")
    workspace.buffer((4096,), torch.float32, "cpu").fill_(float("nan"))
    dx = tb.backward(dy, x, S, qw, A, B, SCALING)[0]
    assert_rel_close(dx, torch_ref.backward(dy, x, S_ref, qw, A, B, SCALING)[0], 2e-5, "dx")
    workspace.clear()
