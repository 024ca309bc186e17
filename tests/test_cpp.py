"""The C++ extension ``cloq_engine._C`` and the ``cpp`` backend, against the Python spec
(``formats.pack_codes_torch`` / ``unpack_codes_torch`` and ``backends.torch_ref``).

Skipped as a whole when the extension is not built.
"""
import os
import subprocess
import sys

import pytest
import torch

from cloq_engine import _ext, formats
from cloq_engine.backends import torch_ref
from cloq_engine.config import QuantConfig
from cloq_engine.formats import QuantizedWeight
from cloq_engine.quant import quantize_weight

_C = _ext.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"C++ extension not built: {_ext.unavailable_reason()}")
if _C is not None:
    from cloq_engine.backends import cpp_backend
ISAS = ["baseline"] + (["avx2"] if _C is not None and _C.kernel_isa() == "avx2" else [])

BITS = [2, 3, 4]
# (K, N): odd, padded (K not a multiple of 32), single column, and multi-word shapes.
PACK_SHAPES = [(1, 1), (31, 7), (33, 5), (100, 37), (256, 384), (96, 1)]


@pytest.fixture(params=ISAS)
def isa(request):
    prev = _C.set_kernel_isa(request.param)
    yield request.param
    _C.set_kernel_isa(prev)


def _codes(k, n, bits, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (k, n), generator=g).to(dtype)


# -- pack / unpack ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,n", PACK_SHAPES)
def test_pack_matches_python_spec_bit_for_bit(bits, k, n):
    codes = _codes(k, n, bits)
    words = _C.pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert torch.equal(words, formats.pack_codes_torch(codes, bits))
    assert torch.equal(formats.pack_codes(codes, bits), words)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,n", PACK_SHAPES)
def test_unpack_inverts_python_pack(bits, k, n):
    codes = _codes(k, n, bits, seed=1)
    words = formats.pack_codes_torch(codes, bits)
    out = _C.unpack_codes(words, bits, k)
    assert out.dtype == torch.int64
    assert torch.equal(out, codes)
    assert torch.equal(formats.unpack_codes(words, bits, k), formats.unpack_codes_torch(words, bits, k))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_pack_accepts_narrow_integer_codes(dtype):
    codes = _codes(70, 9, 4)
    assert torch.equal(_C.pack_codes(codes.to(dtype), 4), formats.pack_codes_torch(codes, 4))


def test_pack_all_ones_sets_sign_bit_like_python():
    codes = torch.full((64, 3), 15, dtype=torch.int64)
    words = _C.pack_codes(codes, 4)
    assert torch.equal(words, formats.pack_codes_torch(codes, 4))
    assert int(words[0, 0]) == -1


def test_pack_of_non_contiguous_codes():
    codes = _codes(40, 64, 3)[:, ::2]
    assert torch.equal(_C.pack_codes(codes, 3), formats.pack_codes_torch(codes.contiguous(), 3))


