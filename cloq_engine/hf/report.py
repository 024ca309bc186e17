"""What a prepare reports: per-layer and per-expert errors, per-block timings (docs/design.md §4).

Every prepare driver (in memory, streaming, from a GPTQ checkpoint) fills one
:class:`PrepareReport` through the same :class:`~cloq_engine.hf.builder.LayerBuilder`, so the
table ``cloq prepare`` prints is the same whichever ran.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

REPORT_MODES = ("sampled", "exact", "off")
REPORT_ROWS = 256  # rows of W the "sampled" report measures


@dataclass
class LayerReport:
    """What preparation did to one layer. Errors are relative: ||X (W - Ŵ')^T||^2 / ||X W^T||^2,
    with Ŵ' = Q (quantized only: the plain quantizer's Q, also when joint re-quantization then
    replaced it) and Q + scaling·B·A (after init); weight-space when no H.
    With ``report="sampled"`` they are measured on at most 256 evenly spaced rows of W; NaN with
    ``report="off"``. ``quantize_s`` of layers sharing one GPTQ is that GPTQ's time split by rows."""

    name: str
    shape: tuple
    err_quant: float
    err_init: float
    bits_per_weight: float
    quantize_s: float
    init_s: float


@dataclass
class ExpertReport:
    """What preparation did to one expert of one packed projection (errors as in LayerReport,
    in expert e's own calibrated norm H_e; weight-space when it got no token). ``tokens``: the
    calibration tokens the router sent to it; ``fallback``: "none", "damped" or "rtn+zero"
    (see hf/moe.py)."""

    name: str
    expert: int
    tokens: int
    shape: tuple
    err_quant: float
    err_init: float
    bits_per_weight: float
    fallback: str
    quantize_s: float
    init_s: float


@dataclass
class BlockReport:
    """Seconds spent on one block of the stack, by stage."""

    index: int
    capture_s: float = 0.0  # forward passes that accumulate H
    quantize_s: float = 0.0
    init_s: float = 0.0
    forward_s: float = 0.0  # the quantized block's forward that feeds the next block
    report_s: float = 0.0  # error report

    @property
    def total_s(self) -> float:
        return self.capture_s + self.quantize_s + self.init_s + self.forward_s + self.report_s


@dataclass
class PrepareReport:
    layers: List[LayerReport] = field(default_factory=list)
    blocks: List[BlockReport] = field(default_factory=list)
    capture_s: float = 0.0
    total_s: float = 0.0
    calib_tokens: int = 0  # set by the plan (hf/plan.py): calibration tokens,
    underdetermined: dict = field(default_factory=dict)  # {layer: in_features} with fewer tokens than in_features,
    full_precision: List[str] = field(default_factory=list)  # and weights left unquantized
    experts: List[ExpertReport] = field(default_factory=list)  # one row per expert of each packed projection

    @property
    def quantize_s(self) -> float:
        return sum(r.quantize_s for r in self.layers) + sum(r.quantize_s for r in self.experts)

    @property
    def init_s(self) -> float:
        return sum(r.init_s for r in self.layers) + sum(r.init_s for r in self.experts)


def relative_error(M: torch.Tensor, W: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    """||X M^T||^2 / ||X W^T||^2 with H = X^T X (||M||^2 / ||W||^2 without H)."""
    if H is None:
        return float(M.pow(2).sum() / W.pow(2).sum().clamp(min=1e-30))
    num = ((M @ H) * M).sum()
    den = ((W @ H) * W).sum().clamp(min=1e-30)
    return float(num / den)


def init_errors(W: torch.Tensor, H: Optional[torch.Tensor], init, scaling: float, mode: str):
    """``(err_quant, err_init)`` of one layer's :class:`~cloq_engine.layer_factory.LayerInit` (see LayerReport)."""
    if mode == "off":
        return float("nan"), float("nan")
    W = W.float()
    Q = init.qw.dequantize().to(W.device)
    # The baseline is the plain quantizer's Q: a jointly re-quantized Q is fitted to
    # W - s·B·A and far from W by design, which would overstate the adapter's gain.
    one_shot = getattr(init, "one_shot_qw", None)
    Q0 = Q if one_shot is None else one_shot.dequantize().to(W.device)
    BA = scaling * (init.B.float() @ init.A.float())
    M, M0 = W - Q, W - Q0
    if mode == "sampled" and W.shape[0] > REPORT_ROWS:
        rows = torch.linspace(0, W.shape[0] - 1, REPORT_ROWS, device=W.device).long()
        W, M, M0, BA = W[rows], M[rows], M0[rows], BA[rows]
    Hf = None if H is None else H.float()
    return relative_error(M0, W, Hf), relative_error(M - BA, W, Hf)
