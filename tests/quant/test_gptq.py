"""GPTQ on real MiniLM layers: beats RTN in the calibrated norm, matches a textbook column-by-column
GPTQ, act-order with static groups, dead columns, automatic damping."""
import warnings

import pytest
import torch

import cloq_engine as ce
from cloq_engine.quant import rtn
from cloq_engine.quant.gptq import damped_inverse_cholesky

QUERY = "encoder.layer.1.attention.self.query"  # 384 -> 384
INTERMEDIATE = "encoder.layer.4.intermediate.dense"  # 384 -> 1536
REAL_LAYERS = (QUERY, INTERMEDIATE)


def textbook_gptq(W, H, bits, group_size, damp=0.01, order=None):
    """The plain OBQ/GPTQ recursion in float64, one column at a time, no blocks, no Cholesky.

    Columns are visited in ``order`` (default: left to right). Keep ``Hinv``, the inverse Hessian
    of the columns not yet quantized. Quantize column j, spread its error
    ``e = (w_j - q_j) / Hinv[j, j]`` over the remaining columns through row j of Hinv, then
    eliminate j from Hinv. Groups are fitted when their first column comes up (on the
    error-updated columns), or all at the start when an ``order`` is given (static groups).
    """
    k = W.shape[1]
    g = k if group_size == -1 else group_size
    maxq = 2**bits - 1
    static = order is not None or group_size == -1
    params = {}
    if static:
        params = {c // g: rtn.find_params(W[:, c : c + g], bits, sym=False) for c in range(0, k, g)}
    perm = torch.arange(k) if order is None else torch.as_tensor(order)
    W = W.double()[:, perm].clone()
    Hp = H.double()[perm][:, perm]
    Hinv = torch.linalg.inv(Hp + damp * Hp.diag().mean() * torch.eye(k, dtype=torch.float64))
    Q = torch.zeros_like(W)
    for j in range(k):
        c = int(perm[j])  # original column index
        if c % g == 0 and not static:
            params[c // g] = rtn.find_params(W[:, j : j + g], bits, sym=False)
        scale, zero = (p.double() for p in params[c // g])
        Q[:, j] = (torch.clamp(torch.round(W[:, j] / scale) + zero, 0, maxq) - zero) * scale
        e = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1 :] -= torch.outer(e, Hinv[j, j + 1 :])
        Hinv[j + 1 :, j + 1 :] -= torch.outer(Hinv[j + 1 :, j], Hinv[j, j + 1 :]) / Hinv[j, j]
    return Q[:, torch.argsort(perm)].float()


def _gptq(W, H, **kwargs):
    return ce.quantize_weight(W, ce.QuantConfig(method="gptq", **kwargs), H)


@pytest.mark.parametrize("name", REAL_LAYERS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_calibrated_error_is_below_rtn(real_layer, calibrated_error, name, bits):
    W, _, H = real_layer(name)
    rtn_err = calibrated_error(W, ce.quantize_weight(W, ce.QuantConfig(bits=bits, method="rtn")).dequantize(), H)
    gptq_err = calibrated_error(W, _gptq(W, H, bits=bits).dequantize(), H)
    assert gptq_err < 0.95 * rtn_err


@pytest.mark.parametrize(
    "name,bits,group_size,act_order",
    [
        (QUERY, 2, 128, False),
        (QUERY, 3, 32, False),
        (QUERY, 4, -1, False),
        (QUERY, 3, 64, True),
        (INTERMEDIATE, 2, 64, False),
        (INTERMEDIATE, 4, 128, True),
    ],
)
def test_gptq_matches_textbook_gptq(real_layer, calibrated_error, name, bits, group_size, act_order):
    W, _, H = real_layer(name)
    W = W[:192]  # rows are independent given H: a slice keeps the test fast
    # block_size 48 does not align with the groups: group starts fall inside blocks
    qw = _gptq(W, H, bits=bits, group_size=group_size, act_order=act_order, block_size=48)
    order = torch.argsort(H.diag(), descending=True).tolist() if act_order else None
    reference = calibrated_error(W, textbook_gptq(W, H, bits, group_size, order=order), H)
    assert calibrated_error(W, qw.dequantize(), H) == pytest.approx(reference, rel=0.02)


@pytest.mark.parametrize("block_size", [1, 37, 384])
def test_block_size_does_not_change_the_result(real_layer, calibrated_error, block_size):
    W, _, H = real_layer(QUERY)
    W = W[:96]
    base = calibrated_error(W, _gptq(W, H, bits=3, group_size=32, block_size=128).dequantize(), H)
    other = calibrated_error(W, _gptq(W, H, bits=3, group_size=32, block_size=block_size).dequantize(), H)
    assert other == pytest.approx(base, rel=1e-3)


def test_act_order_keeps_format_and_uses_static_groups(real_layer, calibrated_error):
    W, _, H = real_layer(INTERMEDIATE)
    W = W[::4]  # every 4th output row: rows are independent given H
    plain = _gptq(W, H, bits=3, group_size=64)
    ordered = _gptq(W, H, bits=3, group_size=64, act_order=True)
    rtn_qw = ce.quantize_weight(W, ce.QuantConfig(bits=3, group_size=64, method="rtn"))
    for name in ("qweight", "scales", "zeros"):
        assert getattr(ordered, name).shape == getattr(plain, name).shape
        assert getattr(ordered, name).dtype == getattr(plain, name).dtype
    # static groups are fitted on the original columns, exactly as RTN fits them
    assert torch.equal(ordered.scales, rtn_qw.scales) and torch.equal(ordered.zeros, rtn_qw.zeros)
    assert calibrated_error(W, ordered.dequantize(), H) < calibrated_error(W, rtn_qw.dequantize(), H)


def test_group_scales_see_the_error_feedback(real_layer):
    W, _, H = real_layer(QUERY)
    qw = _gptq(W, H, bits=2, group_size=32)
    rtn_qw = ce.quantize_weight(W, ce.QuantConfig(bits=2, group_size=32, method="rtn"))
    assert torch.equal(qw.scales[0], rtn_qw.scales[0])  # the first group sees no feedback yet
    assert not torch.equal(qw.scales[1:], rtn_qw.scales[1:])


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_zero_and_the_rest_is_quantized(real_layer, calibrated_error, act_order):
    W, X, _ = real_layer(QUERY)
    X = X.clone()
    dead = torch.tensor([0, 5, 200, 383])
    X[:, dead] = 0
    H = X.t() @ X
    qw = _gptq(W, H, bits=4, group_size=32, act_order=act_order)
    Q = qw.dequantize()
    assert torch.isfinite(Q).all()
    assert (Q[:, dead] == 0).all()
    rtn_Q = ce.quantize_weight(W, ce.QuantConfig(bits=4, group_size=32, method="rtn")).dequantize()
    assert calibrated_error(W, Q, H) < calibrated_error(W, rtn_Q, H)


def _indefinite_gram(k=64, tokens=32, shift=0.05, seed=0):
    """X^T X of rank `tokens` < k, minus shift * mean(diag) * I: slightly indefinite, diag > 0."""
    X = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed))
    H = X.t() @ X
    return H - shift * H.diag().mean() * torch.eye(k)


def test_failed_cholesky_grows_damping_and_warns_once():
    H = _indefinite_gram()
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qw = _gptq(W, H, bits=4, group_size=32, damp=0.01)
    damping = [w for w in caught if "damp" in str(w.message)]
    assert len(damping) == 1
    assert "damp=0.1 " in str(damping[0].message)
    assert torch.isfinite(qw.dequantize()).all()


def test_well_conditioned_h_does_not_warn(real_layer):
    W, _, H = real_layer(QUERY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _gptq(W[:32], H, bits=4)


def test_hopelessly_indefinite_h_raises_value_error():
    k = 32
    H = torch.eye(k) - 0.5 * torch.ones(k, k) + 0.5 * torch.eye(k)  # diag 1, eigenvalue 1 - 16 along ones
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="Cholesky"):
            _gptq(torch.randn(4, k), H, bits=4, group_size=32)


def test_damped_inverse_cholesky_is_upper_factor_of_inverse():
    X = torch.randn(200, 48, generator=torch.Generator().manual_seed(2))
    H = X.t() @ X
    U = damped_inverse_cholesky(H, 0.01)
    Hd = H + 0.01 * H.diag().mean() * torch.eye(48)
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.t() @ U @ Hd, torch.eye(48), atol=1e-3, rtol=0)


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes_give_the_same_quantization(real_layer, calibrated_error, w_dtype, h_dtype):
    W, _, H = real_layer(QUERY)
    W, H = W[:64].to(w_dtype), H.to(h_dtype)
    base = calibrated_error(W.float(), _gptq(W.float(), H.float(), bits=3).dequantize(), H)
    assert calibrated_error(W.float(), _gptq(W, H, bits=3).dequantize(), H) == pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("sym", [False, True])
def test_dequantize_is_what_gptq_decided(real_layer, sym):
    """The stored codes, scales and zeros reproduce Q; sym keeps zeros at the middle code."""
    W, _, H = real_layer(QUERY)
    qw = _gptq(W[:48], H, bits=3, group_size=64, sym=sym)
    codes = qw.codes()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 7
    if sym:
        assert (qw.zeros == 4).all()
    Q = qw.dequantize()
    # every entry is on its group's grid: (Q / scale + zero) is a whole number in [0, maxq]
    grid = Q.t() / qw.scales.float().repeat_interleave(64, 0) + qw.zeros.float().repeat_interleave(64, 0)
    assert torch.allclose(grid, grid.round(), atol=1e-3)


def test_gptq_with_mse_clip_beats_rtn_with_mse_clip(real_layer, calibrated_error):
    W, _, H = real_layer(QUERY)
    W = W[:96]
    config = dict(bits=2, group_size=64, mse_clip=True)
    rtn_Q = ce.quantize_weight(W, ce.QuantConfig(method="rtn", **config)).dequantize()
    assert calibrated_error(W, _gptq(W, H, **config).dequantize(), H) < calibrated_error(W, rtn_Q, H)
