"""What both packed layer kinds share: :class:`PackedLoRALayer`, the base of
:class:`~cloq_engine.nn.QuantLoRALinear` (one weight) and :class:`~cloq_engine.experts.QuantLoRAExperts`
(E stacked expert weights).

Written once here, so the two kinds cannot drift apart again: the shape checks
(:func:`check_layer_shape`, also the plan step's per-target check), the layer's own quantization
config (a k-quant grid's fallback, ``quant.grids.layer_config``), the packed buffers and LoRA
factors with an optional leading expert dimension, the factor dtype (``layer_factory.factor_dtype``), the
LoRA dropout, loading from packed tensors, and the dense views (``dequantize``, ``delta_weight``,
``dense_weight``). The forward wrapper both kinds share is ``layer_forward.packed_forward``; the
hf/ side's one dispatch over both kinds (empty skeletons, densify) is ``hf/skeleton.py`` and
``hf/merge.py``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type, TypeVar

import torch
from torch import nn

from .config import LoRAConfig, QuantConfig
from .layer_factory import factor_dtype
from .formats import PackedBuffers, check_group_size, group_count, packed_rows
from .quant.grids import layer_config


def check_layer_shape(in_features: int, out_features: int, group_size: int, rank: int, where: str = "") -> None:
    """The one check that a (out_features, in_features) weight can take ``group_size`` groups and a
    rank-``rank`` LoRA; ``where`` prefixes the message (a target's name)."""
    check_group_size(in_features, group_size, where)
    if rank > min(in_features, out_features):
        raise ValueError(f"{where}rank={rank} exceeds min(in_features, out_features)={min(in_features, out_features)}")


class PackedLoRALayer(PackedBuffers, nn.Module):
    """Packed 2/3/4-bit (or NF4) base weight(s) plus LoRA factors; ``lead`` is the shape put in front
    of every buffer and factor: ``()`` for one weight, ``(E,)`` for E experts.

    Buffers ``qweight`` int32 [*lead, Kp·bits/32, out], ``scales`` float16 [*lead, G, out], ``zeros``
    float16 [*lead, G, out] (None for NF4): never Parameters, and they keep their dtypes under
    ``model.half()`` / ``.to(bf16)`` (only device moves apply). Trainable: ``lora_A`` [*lead, rank, in]
    and ``lora_B`` [*lead, out, rank] in ``factor_dtype(lora_config, dtype)``.
    """

    def __init__(self, in_features: int, out_features: int, quant_config: QuantConfig, lora_config: LoRAConfig,
                 lead: Tuple[int, ...] = (), device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        quant_config = layer_config(quant_config, in_features)  # this layer's bits (a k-quant grid's fallback)
        check_layer_shape(in_features, out_features, quant_config.group_size, lora_config.rank)
        self.in_features, self.out_features = in_features, out_features
        self.quant_config, self.lora_config = quant_config, lora_config
        self.bits, self.group_size, self.rank = quant_config.bits, quant_config.group_size, lora_config.rank
        self.method = quant_config.method.value
        self.scaling = lora_config.scaling
        groups = group_count(in_features, self.group_size)
        self.register_buffer("qweight", torch.empty(*lead, packed_rows(in_features, self.bits), out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(*lead, groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("zeros", None if self.method == "nf4" else
                             torch.empty(*lead, groups, out_features, dtype=torch.float16, device=device))
        factors = factor_dtype(lora_config, dtype)
        self.lora_A = nn.Parameter(torch.empty(*lead, self.rank, in_features, dtype=factors, device=device))
        self.lora_B = nn.Parameter(torch.empty(*lead, out_features, self.rank, dtype=factors, device=device))
        self.lora_dropout = nn.Dropout(lora_config.dropout) if lora_config.dropout > 0 else nn.Identity()

    def _load_packed(self, packed: Dict[str, torch.Tensor], lora_A: torch.Tensor, lora_B: torch.Tensor,
                     extra: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Assign ``packed`` (qweight, scales and zeros unless NF4), the factors (cast to this layer's
        factor dtype) and ``extra`` (a bias) in place of the empty tensors (built on ``meta``)."""
        factors = self.lora_A.dtype
        state = {**packed, "lora_A": lora_A.detach().to(factors), "lora_B": lora_B.detach().to(factors),
                 **(extra or {})}
        self.load_state_dict(state, assign=True)

    # -- dense views ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the packed buffers (qweight, scales, zeros)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """Ŵ in float32, [*lead, out, in]."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """scaling·B·A in float32, [*lead, out, in]."""
        B, A = self.lora_B.float(), self.lora_A.float()
        return self.scaling * (torch.bmm(B, A) if A.dim() == 3 else B @ A)

    def dense_weight(self, merge: bool) -> torch.Tensor:
        """Ŵ (+ scaling·B·A when ``merge``) in float32, [*lead, out, in], on the factors' device."""
        w = self.dequantize().to(self.lora_A.device)
        return w + self.delta_weight() if merge else w

    def _repr_fields(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, method={self.method}, rank={self.rank}, scaling={self.scaling:g}")


L = TypeVar("L", bound=nn.Module)


def packed_layers(model: nn.Module, kind: Type[L] = PackedLoRALayer) -> Dict[str, L]:
    """``model``'s packed layers of ``kind`` (default both kinds), by qualified name, in its order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}
