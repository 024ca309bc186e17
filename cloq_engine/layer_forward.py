"""The forward wrapper shared by both packed layer kinds (``QuantLoRALinear``, ``QuantLoRAExperts``).

What it does around a layer's autograd Function, once for both: refuse a non-float input (nn.Linear
raises there too; the kernels would return zeros) or a wrong last dimension, apply the LoRA dropout
(training only) to the LoRA branch's input, and do what autocast does for nn.Linear: the input cast
to the autocast dtype, the output returned in it, and autocast switched off inside, where it would
recast the backends' float32 accumulators (the C++ ops take float32/float64 only) and LoRA products.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

# compute(x [S, in], x_lora [S, in] or None) -> y [S, out]
Compute = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would cast ``x`` to for a linear layer (None: autocast is off on x's
    device, or x is float64, which autocast leaves alone)."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def backend_region(device_type: str):
    """Where the backends run, forward and backward: autocast off (they pick their own compute
    dtypes; a trainer may call backward with autocast still on)."""
    return torch.autocast(device_type, enabled=False)


def packed_forward(layer: nn.Module, x: torch.Tensor, compute: Compute, perm: Optional[torch.Tensor] = None,
                   dropout: bool = True) -> torch.Tensor:
    """``layer``'s output for ``x`` [..., in_features]: ``compute`` on the flattened input, wrapped
    in the checks, dropout and autocast handling above. ``perm``: the packed weight's input
    permutation (a GPTQ act-order import), applied to the base branch's input only. ``dropout``:
    False where the layer's own LoRA branch does not run (PEFT's adapter replaces it)."""
    if not x.is_floating_point():
        raise RuntimeError(f"{type(layer).__name__} needs a floating-point input; got {x.dtype}")
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has last dimension {x.shape[-1]}; expected in_features={layer.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    x_lora = None
    if dropout and isinstance(layer.lora_dropout, nn.Dropout) and layer.training:
        x_lora = layer.lora_dropout(x2)
    if perm is not None:  # the packed weight's columns are in perm order; the LoRA's are not
        x_lora = x2 if x_lora is None else x_lora
        x2 = x2.index_select(1, perm)
    amp_dtype = autocast_dtype(x2)
    if amp_dtype is None:
        y = compute(x2, x_lora)
    else:
        x2 = x2.to(amp_dtype)
        x_lora = None if x_lora is None else x_lora.to(amp_dtype)
        with backend_region(x2.device.type):
            y = compute(x2, x_lora)
    return y.reshape(*lead, layer.out_features)
