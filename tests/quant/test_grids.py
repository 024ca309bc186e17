"""llama.cpp grids: every group's (scale, zero) on the GGUF type's lattice, checked against the
lattice's own definition (a super-scale d, dmin per 256 columns, small integers per group)."""
import pytest
import torch

import cloq_engine as ce
from cloq_engine.quant import grids

GRID_CASES = [("q4_1", 4, False), ("q4_k", 4, False), ("q3_k", 3, True), ("q2_k", 2, False)]


def _weights(n=48, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.02
    W[:3] *= 40  # rows of very different ranges share no super-scale
    W[5, :64] = 0  # an all-zero stretch
    X = torch.randn(1024, k, generator=g) @ (torch.eye(k) + 0.1 * torch.randn(k, k, generator=g))
    return W, X.T @ X


def _on_lattice(qw, grid):
    """Whether (s, z) of every group satisfy the ggml type's equations, from their float16 values."""
    s = qw.scales.double().t()  # [N, G]
    z = qw.zeros.double().t()
    f16 = lambda x: bool((x.half().double() == x).all())  # noqa: E731
    if grid == "q4_1":
        return f16(s * z)
    n = s.shape[0]
    s, z = s.reshape(n, -1, 8), z.reshape(n, -1, 8)  # 8 groups of 32 per super-block
    top = {"q4_k": 63, "q3_k": 31, "q2_k": 15}[grid]

    def has_super(v):  # a float16 D with every v / D an integer 0..top
        ok = torch.zeros(v.shape[:2], dtype=torch.bool)
        for c in range(1, top + 1):
            D = v.amax(-1) / c
            q = v / D.unsqueeze(-1)
            ok |= (D.half().double() == D) & ((q == q.round()) & (q <= top)).all(-1) | (v.amax(-1) == 0)
        return bool(ok.all())

    if grid == "q3_k":
        return bool((z == 4).all()) and has_super(s)
    return has_super(s) and has_super(s * z)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("grid,bits,sym", GRID_CASES)
def test_every_group_is_on_the_lattice(grid, bits, sym, method):
    W, H = _weights()
    qw = ce.quantize_weight(W, ce.QuantConfig(bits=bits, group_size=32, method=method, sym=sym, grid=grid), H=H)
    assert _on_lattice(qw, grid)
    # our own grid is not on it (so the check can fail)
    own = ce.quantize_weight(W, ce.QuantConfig(bits=bits, group_size=32, method=method, sym=sym), H=H)
    assert not _on_lattice(own, grid)


@pytest.mark.parametrize("grid,bits,sym", GRID_CASES)
def test_gptq_on_the_grid_beats_rtn_on_it_and_stays_near_our_own_grid(grid, bits, sym):
    W, H = _weights(k=768)
    err = lambda Q: float(((W - Q) @ H * (W - Q)).sum() / ((W @ H) * W).sum())  # noqa: E731
    cfg = dict(bits=bits, group_size=32, sym=sym)
    on_grid = err(ce.quantize_weight(W, ce.QuantConfig(method="gptq", grid=grid, **cfg), H=H).dequantize())
    rtn = err(ce.quantize_weight(W, ce.QuantConfig(method="rtn", grid=grid, **cfg)).dequantize())
    own = err(ce.quantize_weight(W, ce.QuantConfig(method="gptq", **cfg), H=H).dequantize())
    assert on_grid < rtn
    assert on_grid < 1.5 * own


def test_a_layer_whose_width_is_not_a_multiple_of_256_falls_back_as_llama_cpp_does():
    cfg = ce.QuantConfig(bits=4, group_size=32, method="rtn", grid="q4_k")
    assert grids.grid_for(cfg, 576).name == "q4_1" and grids.grid_for(cfg, 512).name == "q4_k"
    W, _ = _weights(k=576)
    assert _on_lattice(ce.quantize_weight(W, cfg), "q4_1")
    for grid, bits, sym in (("q2_k", 2, False), ("q3_k", 3, True)):  # llama.cpp: Q2_K/Q3_K -> Q4_0, at 4 bits
        cfg = ce.QuantConfig(bits=bits, group_size=32, method="rtn", grid=grid, sym=sym)
        assert grids.grid_for(cfg, 576).name == "q4_0" and grids.grid_for(cfg, 512).name == grid
        assert grids.layer_config(cfg, 512) is cfg
        lc = grids.layer_config(cfg, 576)
        assert (lc.bits, lc.sym, lc.grid) == (4, True, "q4_0")
        qw = ce.quantize_weight(W, cfg)
        assert qw.bits == 4 and bool((qw.zeros == 8).all())


def test_records_from_before_grid_fallback_keep_the_configs_bits():
    """A q2_k checkpoint written before the field held its 576-wide layers at 2 bits on our own grid:
    read back so (its packed shapes depend on it)."""
    old = {"bits": 2, "group_size": 32, "method": "gptq", "sym": False, "grid": "q2_k"}
    qc = ce.QuantConfig.from_dict(old)
    assert qc.grid_fallback == "same-bits"
    assert grids.grid_for(qc, 576).name == "own" and grids.layer_config(qc, 576).bits == 2
    assert ce.QuantConfig.from_dict(qc.to_dict()) == qc
    assert ce.QuantConfig.from_dict({**old, "grid_fallback": "llama.cpp"}).grid_fallback == "llama.cpp"
    with pytest.raises(ValueError, match="grid_fallback"):
        ce.QuantConfig(bits=2, group_size=32, grid="q2_k", grid_fallback="q8_0")


def test_q4_0_is_gguf_q4_0_and_uses_the_signed_extreme():
    """ggml's Q4_0 puts the value of largest magnitude on code 0 (d = max / -8, d of either sign):
    a group whose extreme is positive gets a negative scale, and codes reach all of -8..7."""
    W, H = _weights(k=256)
    W[0, :32] = torch.linspace(-0.1, 0.8, 32)  # positive extreme
    for method in ("rtn", "gptq"):
        qw = ce.quantize_weight(W, ce.QuantConfig(bits=4, group_size=32, method=method, sym=True, grid="q4_0"), H=H)
        assert bool((qw.zeros == 8).all())
        assert float(qw.scales[0, 0]) < 0
    rtn = dict(bits=4, group_size=32, method="rtn", sym=True)
    err = float(((W - ce.quantize_weight(W, ce.QuantConfig(grid="q4_0", **rtn)).dequantize()) ** 2).sum())
    own = float(((W - ce.quantize_weight(W, ce.QuantConfig(**rtn)).dequantize()) ** 2).sum())
    assert err < own  # the full signed range beats our symmetric 2·amax/15


def test_no_grid_is_our_own_lattice_unchanged():
    W, H = _weights()
    a = ce.quantize_weight(W, ce.QuantConfig(bits=3, group_size=32, method="gptq"), H=H)
    b = ce.quantize_weight(W, ce.QuantConfig(bits=3, group_size=32, method="gptq", grid=None), H=H)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(bits=4, group_size=32, grid="q5_k"), "`grid` must be None or one of"),
    (dict(bits=4, group_size=32, grid="q2_k"), "needs bits=2"),
    (dict(bits=3, group_size=64, grid="q3_k", sym=True), "group_size=32"),
    (dict(bits=3, group_size=32, grid="q3_k"), "sym=True"),
    (dict(bits=4, group_size=32, grid="q4_1", method="nf4"), "method 'rtn' or 'gptq'"),
    (dict(bits=4, group_size=32, grid="q4_1", mse_clip=True), "mse_clip"),
])
def test_grid_config_errors_name_the_field(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ce.QuantConfig(**kwargs)


def test_grid_round_trips_through_the_config_dict():
    qc = ce.QuantConfig(bits=2, group_size=32, grid="Q2_K")
    assert qc.grid == "q2_k" and ce.QuantConfig.from_dict(qc.to_dict()) == qc


def test_a_group_past_its_super_blocks_range_still_lands_on_the_lattice():
    """GPTQ's error feedback can move a group beyond the (d, dmin) fitted at its super-block's start
    (caught by the GGUF export of a tiny Llama): the fit clamps (sc, m) to the lattice."""
    g = torch.Generator().manual_seed(0)
    for shift in torch.linspace(0.0, 0.3, 16).tolist():  # min-max fits landing on every sub-block scale
        w = torch.randn(64, 32, generator=g) * (1 + 3 * torch.rand(64, 1, generator=g)) + shift
        d = torch.full((64,), 2.0**-2)
        dmin = torch.full((64,), 2.0**-7)  # far too small for these mins: -xmin / dmin > 15
        scale, zero = grids.GRIDS["q2_k"].fit_group(w, (d, dmin))
        sc, m = scale.double() / d.double(), scale.double() * zero.double() / dmin.double()
        assert bool(((sc == sc.round()) & (sc >= 1) & (sc <= 15)).all())
        assert bool(((m == m.round()) & (m >= 0) & (m <= 15)).all())
