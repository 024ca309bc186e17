"""The packed format: pack/unpack round trips and bit layout, QuantizedWeight persistence and
storage size, corrupt state dicts."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import cloq_engine as ce
from cloq_engine.formats import PACK_ALIGN, QuantizedWeight, pack_codes, packed_rows, padded_k, unpack_codes

PROPERTY = settings(max_examples=60, deadline=None)


def _random_codes(bits, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int64)


@PROPERTY
@given(bits=st.sampled_from([2, 3, 4]), k=st.integers(1, 300), n=st.integers(1, 7), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, k, n, seed):
    codes = _random_codes(bits, k, n, seed)
    qweight = pack_codes(codes, bits)
    assert qweight.dtype == torch.int32
    assert tuple(qweight.shape) == (packed_rows(k, bits), n) == (padded_k(k) * bits // 32, n)
    assert torch.equal(unpack_codes(qweight, bits, k), codes)


@PROPERTY
@given(bits=st.sampled_from([2, 3, 4]), k=st.integers(1, 200), data=st.data())
def test_single_code_lands_at_documented_word_and_bit(bits, k, data):
    """2/4 bits: code k at bit bits*(k % per_word) of word k // per_word. 3 bits: low 2 bits in a
    2-bit plane (rows [0, Kp/16)), high bit in a 1-bit plane (rows [Kp/16, 3Kp/32))."""
    pos = data.draw(st.integers(0, k - 1))
    value = data.draw(st.integers(1, 2**bits - 1))
    codes = torch.zeros(k, 1, dtype=torch.int64)
    codes[pos] = value
    words = pack_codes(codes, bits).to(torch.int64)[:, 0] & 0xFFFFFFFF
    expected = torch.zeros_like(words)
    if bits == 3:
        lo_rows = padded_k(k) // 16
        expected[pos // 16] |= (value & 3) << (2 * (pos % 16))
        expected[lo_rows + pos // 32] |= (value >> 2) << (pos % 32)
    else:
        per_word = 32 // bits
        expected[pos // per_word] = value << (bits * (pos % per_word))
    assert torch.equal(words, expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_all_ones_codes_fill_every_bit(bits):
    codes = torch.full((PACK_ALIGN * 3, 2), 2**bits - 1, dtype=torch.int64)
    assert (pack_codes(codes, bits) == -1).all()  # 0xFFFFFFFF as int32


@pytest.mark.parametrize(
    "codes,bits,match",
    [
        (torch.full((32, 2), 4), 2, r"\[0, 4\)"),
        (torch.full((32, 2), -1), 4, r"\[0, 16\)"),
        (torch.zeros(32, 2), 4, "integer"),
        (torch.zeros(32, dtype=torch.int64), 4, "2-D"),
        (torch.zeros(32, 2, dtype=torch.int64), 5, "`bits`"),
    ],
)
def test_pack_codes_rejects_bad_codes(codes, bits, match):
    with pytest.raises(ValueError, match=match):
        pack_codes(codes, bits)


def test_unpack_codes_rejects_wrong_row_count():
    qweight = pack_codes(torch.zeros(64, 3, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="rows"):
        unpack_codes(qweight, 4, 96)
    with pytest.raises(ValueError, match="int32"):
        unpack_codes(qweight.to(torch.int64), 4, 64)


def _quantized(method, bits, group_size, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=gen)
    config = ce.QuantConfig(bits=bits, group_size=group_size, method=method)
    H = None
    if method == "gptq":
        X = torch.randn(4 * k, k, generator=gen)
        H = X.t() @ X
    return W, ce.quantize_weight(W, config, H)


@pytest.mark.parametrize(
    "method,bits,group_size,n,k",
    [
        ("rtn", 2, 32, 5, 64),
        ("rtn", 3, -1, 1, 45),  # K not a multiple of 32: padded codes
        ("rtn", 4, 128, 3, 256),
        ("gptq", 3, 64, 4, 128),
        ("gptq", 2, -1, 2, 70),
        ("nf4", 4, 64, 3, 192),
        ("nf4", 4, -1, 1, 33),
    ],
)
def test_state_dict_round_trips_through_safetensors(tmp_path, method, bits, group_size, n, k):
    _, qw = _quantized(method, bits, group_size, n, k)
    path = tmp_path / "qw.safetensors"
    save_file(qw.state_dict(prefix="layer."), str(path))
    loaded = QuantizedWeight.from_state_dict(load_file(str(path)), prefix="layer.")
    assert (loaded.method, loaded.bits, loaded.group_size, loaded.shape) == (method, bits, group_size, qw.shape)
    assert (loaded.zeros is None) == (method == "nf4")
    assert torch.equal(loaded.dequantize(), qw.dequantize())


STORAGE_CASES = [("rtn", bits, g) for bits in (2, 3, 4) for g in (32, 64, 128, -1)] + [
    ("nf4", 4, g) for g in (32, 64, 128, -1)
]


@pytest.mark.parametrize("method,bits,group_size", STORAGE_CASES)
def test_storage_is_bits_plus_group_parameters(method, bits, group_size):
    n, k = 48, 1024
    _, qw = _quantized(method, bits, group_size, n, k)
    g = k if group_size == -1 else group_size
    per_group_bits = 16 if method == "nf4" else 32  # fp16 absmax | fp16 scale + fp16 zero
    assert qw.bits_per_weight <= bits + per_group_bits / g + 1e-9
    assert qw.nbytes == n * k * bits // 8 + n * (k // g) * per_group_bits // 8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_padding_costs_at_most_one_word_row_per_plane(bits):
    n, k = 8, 33  # padded to 64
    _, qw = _quantized("rtn", bits, -1, n, k)
    assert qw.qweight.numel() * 4 == n * 64 * bits // 8


def _corrupt(sd, key, value):
    sd = dict(sd)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    return sd


@pytest.mark.parametrize(
    "key,make_value,match",
    [
        ("qweight", lambda sd: None, "missing"),
        ("scales", lambda sd: None, "missing"),
        ("meta", lambda sd: None, "missing"),
        ("zeros", lambda sd: None, "zeros"),
        ("qweight", lambda sd: sd["qweight"][:-1], "qweight"),
        ("qweight", lambda sd: sd["qweight"].to(torch.int64), "qweight"),
        ("scales", lambda sd: sd["scales"][:, :-1], "scales"),
        ("zeros", lambda sd: sd["zeros"][:1], "zeros"),
        ("meta", lambda sd: torch.tensor([5, 32, 4, 64, 0], dtype=torch.int32), "bits"),
        ("meta", lambda sd: torch.tensor([2, 48, 4, 64, 0], dtype=torch.int32), "group_size"),
        ("meta", lambda sd: torch.tensor([2, 32], dtype=torch.int32), "corrupt"),
        ("meta", lambda sd: torch.tensor([2, 32, 4, 64, 9], dtype=torch.int32), "method"),
    ],
)
def test_corrupt_state_dict_raises_value_error(key, make_value, match):
    _, qw = _quantized("rtn", 2, 32, 4, 64)
    sd = qw.state_dict()
    with pytest.raises(ValueError, match=match):
        QuantizedWeight.from_state_dict(_corrupt(sd, key, make_value(sd)))


def test_nf4_state_dict_with_zeros_is_rejected():
    _, qw = _quantized("nf4", 4, 64, 4, 64)
    sd = qw.state_dict()
    sd["zeros"] = torch.zeros_like(sd["scales"])
    with pytest.raises(ValueError, match="zeros"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("method,bits,group_size", [("rtn", 3, 32), ("nf4", 4, 64)])
def test_dequantize_follows_the_documented_formula(method, bits, group_size):
    _, qw = _quantized(method, bits, group_size, 6, 128)
    codes = qw.codes().float()  # [K, N]
    scales = qw.scales.float().repeat_interleave(group_size, dim=0)
    if method == "nf4":
        expected = ce.formats.NF4_CODEBOOK[qw.codes()] * scales
    else:
        expected = (codes - qw.zeros.float().repeat_interleave(group_size, dim=0)) * scales
    assert torch.equal(qw.dequantize(), expected.t())
