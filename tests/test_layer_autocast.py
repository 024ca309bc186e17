"""Every packed layer kind (QuantLoRALinear, QuantLoRAExperts, and PEFT's adapter over a
QuantLoRALinear) under CPU autocast, on every backend: each returns what nn.Linear returns there
(the autocast dtype), in float32 math on the input as autocast rounds it, with float32 gradients for
x and the LoRA factors. All three run through one forward wrapper (cloq_engine/layer_forward.py)."""
import pytest
import torch
from torch import nn

import cloq_engine as ce
from cloq_engine.experts import QuantLoRAExperts
from cloq_engine.nn import QuantLoRALinear

RTN3 = ce.QuantConfig(bits=3, group_size=32, method="rtn")
LORA = ce.LoRAConfig(rank=4, alpha=8, init="zero")
IN_F, OUT_F = 96, 48
COUNTS = (5, 0, 3, 2)  # rows per expert, sorted by expert; expert 1 gets no token
AMP_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # bf16 keeps 8 mantissa bits, fp16 11
# The Triton interpreter computes bf16 wrongly on CPU (docs/design.md §6, "The Triton interpreter"): fp16 only there.
CASES = [(b, d) for b in ("torch", "cpp", "triton") for d in (torch.bfloat16, torch.float16)
         if not (b == "triton" and d == torch.bfloat16)]


def _linear():
    g = torch.Generator().manual_seed(0)
    qw = ce.quantize_weight(torch.randn(OUT_F, IN_F, generator=g), RTN3)
    A, B = torch.randn(4, IN_F, generator=g) / 8, torch.randn(OUT_F, 4, generator=g) / 8
    layer = QuantLoRALinear.from_quantized(qw, A, B, LORA, RTN3, bias=torch.randn(OUT_F, generator=g))
    x = torch.randn(2, 5, IN_F, generator=g)

    def reference(x, A, B):
        return x @ layer.quantized_weight.dequantize().t() + layer.scaling * (x @ A.t()) @ B.t() + layer.bias

    return layer, x, (), (layer.lora_A, layer.lora_B), reference


