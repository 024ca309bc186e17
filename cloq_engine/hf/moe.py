"""Mixture-of-experts in a Hugging Face model: which expert projections to quantize, their
per-expert calibration, and building the packed :class:`~cloq_engine.experts.QuantLoRAExperts`.

Calibration per expert (docs/design.md §7): during the sequential pass a recorder on each experts
module (called by :func:`cloq_engine.experts.experts_forward` with the tokens sorted by the
router's top-k choice) adds the rows routed to expert e into that expert's own Gram matrix
``H_e``. The (gate_)up projection of all experts is calibrated first and swapped in, then the down
projection is calibrated on the outputs of the quantized (gate_)up (true-sequential); gate and up
are one fused matrix per expert, so they share ``H_e`` and one GPTQ.

Thin experts: an expert that received fewer calibration tokens than its projection's
in_features has a rank-deficient ``H_e``. Policy (:func:`expert_plan`), each case with a warning
naming the expert and its token count:

* no token at all: RTN instead of GPTQ and zero init instead of a calibrated init (there is
  nothing to calibrate on); ``fallback="rtn+zero"``.
* 0 < tokens < in_features: GPTQ and the calibrated init run on ``H_e + λI`` with the damping
  raised to at least :data:`THIN_DAMP` (relative to mean(diag H_e)); ``fallback="damped"``.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import LoRAConfig, QuantConfig
from ..layer_factory import LayerInit, factor_dtype, needs_calibration, quantize_and_init
from ..init import get_init
from ..quant import get_quantizer
from ..experts import (RECORDER_ATTR, QuantLoRAExperts, dense_expert_weight, is_experts_module,
                       projection_names)
from ..gram import GramAccumulator
from ..packed_layer import check_layer_shape, packed_layers

logger = logging.getLogger(__name__)

THIN_DAMP = 0.1  # damping (fraction of mean(diag H_e)) for experts with fewer tokens than in_features


class _StopPass(Exception):
    """Raised by the recorder once every experts module of the block has recorded its input."""


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def _matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def experts_modules(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n and is_experts_module(m)}


def find_expert_targets(model: nn.Module, lora_config: LoRAConfig) -> List[str]:
    """Fully qualified names of the 3-D expert projections ``lora_config`` selects
    (``model.layers.0.mlp.experts.gate_up_proj``): every one with "all-linear"; with a list, those
    whose projection or experts-module name matches an entry (``"experts"``, ``"down_proj"``); a
    regex string must match the projection name. ``exclude`` matches either name."""
    spec = lora_config.target_modules
    out = []
    for mod_name, module in experts_modules(model).items():
        for proj in projection_names(module):
            if isinstance(getattr(module, proj, None), QuantLoRAExperts):
                continue  # already prepared
            name = f"{mod_name}.{proj}"
            if spec == "all-linear":
                chosen = True
            elif isinstance(spec, str):
                chosen = re.fullmatch(spec, name) is not None
            else:
                chosen = _matches(name, spec) or _matches(mod_name, spec)
            if chosen and not (_matches(name, lora_config.exclude) or _matches(mod_name, lora_config.exclude)):
                out.append(name)
    return out


def split_target(name: str) -> Tuple[str, str]:
    """("model.layers.0.mlp.experts", "gate_up_proj") of an expert projection name."""
    mod_name, _, proj = name.rpartition(".")
    return mod_name, proj


def is_expert_target(model: nn.Module, name: str) -> bool:
    mod_name, proj = split_target(name)
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        return False
    return is_experts_module(module) and proj in projection_names(module)


def check_expert_targets(model: nn.Module, names: List[str], quant_config: QuantConfig,
                         lora_config: LoRAConfig) -> None:
    """Fail before any work if an expert projection cannot take this configuration."""
    for name in names:
        mod_name, proj = split_target(name)
        module = model.get_submodule(mod_name)
        _, out_f, in_f = dense_expert_weight(getattr(module, proj), module.is_transposed).shape
        check_layer_shape(in_f, out_f, quant_config.group_size, lora_config.rank_for(name),
                          f"expert projection {name!r}: ")
        if quant_config.act_order:
            raise ValueError(f"expert projection {name!r}: act_order is not supported for experts")


# ---------------------------------------------------------------------------------------------
# Per-expert Gram matrices
# ---------------------------------------------------------------------------------------------
@dataclass
class ExpertGrams:
    """Gram matrices of one projection, one per expert: ``H[e]`` (None: expert e got no token)
    and ``tokens[e]`` (calibration tokens the router sent to e; padding excluded)."""

    H: List[Optional[torch.Tensor]]
    tokens: List[int]


class ExpertRecorder:
    """Accumulates per-expert Gram matrices of one projection of the given experts modules."""

    def __init__(self, modules: Dict[str, nn.Module], proj: Dict[str, str], stop: bool):
        self.modules, self.proj, self.stop = modules, proj, stop
        self.mask: Optional[torch.Tensor] = None
        self.acc: Dict[str, List[Optional[GramAccumulator]]] = {n: [None] * m.num_experts for n, m in modules.items()}
        self._names = {id(m): n for n, m in modules.items()}
        self._seen: set = set()

    def __enter__(self):
        for m in self.modules.values():
            setattr(m, RECORDER_ATTR, self)
        return self

    def __exit__(self, *exc):
        for m in self.modules.values():
            m.__dict__.pop(RECORDER_ATTR, None)

    def new_pass(self, mask: Optional[torch.Tensor]) -> None:
        self.mask, self._seen = mask, set()

    def __call__(self, module, proj, x, counts, token_idx, num_tokens) -> None:
        name = self._names[id(module)]
        if proj != self.proj[name]:
            return
        keep = None
        if self.mask is not None and self.mask.numel() == num_tokens and not bool(self.mask.all()):
            keep = self.mask.reshape(-1).bool()[token_idx]  # real (unpadded) tokens among the routed rows
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = x[start:start + n]
                if keep is not None:
                    rows = rows[keep[start:start + n]]
                if rows.shape[0]:
                    acc = self.acc[name][e]
                    if acc is None:
                        acc = self.acc[name][e] = GramAccumulator(x.shape[-1], device=x.device,
                                                                  name=f"{name}.{proj}[expert {e}]")
                    acc.add(rows)
            start += n
        self._seen.add(name)
        if self.stop and len(self._seen) == len(self.modules):
            raise _StopPass

    def grams(self) -> Dict[str, ExpertGrams]:
        return {n: ExpertGrams([None if a is None else a.H for a in accs], [0 if a is None else a.count for a in accs])
                for n, accs in self.acc.items()}


@torch.no_grad()
def collect_expert_grams(root: nn.Module, modules: Dict[str, nn.Module], proj: Dict[str, str], run_batches,
                         stop: bool = True) -> Dict[str, ExpertGrams]:
    """Per-expert Gram matrices of ``proj[name]`` of each experts module under ``root``.

    ``run_batches(recorder)`` runs the forward passes, calling ``recorder.new_pass(mask)`` before
    each; with ``stop`` a pass ends once every module has recorded its input (a
    :class:`_StopPass` the caller's ``run_batches`` lets :func:`run_stopping` catch)."""
    with ExpertRecorder(modules, proj, stop) as rec:
        run_batches(rec)
    return rec.grams()


def run_stopping(fn, *args, **kwargs) -> None:
    """Call ``fn`` and swallow the recorder's early stop."""
    try:
        fn(*args, **kwargs)
    except _StopPass:
        pass


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------
def expert_plan(tokens: int, in_features: int, quant_config: QuantConfig, lora_config: LoRAConfig,
                calibrated: bool) -> Tuple[QuantConfig, LoRAConfig, str]:
    """The configs one expert is prepared with and its fallback ("none", "damped", "rtn+zero");
    see the module docstring. ``calibrated``: the run has calibration data at all."""
    if not calibrated or not needs_calibration(quant_config, lora_config) or tokens >= in_features:
        return quant_config, lora_config, "none"
    if tokens == 0:  # what reads H (the registries' needs_H) falls back to what does not
        qc = dataclasses.replace(quant_config, method="rtn") if get_quantizer(quant_config.method).needs_H \
            else quant_config
        lc = lora_config
        if get_init(lora_config.init).needs_H:
            lc = dataclasses.replace(lora_config, init="zero", requant_rounds=0)
        return qc, lc, "rtn+zero"
    qc = dataclasses.replace(quant_config, damp=max(quant_config.damp, THIN_DAMP))
    lc = dataclasses.replace(lora_config, init_damp=max(lora_config.init_damp, THIN_DAMP))
    return qc, lc, "damped"


@dataclass
class ExpertInit:
    """One expert's build: its LayerInit, the H it was calibrated on, tokens and fallback."""

    init: LayerInit
    W: torch.Tensor
    H: Optional[torch.Tensor]
    tokens: int
    fallback: str


def quantize_experts(module: nn.Module, proj: str, name: str, grams: Optional[ExpertGrams],
                     quant_config: QuantConfig, lora_config: LoRAConfig) -> Tuple[QuantLoRAExperts, List[ExpertInit]]:
    """Quantize and initialise every expert of ``module.<proj>`` on its own ``H_e`` (GPTQ and
    the init per expert), and stack them into a :class:`QuantLoRAExperts`."""
    param = getattr(module, proj)
    W_all = dense_expert_weight(param.detach(), module.is_transposed)  # [E, out, in]
    E, _, in_f = W_all.shape
    rank = lora_config.rank_for(name)
    lc_layer = dataclasses.replace(lora_config, rank=rank, rank_pattern={})
    builds = []
    for e in range(E):
        tokens = grams.tokens[e] if grams is not None else 0
        H = grams.H[e] if grams is not None else None
        qc, lc, fallback = expert_plan(tokens, in_f, quant_config, lc_layer, calibrated=grams is not None)
        if fallback != "none":
            logger.warning("expert %d of %s received %d calibration token(s) (in_features=%d): %s", e, name, tokens,
                           in_f, "no token: RTN + zero init" if fallback == "rtn+zero" else
                           f"H_e is rank-deficient: damping raised to {THIN_DAMP:g} for GPTQ and the init")
        W = W_all[e].float()
        (init,) = quantize_and_init([W], qc, lc, H if fallback != "rtn+zero" else None)
        builds.append(ExpertInit(init, W, H, tokens, fallback))
    dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    layer = QuantLoRAExperts.from_quantized(
        [b.init.qw for b in builds], torch.stack([b.init.A for b in builds]), torch.stack([b.init.B for b in builds]),
        lc_layer, quant_config, transposed=module.is_transposed, dtype=factor_dtype(lc_layer, dtype))
    return layer.to(param.device), builds


def replace_projection(module: nn.Module, proj: str, layer: nn.Module) -> None:
    """Swap the 3-D parameter ``module.<proj>`` for ``layer`` (a module of the same name)."""
    module._parameters.pop(proj, None)
    setattr(module, proj, layer)


def quant_experts(model: nn.Module) -> Dict[str, QuantLoRAExperts]:
    return packed_layers(model, QuantLoRAExperts)


# ---------------------------------------------------------------------------------------------
# PEFT (target_parameters) layout
# ---------------------------------------------------------------------------------------------
def peft_expert_factors(layer: QuantLoRAExperts) -> Tuple[torch.Tensor, torch.Tensor]:
    """Our A [E, r, in], B [E, out, r] as PEFT 0.21's ``ParamWrapper`` stores them:
    ``lora_A.weight`` [E·r, in] (expert-major) and ``lora_B.weight`` [out, r·E] (read back by PEFT
    as ``reshape(out, r, E)``: rank-major, expert-minor)."""
    E, r, in_f = layer.lora_A.shape
    A = layer.lora_A.detach().reshape(E * r, in_f)
    B = layer.lora_B.detach().permute(1, 2, 0).reshape(layer.out_features, r * E)
    return A.contiguous(), B.contiguous()


def peft_wrapper_prefixes(model: nn.Module, names: List[str]) -> Dict[str, str]:
    """Where PEFT puts each targeted projection's factors. PEFT wraps an experts module's targeted
    parameters in their registration order, the first innermost, and every decorated experts
    class registers (gate_)up before down: ``experts.base_layer.lora_A`` for (gate_)up and
    ``experts.lora_A`` for down when both are targeted (tests load the export through PEFT)."""
    by_module: Dict[str, List[str]] = {}
    for name in names:
        mod_name, proj = split_target(name)
        by_module.setdefault(mod_name, []).append(proj)
    out = {}
    for mod_name, projs in by_module.items():
        order = [p for p in projection_names(model.get_submodule(mod_name)) if p in projs]
        for i, proj in enumerate(order):
            out[f"{mod_name}.{proj}"] = mod_name + ".base_layer" * (len(order) - 1 - i)
    return out


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def storage_summary(model: nn.Module) -> Dict[str, float]:
    """Bits per weight actually stored. ``quantized``: packed buffers of every QuantLoRALinear and
    QuantLoRAExperts over their weights; ``whole_model``: every persistent tensor but the LoRA
    factors (embeddings, norms, routers, biases at their own dtype) over all weights; ``body``:
    the same without the input and output embeddings (which dominate tiny models)."""
    from ..nn import QuantLoRALinear

    q_weights = q_bytes = 0
    for m in model.modules():
        if isinstance(m, QuantLoRAExperts):
            q_weights += m.num_experts * m.in_features * m.out_features
            q_bytes += m.nbytes
        elif isinstance(m, QuantLoRALinear):
            q_weights += m.in_features * m.out_features
            q_bytes += m.quantized_weight.nbytes
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        emb = fn() if callable(fn) else None
        if emb is not None:
            embeddings.update(id(p) for p in emb.parameters())
    packed = {"qweight", "scales", "zeros", "perm"}
    other = {"weights": 0, "bytes": 0, "emb_weights": 0, "emb_bytes": 0}
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if ".lora_" in name or name.rpartition(".")[2] in packed or id(t) in seen:
            continue
        seen.add(id(t))  # tied embeddings are stored once
        key = "emb_" if id(t) in embeddings else ""
        other[key + "weights"] += t.numel()
        other[key + "bytes"] += t.numel() * t.element_size()
    total = q_weights + other["weights"] + other["emb_weights"]
    body = q_weights + other["weights"]
    return {"quantized_weights": q_weights, "quantized_bits_per_weight": 8 * q_bytes / max(q_weights, 1),
            "total_weights": total, "quantized_fraction": q_weights / max(total, 1),
            "whole_model_bits_per_weight": 8 * (q_bytes + other["bytes"] + other["emb_bytes"]) / max(total, 1),
            "body_bits_per_weight": 8 * (q_bytes + other["bytes"]) / max(body, 1)}


# ---------------------------------------------------------------------------------------------
# Reading per-expert checkpoints (the streaming prepare reads shards itself)
# ---------------------------------------------------------------------------------------------
# transformers' save_pretrained writes Qwen2/3-MoE, OLMoE and Mixtral experts back in their original
# per-expert layout (its conversion_mapping); these are the names that fuse into each projection,
# in concatenation order, for the layouts stored [E, out, in].
PER_EXPERT_NAMES = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
                    "up_proj": (("up_proj",),),
                    "down_proj": (("down_proj",), ("w2",))}
MODULE_RENAMES = ((".mlp.experts", ".mlp.experts"), (".mlp.experts", ".block_sparse_moe.experts"))  # Mixtral


def read_per_expert(read, name: str, num_experts: int) -> Optional[torch.Tensor]:
    """The fused [E, out, in] tensor of projection ``name`` from per-expert checkpoint tensors
    (``experts.{e}.gate_proj.weight`` ...), through ``read(keys) -> {key: tensor}``; None when the
    checkpoint does not hold them."""
    mod_name, proj = split_target(name)
    for names in PER_EXPERT_NAMES.get(proj, ()):
        for ours, theirs in MODULE_RENAMES:
            src = mod_name.replace(ours, theirs) if ours in mod_name else mod_name
            keys = [f"{src}.{e}.{n}.weight" for n in names for e in range(num_experts)]
            got = read(keys)
            if len(got) == len(keys):
                return torch.cat([torch.stack([got[f"{src}.{e}.{n}.weight"] for e in range(num_experts)])
                                  for n in names], dim=1)
    return None
