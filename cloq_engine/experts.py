"""Packed mixture-of-experts projections, and the experts forward registered with transformers.

In transformers 5 the experts of an MoE block are one module holding fused 3-D parameters
(``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I], or ``up_proj`` when ``has_gate`` is
False; stored [E, in, out] when ``is_transposed``, with ``<name>_bias`` [E, out] when
``has_bias``), whose class is decorated by ``@use_experts_implementation``. That decorator makes
``forward`` look up ``config._experts_implementation`` in
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` and call the function found there with the
experts module itself.

Preparation replaces each 3-D projection parameter by a :class:`QuantLoRAExperts` submodule of the
same name (packed weights and LoRA factors of all E experts) and sets the model's experts
implementation to :data:`EXPERTS_IMPLEMENTATION`, whose function :func:`experts_forward` runs
both the packed and the plain dense projections. The model's own experts class keeps its gating
(``_apply_gate``: gpt-oss clamps and interleaves gate/up), activation, biases and routing; no
class is patched. Routers and shared experts (``nn.Linear``) are not touched here.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from . import backends
from .config import LoRAConfig, QuantConfig
from .formats import QUANT_BUFFERS, QuantizedWeight  # noqa: F401
from .layer_forward import backend_region, packed_forward
from .packed_layer import PackedLoRALayer

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "cloq"
LAYOUT_FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate")


# ---------------------------------------------------------------------------------------------
# Finding experts modules
# ---------------------------------------------------------------------------------------------
def is_experts_module(module: nn.Module) -> bool:
    """A module of a class decorated by ``@use_experts_implementation`` (its __init__ sets the
    layout flags) holding a ``down_proj``."""
    return all(hasattr(module, f) for f in LAYOUT_FLAGS) and hasattr(module, "down_proj")


def projection_names(module: nn.Module) -> List[str]:
    """The projections of an experts module in execution order: (gate_)up first, then down."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def dense_expert_weight(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, out, in] (nn.Linear orientation) of a stored 3-D expert parameter."""
    return param.transpose(1, 2) if transposed else param


