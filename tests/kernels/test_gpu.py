"""GPU tests, one command on a CUDA machine: ``pytest -m gpu`` (skipped without CUDA, and in a run
under the Triton interpreter; the conftest leaves TRITON_INTERPRET unset for ``-m gpu``).

* every entry of the shipped config table for this GPU's architecture, per kernel, bits 2/3/4/NF4,
  against the torch reference at a real shape (4096 x 4096, group 128);
* every path (GEMV, fused, dequant + cuBLAS with both LoRA folds) in bf16 and fp16, forward and
  backward, at 4096 x 4096 and an odd N, M from 1 to 8192;
* ``QuantLoRALinear`` under autograd against dense LoRA on the same weights, and an fp32 layer under
  CUDA autocast (bf16, fp16) returning what ``nn.Linear`` returns there;
* the decode forward under CUDA-graph capture (no host sync, no allocation that breaks replay).
"""
import pytest
import torch
from kernel_testing import assert_rel_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = {torch.bfloat16: 1e-2, torch.float16: 4e-3}  # max error / max |ref|, against float32 math
VARIANTS = [(2, "rtn"), (3, "rtn"), (4, "rtn"), (4, "nf4")]
RANK = 16


@pytest.fixture(autouse=True)
def _compiled_kernels_only():
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run the GPU tests alone: pytest -m gpu (kernels were imported for the interpreter)")


def packed_weight(bits, method, out_features, in_features, group=128, seed=0):
    """A random but valid packed weight on the GPU (quantizing 16M weights on the CPU would be slow)."""
    from cloq_engine.formats import QuantizedWeight, packed_rows

    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = in_features // group
    words = torch.randint(-2**31, 2**31 - 1, (packed_rows(in_features, bits), out_features), generator=g,
                          device="cuda", dtype=torch.int64).to(torch.int32)
    scales = (0.02 * torch.rand(groups, out_features, generator=g, device="cuda") + 1e-3).half()
    zeros = None if method == "nf4" else torch.randint(0, 2**bits, (groups, out_features), generator=g,
                                                       device="cuda").half()
    return QuantizedWeight(words, scales, zeros, bits, group, in_features, out_features, method)


