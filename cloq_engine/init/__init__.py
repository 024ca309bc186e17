"""LoRA initialisation from ``(W, Q, H)``: cloq | quailora | loftq | svd | zero (docs/design.md §4).

* :func:`init_lora` computes factors for a given quantized weight: ``scaling·B·A ≈ W - Q`` in the
  calibrated norm ``tr(M H M^T)``.
* :func:`init_loftq` runs LoftQ's alternation, which re-quantizes, so it returns the new weight.
* :func:`initialize` is the one call a model driver needs: quantize, then initialise (any
  method, options from the LoRAConfig), then optionally re-quantize jointly (:mod:`.requant`).

Methods live in a registry (:mod:`.registry`) that the method modules fill. All factors come back
float32 on W's device; the work runs on that device.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Tuple

import torch

from ..config import InitMethod, LoRAConfig, QuantConfig, QuantMethod
from ..formats import QuantizedWeight
from ..quant import quantize_weight
from .cloq import cloq
from .loftq import DEFAULT_NUM_ITERS, loftq, svd, svd_init
from .objective import calibrated_error
from .quailora import quailora
from .registry import InitSpec, get_init, init_method, register_init
from .requant import requantize
from .zero import zero, zero_init

__all__ = ["init_lora", "init_loftq", "initialize", "init_options", "calibrated_error", "cloq", "quailora",
           "loftq", "svd", "svd_init", "zero", "zero_init", "requantize", "register_init", "get_init", "InitSpec"]

_COMPUTE_DTYPES = (torch.float32, torch.float64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_W(W) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"`W` must be a 2-D tensor (out_features, in_features); got {getattr(W, 'shape', type(W))}")
    if W.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`W` has unsupported dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError("`W` is empty")
    if not _all_finite(W):
        raise ValueError("`W` contains NaN or Inf values")


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in ``x``. A finite sum proves it (NaN and ±Inf propagate through a sum) and costs
    one read; only a sum that overflowed or met a NaN/Inf takes the elementwise test."""
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


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
    if not _all_finite(H):
        raise ValueError("`H` contains NaN or Inf values")
    Hf = H.float()
    if not _is_symmetric(Hf):
        raise ValueError("`H` is not symmetric; it must be a Gram matrix X^T X")
    if float(torch.diagonal(Hf).sum()) <= 0:
        raise ValueError("`H` is zero (no calibration activations reached this layer)")
    _check_gram(Hf)


# Rows per block of the O(in²) checks: a block and its transposed column block stay in cache, and
# no in×in temporary is made.
_CHECK_BLOCK = 256


def _is_symmetric(H: torch.Tensor, rtol: float = 1e-4) -> bool:
    """max|H - H^T| <= rtol·max|H|: each row block against the transposed column block on and right
    of the diagonal (the upper triangle, read once), in cache-sized blocks."""
    asym = 0.0
    for r0 in range(0, H.shape[0], _CHECK_BLOCK):
        rows = H[r0:r0 + _CHECK_BLOCK, r0:]
        asym = max(asym, float((rows - H[r0:, r0:r0 + _CHECK_BLOCK].t()).abs().max()))
    return not asym > rtol * max(float(H.abs().max()), 1e-30)


