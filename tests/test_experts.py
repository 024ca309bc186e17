"""QuantLoRAExperts and the experts forward registered with transformers' ExpertsInterface."""
import copy

import pytest
import torch

import cloq_engine as ce
from cloq_engine import backends
from cloq_engine.experts import QuantLoRAExperts, experts_forward, use_cloq_experts
from tiny_moe import MOE_ARCHS, tiny_moe, tiny_moe_calib

RTN4 = ce.QuantConfig(bits=4, group_size=32, method="rtn")


def random_experts(E=4, in_f=64, out_f=32, rank=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, out_f, in_f, generator=g)
    qws = [ce.quantize_weight(W[e], RTN4) for e in range(E)]
    A = 0.1 * torch.randn(E, rank, in_f, generator=g, dtype=dtype)
    B = 0.1 * torch.randn(E, out_f, rank, generator=g, dtype=dtype)
    lc = ce.LoRAConfig(rank=rank, alpha=2 * rank, init="zero")
    return QuantLoRAExperts.from_quantized(qws, A, B, lc, RTN4, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_forward_and_backward_match_autograd_on_the_dequantized_reference(backend):
    if backend not in backends.available_backends():
        pytest.skip(f"{backend} backend unavailable")
    layer = random_experts()
    counts = [5, 0, 3, 7]  # expert 1 gets no token
    x = torch.randn(sum(counts), layer.in_features, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(sum(counts), layer.out_features, dtype=torch.float64)
    backends.set_backend(backend)
    try:
        y = layer(x, counts)
        y.backward(dy)
    finally:
        backends.set_backend(None)
    W = layer.dequantize().double()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    parts, start = [], 0
    for e, n in enumerate(counts):
        Weff = W[e] + layer.scaling * B[e] @ A[e]
        parts.append(xr[start:start + n] @ Weff.t())
        start += n
    y_ref = torch.cat(parts)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-9, atol=1e-9)
    assert layer.lora_A.grad[1].abs().max() == 0 and layer.lora_B.grad[1].abs().max() == 0


def test_packed_buffers_keep_their_dtypes_under_a_dtype_cast():
    layer = random_experts(dtype=torch.float32).to(torch.bfloat16)
    assert (layer.qweight.dtype, layer.scales.dtype, layer.zeros.dtype) == (torch.int32, torch.float16, torch.float16)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer.nbytes * 8 / (layer.num_experts * layer.in_features * layer.out_features) == 4 + 32 / 32


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_dense_experts_through_the_cloq_implementation_equal_transformers_grouped_mm(arch):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    model = tiny_moe(arch)
    x = tiny_moe_calib(1)[0]
    ref = model(x).logits
    ours = copy.deepcopy(model)
    use_cloq_experts(ours)
    assert ours.config._experts_implementation == "cloq" and ALL_EXPERTS_FUNCTIONS["cloq"] is experts_forward
    torch.testing.assert_close(ours(x).logits, ref, rtol=1e-5, atol=1e-5)
