"""Plan per-layer LoRA ranks for a model from its whitened residual spectra (:mod:`.init.rank_alloc`).

``plan_ranks`` quantizes every target layer once on full-precision calibration inputs, takes the
top singular values of its whitened error, and spends the parameter budget of a uniform
``lora_config.rank`` where a rank buys the most relative objective. The result is a PEFT-style
``rank_pattern`` for ``LoRAConfig``; ``prepare_model`` then quantizes again, sequentially.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from . import calib as calib_mod
from .config import LoRAConfig, QuantConfig
from .init.rank_alloc import allocate_ranks, whitened_spectrum
from .layer_factory import linear_weight
from .quant import quantize_weight

logger = logging.getLogger(__name__)


def plan_ranks(model: nn.Module, quant_config: QuantConfig, lora_config: LoRAConfig, calib: Iterable,
               max_rank: Optional[int] = None, min_rank: int = 1) -> Dict[str, int]:
    """``{layer: rank}`` with the parameter count of rank ``lora_config.rank`` everywhere.

    ``max_rank`` (default 4·rank) caps any one layer. The model is not changed.
    """
    from .hf.targets import find_targets

    targets = find_targets(model, lora_config)
    cap = max_rank or 4 * lora_config.rank
    gains, costs = {}, {}

    def layer_fn(name, module, H):
        W = linear_weight(module).float()
        Hf = H.float()
        qw = quantize_weight(W, quant_config, H=Hf)
        s2 = whitened_spectrum(W - qw.dequantize().to(W.device), Hf, min(cap, *W.shape), damp=lora_config.init_damp)
        out_energy = float(((W.double() @ Hf.double()) * W.double()).sum())
        gains[name] = s2 / max(out_energy, 1e-30)
        costs[name] = W.shape[0] + W.shape[1]
        return module  # planning only: the layer stays as it is

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        grams = calib_mod.full_pass_grams(model, targets, calib_mod.batch_samples(list(calib), 8, device))
        for name, H in grams.items():
            layer_fn(name, model.get_submodule(name), H)
    model.train(was_training)
    budget = sum(lora_config.rank * c for c in costs.values())
    ranks = allocate_ranks(gains, costs, budget, min_rank=min_rank)
    logger.info("planned ranks: %s", ranks)
    return ranks
