"""GramAccumulator: H = sum x^T x over (..., in) inputs, fp32 (or fp64) accumulation."""
import pytest
import torch

from cloq_engine import GramAccumulator


@pytest.mark.parametrize(
    "x_dtype, acc_dtype, rtol",
    [
        (torch.float16, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 1e-5),
        (torch.float32, torch.float32, 1e-5),
        (torch.float32, torch.float64, 1e-12),
        (torch.float64, torch.float64, 1e-12),
    ],
)
def test_gram_matches_fp64_reference_of_the_same_inputs(x_dtype, acc_dtype, rtol):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 17, 24, generator=g).to(x_dtype), torch.randn(9, 24, generator=g).to(x_dtype)]
    acc = GramAccumulator(24, dtype=acc_dtype)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 24).double() for x in xs])
    ref = X.T @ X
    assert acc.H.dtype == acc_dtype
    assert acc.count == 2 * 17 + 9
    torch.testing.assert_close(acc.H.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_gram_is_symmetric_psd():
    acc = GramAccumulator(16).add(torch.randn(5, 16))
    torch.testing.assert_close(acc.H, acc.H.T)
    assert float(torch.linalg.eigvalsh(acc.H.double()).min()) > -1e-6 * float(acc.H.abs().max())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_gram_nonfinite_activation_names_the_layer(bad):
    acc = GramAccumulator(4, name="model.layers.0.mlp.up_proj")
    x = torch.ones(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*NaN or Inf"):
        acc.add(x)
    assert acc.count == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GramAccumulator(0), "in_features"),
        (lambda: GramAccumulator(4, dtype=torch.float16), "dtype"),
        (lambda: GramAccumulator(4).add(torch.ones(2, 5)), "in_features=4"),
        (lambda: GramAccumulator(4).add(torch.ones(2, 4, dtype=torch.int32)), "dtype"),
    ],
)
def test_gram_rejects_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
