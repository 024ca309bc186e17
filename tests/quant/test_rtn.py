"""Round to nearest on real MiniLM weights: error bounds, sym vs asym, exact zeros, mse_clip."""
import pytest
import torch

import cloq_engine as ce
from cloq_engine.quant import rtn

QUERY = "encoder.layer.1.attention.self.query"  # 384 -> 384
INTERMEDIATE = "encoder.layer.4.intermediate.dense"  # 384 -> 1536
REAL_LAYERS = (QUERY, INTERMEDIATE)


def _rtn(W, **kwargs):
    return ce.quantize_weight(W, ce.QuantConfig(method="rtn", **kwargs))


def _expand(t, g):
    return t.float().repeat_interleave(g, dim=0).t()  # [G, N] -> (N, K)


@pytest.mark.parametrize("name", REAL_LAYERS)
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 128), (4, 64), (4, -1)])
def test_asym_error_is_at_most_half_a_step(real_layer, name, bits, group_size):
    W, _, _ = real_layer(name)
    qw = _rtn(W, bits=bits, group_size=group_size)
    g = qw.effective_group_size
    step = _expand(qw.scales, g)
    assert ((W - qw.dequantize()).abs() <= 0.5 * step * (1 + 1e-2) + 1e-7).all()
    codes = qw.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    zeros = qw.zeros.float()
    assert torch.equal(zeros, zeros.round()) and int(zeros.min()) >= 0 and int(zeros.max()) <= 2**bits - 1


@pytest.mark.parametrize("name", REAL_LAYERS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sym_has_a_fixed_middle_zero_and_more_error_than_asym(real_layer, name, bits):
    W, _, _ = real_layer(name)
    sym, asym = _rtn(W, bits=bits, sym=True), _rtn(W, bits=bits, sym=False)
    assert (sym.zeros == 2 ** (bits - 1)).all()
    assert len(torch.unique(asym.zeros)) > 1
    # symmetric grids spend levels on the side of the range a group does not use
    assert ((W - asym.dequantize()) ** 2).sum() < ((W - sym.dequantize()) ** 2).sum()


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_zeros_stay_exact(real_layer, bits, sym):
    W = real_layer(REAL_LAYERS[0])[0].clone()
    W[:, ::7] = 0
    W[5, :] = 0  # an all-zero row: every group of it has a zero range
    Q = _rtn(W, bits=bits, group_size=32, sym=sym).dequantize()
    assert (Q[:, ::7] == 0).all() and (Q[5] == 0).all()


@pytest.mark.parametrize("name", REAL_LAYERS)
@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False)])
def test_mse_clip_does_not_increase_any_rows_error(real_layer, name, bits, sym):
    W, _, _ = real_layer(name)
    plain = ((W - _rtn(W, bits=bits, group_size=64, sym=sym).dequantize()) ** 2).sum(dim=1)
    clipped = ((W - _rtn(W, bits=bits, group_size=64, sym=sym, mse_clip=True).dequantize()) ** 2).sum(dim=1)
    assert (clipped <= plain * (1 + 1e-6)).all()
    assert clipped.sum() < plain.sum()  # at low bits the search finds something on real weights


def test_find_params_matches_min_max_and_rounds_scales_to_float16():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    scale, zero = rtn.find_params(w, bits=2, sym=False)
    assert torch.equal(scale, scale.half().float())
    assert scale[0] == torch.tensor(3.0 / 3).half().float()
    assert zero[0] == 1  # round(1 / 1)
    assert scale[1] == torch.tensor(0.3 / 3).half().float() and zero[1] == 0  # range includes 0
    assert scale[2] > 0 and torch.isfinite(scale).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_only_changes_the_input(real_layer, dtype):
    W = real_layer(REAL_LAYERS[0])[0][:32]
    Wd = W.to(dtype)
    assert torch.equal(_rtn(Wd, bits=3).dequantize(), _rtn(Wd.float(), bits=3).dequantize())
