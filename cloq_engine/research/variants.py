"""Named init variants, as ``cloq compare`` and ``cloq bench finetune`` run them.

A variant is an init method plus how it is run: ``loftq`` alternates with its own RTN quantizer
(an uncalibrated method, as in its paper), ``cloq`` is CLoQ with its published split (the
library's default ``LoRAConfig`` balances calibrated inits; every other calibrated variant keeps that
default), ``cloq+requant`` is CLoQ with joint re-quantization
(3 rounds), ``cloq+balanced`` is CLoQ with its factors re-split to equal scale in weight
space (``LoRAConfig.balance``), ``cloq+ranks`` is CLoQ with per-layer ranks planned under the parameter budget of
the uniform rank. One registry, so that the comparison and the fine-tuning study cannot drift.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, Iterable, Optional, Tuple

from torch import nn

from ..config import LoRAConfig, QuantConfig

# name -> (LoRAConfig, QuantConfig, base model, calibration) -> (QuantConfig, LoRAConfig)
_Resolver = Callable[[LoRAConfig, QuantConfig, Optional[nn.Module], Optional[list]], Tuple[QuantConfig, LoRAConfig]]
VARIANTS: Dict[str, _Resolver] = {}


def register_variant(name: str):
    def deco(fn: _Resolver) -> _Resolver:
        VARIANTS[name] = fn
        return fn

    return deco


def _with_init(lc: LoRAConfig, init: str, **changes) -> LoRAConfig:
    return LoRAConfig.from_dict({**lc.to_dict(), "init": init, **changes})


for _plain in ("zero", "quailora", "svd"):
    register_variant(_plain)(lambda lc, qc, base, calib, _i=_plain: (qc, _with_init(lc, _i)))


@register_variant("cloq")
def _cloq(lc, qc, base, calib):  # CLoQ's own split, as published (the library default balances it)
    return qc, _with_init(lc, "cloq", balance=False)


@register_variant("loftq")
def _loftq(lc, qc, base, calib):
    method = "rtn" if qc.method.value == "gptq" else qc.method.value
    return dataclasses.replace(qc, method=method), _with_init(lc, "loftq")


@register_variant("cloq+requant")
def _requant(lc, qc, base, calib):
    return qc, _with_init(lc, "cloq", requant_rounds=3)


@register_variant("cloq+balanced")
def _balanced(lc, qc, base, calib):
    return qc, _with_init(lc, "cloq", balance=True)


@register_variant("cloq+ranks")
def _ranks(lc, qc, base, calib):
    from ..rank_plan import plan_ranks

    if base is None or calib is None:
        raise ValueError("the cloq+ranks variant plans ranks on the model: pass the base model and calibration data")
    plain = _with_init(lc, "cloq")
    return qc, _with_init(lc, "cloq", rank_pattern=plan_ranks(copy.deepcopy(base), qc, plain, calib))


def resolve_variant(name: str, lora_config: LoRAConfig, quant_config: QuantConfig,
                    base: Optional[nn.Module] = None, calib: Optional[Iterable] = None) -> Tuple[QuantConfig, LoRAConfig]:
    """The (QuantConfig, LoRAConfig) that variant ``name`` prepares with."""
    if name not in VARIANTS:
        raise ValueError(f"unknown init variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name](lora_config, quant_config, base, None if calib is None else list(calib))