def _check_gram(H: torch.Tensor, rtol: float = 1e-4) -> None:
    """Cheap necessary conditions of a Gram matrix X^T X, O(in²), by row blocks: a non-negative
    diagonal and |H_ij| <= sqrt(H_ii·H_jj) (Cauchy-Schwarz). Damping would otherwise
    "fix" an indefinite H and return factors for a meaningless objective."""
    d = torch.diagonal(H)
    scale = float(d.max())
    if float(d.min()) < -rtol * scale:
        i = int(d.argmin())
        raise ValueError(f"`H` is not positive semi-definite: H[{i}, {i}] = {float(d[i]):.4g} < 0 "
                         "(it must be a Gram matrix X^T X)")
    # Cauchy-Schwarz on squares of H / max(diag), not sqrt(outer(d, d)): no overflow, and no large
    # elementwise sqrt (on this project's 2-core VMs the first large torch.sqrt of a process returned
    # values 2.4e-4 low on one of its two threads in about 1 run of 5, refusing a valid H). It flags
    # |H_ij| beyond sqrt(H_ii·H_jj) + rtol·scale at most, since sqrt(H_ii·H_jj) <= scale.
    dn = d.clamp(min=0) / scale
    n = H.shape[0]
    worst, at = -math.inf, (0, 0)
    for r0 in range(0, n, _CHECK_BLOCK):
        rows = H[r0:r0 + _CHECK_BLOCK]
        excess = torch.square(rows / scale) - torch.outer(dn[r0:r0 + _CHECK_BLOCK], dn)
        k = int(excess.argmax())
        if float(excess.view(-1)[k]) > worst:
            worst, at = float(excess.view(-1)[k]), (r0 + k // n, k % n)
    if worst > 2 * rtol + rtol * rtol:
        dc = d.clamp(min=0)
        i, j = at
        raise ValueError(f"`H` is not positive semi-definite: |H[{i}, {j}]| = {float(H[i, j].abs()):.4g} exceeds "
                         f"sqrt(H[{i}, {i}]·H[{j}, {j}]) = {float(torch.sqrt(dc[i] * dc[j])):.4g} "
                         "(it must be a Gram matrix X^T X)")


def _check_opts(spec: InitSpec, opts: dict) -> torch.dtype:
    allowed = spec.options + ("dtype",)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={spec.method.value!r}; allowed: {list(allowed)}")
    dtype = opts.pop("dtype", torch.float32)
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64; got {dtype!r}")
    return dtype


def init_lora(W: torch.Tensor, qw: QuantizedWeight, H: Optional[torch.Tensor], rank: int, method="cloq",
              scaling: float = 1.0, **opts) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)``, A (rank, in) and B (out, rank), with ``scaling·B·A ≈ W - qw.dequantize()``.

    Methods (``opts`` in brackets; every method but "zero" also takes ``dtype``):

    * "cloq": the closed-form optimum of ``tr(M H M^T)`` [damp, max_tries, svd, oversample,
      power_iters, seed, dtype]. ``svd`` is "auto" (exact for small layers, block Krylov for
      large), "exact", "randomized" or "krylov"; ``power_iters`` None iterates until the captured
      energy settles. ``damp`` (default 1e-6) is relative to mean(diag H), grown only if the
      Cholesky fails. ``dtype`` (float32 default, or float64) is the compute precision.
    * "quailora": ALS on the same objective from the SVD of ``W - Q`` [iters, tol, damp, svd, ...,
      history: a list that receives the objective after each sweep].
    * "svd": the plain rank-r SVD of ``W - Q`` (one LoftQ step with Q fixed; ``H`` unused).
    * "zero": ``B = 0``, A Kaiming-uniform as in PEFT [seed]; ``H`` unused.

    "loftq" re-quantizes W, so it is not available here: use :func:`init_loftq` or :func:`initialize`.
    ``H`` (in, in) is required by "cloq" and "quailora". Returns float32 tensors on ``W``'s device.
    """
    spec = get_init(method)
    if spec.requantizes:
        raise ValueError(
            f"method={spec.method.value!r} re-quantizes W and returns a new Q: use init_loftq() or initialize(); "
            "method='svd' is the plain SVD of W - Q with Q fixed"
        )
    opts = dict(opts)
    dtype = _check_opts(spec, opts)
    _check_W(W)
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"`qw` must be a QuantizedWeight; got {type(qw).__name__}")
    if tuple(qw.shape) != tuple(W.shape):
        raise ValueError(f"`qw` has shape {tuple(qw.shape)} but `W` has shape {tuple(W.shape)}")
    _check_rank(rank, W.shape)
    _check_scaling(scaling)
    in_features = W.shape[1]
    device = W.device
    if spec.method == InitMethod.ZERO:
        R = W  # zero init reads only the shape and device
    else:
        R = W.to(dtype) - qw.dequantize().to(device=device, dtype=dtype)
    Hc = None
    if spec.needs_H:
        if H is None:
            raise ValueError(
                f"method={spec.method.value!r} needs the calibration Gram matrix `H` (in_features x in_features)"
            )
        _check_H(H, in_features)
        Hc = H.to(device=device, dtype=dtype)
    A, B = spec.fn(R, Hc, rank, scaling, **opts)
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
    spec = get_init(InitMethod.LOFTQ)
    opts = dict(opts)
    if "iters" in opts:
        raise ValueError("init_loftq takes `num_iters`, not `iters`")
    dtype = _check_opts(spec, opts)
    _check_W(W)
    _check_rank(rank, W.shape)
    _check_scaling(scaling)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"`num_iters` must be a positive integer; got {num_iters!r}")
    if quant_config.method == QuantMethod.GPTQ and H is None:
        raise ValueError("LoftQ with a GPTQ quantizer needs the calibration Gram matrix `H`")
    qw, A, B = spec.fn(W.to(dtype), quant_config, rank, scaling, H=H, iters=num_iters, **opts)
    return qw, A.float().contiguous(), B.float().contiguous()


# LoRAConfig field -> init option, for the methods whose registry entry accepts that option.
_CONFIG_OPTIONS = (("init_solver", "svd"), ("init_power_iters", "power_iters"), ("init_damp", "damp"),
                   ("init_iters", "iters"))


def init_options(lora_config: LoRAConfig) -> dict:
    """The ``init_lora``/LoftQ options that ``lora_config``'s init fields set for its method."""
    spec = get_init(lora_config.init)
    opts = {}
    for field, opt in _CONFIG_OPTIONS:
        value = getattr(lora_config, field)
        if opt in spec.options and value is not None:
            opts[opt] = value.value if field == "init_solver" else value
    return opts


