"""QuantLoRALinear: forward/backward against dense autograd, dtypes, dropout, two-phase loading."""
import pytest
import torch
from torch import nn

import cloq_engine as ce
from cloq_engine.nn import QuantLoRALinear


def _layer(bits=4, group_size=32, in_f=64, out_f=48, rank=4, bias=True, dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    W = torch.randn(out_f, in_f)
    qc = ce.QuantConfig(bits=bits, group_size=group_size, method="rtn")
    lc = ce.LoRAConfig(rank=rank, alpha=2 * rank, dropout=dropout)
    qw = ce.quantize_weight(W, qc)
    A, B = torch.randn(rank, in_f) / 8, torch.randn(out_f, rank) / 8
    b = torch.randn(out_f) if bias else None
    return QuantLoRALinear.from_quantized(qw, A, B, lc, qc, bias=b, dtype=dtype), qw


def _dense(layer, x):
    w = layer.quantized_weight.dequantize().to(x.dtype)
    y = x @ w.t() + layer.scaling * (x @ layer.lora_A.to(x.dtype).t()) @ layer.lora_B.to(x.dtype).t()
    return y + layer.bias.to(x.dtype) if layer.bias is not None else y


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_forward_backward_match_dense_autograd(bits, group_size):
    layer, _ = _layer(bits=bits, group_size=group_size, in_f=96 if group_size == 32 else 70)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    A_ref = layer.lora_A.detach().clone().requires_grad_()
    B_ref = layer.lora_B.detach().clone().requires_grad_()
    y = layer(x)
    w = layer.quantized_weight.dequantize()
    y_ref = x_ref @ w.t() + layer.scaling * (x_ref @ A_ref.t()) @ B_ref.t() + layer.bias
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B_ref.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    layer, qw = _layer(bits=3, in_f=32, out_f=8, rank=2, dtype=torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    fn = lambda x, A, B: ce.nn.QuantLoRAFunction.apply(x, None, A, B, layer.bias, qw, layer.scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, layer.lora_A, layer.lora_B))


def test_gradcheck_with_dropout_input():
    layer, qw = _layer(bits=2, in_f=32, out_f=8, rank=2, dtype=torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    x_l = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    fn = lambda x, xl, A, B: ce.nn.QuantLoRAFunction.apply(x, xl, A, B, None, qw, layer.scaling)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, x_l, layer.lora_A, layer.lora_B))


def test_only_lora_factors_are_trainable_and_buffers_are_packed():
    layer, qw = _layer()
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["lora_A", "lora_B"]
    assert set(dict(layer.named_buffers())) == {"qweight", "scales", "zeros"}
    assert layer.qweight.dtype == torch.int32 and layer.qweight.numel() * 4 == 64 * 48 * 4 // 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cast_keeps_packed_buffers_exact(dtype):
    layer, qw = _layer()
    before = layer.quantized_weight.dequantize()
    layer.to(dtype)
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    assert layer.lora_A.dtype == dtype
    torch.testing.assert_close(layer.quantized_weight.dequantize(), before, rtol=0, atol=0)
    x = torch.randn(4, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), _dense(layer, x.float()), rtol=3e-2, atol=3e-2)


def test_dropout_applies_to_lora_branch_only_in_training():
    layer, _ = _layer(dropout=0.5)
    x = torch.randn(8, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), _dense(layer, x), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    assert not torch.allclose(y, _dense(layer, x), atol=1e-3)
    y.sum().backward()
    assert layer.lora_A.grad is not None


def test_meta_construction_then_assign_load_is_exact():
    layer, qw = _layer()
    empty = QuantLoRALinear(64, 48, layer.quant_config, layer.lora_config, bias=True, device="meta")
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)


def test_from_linear_and_conv1d_orientation():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    conv = Conv1D(32, 64)
    conv.weight.data = lin.weight.data.t().clone()
    conv.bias.data = lin.bias.data.clone()
    qc, lc = ce.QuantConfig(bits=4, group_size=32, method="rtn"), ce.LoRAConfig(rank=4, init="zero")
    a, b = QuantLoRALinear.from_linear(lin, qc, lc), QuantLoRALinear.from_linear(conv, qc, lc)
    x = torch.randn(5, 64)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a(x), lin(x), rtol=0.2, atol=0.2)  # 4-bit, B = 0


def test_bad_input_dimension_is_a_clear_error():
    layer, _ = _layer()
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(2, 63))


def test_backend_env_var_is_read_at_call_time(monkeypatch):
    layer, _ = _layer()
    monkeypatch.setenv("CLOQ_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"environment variable CLOQ_BACKEND must be one of .*got 'nonsense'"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"set_backend\(name\): the backend must be one of"):
        ce.set_backend("nonsense")
    monkeypatch.setenv("CLOQ_BACKEND", "torch")
    assert ce.active_backend("cpu") == "torch"
    ce.set_backend("torch")
    monkeypatch.setenv("CLOQ_BACKEND", "nonsense")
    try:
        layer(torch.randn(2, 64))  # the setter wins over the environment
    finally:
        ce.set_backend(None)


# ---------------------------------------------------------------------------------------------
# Autocast: every backend returns what nn.Linear returns under the same autocast
# ---------------------------------------------------------------------------------------------
AMP_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # bf16 keeps 8 mantissa bits, fp16 11
# The Triton interpreter computes bf16 wrongly on CPU (docs/design.md §6, "The Triton interpreter"): fp16 only there.
AUTOCAST_CASES = [(b, d) for b in ("torch", "cpp", "triton") for d in (torch.bfloat16, torch.float16)
                  if not (b == "triton" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,amp_dtype", AUTOCAST_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_cpu_autocast_returns_what_nn_linear_returns(monkeypatch, backend, amp_dtype):
    if backend not in ce.available_backends():
        pytest.skip(f"the {backend} backend is unavailable here")
    monkeypatch.setenv("CLOQ_BACKEND", backend)
    layer, _ = _layer(bits=3, in_f=96)
    dense = nn.Linear(96, 48)
    x = torch.randn(2, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    A_ref = layer.lora_A.detach().clone().requires_grad_()
    B_ref = layer.lora_B.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=amp_dtype):
        y = layer(x)
        expected_dtype = dense(x).dtype
    assert y.dtype == expected_dtype == amp_dtype
    # The reference: float32 math on the input rounded as autocast rounds it, then the output rounded.
    xr = x_ref.to(amp_dtype).float()
    y_ref = xr @ layer.quantized_weight.dequantize().t() + layer.scaling * (xr @ A_ref.t()) @ B_ref.t() + layer.bias
    tol = AMP_TOL[amp_dtype]
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    g = torch.randn(y.shape).to(amp_dtype)
    y.backward(g)
    y_ref.backward(g.float())
    for got, want, what in ((x.grad, x_ref.grad, "x"), (layer.lora_A.grad, A_ref.grad, "lora_A"),
                            (layer.lora_B.grad, B_ref.grad, "lora_B")):
        assert got.dtype == torch.float32, what
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=what)


def test_backward_inside_an_autocast_region_matches_outside():
    """Trainers may call backward with autocast still on; the backends' own casts must win."""
    layer, _ = _layer(in_f=64)
    x = torch.randn(4, 64)
    grads = []
    for inside in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            if inside:
                y.float().pow(2).sum().backward()
        if not inside:
            y.float().pow(2).sum().backward()
        grads.append(layer.lora_A.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_autocast_leaves_float64_and_disabled_regions_alone():
    layer, _ = _layer(in_f=64, dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.float64
    layer32, _ = _layer(in_f=64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert layer32(torch.randn(3, 64)).dtype == torch.float32