@pytest.mark.parametrize(
    "codes,bits,match",
    [
        (torch.full((4, 4), 4), 2, "codes must lie in"),
        (torch.full((4, 4), -1), 3, "codes must lie in"),
        (torch.zeros(4, 4, dtype=torch.int64), 5, "`bits`"),
        (torch.zeros(4, 4, 2, dtype=torch.int64), 4, "2-D"),
        (torch.zeros(4, 4), 4, "integer"),
    ],
)
def test_pack_rejects_bad_input_with_value_error(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        _C.pack_codes(codes, bits)
    with pytest.raises(ValueError, match=match):
        formats.pack_codes(codes, bits)


@pytest.mark.parametrize(
    "qweight,bits,k,match",
    [
        (torch.zeros(4, 3, dtype=torch.int32), 4, 64, "rows"),
        (torch.zeros(8, 3, dtype=torch.int64), 4, 64, "int32"),
    ],
)
def test_unpack_rejects_bad_input_with_value_error(qweight, bits, k, match):
    with pytest.raises(ValueError, match=match):
        _C.unpack_codes(qweight, bits, k)
    with pytest.raises(ValueError, match=match):
        formats.unpack_codes(qweight, bits, k)


# -- dequantize / forward / backward vs torch_ref ---------------------------------------------------
# (bits, group_size, method, K, N): odd N, K padded with group_size -1, NF4, all bit widths.
WEIGHTS = [
    (2, 32, "rtn", 128, 40),
    (3, 64, "rtn", 192, 33),
    (4, 128, "rtn", 256, 17),
    (3, -1, "rtn", 100, 21),
    (2, -1, "rtn", 45, 8),
    (4, 64, "nf4", 128, 24),
    (4, -1, "nf4", 70, 11),
]


def _weight(bits, group_size, method, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    return quantize_weight(W, QuantConfig(bits=bits, group_size=group_size, method=method))


def _lora(k, n, r=4, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(r, k, generator=g)).to(dtype), (0.1 * torch.randn(n, r, generator=g)).to(dtype)


@pytest.mark.parametrize("bits,group_size,method,k,n", WEIGHTS)
def test_dequantize_equals_reference_exactly(bits, group_size, method, k, n, isa):
    qw = _weight(bits, group_size, method, k, n)
    assert torch.equal(cpp_backend.dequantize(qw), torch_ref.dequantize(qw))


def test_dequantize_row_block_is_a_slice_of_w_transpose():
    qw = _weight(3, 32, "rtn", 160, 12)
    blk = _C.dequantize_kn(*cpp_backend._weight_args(qw), qw.in_features, 37, 101, torch.float64)
    assert blk.dtype == torch.float64
    assert torch.equal(blk, torch_ref.dequantize(qw).t()[37:101].double())


# dtype of x -> (atol, rtol) of y / dx against the float32 reference.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


# M = 1 and 7 take the fused kernels (both directions forced here), 33 the blocked one; BLOCK_K is
# shrunk to cover several blocks.
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("bits,group_size,method,k,n", WEIGHTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_match_reference(bits, group_size, method, k, n, m, dtype, isa, monkeypatch):
    monkeypatch.setattr(cpp_backend, "BLOCK_K", 32)
    monkeypatch.setattr(cpp_backend, "FUSED_MAX_M", 8)
    monkeypatch.setattr(cpp_backend, "FUSED_MAX_M_BACKWARD", 8)
    qw = _weight(bits, group_size, method, k, n)
    A, B = _lora(k, n)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    dy = torch.randn(m, n, generator=g).to(dtype)
    atol, rtol = TOL[dtype]

    y_ref, S_ref = torch_ref.forward(x, qw, A, B, 0.7, bias=bias)
    y, S = cpp_backend.forward(x, qw, A, B, 0.7, bias=bias)
    assert y.dtype == dtype and S.dtype == torch.float32
    torch.testing.assert_close(S, S_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)

    ref = torch_ref.backward(dy, x, S_ref, qw, A, B, 0.7)
    got = cpp_backend.backward(dy, x, S, qw, A, B, 0.7)
    assert got[1] is None and got[0].dtype == dtype
    torch.testing.assert_close(got[0].float(), ref[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(got[2], ref[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[3], ref[3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [3, 40])  # fused (forced), blocked
def test_backward_with_dropout_input_returns_lora_grad_apart(m, monkeypatch):
    monkeypatch.setattr(cpp_backend, "FUSED_MAX_M_BACKWARD", 8)
    qw = _weight(4, 32, "rtn", 96, 20)
    A, B = _lora(96, 20)
    g = torch.Generator().manual_seed(3)
    x, x_lora, dy = torch.randn(m, 96, generator=g), torch.randn(m, 96, generator=g), torch.randn(m, 20, generator=g)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, 2.0, x_lora=x_lora)
    y, S = cpp_backend.forward(x, qw, A, B, 2.0, x_lora=x_lora)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    ref = torch_ref.backward(dy, x, S_ref, qw, A, B, 2.0, x_lora=x_lora)
    got = cpp_backend.backward(dy, x, S, qw, A, B, 2.0, x_lora=x_lora)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert cpp_backend.backward(dy, x, S, qw, A, B, 2.0, need_dx=False)[0] is None


@pytest.mark.parametrize("m", [2, 20])
def test_float64_inputs_accumulate_in_float64(m, monkeypatch):
    monkeypatch.setattr(cpp_backend, "FUSED_MAX_M_BACKWARD", 8)
    qw = _weight(3, 32, "rtn", 64, 10)
    A, B = _lora(64, 10, dtype=torch.float64)
    x = torch.randn(m, 64, dtype=torch.float64)
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, 1.5)
    y, S = cpp_backend.forward(x, qw, A, B, 1.5)
    assert y.dtype == S.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    dy = torch.randn(m, 10, dtype=torch.float64)
    torch.testing.assert_close(
        cpp_backend.backward(dy, x, S, qw, A, B, 1.5)[0], torch_ref.backward(dy, x, S_ref, qw, A, B, 1.5)[0],
        atol=1e-12, rtol=1e-12,
    )


def test_empty_batch_gives_empty_outputs():
    qw = _weight(2, 32, "rtn", 64, 8)
    A, B = _lora(64, 8)
    y, S = cpp_backend.forward(torch.zeros(0, 64), qw, A, B, 1.0)
    assert y.shape == (0, 8) and S.shape == (0, 4)
    dx = cpp_backend.backward(torch.zeros(0, 8), torch.zeros(0, 64), S, qw, A, B, 1.0)[0]
    assert dx.shape == (0, 64)


def test_forward_rejects_wrong_input_width():
    qw = _weight(4, 32, "rtn", 64, 8)
    A, B = _lora(64, 8)
    with pytest.raises(ValueError, match="`x`"):
        cpp_backend.forward(torch.zeros(2, 63), qw, A, B, 1.0)


def test_qmm_rejects_mismatched_scales():
    qw = _weight(4, 32, "rtn", 64, 8)
    y = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="scales"):
        _C.qmm_(y, torch.zeros(1, 64), qw.qweight, qw.scales[:1], qw.zeros, None, 4, 32, 0)


def test_real_minilm_layer_matches_reference(minilm, minilm_inputs):
    """A real MiniLM weight and its real activations (the session fixtures other tests share)."""
    name, X = next((k, v) for k, v in minilm_inputs.items() if v.shape[1] == 384)
    W = dict(minilm[0].named_modules())[name].weight.detach()
    qw = quantize_weight(W, QuantConfig(bits=3, group_size=64, method="rtn"))
    A, B = _lora(W.shape[1], W.shape[0], r=8)
    x = X[:64].float()
    y_ref, S_ref = torch_ref.forward(x, qw, A, B, 1.0)
    y, S = cpp_backend.forward(x, qw, A, B, 1.0)
    torch.testing.assert_close(y, y_ref, atol=1e-3, rtol=1e-4)


def test_backend_is_available_and_chosen_for_cpu_by_auto(monkeypatch):
    from cloq_engine import backends

    monkeypatch.setattr(backends, "_override", None)
    monkeypatch.setenv("CLOQ_BACKEND", "auto")
    assert "cpp" in backends.available_backends()
    assert backends.active_backend("cpu") == "cpp"


def test_unavailable_reason_is_none_when_loaded():
    assert _ext.unavailable_reason() is None


@pytest.mark.slow
def test_package_falls_back_to_python_when_extension_disabled():
    code = (
        "import torch, cloq_engine as ce; from cloq_engine import formats, _ext;"
        "assert _ext.load() is None and 'CLOQ_NO_EXT' in _ext.unavailable_reason();"
        "assert 'cpp' not in ce.available_backends() and ce.active_backend('cpu') == 'torch';"
        "c = torch.randint(0, 8, (40, 3));"
        "assert torch.equal(formats.unpack_codes(formats.pack_codes(c, 3), 3, 40), c)"
    )
    env = {**os.environ, "CLOQ_NO_EXT": "1", "CLOQ_BACKEND": "auto"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- the ops as torch ops: schemas, fake kernels, torch.compile --------------------------------------
def _op_samples():
    """(op name, args) covering every op, with NF4 (codebook, no zeros) and both matmul paths."""
    from cloq_engine.formats import NF4_CODEBOOK

    qw = _weight(3, 32, "rtn", 64, 24)
    nf4 = _weight(4, 32, "nf4", 64, 24)
    x, dy = torch.randn(5, 64), torch.randn(5, 24)
    w = cpp_backend._weight_args(qw)
    yield "pack_codes", (_codes(40, 7, 3), 3)
    yield "unpack_codes", (qw.qweight, 3, 64)
    yield "dequantize_kn", (*w, 64, 7, 50, torch.float64)
    yield "dequantize_kn", (nf4.qweight, nf4.scales, None, NF4_CODEBOOK, 4, 32, 64, 0, 64, torch.float32)
    for block_k in (0, 32):
        yield "qmm_", (torch.randn(5, 24), x, *w, block_k)
        yield "qmm_t_", (torch.randn(5, 64), dy, *w, block_k)


@pytest.mark.parametrize("name,args", list(_op_samples()) if _C is not None else [],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_op_schema_and_fake_kernel_pass_opcheck(name, args):
    """torch.library.opcheck: the schema's mutation annotations are true, the fake kernel gives
    the real kernel's shapes/dtypes, and the ops trace under FakeTensor and functionalization."""
    torch.library.opcheck(getattr(torch.ops.cloq_engine, name), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_ops_refuse_to_be_differentiated_directly():
    """QuantLoRAFunction owns the gradient: a direct call that would need one is refused (the
    in-place ops return nothing, so the gradient would otherwise go missing without a word)."""
    qw = _weight(4, 32, "rtn", 64, 8)
    y = torch.zeros(2, 8)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="cloq_engine::qmm_ has no derivative.*`x` requires grad"):
        _C.qmm_(y, x, *cpp_backend._weight_args(qw), 0)
    scales = qw.scales.float().requires_grad_()
    with pytest.raises(RuntimeError, match="`scales` requires grad"):
        _C.dequantize_kn(qw.qweight, scales, qw.zeros.float(), None, 4, 32, 64, 0, 64, torch.float32)
    with torch.no_grad():
        _C.qmm_(y, x, *cpp_backend._weight_args(qw), 0)
    torch.testing.assert_close(y, x.detach() @ qw.dequantize().t())


@pytest.mark.slow
def test_compiled_prepared_llama_is_one_graph_matching_eager(monkeypatch):
    """torch.compile(fullgraph=True) of a prepared tiny Llama on the cpp backend: forward and backward
    through the extension's ops (asserted in the traced graphs), logits and LoRA gradients as eager."""
    import sys
    from pathlib import Path

    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import prepared_tiny

    monkeypatch.setenv("CLOQ_BACKEND", "cpp")
    model = prepared_tiny("llama")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(m):
        m.zero_grad()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    logits_ref, grads_ref = step(model)
    assert grads_ref and all(n.endswith(("lora_A", "lora_B")) for n in grads_ref)

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    try:
        for backend in (aot_autograd(fw_compiler=keep, bw_compiler=keep), "inductor"):
            logits, grads = step(torch.compile(model, fullgraph=True, backend=backend))
            torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
            assert grads.keys() == grads_ref.keys()
            for n in grads_ref:
                torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6, msg=n)
            torch._dynamo.reset()
    finally:
        torch._dynamo.reset()
    forward_graph, backward_graph = graphs
    assert "cloq_engine.qmm_" in forward_graph and "cloq_engine.qmm_t_" in backward_graph
