"""SYRK Gram accumulation H += X^T X."""
import pytest
import torch
from kernel_testing import assert_rel_close, randn

from cloq_engine.kernels.gram_syrk import gram_syrk


@pytest.mark.parametrize("T,K,dtype", [(45, 70, torch.float32), (64, 40, torch.float16), (1, 33, torch.float32)])
def test_accumulates_upper_and_mirrored_tiles(T, K, dtype):
    x = randn(T, K, dtype=dtype)
    H0 = randn(K, K, seed=5)
    H = gram_syrk(H0.clone(), x)
    assert_rel_close(H, H0.double() + x.double().t() @ x.double(), 1e-6, "H")


def test_two_batches_equal_one_concatenated(minilm_inputs):
    x = next(iter(minilm_inputs.values()))[:96]  # real MiniLM activations
    H = torch.zeros(x.shape[1], x.shape[1])
    gram_syrk(H, x[:40])
    gram_syrk(H, x[40:])
    assert_rel_close(H, x.double().t() @ x.double(), 1e-6, "H")
    torch.testing.assert_close(H, H.t(), rtol=0, atol=0)


def test_non_float32_accumulator_is_rejected():
    with pytest.raises(ValueError, match="float32"):
        gram_syrk(torch.zeros(8, 8, dtype=torch.float64), randn(4, 8))