def _peft():
    """PEFT's LoRA over a QuantLoRALinear whose calibrated factors it absorbed (hf/peft_interop.py)."""
    import peft

    layer, x, _, _, reference = _linear()
    model = nn.Sequential()
    model.add_module("proj", layer)
    cfg = ce.register_peft_custom_module(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    wrapped = peft.get_peft_model(model, cfg).base_model.model.proj
    assert wrapped.absorbed_base_lora
    A, B = wrapped.lora_A["default"].weight, wrapped.lora_B["default"].weight
    s = wrapped.scaling["default"] / layer.scaling  # PEFT's scaling in place of the layer's
    return wrapped, x, (), (A, B), lambda x, A, B: reference(x, A, s * B)


def _experts():
    g = torch.Generator().manual_seed(0)
    E = len(COUNTS)
    W = torch.randn(E, OUT_F, IN_F, generator=g)
    qws = [ce.quantize_weight(W[e], RTN3) for e in range(E)]
    A, B = torch.randn(E, 4, IN_F, generator=g) / 8, torch.randn(E, OUT_F, 4, generator=g) / 8
    layer = QuantLoRAExperts.from_quantized(qws, A, B, LORA, RTN3)
    x = torch.randn(sum(COUNTS), IN_F, generator=g)

    def reference(x, A, B):
        W_hat, parts, lo = layer.dequantize(), [], 0
        for e, n in enumerate(COUNTS):
            parts.append(x[lo:lo + n] @ (W_hat[e] + layer.scaling * B[e] @ A[e]).t())
            lo += n
        return torch.cat(parts)

    return layer, x, (COUNTS,), (layer.lora_A, layer.lora_B), reference


LAYERS = {"linear": _linear, "experts": _experts, "peft": _peft}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("backend,amp_dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_every_layer_kind_under_cpu_autocast_returns_what_nn_linear_returns(monkeypatch, kind, backend, amp_dtype):
    if backend not in ce.available_backends():
        pytest.skip(f"the {backend} backend is unavailable here")
    monkeypatch.setenv("CLOQ_BACKEND", backend)
    layer, x, extra, (A, B), reference = LAYERS[kind]()
    x.requires_grad_(True)
    x_ref, A_ref, B_ref = (t.detach().clone().requires_grad_() for t in (x, A, B))
    with torch.autocast("cpu", dtype=amp_dtype):
        y = layer(x, *extra)
        expected_dtype = nn.Linear(IN_F, OUT_F)(x).dtype
    assert y.dtype == expected_dtype == amp_dtype
    y_ref = reference(x_ref.to(amp_dtype).float(), A_ref, B_ref)  # the input rounded as autocast rounds it
    tol = AMP_TOL[amp_dtype]
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    g = torch.randn(y.shape).to(amp_dtype)
    with torch.autocast("cpu", dtype=amp_dtype):  # trainers may run backward with autocast still on
        y.backward(g)
    y_ref.backward(g.float())
    for got, want, what in ((x.grad, x_ref.grad, "x"), (A.grad, A_ref.grad, "lora_A"), (B.grad, B_ref.grad, "lora_B")):
        assert got.dtype == torch.float32, what
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=what)


@pytest.mark.parametrize("kind", LAYERS)
def test_every_layer_kind_refuses_an_integer_input(kind):
    layer, x, extra, _, _ = LAYERS[kind]()
    with pytest.raises(RuntimeError, match="QuantLoRA(Linear|Experts) needs a floating-point input; got torch.int64"):
        layer(x.long(), *extra)


@pytest.mark.parametrize("kind", ["linear", "experts"])
def test_both_packed_kinds_apply_lora_dropout_in_training_only(kind):
    layer, x, extra, _, reference = LAYERS[kind]()
    layer.lora_dropout = nn.Dropout(0.5)
    torch.testing.assert_close(layer.eval()(x, *extra), reference(x, layer.lora_A, layer.lora_B).detach(),
                               rtol=1e-4, atol=1e-4)
    torch.manual_seed(1)
    y_train = layer.train()(x, *extra)
    torch.manual_seed(1)
    x_lora = nn.functional.dropout(x.reshape(-1, IN_F), 0.5).reshape(x.shape)
    base = reference(x, torch.zeros_like(layer.lora_A), layer.lora_B)  # Ŵ (+ bias) only
    lora = reference(x_lora, layer.lora_A, layer.lora_B) - reference(x_lora, torch.zeros_like(layer.lora_A),
                                                                       layer.lora_B)
    torch.testing.assert_close(y_train, (base + lora).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_prepared_moe_model_runs_under_cpu_autocast_on_the_cpp_backend(monkeypatch, amp_dtype):
    """The reported failure: a tiny Qwen3-MoE prepared with RTN, forward under CPU autocast on the
    C++ backend raised "y must be float32 or float64" in _C.qmm_ (the experts had no autocast-off region)."""
    from tiny_moe import tiny_moe, tiny_moe_calib

    if "cpp" not in ce.available_backends():
        pytest.skip("the cpp backend is unavailable here")
    monkeypatch.setenv("CLOQ_BACKEND", "cpp")
    model = ce.prepare_model(tiny_moe("qwen3_moe"), ce.QuantConfig(bits=4, group_size=32, method="rtn"), LORA)
    x = tiny_moe_calib(1, seed=3)[0]
    with torch.no_grad():
        y32 = model(x).logits
        with torch.autocast("cpu", dtype=amp_dtype):
            y = model(x).logits
    assert y.dtype == amp_dtype and torch.isfinite(y).all()
    # Token by token: a near-tie in a router can pick another expert once the router's logits are
    # rounded to the autocast dtype, which changes that token's logits by far more than rounding.
    tol = 5 * AMP_TOL[amp_dtype]  # two blocks of rounding
    close = ((y.float() - y32).abs() <= tol * y32.abs().max()).all(dim=-1)[0]
    assert int(close.sum()) >= close.numel() - 2, f"tokens off: {(~close).nonzero().flatten().tolist()}"


def _empty_like(layer):
    """An empty layer of the same kind and configs on meta, as a checkpoint loader builds it."""
    if isinstance(layer, QuantLoRAExperts):
        return QuantLoRAExperts(layer.num_experts, layer.in_features, layer.out_features, layer.quant_config,
                                layer.lora_config, transposed=layer.transposed, device="meta", dtype=layer.lora_A.dtype)
    return QuantLoRALinear(layer.in_features, layer.out_features, layer.quant_config, layer.lora_config,
                           bias=layer.bias is not None, device="meta", dtype=layer.base_dtype)


@pytest.mark.parametrize("kind", ["linear", "experts"])
@pytest.mark.parametrize("backend,amp_dtype", [(b, d) for b in ("torch", "cpp") for d in (None, torch.bfloat16,
                                                                                         torch.float16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_every_packed_kind_saves_and_loads_bitwise(monkeypatch, tmp_path, kind, backend, amp_dtype):
    """The state dict written to disk and loaded into an empty layer of the same kind (on meta, as
    load_pretrained does) gives back the same tensors and the same output to the bit, autocast or not."""
    if backend not in ce.available_backends():
        pytest.skip(f"the {backend} backend is unavailable here")
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("CLOQ_BACKEND", backend)
    layer, x, extra, _, _ = LAYERS[kind]()
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(tmp_path / "layer.safetensors"))
    state = load_file(str(tmp_path / "layer.safetensors"))
    loaded = _empty_like(layer)
    loaded.load_state_dict(state, assign=True)
    assert set(state) == set(layer.state_dict())
    for name, t in layer.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        y, y_loaded = layer(x, *extra), loaded(x, *extra)
    assert y.dtype == y_loaded.dtype and torch.equal(y, y_loaded)


K_QUANT = ce.QuantConfig(bits=2, group_size=32, method="rtn", grid="q2_k")  # no 256-wide super-block fits 96 or 64


def test_both_packed_kinds_store_a_k_quant_grids_fallback_alike():
    """A row too short for a k-quant super-block is quantized on llama.cpp's fallback grid (4-bit
    Q4_0 for q2_k): both kinds size their buffers and read their codes at the fallback's bits. The
    experts kind used the config's 2 bits, and an MoE prepared with grid=q2_k failed in load_state_dict
    (size mismatch for qweight)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(len(COUNTS), OUT_F, IN_F, generator=g)
    qws = [ce.quantize_weight(W[e], K_QUANT) for e in range(len(COUNTS))]
    assert {q.bits for q in qws} == {4}
    A, B = torch.zeros(len(COUNTS), 4, IN_F), torch.zeros(len(COUNTS), OUT_F, 4)
    experts = QuantLoRAExperts.from_quantized(qws, A, B, LORA, K_QUANT)
    linear = QuantLoRALinear.from_quantized(qws[0], A[0], B[0], LORA, K_QUANT)
    for layer in (experts, linear):
        assert (layer.bits, layer.quant_config.grid) == (4, "q4_0")
    torch.testing.assert_close(experts.dequantize(), torch.stack([q.dequantize() for q in qws]), rtol=0, atol=0)
    torch.testing.assert_close(linear.dequantize(), qws[0].dequantize(), rtol=0, atol=0)


def test_a_moe_model_prepares_saves_and_loads_on_a_k_quant_grid(tmp_path):
    from tiny_moe import tiny_moe, tiny_moe_calib

    model = ce.prepare_model(tiny_moe("qwen3_moe"), K_QUANT, LORA)
    assert {m.bits for m in model.modules() if isinstance(m, QuantLoRAExperts)} == {4}
    x = tiny_moe_calib(1, seed=3)[0]
    ce.save_pretrained(model, str(tmp_path / "ckpt"))
    loaded = ce.load_pretrained(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
