"""LoRA initialisation from ``(W, Q, H)``: cloq | quailora | loftq | zero (DESIGN.md §4).

* :func:`init_lora` computes factors for a given quantized weight: ``scaling·B·A ≈ W - Q`` in the
  calibrated norm ``tr(M H M^T)``.
* :func:`init_loftq` runs LoftQ's alternation, which re-quantizes, so it returns the new weight.
* :func:`initialize` is the one call a model driver needs: quantize, then initialise, any method.

All factors come back float32 on W's device; the work runs on that device.
"""
from __future__ import annotations

import enum
import math
from typing import Optional, Tuple

import torch

from ..config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from ..formats import QuantizedWeight
from ..quant import quantize_weight
from .cloq import cloq
from .loftq import DEFAULT_NUM_ITERS, loftq, svd_init
from .objective import calibrated_error
from .quailora import quailora
from .zero import zero_init

__all__ = ["init_lora", "init_loftq", "initialize", "calibrated_error", "cloq", "quailora", "loftq", "zero_init"]

_SVD_OPTS = ("svd", "oversample", "power_iters", "seed")
_ALLOWED_OPTS = {
    InitMethod.CLOQ: _SVD_OPTS + ("damp", "max_tries", "dtype"),
    InitMethod.QUAILORA: _SVD_OPTS + ("damp", "iters", "tol", "history", "dtype"),
    InitMethod.LOFTQ: _SVD_OPTS + ("dtype",),
    InitMethod.ZERO: ("seed",),
}
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _method(method) -> InitMethod:
    try:
        return InitMethod(method.value if isinstance(method, enum.Enum) else str(method).lower())
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in InitMethod)
        raise ValueError(f"`method` must be one of {allowed}; got {method!r}") from None


def _check_W(W) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"`W` must be a 2-D tensor (out_features, in_features); got {getattr(W, 'shape', type(W))}")
    if W.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`W` has unsupported dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError("`W` is empty")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("`W` contains NaN or Inf values")


def _check_rank(rank, shape) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer; got {rank!r}")
    if rank > min(shape):
        raise ValueError(f"`rank` must be at most min(out_features, in_features) = {min(shape)}; got {rank}")


def _check_scaling(scaling) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise ValueError(f"`scaling` must be a positive finite number; got {scaling!r}")


def _check_H(H, in_features: int) -> None:
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"`H` must have shape ({in_features}, {in_features}); got {tuple(getattr(H, 'shape', ()))}")
    if H.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`H` has unsupported dtype {H.dtype}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("`H` contains NaN or Inf values")
    Hf = H.float()
    if bool((Hf - Hf.transpose(0, 1)).abs().max() > 1e-4 * Hf.abs().max().clamp(min=1e-30)):
        raise ValueError("`H` is not symmetric; it must be a Gram matrix X^T X")
    if float(torch.diagonal(Hf).sum()) <= 0:
        raise ValueError("`H` is zero (no calibration activations reached this layer)")


def _check_opts(method: InitMethod, opts: dict) -> torch.dtype:
    unknown = sorted(set(opts) - set(_ALLOWED_OPTS[method]))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method={method.value!r}; allowed: {list(_ALLOWED_OPTS[method])}"
        )
    dtype = opts.pop("dtype", torch.float32)
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {dtype!r}")
    return dtype


