"""The baselines a GPU session compares against, each at its best, each reporting why it cannot run.

Layer-level decode peers (M <= 16), built on the GPU with random codes (their speed does not
depend on the values): torch's int4 tinygemm (``aten._weight_int4pack_mm``, W4 g128), GemLite
through its documented API (``gemlite.GemLiteLinear(W_nbits, group_size=, in_features=,
out_features=, input_dtype=, output_dtype=)`` then ``.pack(W_q uint8 [out, in], scales [out, in/g],
zeros [out, in/g])``, W = (W_q - zeros)·scales, as gemlite/core.py defines it), bitsandbytes'
``matmul_4bit`` (NF4).

Training baselines (model level, see ``train.py``): PEFT LoRA on the bf16 base with its default
(fp32 adapters, x cast to fp32 in the LoRA branch) and with ``autocast_adapter_dtype=False`` (bf16
adapters); the dense bf16 base with our LoRA folding (:class:`DenseFoldLoRALinear`: the same
per-product fold as the quantized large-M path, with nothing to dequantize: the limit that the
dequant can only add to); PEFT + bitsandbytes QLoRA.

A peer that cannot run raises :class:`Unavailable` with the reason; the session records it as
skipped, never drops it.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch
from torch import nn


class Unavailable(RuntimeError):
    """A baseline that cannot run here (not installed, no CUDA build, unsupported shape)."""


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or a CUDA-less build failing at import
        raise Unavailable(f"{name} not importable: {type(e).__name__}: {str(e)[:160]}") from e


def versions() -> Dict[str, str]:
    """Version of every peer package, or why it cannot be imported."""
    out = {}
    for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "gemlite"):
        try:
            out[name] = getattr(_import(name), "__version__", "?")
        except Unavailable as e:
            out[name] = f"unavailable ({e})"
    out["tinygemm"] = "available" if hasattr(torch.ops.aten, "_weight_int4pack_mm") else "unavailable (no aten op)"
    return out


# ---------------------------------------------------------------------------------------------
# Decode peers: each returns fn() running one forward per weight copy (rotated past the L2)
# ---------------------------------------------------------------------------------------------
def tinygemm_w4(x: torch.Tensor, in_f: int, out_f: int, copies: int, group: int = 128) -> Callable[[], None]:
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        raise Unavailable("torch has no aten._weight_int4pack_mm")
    if x.device.type != "cuda":
        raise Unavailable("tinygemm's int4 packing is a CUDA kernel")
    Wq = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, device=x.device)
    try:  # torch >= 2.5: uint8 [N, K/2] packed pairs
        packed_in = (Wq[:, ::2] << 4 | Wq[:, 1::2]).to(torch.uint8)
        packs = [torch.ops.aten._convert_weight_to_int4pack(packed_in, 8) for _ in range(copies)]
    except RuntimeError:
        packs = [torch.ops.aten._convert_weight_to_int4pack(Wq, 8) for _ in range(copies)]
    sz = (0.01 * torch.rand(in_f // group, out_f, 2, device=x.device)).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    torch.ops.aten._weight_int4pack_mm(xb, packs[0], group, sz)
    return lambda: [torch.ops.aten._weight_int4pack_mm(xb, p, group, sz) for p in packs]


def gemlite_wn(x: torch.Tensor, in_f: int, out_f: int, copies: int, bits: int, group: int = 128) -> Callable[[], None]:
    gemlite = _import("gemlite")
    if bits not in (1, 2, 4, 8):
        raise Unavailable(f"GemLite packs 1/2/4/8-bit weights, not {bits}-bit")
    dt = {torch.bfloat16: gemlite.DType.BF16, torch.float16: gemlite.DType.FP16}[x.dtype]
    layers = []
    for _ in range(copies):
        layer = gemlite.GemLiteLinear(bits, group_size=group, in_features=in_f, out_features=out_f,
                                      input_dtype=dt, output_dtype=dt)
        W_q = torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.uint8, device=x.device)
        scales = (0.01 * torch.rand(out_f, in_f // group, device=x.device) + 1e-3).to(x.dtype)
        zeros = torch.full((out_f, in_f // group), 2 ** (bits - 1), device=x.device, dtype=x.dtype)
        layers.append(layer.pack(W_q, scales, zeros, bias=None))
    layers[0](x)
    return lambda: [layer(x) for layer in layers]


def bnb_nf4(x: torch.Tensor, in_f: int, out_f: int, copies: int) -> Callable[[], None]:
    bnb = _import("bitsandbytes")
    states = [bnb.functional.quantize_4bit(torch.randn(out_f, in_f, device=x.device, dtype=x.dtype), quant_type="nf4")
              for _ in range(copies)]
    bnb.matmul_4bit(x, states[0][0].t(), quant_state=states[0][1])
    return lambda: [bnb.matmul_4bit(x, w.t(), quant_state=s) for w, s in states]


DECODE_PEERS = {  # name -> (bit variant it stands against, builder(x, in_f, out_f, copies))
    "tinygemm-w4": ("4", tinygemm_w4),
    "gemlite-w4": ("4", lambda x, i, o, c: gemlite_wn(x, i, o, c, 4)),
    "gemlite-w2": ("2", lambda x, i, o, c: gemlite_wn(x, i, o, c, 2)),
    "bnb-nf4": ("nf4", bnb_nf4),
}


# ---------------------------------------------------------------------------------------------
# Dense bf16 base with our LoRA folding
# ---------------------------------------------------------------------------------------------
class _DenseFold(torch.autograd.Function):
    """y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ with the fold of the quantized large-M path, per product.

    ``ext`` [N + rp, K + rp] holds W at [:N, :K], s·B at [:N, K:K + r], A at [N:N + r, :K] and zeros
    elsewhere, so both folded operands are views of one buffer: ``[W | s·B]`` for the forward,
    ``[W ; A]`` for dX. Only the r-wide strips are refreshed per call; nothing of size N x K moves.
    """

    @staticmethod
    def forward(ctx, x, ext, lora_A, lora_B, N: int, K: int, scaling: float):
        from cloq_engine.backends.triton_backend import LoraFold, lora_fold

        r = lora_A.shape[0]
        rp = ext.shape[0] - N
        with torch.no_grad():
            ext[:N, K:K + r].copy_(lora_B).mul_(scaling)
            ext[N:N + r, :K].copy_(lora_A)
        S = torch.mm(x, lora_A.t())
        if lora_fold(inner=K, outer=N) == LoraFold.CONCAT:
            xs = torch.cat([x, S, x.new_zeros(x.shape[0], rp - r)], dim=1)
            y = torch.mm(xs, ext[:N].t())
        else:
            y = torch.mm(x, ext[:N, :K].t()).addmm_(S, ext[:N, K:K + r].t())
        ctx.save_for_backward(x, S, ext, lora_A, lora_B)
        ctx.dims = (N, K, scaling)
        return y

    @staticmethod
    def backward(ctx, dy):
        from cloq_engine.backends.triton_backend import LoraFold, lora_fold

        x, S, ext, lora_A, lora_B = ctx.saved_tensors
        N, K, scaling = ctx.dims
        r = lora_A.shape[0]
        rp = ext.shape[0] - N
        dS = torch.mm(dy, lora_B).mul_(scaling)
        dB = torch.mm(dy.t(), S).mul_(scaling)
        dA = torch.mm(dS.t(), x)
        if lora_fold(inner=N, outer=K) == LoraFold.CONCAT:
            dys = torch.cat([dy, dS, dy.new_zeros(dy.shape[0], rp - r)], dim=1)
            dx = torch.mm(dys, ext[:, :K])
        else:
            dx = torch.mm(dy, ext[:N, :K]).addmm_(dS, ext[N:N + r, :K])
        return dx, None, dA, dB, None, None, None


class DenseFoldLoRALinear(nn.Module):
    """A frozen bf16 ``nn.Linear`` weight plus trainable LoRA, computed with our folding."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        N, K = linear.weight.shape
        rp = -(-rank // 8) * 8
        ext = torch.zeros(N + rp, K + rp, dtype=linear.weight.dtype, device=linear.weight.device)
        ext[:N, :K].copy_(linear.weight.detach())
        self.register_buffer("ext", ext)
        self.bias = linear.bias
        self.in_features, self.out_features, self.scaling = K, N, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, K, dtype=ext.dtype, device=ext.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(N, rank, dtype=ext.dtype, device=ext.device))

    def forward(self, x):
        lead = x.shape[:-1]
        y = _DenseFold.apply(x.reshape(-1, self.in_features), self.ext, self.lora_A, self.lora_B, self.out_features,
                             self.in_features, self.scaling).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias


