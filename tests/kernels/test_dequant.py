"""Dequantization into a strided destination (the large-M workspace) against the reference."""
import pytest
import torch
from kernel_testing import make_weight

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.dequant import dequant, dequant_into
from cloq_engine.kernels.utils import codebook_on

CASES = [(2, 32, 64, "rtn"), (3, 128, 128, "rtn"), (3, -1, 80, "rtn"), (4, 64, 128, "nf4"), (4, 32, 96, "rtn")]


@pytest.mark.parametrize("bits,group,K,method", CASES)
def test_dense_weight_is_exact(bits, group, K, method):
    _, qw = make_weight(bits, group, 70, K, method=method)
    w = dequant(qw.qweight, qw.scales, qw.zeros, codebook_on("cpu"), bits, qw.effective_group_size, K)
    torch.testing.assert_close(w, torch_ref.dequantize(qw), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group,K,method", CASES)
def test_workspace_rows_get_the_rounded_weight_and_nothing_else(bits, group, K, method):
    N, r = 70, 5
    _, qw = make_weight(bits, group, N, K, method=method)
    ws = torch.full((K + r, N + 3), float("nan"), dtype=torch.float16)  # [Ŵᵀ ; s·Bᵀ] with a wider row stride
    dequant_into(ws[:K, :N], qw.qweight, qw.scales, qw.zeros, codebook_on("cpu"), bits, qw.effective_group_size, K)
    torch.testing.assert_close(ws[:K, :N], torch_ref.dequantize(qw).t().half(), rtol=0, atol=0)
    assert ws[K:].isnan().all() and ws[:, N:].isnan().all()


def test_offsets_past_two_to_the_31_elements():
    """A destination whose row k starts at k·stride elements, rows past 2^31 (virtual memory only:
    the untouched pages of the large allocation are never backed); 32-bit offsets would wrap."""
    K, N = 96, 8
    _, qw = make_weight(4, 32, N, K)
    stride = 2**31 // 64 + 8
    big = torch.empty(K * stride, dtype=torch.float16)
    out = big.as_strided((K, N), (stride, 1))
    dequant_into(out, qw.qweight, qw.scales, qw.zeros, qw.scales, 4, 32, K)
    torch.testing.assert_close(out.clone(), torch_ref.dequantize(qw).t().half(), rtol=0, atol=0)


def test_destination_shape_is_checked():
    _, qw = make_weight(2, 32, 8, 64)
    with pytest.raises(ValueError, match="out must have shape"):
        dequant_into(torch.empty(8, 64), qw.qweight, qw.scales, qw.zeros, qw.scales, 2, 32, 64)
