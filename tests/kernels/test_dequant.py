"""Standalone dequantization kernel against the reference unpacking."""
import pytest
import torch
from kernel_testing import make_weight

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.dequant import dequant
from cloq_engine.kernels.utils import codebook_on


@pytest.mark.parametrize("bits,group,K,method", [(2, 32, 64, "rtn"), (3, 128, 128, "rtn"), (3, -1, 80, "rtn"),
                                                 (4, 64, 128, "nf4")])
def test_dense_weight_is_exact(bits, group, K, method):
    _, qw = make_weight(bits, group, 70, K, method=method)
    w = dequant(qw.qweight, qw.scales, qw.zeros, codebook_on("cpu"), bits, qw.effective_group_size, K)
    torch.testing.assert_close(w, torch_ref.dequantize(qw), rtol=0, atol=0)