def init_lora(W: torch.Tensor, qw: QuantizedWeight, H: Optional[torch.Tensor], rank: int, method="cloq",
              scaling: float = 1.0, **opts) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)``, A (rank, in) and B (out, rank), with ``scaling·B·A ≈ W - qw.dequantize()``.

    Methods (``opts`` in brackets):

    * "cloq": the closed-form optimum of ``tr(M H M^T)`` [damp, max_tries, svd, oversample,
      power_iters, seed, dtype]. ``svd`` is "auto" (exact for small layers, randomized for large),
      "exact" or "randomized". ``damp`` (default 1e-6) is relative to mean(diag H), grown only if the
      Cholesky fails. ``dtype`` (float32 default, or float64) is the compute precision.
    * "quailora": ALS on the same objective from the SVD of ``W - Q`` [iters, tol, damp, svd, ...,
      history: a list that receives the objective after each sweep].
    * "loftq": with Q fixed, one LoftQ step: the plain rank-r SVD of ``W - Q`` (``H`` unused); use
      :func:`init_loftq` for the alternation that also re-quantizes.
    * "zero": ``B = 0``, A Kaiming-uniform as in PEFT [seed]; ``H`` unused.

    ``H`` (in, in) is required by "cloq" and "quailora". Returns float32 tensors on ``W``'s device.
    """
    method = _method(method)
    opts = dict(opts)
    dtype = _check_opts(method, opts)
    _check_W(W)
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"`qw` must be a QuantizedWeight; got {type(qw).__name__}")
    if tuple(qw.shape) != tuple(W.shape):
        raise ValueError(f"`qw` has shape {tuple(qw.shape)} but `W` has shape {tuple(W.shape)}")
    _check_rank(rank, W.shape)
    _check_scaling(scaling)
    out_features, in_features = W.shape
    device = W.device
    if method == InitMethod.ZERO:
        return zero_init(out_features, in_features, rank, device=device, seed=opts.get("seed"))
    R = W.to(dtype) - qw.dequantize().to(device=device, dtype=dtype)
    if method == InitMethod.LOFTQ:
        A, B = svd_init(R, rank, scaling, **opts)
    else:
        if H is None:
            raise ValueError(f"method={method.value!r} needs the calibration Gram matrix `H` (in_features x in_features)")
        _check_H(H, in_features)
        Hc = H.to(device=device, dtype=dtype)
        fn = cloq if method == InitMethod.CLOQ else quailora
        A, B = fn(R, Hc, rank, scaling, **opts)
    return A.float().contiguous(), B.float().contiguous()


def init_loftq(W: torch.Tensor, quant_config: QuantConfig, rank: int, scaling: float = 1.0,
               num_iters: int = DEFAULT_NUM_ITERS, H: Optional[torch.Tensor] = None,
               **opts) -> Tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """LoftQ: ``(qw, A, B)`` after ``num_iters`` rounds of ``Q = quant(W - s·B·A)`` and SVD of ``W - Q``.

    ``H`` is only for a GPTQ quantizer (which needs it); the factors are uncalibrated.
    ``opts``: svd, oversample, power_iters, seed, dtype.
    """
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig; got {type(quant_config).__name__}")
    opts = dict(opts)
    dtype = _check_opts(InitMethod.LOFTQ, opts)
    _check_W(W)
    _check_rank(rank, W.shape)
    _check_scaling(scaling)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"`num_iters` must be a positive integer; got {num_iters!r}")
    if quant_config.method == QuantMethod.GPTQ and H is None:
        raise ValueError("LoftQ with a GPTQ quantizer needs the calibration Gram matrix `H`")
    qw, A, B = loftq(W.to(dtype), quant_config, rank, scaling, num_iters, H=H, **opts)
    return qw, A.float().contiguous(), B.float().contiguous()


def initialize(W: torch.Tensor, quant_config: QuantConfig, lora_config: LoRAConfig,
               H: Optional[torch.Tensor] = None) -> Tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """Quantize ``W`` and initialise its LoRA factors as ``lora_config.init`` says: ``(qw, A, B)``.

    ``H`` is required by GPTQ and by the calibrated inits ("cloq", "quailora").
    """
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig; got {type(quant_config).__name__}")
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"`lora_config` must be a LoRAConfig; got {type(lora_config).__name__}")
    method = lora_config.init
    if H is None and method in (InitMethod.CLOQ, InitMethod.QUAILORA):
        raise ValueError(f"init={method.value!r} needs the calibration Gram matrix `H` (in_features x in_features)")
    _check_W(W)
    _check_rank(lora_config.rank, W.shape)
    if method == InitMethod.LOFTQ:
        return init_loftq(W.float(), quant_config, lora_config.rank, lora_config.scaling, H=H)
    qw = quantize_weight(W, quant_config, H=H)
    A, B = init_lora(W.float(), qw, H, lora_config.rank, method=method, scaling=lora_config.scaling)
    return qw, A, B
