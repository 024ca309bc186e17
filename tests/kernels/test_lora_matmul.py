"""Strided low-rank products in float32."""
import pytest
import torch
from kernel_testing import assert_rel_close, randn

from cloq_engine.kernels.lora_matmul import lora_matmul


@pytest.mark.parametrize("P,T,Q,transpose_l", [(5, 70, 8, False), (37, 3, 16, True), (8, 33, 100, False)])
def test_product_with_transposed_operands(P, T, Q, transpose_l):
    L = randn(T, P).t() if transpose_l else randn(P, T)
    R = randn(Q, T, seed=4).t()
    c = lora_matmul(L, R, alpha=0.5)
    assert c.dtype == torch.float32
    assert_rel_close(c, 0.5 * L.double() @ R.double(), 1e-6, "C")


def test_half_inputs_are_upcast_and_output_dtype_honoured():
    L, R = randn(9, 40, dtype=torch.float16), randn(40, 16, dtype=torch.float16, seed=3)
    c = lora_matmul(L, R, out_dtype=torch.float16)
    assert c.dtype == torch.float16
    assert_rel_close(c, (L.double() @ R.double()).half(), 1e-3, "C")


def test_empty_reduction_gives_zeros():
    c = lora_matmul(torch.empty(4, 0), torch.empty(0, 8))
    assert torch.equal(c, torch.zeros(4, 8))


def test_mismatched_inner_sizes_are_rejected():
    with pytest.raises(ValueError, match="lora_matmul"):
        lora_matmul(randn(4, 5), randn(6, 8))
