"""Bad inputs to quantize_weight: a specific ValueError for each."""
import pytest
import torch

import cloq_engine as ce

K = 64


def _W():
    return torch.randn(8, K, generator=torch.Generator().manual_seed(0))


def _H():
    X = torch.randn(256, K, generator=torch.Generator().manual_seed(1))
    return X.t() @ X


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _asymmetric(H):
    H = H.clone()
    H[0, 1] += 0.5 * H.abs().max()
    return H


BAD_W = [
    (lambda: _with(_W(), (0, 0), float("nan")), "NaN or Inf"),
    (lambda: _with(_W(), (3, 5), float("inf")), "NaN or Inf"),
    (lambda: _W().to(torch.int32), "unsupported dtype"),
    (lambda: _W().bool(), "unsupported dtype"),
    (lambda: _W()[0], "2-D"),
    (lambda: torch.zeros(0, K), "empty"),
    (lambda: _W()[:, :48], "not divisible by group_size"),
    (lambda: _with(_W(), (0, 0), 1e6), "float16 range"),
]


@pytest.mark.parametrize("method", ["rtn", "gptq", "nf4"])
@pytest.mark.parametrize("make_W,match", BAD_W)
def test_bad_weight_raises_value_error(method, make_W, match):
    with pytest.raises(ValueError, match=match):
        ce.quantize_weight(make_W(), ce.QuantConfig(bits=4, group_size=32, method=method), _H())


BAD_H = [
    (lambda: _with(_H(), (2, 2), float("nan")), "H contains NaN or Inf"),
    (lambda: _with(_H(), (0, 1), float("inf")), "H contains NaN or Inf"),
    (lambda: _H()[:32, :32], r"H must have shape \(64, 64\)"),
    (lambda: _H()[0], r"H must have shape \(64, 64\)"),
    (lambda: _asymmetric(_H()), "not symmetric"),
    (lambda: _with(_H(), (4, 4), -1.0), "negative diagonal"),
    (lambda: _H().to(torch.int64), "H has unsupported dtype"),
]


@pytest.mark.parametrize("make_H,match", BAD_H)
def test_bad_hessian_raises_value_error(make_H, match):
    with pytest.raises(ValueError, match=match):
        ce.quantize_weight(_W(), ce.QuantConfig(bits=4, group_size=32, method="gptq"), make_H())


def test_gptq_without_h_raises_value_error():
    with pytest.raises(ValueError, match="needs the calibration Gram matrix `H`"):
        ce.quantize_weight(_W(), ce.QuantConfig(bits=4, group_size=32, method="gptq"))


def test_config_must_be_a_quant_config():
    with pytest.raises(TypeError, match="QuantConfig"):
        ce.quantize_weight(_W(), {"bits": 4})