def initialize(W: torch.Tensor, quant_config: QuantConfig, lora_config: LoRAConfig,
               H: Optional[torch.Tensor] = None, name: Optional[str] = None, history: Optional[list] = None,
               timings: Optional[dict] = None, one_shot: Optional[list] = None,
               ) -> Tuple[QuantizedWeight, torch.Tensor, torch.Tensor]:
    """Quantize ``W`` and initialise its LoRA factors as ``lora_config`` says: ``(qw, A, B)``.

    ``H`` is required by GPTQ and by the calibrated inits ("cloq", "quailora"). ``name`` (the
    layer's qualified name) picks its rank from ``lora_config.rank_pattern``. With
    ``lora_config.requant_rounds`` the quantizer and the init then alternate (:mod:`.requant`);
    ``history``, if a list, receives the calibrated objective of each of those rounds; ``timings``,
    if a dict, receives "quantize_s" and "init_s" (wall seconds; re-quantization counts as init).
    """
    if not isinstance(quant_config, QuantConfig):
        raise TypeError(f"`quant_config` must be a QuantConfig; got {type(quant_config).__name__}")
    if not isinstance(lora_config, LoRAConfig):
        raise TypeError(f"`lora_config` must be a LoRAConfig; got {type(lora_config).__name__}")
    spec = get_init(lora_config.init)
    if H is None and spec.needs_H:
        raise ValueError(
            f"init={spec.method.value!r} needs the calibration Gram matrix `H` (in_features x in_features)"
        )
    _check_W(W)
    rank = lora_config.rank if name is None else lora_config.rank_for(name)
    scaling = lora_config.scaling_for_rank(rank)
    _check_rank(rank, W.shape)
    opts = init_options(lora_config)
    W = W.float()
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    if spec.requantizes:
        iters = opts.pop("iters", DEFAULT_NUM_ITERS)
        qw, A, B = init_loftq(W, quant_config, rank, scaling, num_iters=iters, H=H, **opts)
        timings.update(quantize_s=0.0, init_s=time.perf_counter() - t0)
        return qw, A, B
    qw = quantize_weight(W, quant_config, H=H)
    if one_shot is not None:
        one_shot.append(qw)
    t1 = time.perf_counter()
    A, B = init_lora(W, qw, H, rank, method=spec.method, scaling=scaling, **opts)
    if lora_config.requant_rounds:
        def solve(R):
            return spec.fn(R, H.to(device=W.device, dtype=W.dtype), rank, scaling, **opts)

        qw, A, B = requantize(W, H.to(device=W.device, dtype=W.dtype), quant_config, qw, A, B, solve,
                              scaling=scaling, rounds=lora_config.requant_rounds, tol=lora_config.requant_tol,
                              history=history)
        A, B = A.float().contiguous(), B.float().contiguous()
    timings.update(quantize_s=t1 - t0, init_s=time.perf_counter() - t1)
    return qw, A, B
