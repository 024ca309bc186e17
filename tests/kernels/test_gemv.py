"""Decode GEMV (M <= 16) against the reference: bits 2/3/4 and NF4, the per-group factored M = 1
path and the tl.dot path, split-K with the arrival counters, padded single-group K."""
import pytest
import torch
from kernel_testing import REL_TOL, assert_rel_close, make_lora, make_weight, randn

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.gemv import gemv, gemv_configs, split_k
from cloq_engine.kernels.utils import codebook_on

N = 40  # not a multiple of the 32-wide interpreter tile

CASES = [  # bits, group, method, K, M, dtype
    (2, 32, "rtn", 160, 1, torch.float32),  # 5 K tiles over 2 slices of 3 + 2
    (3, 64, "rtn", 128, 1, torch.float32),
    (4, 32, "rtn", 128, 1, torch.float16),
    (4, 64, "nf4", 128, 1, torch.float32),
    (3, -1, "rtn", 80, 1, torch.float32),  # one group over a padded K
    (2, 32, "rtn", 96, 5, torch.float16),
    (3, 32, "rtn", 96, 16, torch.float32),
    (4, 64, "nf4", 128, 3, torch.float16),
]


@pytest.mark.parametrize("bits,group,method,K,m,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference_and_leaves_counters_at_zero(bits, group, method, K, m, dtype):
    _, qw = make_weight(bits, group, N, K, method=method)
    A, B = make_lora(8, N, K)
    x = randn(m, K, dtype=dtype)
    bias = randn(N, seed=8)
    S = (x.float() @ A.t()).to(dtype)
    buffers = {}

    def scratch(numel, dt, zeroed):
        buffers[zeroed] = (torch.zeros if zeroed else torch.empty)(numel, dtype=dt)
        return buffers[zeroed]

    y = gemv(x, qw.qweight, qw.scales, qw.zeros, codebook_on("cpu"), S, B.to(dtype), bias.to(dtype), 2.0, bits,
             qw.effective_group_size, K, scratch=scratch)
    y_ref, _ = torch_ref.forward(x, qw, A, B, 2.0, bias=bias)
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, REL_TOL[dtype], "y")
    assert set(buffers) == {False, True}, "the interpreter config splits K in two"
    assert (buffers[True] == 0).all(), "the last slice of each N tile must reset its counter"


def test_without_lora_or_bias():
    _, qw = make_weight(4, 32, N, 64)
    x = randn(1, 64)
    y = gemv(x, qw.qweight, qw.scales, qw.zeros, qw.scales, None, None, None, 1.0, 4, 32, 64)
    assert_rel_close(y, x @ torch_ref.dequantize(qw).t(), 2e-5, "y")


def test_more_than_sixteen_rows_is_rejected():
    _, qw = make_weight(4, 32, N, 64)
    with pytest.raises(ValueError, match="M <= 16"):
        gemv(randn(17, 64), qw.qweight, qw.scales, qw.zeros, None, None, None, None, 1.0, 4, 32, 64)


@pytest.mark.parametrize("N_,K,requested", [(4096, 4096, 0), (64, 64, 0), (64, 4096, 0), (4096, 4096, 3)])
def test_split_k_never_leaves_a_slice_empty(N_, K, requested):
    split, per = split_k(N_, K, 128, 32, requested, torch.device("cpu"))
    k_tiles = -(-K // 32)
    assert (split - 1) * per < k_tiles <= split * per


def test_split_k_targets_four_programs_per_sm():
    # a CPU device counts as 8 SMs: one 128-wide N tile needs 32 K slices
    assert split_k(64, 4096, 128, 32, 0, torch.device("cpu")) == (32, 4)


def test_every_config_keeps_block_k_within_the_shipped_range():
    assert all(c.kwargs["BLOCK_K"] % 32 == 0 and c.kwargs["SPLIT_K"] >= 0 for c in gemv_configs())