# ---------------------------------------------------------------------------------------------
# Autograd: one projection of all experts over tokens sorted by expert
# ---------------------------------------------------------------------------------------------
def _spans(counts: Sequence[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class QuantExpertsFunction(torch.autograd.Function):
    """y[rows of e] = x·Ŵ_e^T + scaling·x_lora·A_e^T·B_e^T for every expert e with rows.

    ``x`` [S, in] is sorted by expert, ``counts`` (Python ints, one host sync per forward) gives
    each expert's rows. The active backend runs each expert (the C++ kernels on CPU; on CUDA the
    Triton backend's large-M path dequantizes Ŵ_e into its reused workspace for cuBLAS): experts
    that got no token are never dequantized, and only x, S = x_lora·A_e^T and the factors are
    saved for backward, which dequantizes again.
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_A, lora_B, layer: "QuantLoRAExperts", counts: tuple):
        backend = backends.get_backend(x.device)
        y = x.new_empty(x.shape[0], layer.out_features)
        S_parts = []
        for e, lo, hi in _spans(counts):
            y[lo:hi], s = backend.forward(x[lo:hi], layer.expert(e), lora_A[e], lora_B[e], layer.scaling,
                                          x_lora=None if x_lora is None else x_lora[lo:hi])
            S_parts.append(s)
        S = torch.cat(S_parts) if S_parts else x.new_zeros(0, layer.rank)
        ctx.save_for_backward(x, x_lora, S, lora_A, lora_B)
        ctx.layer, ctx.counts = layer, counts
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_lora, S, lora_A, lora_B = ctx.saved_tensors
        layer = ctx.layer
        need_dx = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        backend = backends.get_backend(dy.device)
        dy = dy.contiguous()
        dx = torch.zeros_like(x) if need_dx else None
        dx_lora = torch.zeros_like(x_lora) if need_dx and x_lora is not None else None
        dA, dB = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
        s0 = 0
        with backend_region(dy.device.type):
            for e, lo, hi in _spans(ctx.counts):
                n = hi - lo
                dxe, dxle, dA[e], dB[e] = backend.backward(
                    dy[lo:hi], x[lo:hi], S[s0:s0 + n], layer.expert(e), lora_A[e], lora_B[e], layer.scaling,
                    x_lora=None if x_lora is None else x_lora[lo:hi], need_dx=need_dx)
                s0 += n
                if need_dx:
                    dx[lo:hi] = dxe
                    if dx_lora is not None:
                        dx_lora[lo:hi] = dxle
        return (dx if ctx.needs_input_grad[0] else None, dx_lora if ctx.needs_input_grad[1] else None,
                dA if ctx.needs_input_grad[2] else None, dB if ctx.needs_input_grad[3] else None, None, None)


# ---------------------------------------------------------------------------------------------
# The packed module
# ---------------------------------------------------------------------------------------------
class QuantLoRAExperts(PackedLoRALayer):
    """One projection of E experts: packed 2/3/4-bit (or NF4) weights plus per-expert LoRA.

    Expert e's weight Ŵ_e is (out_features, in_features) in nn.Linear's orientation, whatever the
    layout of the parameter it replaced (``transposed`` records that layout, for merging back).
    Buffers (the :class:`QuantizedWeight` buffers stacked over E; K = in, N = out, G groups):

    * ``qweight``: int32 [E, Kp * bits / 32, N]
    * ``scales``: float16 [E, G, N]; ``zeros``: float16 [E, G, N] (None for NF4)

    Trainable: ``lora_A`` [E, rank, in] and ``lora_B`` [E, out, rank] (PEFT's ``lora_`` prefix),
    in ``factor_dtype(lora_config, dtype)`` as :class:`~cloq_engine.nn.QuantLoRALinear`'s: both kinds
    are :class:`~cloq_engine.packed_layer.PackedLoRALayer` (checks, the layer's own quantization
    config under a k-quant grid, buffers, factors, dropout, dense views). Buffers keep their dtypes
    under ``model.half()`` / ``.to(bf16)`` (only device moves apply).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, quant_config: QuantConfig,
                 lora_config: LoRAConfig, transposed: bool = False, device=None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, quant_config, lora_config, lead=(num_experts,), device=device,
                         dtype=dtype)
        self.num_experts = num_experts
        self.transposed = bool(transposed)

    @classmethod
    def from_quantized(cls, qws: Sequence[QuantizedWeight], lora_A: torch.Tensor, lora_B: torch.Tensor,
                       lora_config: LoRAConfig, quant_config: QuantConfig, transposed: bool = False,
                       dtype: torch.dtype = torch.float32) -> "QuantLoRAExperts":
        """Stack per-expert quantized weights (all of one shape) and factors A [E, r, in], B [E, out, r]."""
        if any(q.perm is not None for q in qws):
            raise ValueError("act-order permutations are not supported for experts (use act_order=False)")
        q0 = qws[0]
        layer = cls(len(qws), q0.in_features, q0.out_features, quant_config, lora_config, transposed,
                    device="meta", dtype=dtype)
        packed = {"qweight": torch.stack([q.qweight for q in qws]), "scales": torch.stack([q.scales for q in qws])}
        if q0.zeros is not None:
            packed["zeros"] = torch.stack([q.zeros for q in qws])
        layer._load_packed(packed, lora_A.contiguous(), lora_B.contiguous())
        return layer

    # -- views ---------------------------------------------------------------------------------
    def expert(self, e: int) -> QuantizedWeight:
        """Expert ``e``'s packed weight (views of the stacked buffers, no copy)."""
        return QuantizedWeight(self.qweight[e], self.scales[e], None if self.zeros is None else self.zeros[e],
                               self.bits, self.group_size, self.in_features, self.out_features, self.method)

    def dequantize(self) -> torch.Tensor:
        """Ŵ of every expert, float32 [E, out, in] (for merging and tests; the forward never builds it)."""
        return torch.stack([self.expert(e).dequantize() for e in range(self.num_experts)])

    def dense_parameter(self, merge: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Ŵ (+ scaling·B·A when ``merge``) in the layout of the parameter this module replaced."""
        w = self.dense_weight(merge)
        w = w.transpose(1, 2) if self.transposed else w
        return w.contiguous().to(dtype or self.lora_A.dtype)

    # -- compute -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """x [S, in] sorted by expert, ``counts[e]`` rows each -> [S, out] (in the autocast dtype
        under autocast, as nn.Linear)."""
        counts = tuple(int(c) for c in counts)
        return packed_forward(self, x, lambda x2, x_lora: QuantExpertsFunction.apply(
            x2, x_lora, self.lora_A, self.lora_B, self, counts))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, {self._repr_fields()}, transposed={self.transposed}"


# ---------------------------------------------------------------------------------------------
# The experts forward (registered with transformers' ExpertsInterface)
# ---------------------------------------------------------------------------------------------
# A recorder (calibration) sees every projection's input:
# recorder(module, proj_name, x_sorted, counts, token_idx, num_tokens); token_idx[i] is the token row i came from.
Recorder = Callable[[nn.Module, str, torch.Tensor, List[int], torch.Tensor, int], None]
RECORDER_ATTR = "_cloq_recorder"


def _dense_projection(weight: torch.Tensor, x: torch.Tensor, counts: Sequence[int], transposed: bool) -> torch.Tensor:
    w = dense_expert_weight(weight, transposed)  # [E, out, in]
    y = x.new_zeros(x.shape[0], w.shape[1])
    for e, lo, hi in _spans(counts):
        y[lo:hi] = x[lo:hi] @ w[e].t().to(x.dtype)
    return y


def _project(module: nn.Module, name: str, x: torch.Tensor, counts: List[int], expert_ids: torch.Tensor,
             token_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    recorder = getattr(module, RECORDER_ATTR, None)
    if recorder is not None:
        recorder(module, name, x, counts, token_idx, num_tokens)
    proj = getattr(module, name)
    if isinstance(proj, QuantLoRAExperts):
        y = proj(x, counts)
    else:
        y = _dense_projection(proj, x, counts, module.is_transposed)
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[expert_ids].to(y.dtype)
    return y


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward contract (see ``grouped_mm_experts_forward``) for packed or
    dense projections: tokens sorted by expert, one projection call per expert that got tokens,
    the routing weights applied and the top-k contributions summed per token in a fixed order."""
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("expert parallelism is not supported by the cloq experts implementation")
    num_top_k = top_k_index.shape[-1]
    num_tokens, hidden_dim = hidden_states.shape[0], hidden_states.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    ids_sorted = expert_ids[order]
    counts = torch.bincount(ids_sorted, minlength=self.num_experts).tolist()  # the one host sync
    token_idx = order // num_top_k
    x = hidden_states[token_idx]
    up = "gate_up_proj" if self.has_gate else "up_proj"
    h = _project(self, up, x, counts, ids_sorted, token_idx, num_tokens)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _project(self, "down_proj", h, counts, ids_sorted, token_idx, num_tokens)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out[inverse].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def register_experts_implementation() -> None:
    """Add :func:`experts_forward` to transformers' ``ALL_EXPERTS_FUNCTIONS`` as "cloq" (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not experts_forward:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)


def use_cloq_experts(model: nn.Module) -> None:
    """Route every experts module of ``model`` through :func:`experts_forward` via transformers'
    own switch (``set_experts_implementation``), or the config's field for non-PreTrainedModels."""
    register_experts_implementation()
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter(EXPERTS_IMPLEMENTATION)
        return
    for m in model.modules():
        if is_experts_module(m):
            m.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
