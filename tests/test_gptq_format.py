"""GPTQ on-disk layout: import/export against an unpacker written here from the public description
(AutoGPTQ's pack loop: codes along K, zeros along N, LSB first; 3 bits in 32-value / 3-word runs
whose values 10 and 21 straddle words), bit-exact round trips for 2/3/4 bits, v1/v2, act-order."""
import json

import pytest
import torch

import cloq_engine as ce
from cloq_engine import gptq_format as gf


def reference_unpack(words, bits, length):
    """Values [length, M] of int32 words packed along dim 0, one value at a time, as the spec reads.

    2/4 bits: value i is bits [bits*(i % (32/bits)), ...) of word i // (32/bits).
    3 bits: a run of 32 values in 3 words w0, w1, w2: values 0-9 at bits 3j of w0; value 10 = bits
    30-31 of w0 (low two bits) + bit 0 of w1 (high bit); values 11-20 at bits 3j+1 of w1; value 21 =
    bit 31 of w1 (low bit) + bits 0-1 of w2 (high two bits); values 22-31 at bits 3j+2 of w2.
    """
    u = [[int(x) & 0xFFFFFFFF for x in row] for row in words.tolist()]
    M = len(u[0])
    out = [[0] * M for _ in range(length)]
    for m in range(M):
        if bits in (2, 4):
            per = 32 // bits
            for i in range(length):
                out[i][m] = (u[i // per][m] >> (bits * (i % per))) & ((1 << bits) - 1)
            continue
        for run in range(length // 32):
            w0, w1, w2 = (u[3 * run + t][m] for t in range(3))
            vals = [(w0 >> (3 * j)) & 7 for j in range(10)]
            vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
            vals += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
            vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
            vals += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
            for j, v in enumerate(vals):
                out[32 * run + j][m] = v
    return torch.tensor(out, dtype=torch.int64)


def reference_dequantize(t, bits, group_size, checkpoint_format):
    """W (out, in) from GPTQ tensors, through the reference unpacker and g_idx."""
    k = t["qweight"].shape[0] * 32 // bits
    n = t["scales"].shape[1]
    q = reference_unpack(t["qweight"], bits, k)  # [K, N]
    z = reference_unpack(t["qzeros"].t().contiguous(), bits, n).t()  # [G, N]
    if checkpoint_format == "gptq":
        z = z + 1
    g = t["g_idx"].long()
    return ((q - z[g]).double() * t["scales"].double()[g]).t()


def _random_gptq(bits, k=128, n=64, group_size=32, act_order=False, checkpoint_format="gptq", seed=0):
    """Random but valid GPTQ tensors (zeros in [1, 2^bits) so they are valid v1 and v2)."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 1 << bits, (k, n), generator=g)
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 1e-3).half()
    g_idx = torch.arange(k) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    return {"qweight": gf.pack_stream(codes, bits), "qzeros": gf.pack_stream(stored.t(), bits).t().contiguous(),
            "scales": scales, "g_idx": g_idx.int()}, codes


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_stream_matches_the_reference_unpacker(bits):
    codes = torch.randint(0, 1 << bits, (96, 5), generator=torch.Generator().manual_seed(bits))
    words = gf.pack_stream(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 5)
    assert torch.equal(reference_unpack(words, bits, 96), codes)
    assert torch.equal(gf.unpack_stream(words, bits, 96), codes)


def test_three_bit_values_straddle_words_as_gptq_lays_them_out():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b101  # low two bits at the top of word 0, high bit at the bottom of word 1
    codes[21, 0] = 0b011  # low bit at the top of word 1, high two bits at the bottom of word 2
    w = gf.pack_stream(codes, 3)[:, 0].tolist()
    assert [x & 0xFFFFFFFF for x in w] == [0b01 << 30, 1 | (1 << 31), 0b01]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_import_is_bit_exact_and_export_round_trips(bits, checkpoint_format, act_order):
    t, _ = _random_gptq(bits, act_order=act_order, checkpoint_format=checkpoint_format, seed=bits)
    qw = gf.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 32, checkpoint_format)
    assert (qw.perm is not None) == act_order
    want = reference_dequantize(t, bits, 32, checkpoint_format)
    assert torch.equal(qw.dequantize().double(), want)
    back = gf.to_gptq(qw, checkpoint_format)
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[key], t[key]), key
    # and our weight -> GPTQ -> our weight is the identity, state dict included
    again = gf.from_gptq(back["qweight"], back["qzeros"], back["scales"], back["g_idx"], bits, 32, checkpoint_format)
    for key, value in qw.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_our_gptq_weights_export_to_the_layout_the_reference_reads(bits):
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 128, generator=g)
    X = torch.randn(256, 128, generator=g)
    qw = ce.quantize_weight(W, ce.QuantConfig(bits=bits, group_size=64, method="gptq"), X.t() @ X)
    t = gf.to_gptq(qw, "gptq_v2")
    assert torch.equal(reference_dequantize(t, bits, 64, "gptq_v2").float(), qw.dequantize())
    assert t["qweight"].shape == (128 * bits // 32, 64) and t["qzeros"].shape == (2, 64 * bits // 32)


def test_v1_cannot_store_a_zero_point_of_zero():
    qw = ce.quantize_weight(torch.rand(32, 64), ce.QuantConfig(bits=4, group_size=32, method="rtn"))  # all >= 0
    assert float(qw.zeros.min()) == 0
    with pytest.raises(ValueError, match="gptq_v2"):
        gf.to_gptq(qw, "gptq")
    t = gf.to_gptq(qw, "gptq_v2")
    assert torch.equal(gf.from_gptq(**t, bits=4, group_size=32, checkpoint_format="gptq_v2").dequantize(),
                       qw.dequantize())


@pytest.mark.parametrize("kwargs, match", [
    (dict(checkpoint_format="gptq_v3"), "checkpoint_format"),
    (dict(bits=8), "bits"),
    (dict(g_idx=torch.zeros(128, dtype=torch.int32)), "g_idx"),
    (dict(group_size=48), "group_size"),
])
def test_from_gptq_rejects_bad_input(kwargs, match):
    t, _ = _random_gptq(4)
    args = dict(t, bits=4, group_size=32, checkpoint_format="gptq") | kwargs
    with pytest.raises(ValueError, match=match):
        gf.from_gptq(**args)


def test_act_order_import_computes_the_layer_output_with_permuted_inputs():
    t, _ = _random_gptq(4, act_order=True)
    qw = gf.from_gptq(**t, bits=4, group_size=32)
    x = torch.randn(3, 128)
    from cloq_engine.backends import torch_ref

    stored = torch_ref.dequantize(qw)  # columns in perm order
    torch.testing.assert_close(x[:, qw.perm] @ stored.t(), x @ qw.dequantize().t())


def test_checkpoint_directory_reads_every_layer(tmp_path):
    from safetensors.torch import save_file

    t, _ = _random_gptq(3, act_order=True, checkpoint_format="gptq")
    save_file({f"model.layers.0.mlp.up_proj.{k}": v for k, v in t.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 32, "desc_act": True}))
    weights = gf.load_gptq_weights(str(tmp_path))
    assert list(weights) == ["model.layers.0.mlp.up_proj"]
    assert torch.equal(weights["model.layers.0.mlp.up_proj"].dequantize().double(),
                       reference_dequantize(t, 3, 32, "gptq"))


def test_layer_built_from_an_act_order_import_matches_its_dense_weight_forward_and_backward():
    t, _ = _random_gptq(4, act_order=True)
    qw = gf.from_gptq(**t, bits=4, group_size=32)
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 128, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1
    lc = ce.LoRAConfig(rank=4, alpha=8)
    layer = ce.QuantLoRALinear.from_quantized(qw, A, B, lc, ce.QuantConfig(bits=4, group_size=32, method="gptq"))
    x = torch.randn(5, 128, requires_grad=True)
    y = layer(x)
    dense = qw.dequantize() + lc.scaling * B @ A
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.merged_weight(), dense)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 64) @ dense, rtol=1e-4, atol=1e-4)
