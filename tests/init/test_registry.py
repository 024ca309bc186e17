"""One registry per stage: every method is registered once, and LoRAConfig's init fields reach the solvers."""
import pytest
import torch

import cloq_engine as ce
from cloq_engine.config import InitMethod, QuantMethod
from cloq_engine.init import get_init, init_options, initialize, register_init
from cloq_engine.quant import get_quantizer, needs_calibration, register_quantizer

RTN2 = ce.QuantConfig(bits=2, group_size=32, method="rtn")


def _layer(out=24, inp=64, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) / 8
    return torch.randn(out, inp, generator=g), X.t() @ X


def test_every_method_has_exactly_one_registered_solver():
    assert {m: get_init(m).needs_H for m in InitMethod} == {
        InitMethod.CLOQ: True, InitMethod.QUAILORA: True, InitMethod.LOFTQ: False, InitMethod.SVD: False,
        InitMethod.ZERO: False}
    assert [m for m in InitMethod if get_init(m).requantizes] == [InitMethod.LOFTQ]
    assert [m for m in QuantMethod if needs_calibration(m)] == [QuantMethod.GPTQ]
    with pytest.raises(ValueError, match="already registered"):
        register_init(InitMethod.CLOQ, needs_H=True)(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer(QuantMethod.RTN, needs_H=False)(lambda *a: None)
    assert get_quantizer(QuantMethod.GPTQ).fn.__name__ == "quantize_gptq"


def test_init_options_come_from_the_lora_config_for_the_methods_that_take_them():
    lc = ce.LoRAConfig(init="quailora", init_solver="exact", init_power_iters=2, init_damp=1e-3, init_iters=3)
    assert init_options(lc) == dict(svd="exact", power_iters=2, damp=1e-3, iters=3)
    assert init_options(ce.LoRAConfig(init="cloq")) == dict(svd="auto", damp=1e-6)
    assert init_options(ce.LoRAConfig(init="zero", init_iters=3)) == {}
    assert init_options(ce.LoRAConfig(init="loftq", init_iters=2)) == dict(svd="auto", iters=2)


def test_initialize_runs_the_configured_quailora_sweeps():
    W, H = _layer()
    hist = {}
    for iters in (1, 30):
        lc = ce.LoRAConfig(rank=4, init="quailora", init_iters=iters)
        qw, A, B = initialize(W, RTN2, lc, H=H)
        hist[iters] = ce.init.calibrated_error(W - qw.dequantize(), H, A, B, lc.scaling)
    assert hist[30] < hist[1]


def test_initialize_loftq_alternations_come_from_init_iters():
    W, _ = _layer()
    one = initialize(W, RTN2, ce.LoRAConfig(rank=4, init="loftq", init_iters=1))
    qw, A, B = ce.init.init_loftq(W, RTN2, 4, scaling=4.0, num_iters=1)  # alpha 16 / rank 4
    torch.testing.assert_close(one[0].dequantize(), qw.dequantize())
    torch.testing.assert_close(one[2] @ one[1], B @ A)


def test_initialize_takes_the_layer_rank_from_rank_pattern():
    W, H = _layer()
    lc = ce.LoRAConfig(rank=4, alpha=8, rank_pattern={"q_proj": 8})
    _, A, B = initialize(W, RTN2, lc, H=H, name="model.layers.0.self_attn.q_proj")
    assert A.shape == (8, 64) and B.shape == (24, 8)
    _, A, _ = initialize(W, RTN2, lc, H=H, name="model.layers.0.self_attn.k_proj")
    assert A.shape == (4, 64)
