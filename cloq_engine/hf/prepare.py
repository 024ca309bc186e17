"""``prepare_model``: a model goes in, a quantized model with calibrated LoRA comes out.

The driver joins the stages: ``calib`` hands back ``{name: H}`` per group of layers sharing an
input, ``convert`` quantizes (one GPTQ per group), initialises and swaps them in, and the block's
new outputs feed the next block.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .. import calib as calib_mod
from ..config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from ..convert import build_layer, linear_weight, mark_trainable, quantize_and_init, replace_modules
from ..experts import use_cloq_experts
from ..nn import QuantLoRALinear
from . import experts as moe
from .checks import guarded
from .fit import fit_ranks, untie_heads, warn_tied_heads
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
class ExpertReport:
    """What preparation did to one expert of one packed projection (errors as in LayerReport,
    in expert e's own calibrated norm H_e; weight-space when it got no token). ``tokens``: the
    calibration tokens the router sent to it; ``fallback``: "none", "damped" or "rtn+zero"
    (see hf/experts.py)."""

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
    calib_tokens: int = 0  # set by hf/checks.py: calibration tokens,
    underdetermined: dict = field(default_factory=dict)  # {layer: in_features} with fewer tokens than in_features,
    full_precision: List[str] = field(default_factory=list)  # and weights left unquantized
    experts: List[ExpertReport] = field(default_factory=list)  # one row per expert of each packed projection

    @property
    def quantize_s(self) -> float:
        return sum(r.quantize_s for r in self.layers) + sum(r.quantize_s for r in self.experts)

    @property
    def init_s(self) -> float:
        return sum(r.init_s for r in self.layers) + sum(r.init_s for r in self.experts)


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

    def build_experts(self, root: nn.Module, names: List[str], grams: Dict[str, Optional["moe.ExpertGrams"]],
                      prefix: str = "") -> None:
        """Quantize, initialise and swap in the packed expert projections ``names`` (under
        ``root``), expert e on its own ``grams[name].H[e]``, and report every expert."""
        for name in names:
            mod_name, proj = moe.split_target(name)
            module = root.get_submodule(mod_name)
            layer, builds = moe.quantize_experts(module, proj, prefix + name, grams.get(name), self.quant_config,
                                                 self.lora_config)
            moe.replace_projection(module, proj, layer)
            for e, b in enumerate(builds):
                err_q, err_i = self._errors(b.W, b.H, b.init)
                self.report.experts.append(ExpertReport(
                    name=prefix + name, expert=e, tokens=b.tokens, shape=tuple(b.init.qw.shape), err_quant=err_q,
                    err_init=err_i, bits_per_weight=b.init.qw.bits_per_weight, fallback=b.fallback,
                    quantize_s=b.init.quantize_s, init_s=b.init.init_s))
                if self.block is not None:
                    self.block.quantize_s += b.init.quantize_s
                    self.block.init_s += b.init.init_s

    def _errors(self, W, H, init):
        if self.report_mode == "off":
            return float("nan"), float("nan")
        W = W.float()
        Q = init.qw.dequantize().to(W.device)
        # The baseline is the plain quantizer's Q: a jointly re-quantized Q is fitted to
        # W - s·B·A and far from W by design, which would overstate the adapter's gain.
        one_shot = getattr(init, "one_shot_qw", None)
        Q0 = Q if one_shot is None else one_shot.dequantize().to(W.device)
        BA = self.lora_config.scaling_for_rank(init.A.shape[0]) * (init.B.float() @ init.A.float())
        M, M0 = W - Q, W - Q0
        if self.report_mode == "sampled" and W.shape[0] > REPORT_ROWS:
            rows = torch.linspace(0, W.shape[0] - 1, REPORT_ROWS, device=W.device).long()
            W, M, M0, BA = W[rows], M[rows], M0[rows], BA[rows]
        Hf = None if H is None else H.float()
        return relative_error(M0, W, Hf), relative_error(M - BA, W, Hf)

    def _record(self, name, W, H, init) -> None:
        t0 = time.perf_counter()
        err_q, err_i = self._errors(W, H, init)
        self.report.layers.append(LayerReport(
            name=name, shape=tuple(init.qw.shape), err_quant=err_q, err_init=err_i,
            bits_per_weight=init.qw.bits_per_weight, quantize_s=init.quantize_s, init_s=init.init_s))
        if self.block is not None:
            self.block.quantize_s += init.quantize_s
            self.block.init_s += init.init_s
            self.block.report_s += time.perf_counter() - t0


BlockHook = Callable[[int, nn.Module], None]


def prepare_experts(root: nn.Module, names: List[str], builder: LayerBuilder, prefix: str = "",
                    run: Optional[Callable] = None, stop: bool = True) -> None:
    """Prepare the expert projections ``names`` (under ``root``): every (gate_)up first, then every
    down, calibrated on the outputs of the already-quantized (gate_)up (true-sequential).

    ``run(recorder)`` runs the calibration forward passes (None: no calibration data); see
    ``hf/experts.collect_expert_grams``."""
    wanted: Dict[str, List[str]] = {}
    for n in names:
        mod_name, proj = moe.split_target(n)
        wanted.setdefault(mod_name, []).append(proj)
    modules = {m: root.get_submodule(m) for m in wanted}
    for step in (0, 1):
        projs = {m: moe.projection_names(mod)[step] for m, mod in modules.items()
                 if moe.projection_names(mod)[step] in wanted[m]}
        if not projs:
            continue
        grams = {} if run is None else moe.collect_expert_grams(root, {m: modules[m] for m in projs}, projs, run, stop)
        builder.build_experts(root, [f"{m}.{p}" for m, p in projs.items()],
                              {f"{m}.{p}": grams.get(m) for m, p in projs.items()}, prefix)


def _block_runner(block: nn.Module, batches):
    def run(recorder):
        for call, h in batches:
            recorder.new_pass(call.mask)
            moe.run_stopping(call, block, h)

    return run


@torch.no_grad()
def run_sequential(model: nn.Module, targets: List[str], batches: List[dict], builder: LayerBuilder,
                   true_sequential: bool = True, progress: bool = False, start: int = 0,
                   before_block: Optional[BlockHook] = None, after_block: Optional[BlockHook] = None,
                   expert_targets: Sequence[str] = ()) -> None:
    """Prepare ``targets`` block by block (docs/design.md §2).

    ``expert_targets`` (packed MoE projections, ``hf/experts.py``) of a block are prepared after
    its linear layers, each expert on the tokens the router sends to it.

    ``before_block(i, block)`` runs before block i is calibrated (the streaming path loads its
    weights there), ``after_block(i, block)`` once it is quantized and has fed the next block
    (the streaming path writes and frees it there). Blocks before ``start`` are only run forward
    (already prepared: a resumed run).
    """
    from tqdm.auto import tqdm

    stack = calib_mod.find_block_stack(model, list(targets) + list(expert_targets))
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
            enames = [t for t in expert_targets if t.startswith(prefix)]
            if before_block is not None:
                before_block(i, block)
            if i >= start and (names or enames):
                rep = BlockReport(i)
                builder.block = rep
                local = [n[len(prefix):] for n in names]
                t0 = time.perf_counter()
                for grams in calib_mod.block_grams(block, local, inputs.batches(i), true_sequential) if local else ():
                    t1 = time.perf_counter()
                    rep.capture_s += t1 - t0
                    replace_modules(block, builder.build(block, grams, prefix))
                    t0 = time.perf_counter()
                rep.capture_s += time.perf_counter() - t0
                if enames:
                    t0, work0 = time.perf_counter(), rep.quantize_s + rep.init_s
                    prepare_experts(block, [n[len(prefix):] for n in enames], builder, prefix,
                                    run=_block_runner(block, inputs.batches(i)))
                    rep.capture_s += time.perf_counter() - t0 - (rep.quantize_s + rep.init_s - work0)
                builder.block = None
            t0 = time.perf_counter()
            inputs.advance(i)
            if i >= start and (names or enames):
                rep.forward_s = time.perf_counter() - t0
                builder.report.blocks.append(rep)
                builder.report.capture_s += rep.capture_s + rep.forward_s
            done.update(names)
            done.update(enames)
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
    rest_experts = [t for t in expert_targets if t not in done]
    if rest_experts:
        prepare_experts(model, rest_experts, builder, run=_model_runner(model, batches), stop=False)


def _model_runner(model: nn.Module, batches):
    def run(recorder):
        with calib_mod.no_cache(model):
            for inputs in batches:
                recorder.new_pass(inputs.get("attention_mask"))
                model(**inputs)

    return run


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
    lora_config = fit_ranks(model, targets, lora_config)
    check_layers(model, targets, quant_config, lora_config)
    warn_tied_heads(model, targets, quant_config, lora_config)
    expert_targets = moe.find_expert_targets(model, lora_config)
    moe.check_expert_targets(model, expert_targets, quant_config, lora_config)
    if expert_targets:
        use_cloq_experts(model)  # transformers' experts registry now runs ours (dense and packed alike)
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
        prepare_experts(model, expert_targets, builder)
    elif sequential:
        run_sequential(model, targets, batches, builder, true_sequential=true_sequential, progress=progress,
                       expert_targets=expert_targets)
    else:
        t0 = time.perf_counter()
        grams = calib_mod.full_pass_grams(model, targets, batches)
        rep.capture_s += time.perf_counter() - t0
        replace_modules(model, builder.build(model, grams))
        # experts after the linear layers: their H_e come from the quantized attention's outputs
        prepare_experts(model, expert_targets, builder, run=_model_runner(model, batches), stop=False)
    rep.total_s = time.perf_counter() - t_start
    finish(model, quant_config, lora_config, targets + expert_targets)
    model.train(was_training)
    model.cloq_report = rep
    return model


def finish(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig, targets: List[str]) -> None:
    """Freeze all but LoRA, record a targeted tied head as untied, and record the configuration on
    the model (and its HF config)."""
    mark_trainable(model)
    untie_heads(model, targets)
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
__all__ = ["prepare_model", "PrepareReport", "LayerReport", "BlockReport", "ExpertReport", "mark_trainable",
           "needs_calibration"]
