"""Shared builders and tolerances for the kernel tests (all run under TRITON_INTERPRET=1 on CPU)."""
from __future__ import annotations

import torch

from cloq_engine.config import QuantConfig
from cloq_engine.quant import quantize_weight

# max |actual - expected| / max |expected|; fp16 rounds the dequantized weight to 16 bits before tl.dot
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def make_weight(bits: int, group_size: int, out_features: int, in_features: int, method: str = "rtn", seed: int = 0):
    """(W, qw): a random weight whose column magnitudes vary, so every group gets its own scale."""
    gen = torch.Generator().manual_seed(seed)
    col = 0.25 + 2.0 * torch.rand(in_features, generator=gen)
    W = torch.randn(out_features, in_features, generator=gen) * col
    qw = quantize_weight(W, QuantConfig(bits=bits, group_size=group_size, method=method))
    return W, qw


def make_lora(rank: int, out_features: int, in_features: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.randn(rank, in_features, generator=gen)
    B = 0.3 * torch.randn(out_features, rank, generator=gen)
    return A, B


def randn(*shape, dtype=torch.float32, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-12), f"{what}: max error {err:.3g} vs max |ref| {scale:.3g} (rel tol {tol})"
