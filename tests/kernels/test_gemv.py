"""Decode GEMV (M <= 16) against the reference: bits 2/3/4 and NF4, the per-group factored M = 1
path and the tl.dot path, split-K with the arrival counters, padded single-group K."""
import pytest
import torch
from kernel_testing import REL_TOL, assert_rel_close, make_lora, make_weight, randn

from cloq_engine.backends import torch_ref
from cloq_engine.kernels.gemv import bytes_in_flight, gemv, gemv_configs, gemv_dot_configs, split_k
from cloq_engine.kernels.utils import codebook_on

N = 40  # not a multiple of the 32-wide interpreter tile

CASES = [  # bits, group, method, K, M, dtype: every width at M = 1 (in-thread K) and at M = 2..16 (tl.dot)
    (2, 32, "rtn", 160, 1, torch.float32),  # 5 K tiles over 2 slices of 3 + 2: the prefetch stops at the slice
    (3, 64, "rtn", 128, 1, torch.float32),
    (4, 32, "rtn", 128, 1, torch.float16),
    (4, 64, "nf4", 128, 1, torch.float32),
    (4, 32, "nf4", 96, 1, torch.float16),  # odd tile count, register codebook in fp16
    (3, -1, "rtn", 80, 1, torch.float32),  # one group over a padded K
    (4, 32, "rtn", 224, 1, torch.float32),  # 7 tiles: slices of 4 + 3
    (2, 32, "rtn", 96, 2, torch.float32),
    (2, 32, "rtn", 96, 5, torch.float16),
    (3, 32, "rtn", 96, 16, torch.float32),
    (4, 32, "rtn", 64, 9, torch.float32),
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
    assert all(c.kwargs["BLOCK_K"] % 32 == 0 and c.kwargs["SPLIT_K"] >= 0 for c in gemv_configs() + gemv_dot_configs())


@pytest.mark.parametrize("cfg", gemv_configs(), ids=str)
def test_every_m1_config_puts_warps_along_n_with_64_bytes_in_flight(cfg):
    """BLOCK_N = 4 columns x 32 threads x warps: Triton's 16-byte loads then lay every warp along N, so K
    is reduced inside each thread; the register double buffer keeps >= 64 packed bytes a thread in flight
    (W2 a config's bytes at 2 bits are half of W4's)."""
    assert cfg.kwargs["BLOCK_N"] == 4 * 32 * cfg.num_warps
    assert min(bytes_in_flight(cfg, b) for b in (2, 3, 4)) >= 64
    assert bytes_in_flight(cfg, 2) * 2 == bytes_in_flight(cfg, 4)
