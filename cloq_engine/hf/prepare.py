"""``prepare_model``: a model goes in, a quantized model with calibrated LoRA comes out.

The driver joins the stages: ``calib`` hands back ``{name: H}`` per group of layers sharing an
input, ``convert`` quantizes (one GPTQ per group), initialises and swaps them in, and the block's
new outputs feed the next block.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from .. import calib as calib_mod
from ..config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from ..convert import build_layer, linear_weight, mark_trainable, quantize_and_init, replace_modules
from ..nn import QuantLoRALinear
from .checks import guarded
from .targets import find_targets

logger = logging.getLogger(__name__)

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
    calib_tokens: int = 0  # set by hf/checks.py: calibration tokens,
    underdetermined: dict = field(default_factory=dict)  # {layer: in_features} with fewer tokens than in_features,
    full_precision: List[str] = field(default_factory=list)  # and weights left unquantized (MoE experts)

    @property
    def quantize_s(self) -> float:
        return sum(r.quantize_s for r in self.layers)

    @property
    def init_s(self) -> float:
        return sum(r.init_s for r in self.layers)


def needs_calibration(quant_config: QuantConfig, lora_config: LoRAConfig) -> bool:
    return quant_config.method == QuantMethod.GPTQ or lora_config.init in (InitMethod.CLOQ, InitMethod.QUAILORA)


def relative_error(M: torch.Tensor, W: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    """||X M^T||^2 / ||X W^T||^2 with H = X^T X (||M||^2 / ||W||^2 without H)."""
    if H is None:
        return float(M.pow(2).sum() / W.pow(2).sum().clamp(min=1e-30))
    num = ((M @ H) * M).sum()
    den = ((W @ H) * W).sum().clamp(min=1e-30)
    return float(num / den)


class LayerBuilder:
    """Quantizes, initialises and builds the layers of one group sharing H, and reports them."""

    def __init__(self, quant_config: QuantConfig, lora_config: LoRAConfig, report: PrepareReport,
                 report_mode: str = "sampled"):
        self.quant_config, self.lora_config = quant_config, lora_config
        self.report, self.report_mode = report, report_mode
        self.block: Optional[BlockReport] = None  # the block being prepared, for its timings

    def build(self, root: nn.Module, grams: Dict[str, Optional[torch.Tensor]], prefix: str = "") -> Dict[str, nn.Module]:
        """New layers for ``grams`` = ``{name under root: H}``, one quantization per distinct H."""
        groups: Dict[int, List[str]] = {}
        for name, H in grams.items():
            groups.setdefault(id(H) if H is not None else id(name), []).append(name)
        out = {}
        for names in groups.values():
            H = grams[names[0]]
            modules = [root.get_submodule(n) for n in names]
            Ws = [linear_weight(m) for m in modules]
            inits = quantize_and_init(Ws, self.quant_config, self.lora_config, H, names=[prefix + n for n in names])
            for n, m, W, init in zip(names, modules, Ws, inits):
                out[n] = build_layer(m, self.quant_config, self.lora_config, H, layer_cls=QuantLoRALinear, init=init)
                self._record(prefix + n, W, H, init)
        return out

    def _record(self, name, W, H, init) -> None:
        t0 = time.perf_counter()
        err_q = err_i = float("nan")
        if self.report_mode != "off":
            W = W.float()
            Q = init.qw.dequantize().to(W.device)
            # The baseline is the plain quantizer's Q: a jointly re-quantized Q is fitted to
            # W - s·B·A and far from W by design, which would overstate the adapter's gain.
            Q0 = Q if init.one_shot_qw is None else init.one_shot_qw.dequantize().to(W.device)
            BA = self.lora_config.scaling_for_rank(init.A.shape[0]) * (init.B.float() @ init.A.float())
            M, M0 = W - Q, W - Q0
            if self.report_mode == "sampled" and W.shape[0] > REPORT_ROWS:
                rows = torch.linspace(0, W.shape[0] - 1, REPORT_ROWS, device=W.device).long()
                W, M, M0, BA = W[rows], M[rows], M0[rows], BA[rows]
            Hf = None if H is None else H.float()
            err_q, err_i = relative_error(M0, W, Hf), relative_error(M - BA, W, Hf)
        self.report.layers.append(LayerReport(
            name=name, shape=tuple(init.qw.shape), err_quant=err_q, err_init=err_i,
            bits_per_weight=init.qw.bits_per_weight, quantize_s=init.quantize_s, init_s=init.init_s))
        if self.block is not None:
            self.block.quantize_s += init.quantize_s
            self.block.init_s += init.init_s
            self.block.report_s += time.perf_counter() - t0


BlockHook = Callable[[int, nn.Module], None]


@torch.no_grad()
def run_sequential(model: nn.Module, targets: List[str], batches: List[dict], builder: LayerBuilder,
                   true_sequential: bool = True, progress: bool = False, start: int = 0,
                   before_block: Optional[BlockHook] = None, after_block: Optional[BlockHook] = None) -> None:
    """Prepare ``targets`` block by block (DESIGN.md §2).

    ``before_block(i, block)`` runs before block i is calibrated (the streaming path loads its
    weights there), ``after_block(i, block)`` once it is quantized and has fed the next block
    (the streaming path writes and frees it there). Blocks before ``start`` are only run forward
    (already prepared: a resumed run).
    """
    from tqdm.auto import tqdm

    stack = calib_mod.find_block_stack(model, targets)
    done = set()
    inputs = None
    if stack is not None:
        stack_name, blocks = stack
        t0 = time.perf_counter()
        inputs = calib_mod.capture_block_inputs(model, blocks, batches)
        builder.report.capture_s += time.perf_counter() - t0
        for i, block in enumerate(tqdm(blocks, desc="blocks", disable=not progress)):
            prefix = f"{stack_name}.{i}."
            names = [t for t in targets if t.startswith(prefix)]
            if before_block is not None:
                before_block(i, block)
            if i >= start and names:
                rep = BlockReport(i)
                builder.block = rep
                local = [n[len(prefix):] for n in names]
                t0 = time.perf_counter()
                for grams in calib_mod.block_grams(block, local, inputs.batches(i), true_sequential):
                    t1 = time.perf_counter()
                    rep.capture_s += t1 - t0
                    replace_modules(block, builder.build(block, grams, prefix))
                    t0 = time.perf_counter()
                rep.capture_s += time.perf_counter() - t0
                builder.block = None
            t0 = time.perf_counter()
            inputs.advance(i)
            if i >= start and names:
                rep.forward_s = time.perf_counter() - t0
                builder.report.blocks.append(rep)
                builder.report.capture_s += rep.capture_s + rep.forward_s
            done.update(names)
            if after_block is not None:
                after_block(i, block)
    rest = [t for t in targets if t not in done]
    if rest:
        t0 = time.perf_counter()
        # Outside the stack (BERT's pooler, a targeted lm_head): from the stream's final hidden
        # states, without running the blocks again (the streaming path has freed them).
        grams = (calib_mod.tail_grams(model, inputs, rest, batches) if inputs is not None
                 else calib_mod.full_pass_grams(model, rest, batches))
        builder.report.capture_s += time.perf_counter() - t0
        replace_modules(model, builder.build(model, grams))


@guarded  # checks before any work; the caller's model restored if this raises
def prepare_model(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig,
                  calib: Optional[Iterable] = None, progress: bool = False, sequential: bool = True,
                  true_sequential: bool = True, batch_size: int = 8, report: str = "sampled") -> nn.Module:
    """Replace the target linear layers of ``model`` by :class:`QuantLoRALinear`, in place.

    Args:
        model: a Hugging Face (or any) model with nn.Linear / Conv1D layers.
        quant_config: how to quantize the base weights.
        lora_config: rank, scaling, init method and which layers to target.
        calib: iterable of input_ids tensors or of dicts of model inputs (a DataLoader works);
            required by GPTQ and the calibrated inits (cloq, quailora).
        progress: show tqdm progress bars.
        sequential: process transformer blocks in order, feeding each block the outputs of the
            already-quantized ones (GPTQ's scheme); otherwise one pass over the original model.
        true_sequential: inside a block, calibrate each group of layers sharing an input after the
            earlier groups were quantized (o_proj sees quantized q/k/v; GPTQ's true-sequential).
        batch_size: calibration sequences per forward pass (samples of equal shape are batched).
        report: per-layer errors in ``model.cloq_report``: "sampled" (at most 256 rows of each
            weight: cheap), "exact" (all rows: costs about as much as GPTQ on wide layers) or "off".

    Returns the same model with everything but the LoRA factors frozen. ``model.cloq_report``
    holds a :class:`PrepareReport` (per-layer errors, per-block timings).
    """
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig; got {type(quant_config).__name__}")
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"`lora_config` must be a LoRAConfig; got {type(lora_config).__name__}")
    if report not in REPORT_MODES:
        raise ValueError(f"`report` must be one of {REPORT_MODES}; got {report!r}")
    targets = find_targets(model, lora_config)
    check_layers(model, targets, quant_config, lora_config)
    device = next(model.parameters()).device
    rep = PrepareReport()
    builder = LayerBuilder(quant_config, lora_config, rep, report)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()

    batches = [] if calib is None else calib_mod.batch_samples(calib, batch_size, device)
    if not batches:
        if needs_calibration(quant_config, lora_config):
            raise ValueError(
                f"method={quant_config.method.value!r} with init={lora_config.init.value!r} needs calibration data: "
                "pass `calib` (input_ids tensors or dicts of model inputs)"
            )
        from tqdm.auto import tqdm

        for n in tqdm(targets, desc="layers", disable=not progress):
            replace_modules(model, builder.build(model, {n: None}))
    elif sequential:
        run_sequential(model, targets, batches, builder, true_sequential=true_sequential, progress=progress)
    else:
        t0 = time.perf_counter()
        grams = calib_mod.full_pass_grams(model, targets, batches)
        rep.capture_s += time.perf_counter() - t0
        replace_modules(model, builder.build(model, grams))
    rep.total_s = time.perf_counter() - t_start
    finish(model, quant_config, lora_config, targets)
    model.train(was_training)
    model.cloq_report = rep
    return model


def finish(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig, targets: List[str]) -> None:
    """Freeze all but LoRA and record the configuration on the model (and its HF config)."""
    mark_trainable(model)
    model.cloq_config = {"quant": quant_config.to_dict(), "lora": lora_config.to_dict(), "targets": targets}
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        from .quantizer import attach_quantization_config

        attach_quantization_config(model)  # so transformers' own save_pretrained / Trainer checkpoints reload


def check_layers(model: nn.Module, targets: List[str], quant_config: QuantConfig, lora_config: LoRAConfig) -> None:
    """Fail before any work if a target layer cannot take this configuration."""
    for name in targets:
        out_f, in_f = linear_weight(model.get_submodule(name)).shape
        if quant_config.group_size != -1 and in_f % quant_config.group_size:
            raise ValueError(f"layer {name!r}: in_features={in_f} is not divisible by group_size={quant_config.group_size}")
        rank = lora_config.rank_for(name)
        if rank > min(in_f, out_f):
            raise ValueError(f"layer {name!r}: rank={rank} exceeds min(in_features, out_features)={min(in_f, out_f)}")


_check_layers = check_layers  # the name used before
__all__ = ["prepare_model", "PrepareReport", "LayerReport", "BlockReport", "mark_trainable", "needs_calibration"]
