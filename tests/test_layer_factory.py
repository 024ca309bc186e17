"""layer_factory.py: shared-H groups quantized once, split by rows exactly; from_linear builds subclasses."""
import pytest
import torch
from torch import nn

import cloq_engine as ce
from cloq_engine import layer_factory


def _H(k, seed=0):
    X = torch.randn(256, k, generator=torch.Generator().manual_seed(seed))
    return X.t() @ X


@pytest.mark.parametrize("method, bits", [("gptq", 2), ("gptq", 3), ("rtn", 4), ("nf4", 4)])
def test_split_rows_is_exact(method, bits):
    W = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    qc = ce.QuantConfig(bits=bits, group_size=32, method=method)
    qw = ce.quantize_weight(W, qc, H=_H(64))
    parts = layer_factory.split_rows(qw, [32, 16, 48])
    torch.testing.assert_close(torch.cat([p.dequantize() for p in parts]), qw.dequantize(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not add up"):
        layer_factory.split_rows(qw, [32, 32])


@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_gptq_matches_layer_by_layer(act_order):
    """One GPTQ on q/k/v stacked is GPTQ on each: rows are independent."""
    g = torch.Generator().manual_seed(2)
    Ws = [torch.randn(n, 64, generator=g) for n in (64, 32, 32)]
    H = _H(64)
    qc = ce.QuantConfig(bits=2, group_size=32, method="gptq", act_order=act_order)
    stacked = layer_factory.quantize_group(Ws, qc, H)
    for W, qw in zip(Ws, stacked):
        alone = ce.quantize_weight(W, qc, H=H)
        assert qw.shape == alone.shape
        torch.testing.assert_close(qw.dequantize(), alone.dequantize(), rtol=1e-3, atol=1e-3)


def test_from_linear_builds_the_subclass_and_keeps_bias_and_dtype():
    class MyLayer(ce.QuantLoRALinear):
        pass

    lin = nn.Linear(64, 32, bias=True).to(torch.bfloat16)
    layer = MyLayer.from_linear(lin, ce.QuantConfig(bits=4, group_size=32, method="rtn"), ce.LoRAConfig(rank=4, init="zero"))
    assert type(layer) is MyLayer and layer.lora_A.dtype == torch.float32  # trainable factors: float32
    assert layer.base_dtype == layer.bias.dtype == layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.bias, lin.bias) and not layer.bias.requires_grad