def lora(out_features, in_features, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    A = 0.02 * torch.randn(RANK, in_features, generator=g, device="cuda")
    B = 0.02 * torch.randn(out_features, RANK, generator=g, device="cuda")
    return A.to(dtype), B.to(dtype)


def randn(*shape, dtype, seed=2):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


# ---------------------------------------------------------------------------------------------
# Every shipped config
# ---------------------------------------------------------------------------------------------
def _shipped_entries():
    from cloq_engine.kernels import configs

    if not torch.cuda.is_available():
        return []
    arch = configs.arch_of("cuda")
    table = configs.shipped_table().get(arch, {})
    return [(kernel, i, entry) for kernel, entries in sorted(table.items()) for i, entry in enumerate(entries)]


@pytest.mark.parametrize("kernel,index,entry", _shipped_entries(), ids=lambda v: str(v) if not isinstance(v, dict) else "")
@pytest.mark.parametrize("bits,method", VARIANTS)
def test_every_shipped_config_matches_reference(monkeypatch, kernel, index, entry, bits, method):
    from cloq_engine.backends import torch_ref
    from cloq_engine.kernels import configs
    from cloq_engine.kernels.dequant import dequant_into
    from cloq_engine.kernels.dequant_gemm import dequant_gemm
    from cloq_engine.kernels.dequant_gemm_t import dequant_gemm_t
    from cloq_engine.kernels.gemv import gemv
    from cloq_engine.kernels.utils import codebook_on

    arch = configs.arch_of("cuda")
    monkeypatch.setattr(configs, "shipped_table", lambda: {arch: {kernel: [{"config": entry["config"]}]}})
    monkeypatch.setattr(configs, "_memo", {})
    K = N = 4096
    dt = torch.bfloat16
    qw = packed_weight(bits, method, N, K)
    cb = codebook_on("cuda") if qw.is_nf4 else qw.scales
    W = torch_ref.dequantize(qw)  # float32 (N, K)
    A, B = lora(N, K, dt)
    m = entry.get("m", 64 if kernel.startswith("dequant_gemm") else 1)
    x = randn(m, K, dtype=dt)
    S = x @ A.t()
    if kernel == "dequant":
        out = torch.empty(K, N, dtype=dt, device="cuda")
        dequant_into(out, qw.qweight, qw.scales, qw.zeros, cb, bits, 128, K)
        torch.testing.assert_close(out, W.t().to(dt), rtol=0, atol=0)
    elif kernel in ("gemv", "gemv_dot"):  # M = 1 and M = 2..16
        for mm in ((1,) if kernel == "gemv" else (2, 16)):
            xm, Sm = x[:1].expand(mm, K).contiguous(), S[:1].expand(mm, RANK).contiguous()
            y = gemv(xm, qw.qweight, qw.scales, qw.zeros, cb, Sm, B, None, 2.0, bits, 128, K)
            ref = xm.float() @ W.t() + 2.0 * Sm.float() @ B.float().t()
            assert_rel_close(y, ref, TOL[dt], f"gemv m={mm}")
    elif kernel == "dequant_gemm":
        y = dequant_gemm(x, qw.qweight, qw.scales, qw.zeros, cb, S, B, None, 2.0, bits, 128, K)
        assert_rel_close(y, x.float() @ W.t() + 2.0 * S.float() @ B.float().t(), TOL[dt], "dequant_gemm")
    elif kernel == "dequant_gemm_t":
        dy = randn(m, N, dtype=dt, seed=3)
        dS = dy @ B
        dx = dequant_gemm_t(dy, qw.qweight, qw.scales, qw.zeros, cb, dS, A, bits, 128, K, dt)
        assert_rel_close(dx, dy.float() @ W + dS.float() @ A.float(), TOL[dt], "dequant_gemm_t")
    else:
        pytest.fail(f"no test for shipped kernel {kernel!r}")


# ---------------------------------------------------------------------------------------------
# Every path at real shapes
# ---------------------------------------------------------------------------------------------
PATH_CASES = [("auto", "concat"), ("gemv", "concat"), ("fused", "concat"), ("dequant_mm", "concat"),
              ("dequant_mm", "addmm")]
SHAPES = [(4096, 4096), (4096, 1001)]  # (in, out): a square layer and an odd N
MS = [1, 7, 16, 17, 100, 129, 2048, 8192]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path,fold", PATH_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("bits,method", VARIANTS)
def test_paths_match_reference_forward_and_backward(monkeypatch, dtype, path, fold, bits, method):
    from cloq_engine.backends import torch_ref
    from cloq_engine.backends import triton_backend as tb

    if path == "auto":
        monkeypatch.delenv("CLOQ_TRITON_PATH", raising=False)
    else:
        monkeypatch.setenv("CLOQ_TRITON_PATH", path)
    monkeypatch.setenv("CLOQ_LORA_FOLD", fold)
    tol = TOL[dtype]
    for K, N in SHAPES:
        qw = packed_weight(bits, method, N, K, seed=K + N)
        A, B = lora(N, K, torch.float32)
        bias = 0.1 * randn(N, dtype=dtype, seed=9)
        for m in MS:
            if path == "gemv" and m > 16:
                continue
            if path == "fused" and m > 2048:
                continue  # slow by design there (the table never sends it this far)
            x = randn(m, K, dtype=dtype, seed=m)
            y, S = tb.forward(x, qw, A, B, 2.0, bias=bias)
            y_ref, S_ref = torch_ref.forward(x, qw, A, B, 2.0, bias=bias.float())
            what = f"{K}x{N} M={m}"
            assert y.dtype == dtype and torch.isfinite(y).all(), what
            assert_rel_close(y, y_ref, tol, f"y {what}")
            dy = randn(m, N, dtype=dtype, seed=m + 1)
            dx, _, dA, dB = tb.backward(dy, x, S, qw, A, B, 2.0)
            dx_ref, _, dA_ref, dB_ref = torch_ref.backward(dy, x, S_ref, qw, A, B, 2.0)
            assert_rel_close(dx, dx_ref, tol, f"dx {what}")
            assert_rel_close(dA, dA_ref, tol, f"dA {what}")
            assert_rel_close(dB, dB_ref, tol, f"dB {what}")


# ---------------------------------------------------------------------------------------------
# The module under autograd, and the decode forward in a CUDA graph
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 100, 2048])
def test_quant_lora_linear_gradients_match_dense_lora(monkeypatch, dtype, m):
    import cloq_engine as ce
    from cloq_engine.nn import QuantLoRALinear

    monkeypatch.setenv("CLOQ_BACKEND", "triton")
    K, N = 4096, 1001
    qw = packed_weight(4, "rtn", N, K)
    A, B = lora(N, K, torch.float32)
    layer = QuantLoRALinear.from_quantized(qw, A, B, ce.LoRAConfig(rank=RANK, alpha=2 * RANK, init="zero"),
                                           dtype=dtype)
    x = randn(2, m, K, dtype=dtype).requires_grad_(True)
    dy = randn(2, m, N, dtype=dtype, seed=4)
    layer(x).backward(dy)

    W = qw.dequantize()
    xr = x.detach().float().requires_grad_(True)
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    (xr @ W.t() + layer.scaling * (xr @ Ar.t()) @ Br.t()).backward(dy.float())
    tol = TOL[dtype]
    assert_rel_close(x.grad, xr.grad, tol, "dx")
    assert_rel_close(layer.lora_A.grad, Ar.grad, tol, "dA")
    assert_rel_close(layer.lora_B.grad, Br.grad, tol, "dB")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 100, 2048])
