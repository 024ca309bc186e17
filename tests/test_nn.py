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

