"""Transposed-dequant backward kernel: dX = dY·Ŵ (+ dS·A) against the reference."""
import pytest
import torch
from kernel_testing import REL_TOL, assert_rel_close, make_lora, make_weight, randn

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.dequant_gemm_t import dequant_gemm_t
from cloq_engine.kernels.utils import codebook_on

N = 40


@pytest.mark.parametrize("bits,group,K,dtype", [(2, 32, 96, torch.float32), (3, 64, 128, torch.float16),
                                                (4, -1, 80, torch.float32)])
def test_input_gradient_without_lora(bits, group, K, dtype):
    _, qw = make_weight(bits, group, N, K)
    dy = randn(21, N, dtype=dtype)
    dx = dequant_gemm_t(dy, qw.qweight, qw.scales, qw.zeros, None, None, None, bits, qw.effective_group_size, K,
                        dtype)
    assert dx.dtype == dtype
    assert_rel_close(dx, (dy.float() @ torch_ref.dequantize(qw)).to(dtype), REL_TOL[dtype], "dx")


@pytest.mark.parametrize("method", ["rtn", "nf4"])
def test_fused_lora_term_is_added(method):
    K = 64
    _, qw = make_weight(4, 32, N, K, method=method)
    A, _ = make_lora(8, N, K)
    dy, dS = randn(18, N), randn(18, 8, seed=6)
    zeros = None if method == "nf4" else qw.zeros
    dx = dequant_gemm_t(dy, qw.qweight, qw.scales, zeros, codebook_on("cpu"), dS, A, 4, 32, K, torch.float32)
    assert_rel_close(dx, dy @ torch_ref.dequantize(qw) + dS @ A, 2e-5, "dx")


def test_mismatched_gradient_width_is_rejected():
    _, qw = make_weight(4, 32, N, 64)
    with pytest.raises(ValueError, match="out_features"):
        dequant_gemm_t(randn(3, N + 1), qw.qweight, qw.scales, qw.zeros, None, None, None, 4, 32, 64, torch.float32)
