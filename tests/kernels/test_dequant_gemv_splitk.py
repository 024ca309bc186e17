"""Split-K GEMV launcher (M <= 16) against the reference."""
import pytest
import torch
from kernel_testing import REL_TOL, assert_rel_close, make_lora, make_weight, randn

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.dequant_gemv_splitk import dequant_gemv_splitk, gemv_configs, prune_configs

N = 40


@pytest.mark.parametrize("m,bits,dtype", [(1, 3, torch.float32), (16, 2, torch.float16), (7, 4, torch.float32)])
def test_uneven_k_slices_sum_to_the_full_product(m, bits, dtype):
    K = 160  # 5 K tiles of 32 over 2 interleaved slices
    _, qw = make_weight(bits, 32, N, K)
    A, B = make_lora(8, N, K)
    x = randn(m, K, dtype=dtype)
    S = x.float() @ A.t()
    bias = randn(N, seed=8)
    y = dequant_gemv_splitk(x, qw.qweight, qw.scales, qw.zeros, None, S, B, bias, 2.0, bits, 32, K)
    y_ref, _ = torch_ref.forward(x, qw, A, B, 2.0, bias=bias)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, REL_TOL[dtype], "y")


def test_more_than_sixteen_rows_is_rejected():
    _, qw = make_weight(4, 32, N, 64)
    with pytest.raises(ValueError, match="M <= 16"):
        dequant_gemv_splitk(randn(17, 64), qw.qweight, qw.scales, qw.zeros, None, None, None, None, 1.0, 4, 32, 64)


def test_pruning_keeps_block_k_within_group_and_slices_nonempty():
    kept = prune_configs(gemv_configs(), {"group_size": 32, "num_groups": 8, "K": 256})
    assert kept
    assert all(c.kwargs["BLOCK_K"] <= 32 and c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"] <= 256 for c in kept)
