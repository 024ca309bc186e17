"""NF4 on real MiniLM weights: codes on the codebook, nearest level, absmax blocks, error."""
import pytest
import torch

import cloq_engine as ce
from cloq_engine.formats import NF4_CODEBOOK
from cloq_engine.quant.nf4 import nearest_nf4

MAX_HALF_GAP = float((NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()) / 2

QUERY = "encoder.layer.1.attention.self.query"  # 384 -> 384
INTERMEDIATE = "encoder.layer.4.intermediate.dense"  # 384 -> 1536
REAL_LAYERS = (QUERY, INTERMEDIATE)


def _nf4(W, group_size=64):
    return ce.quantize_weight(W, ce.QuantConfig(bits=4, group_size=group_size, method="nf4"))


@pytest.mark.parametrize("name", REAL_LAYERS)
@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_nf4_picks_the_nearest_codebook_level_of_the_block_absmax(real_layer, name, group_size):
    W, _, _ = real_layer(name)
    qw = _nf4(W, group_size)
    g = qw.effective_group_size
    assert qw.zeros is None and qw.method == "nf4" and qw.scales.dtype == torch.float16
    absmax = W.abs().reshape(W.shape[0], -1, g).amax(dim=2)  # (N, G)
    torch.testing.assert_close(qw.scales.float().t(), absmax, rtol=2**-11, atol=0)
    scale = qw.scales.float().repeat_interleave(g, dim=0).t()
    codes = qw.codes().t()
    level = NF4_CODEBOOK[codes]
    assert torch.equal(qw.dequantize(), level * scale)
    # nearest: no other level is closer to W / absmax
    dist = ((W / scale).unsqueeze(-1) - NF4_CODEBOOK).abs()
    assert (dist.gather(-1, codes.unsqueeze(-1)).squeeze(-1) <= dist.min(dim=-1).values + 1e-6).all()


@pytest.mark.parametrize("name", REAL_LAYERS)
def test_nf4_error_is_bounded_by_half_the_widest_gap(real_layer, name):
    W, _, _ = real_layer(name)
    qw = _nf4(W)
    scale = qw.scales.float().repeat_interleave(64, dim=0).t()
    err = W - qw.dequantize()
    assert (err.abs() <= MAX_HALF_GAP * scale * (1 + 1e-3)).all()
    assert err.norm() / W.norm() < 0.12


@pytest.mark.parametrize("name", REAL_LAYERS)
def test_nf4_beats_two_and_three_bit_rtn_and_is_close_to_four_bit_rtn(real_layer, name):
    W, _, _ = real_layer(name)
    nf4 = ((W - _nf4(W).dequantize()) ** 2).sum()
    rtn = {b: ((W - ce.quantize_weight(W, ce.QuantConfig(bits=b, group_size=64, method="rtn")).dequantize()) ** 2).sum()
           for b in (3, 4)}
    assert nf4 < rtn[3]
    assert nf4 < 1.5 * rtn[4]


def test_nf4_all_zero_block_dequantizes_to_zero():
    W = torch.randn(4, 128)
    W[1, :64] = 0
    Q = _nf4(W).dequantize()
    assert torch.isfinite(Q).all() and (Q[1, :64] == 0).all()


def test_nearest_nf4_maps_levels_to_themselves_and_clamps_outside():
    assert torch.equal(nearest_nf4(NF4_CODEBOOK), torch.arange(16))
    assert nearest_nf4(torch.tensor([-3.0, 3.0])).tolist() == [0, 15]