def dense_fold_model(model: nn.Module, targets, rank: int, alpha: float) -> nn.Module:
    """Swap every target ``nn.Linear`` (by child name) for :class:`DenseFoldLoRALinear`, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, DenseFoldLoRALinear(child, rank, alpha))
    return model


# ---------------------------------------------------------------------------------------------
# PEFT variants
# ---------------------------------------------------------------------------------------------
def peft_lora(model: nn.Module, targets, rank: int, alpha: float, fp32_adapters: bool = True) -> nn.Module:
    """PEFT LoRA; ``fp32_adapters=False`` passes ``autocast_adapter_dtype=False`` (adapters in the base's
    bf16, no fp32 cast of x in the LoRA branch)."""
    peft = _import("peft")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return peft.get_peft_model(model, cfg, autocast_adapter_dtype=fp32_adapters)


def bnb_qlora(model: nn.Module, targets, rank: int, alpha: float, dtype) -> nn.Module:
    """The target linears as bitsandbytes NF4 ``Linear4bit`` (quantized on the GPU), then PEFT LoRA."""
    bnb = _import("bitsandbytes")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(module, name, q.to(child.weight.device))
    return peft_lora(model, targets, rank, alpha)


def availability(name: str) -> Optional[str]:
    """None when the model-level baseline ``name`` can run here, else why not."""
    needs = {"peft": ("peft",), "peft-bf16": ("peft",), "bnb": ("peft", "bitsandbytes")}.get(name, ())
    for pkg in needs:
        try:
            _import(pkg)
        except Unavailable as e:
            return str(e)
    return None