def test_fp32_layer_under_cuda_autocast_returns_what_nn_linear_returns(monkeypatch, dtype, m):
    import cloq_engine as ce
    from cloq_engine.nn import QuantLoRALinear

    monkeypatch.setenv("CLOQ_BACKEND", "triton")
    K, N = 4096, 1001
    qw = packed_weight(4, "rtn", N, K)
    A, B = lora(N, K, torch.float32)
    layer = QuantLoRALinear.from_quantized(qw, A, B, ce.LoRAConfig(rank=RANK, alpha=2 * RANK, init="zero"))
    dense = torch.nn.Linear(K, N, device="cuda")
    x = randn(2, m, K, dtype=torch.float32).requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
        assert y.dtype == dense(x).dtype == dtype
    y.backward(randn(2, m, N, dtype=dtype, seed=4))
    assert x.grad.dtype == layer.lora_A.grad.dtype == torch.float32

    W = qw.dequantize()
    xr = x.detach().to(dtype).float()  # the input rounded as autocast rounds it
    assert_rel_close(y, xr @ W.t() + layer.scaling * (xr @ A.t()) @ B.t(), TOL[dtype], "y")


@pytest.mark.parametrize("bits,method", VARIANTS)
def test_decode_forward_replays_in_a_cuda_graph(bits, method):
    from cloq_engine.backends import torch_ref
    from cloq_engine.backends import triton_backend as tb

    K, N = 4096, 14336
    qw = packed_weight(bits, method, N, K)
    A, B = lora(N, K, torch.bfloat16)
    x = randn(1, K, dtype=torch.bfloat16)
    tb.forward(x, qw, A, B, 2.0)  # compile and allocate the workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, _ = tb.forward(x, qw, A, B, 2.0)
    for seed in (5, 6):
        x.copy_(randn(1, K, dtype=torch.bfloat16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert_rel_close(y, torch_ref.forward(x, qw, A, B, 2.0)[0], TOL[torch.bfloat16], f"replay {seed}")


def test_a_captured_decode_graph_survives_a_later_workspace_growth():
    """A larger call after the capture grows the shared workspace; the graph's buffers stay put."""
    from cloq_engine.backends import torch_ref, workspace
    from cloq_engine.backends import triton_backend as tb

    workspace.clear()
    K, N = 4096, 14336
    qw = packed_weight(4, "rtn", N, K)
    A, B = lora(N, K, torch.bfloat16)
    x = randn(1, K, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()  # warm up on the capture stream, so the capture uses its persistent slots
    torch.cuda.synchronize()  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        tb.forward(x, qw, A, B, 2.0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y, _ = tb.forward(x, qw, A, B, 2.0)
    qw2 = packed_weight(4, "rtn", 2 * N, K, seed=1)  # a wider layer: every slot the capture used grows
    A2, B2 = lora(2 * N, K, torch.bfloat16)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for m in (1, 16, 4096):  # split-K partials and counters (M = 1, 16), the dequant buffer (4096)
            tb.forward(randn(m, K, dtype=torch.bfloat16, seed=3), qw2, A2, B2, 2.0)
    torch.cuda.synchronize()
    assert workspace._retired, "the later calls should have outgrown the captured buffers"
    for seed in (5, 6):
        x.copy_(randn(1, K, dtype=torch.bfloat16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert_rel_close(y, torch_ref.forward(x, qw, A, B, 2.0)[0], TOL[torch.bfloat16], f"replay {seed}")
