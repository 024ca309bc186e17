"""Tiled GEMM launcher: Y = X·Ŵ^T (+ scaling·S·B^T) (+ bias) against the reference."""
import pytest
import torch
from kernel_testing import REL_TOL, assert_rel_close, make_lora, make_weight, randn

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.dequant_gemm import dequant_gemm, prune_configs, gemm_configs
from cloq_engine.kernels.utils import codebook_on

N, K = 40, 128


@pytest.mark.parametrize("bits,dtype", [(2, torch.float16), (3, torch.float32)])
def test_base_only_product_without_lora_or_bias(bits, dtype):
    W, qw = make_weight(bits, 32, N, K)
    x = randn(17, K, dtype=dtype)
    y = dequant_gemm(x, qw.qweight, qw.scales, qw.zeros, None, None, None, None, 1.0, bits, 32, K)
    expected = (x.float() @ torch_ref.dequantize(qw).t()).to(dtype)
    assert y.dtype == dtype
    assert_rel_close(y, expected, REL_TOL[dtype], "y")


def test_strided_activations_and_bias():
    _, qw = make_weight(4, 64, N, K)
    A, B = make_lora(4, N, K)
    wide = randn(20, 2 * K)
    x = wide[:, ::2]  # non-unit stride along K
    S = x @ A.t()
    bias = randn(N, seed=8)
    y = dequant_gemm(x, qw.qweight, qw.scales, qw.zeros, None, S, B, bias, 0.5, 4, 64, K)
    y_ref, _ = torch_ref.forward(x.contiguous(), qw, A, B, 0.5, bias=bias)
    assert_rel_close(y, y_ref, 2e-5, "y")


def test_nf4_uses_the_codebook():
    _, qw = make_weight(4, 32, N, K, method="nf4")
    x = randn(33, K)
    y = dequant_gemm(x, qw.qweight, qw.scales, None, codebook_on(x.device), None, None, None, 1.0, 4, 32, K)
    assert_rel_close(y, x @ torch_ref.dequantize(qw).t(), 2e-5, "y")


def test_wrong_in_features_is_rejected():
    _, qw = make_weight(4, 32, N, K)
    with pytest.raises(ValueError, match="in_features"):
        dequant_gemm(randn(17, K - 32), qw.qweight, qw.scales, qw.zeros, None, None, None, None, 1.0, 4, 32, K)


@pytest.mark.parametrize("group_size,num_groups,max_block_k", [(32, 4, 32), (64, 2, 64), (128, 1, 128), (80, 1, 128)])
def test_configs_pruned_to_one_scale_row_per_tile(group_size, num_groups, max_block_k):
    x = torch.empty(64, 128, dtype=torch.float16)
    kept = prune_configs(gemm_configs(), x, 4, group_size, num_groups)
    assert kept and max(c.kwargs["BLOCK_K"] for c in kept) == max_block_k
    assert all(c.kwargs["BLOCK_K"] <= group_size or num_groups == 1 for c in kept)
