"""GramAccumulator: fp32 (or fp64) accumulation of X^T X from fp16/bf16/fp32 activations."""
import warnings

import pytest
import torch

import cloq_engine as ce
from cloq_engine.linalg import DampingWarning, damped_cholesky


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_accumulates_gram_in_float32(dtype, tol):
    torch.manual_seed(0)
    chunks = [torch.randn(2, 7, 24).to(dtype) for _ in range(3)]
    acc = ce.GramAccumulator(24)
    for c in chunks:
        acc.add(c)
    X = torch.cat([c.reshape(-1, 24) for c in chunks]).double()
    assert acc.H.dtype == torch.float32 and acc.count == 42
    torch.testing.assert_close(acc.H.double(), X.t() @ X, rtol=tol, atol=tol * 10)


def test_float64_option_and_errors():
    acc = ce.GramAccumulator(8, dtype=torch.float64, name="blk.q")
    acc.add(torch.randn(5, 8))
    assert acc.H.dtype == torch.float64
    with pytest.raises(ValueError, match="in_features=8"):
        acc.add(torch.randn(5, 9))
    with pytest.raises(ValueError, match=r"'blk\.q'.*NaN"):
        acc.add(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(ValueError, match="dtype"):
        ce.GramAccumulator(8, dtype=torch.float16)


def test_damped_cholesky_grows_damping_once_on_singular_h():
    X = torch.randn(3, 10, dtype=torch.float64)
    H = X.t() @ X  # rank 3
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        L, lam = damped_cholesky(H, damp=0.0)
    assert sum(issubclass(x.category, DampingWarning) for x in w) == 1 and lam > 0
    torch.testing.assert_close(L @ L.t(), H + lam * torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError):
        damped_cholesky(-torch.eye(4))
