"""Kernel benchmark for a CUDA machine: fused quantized-LoRA forward, backward and training step.

    python benchmarks/kernels.py [--dtype bf16|fp16] [--bits 2,3,4] [--m 1,16,64,256,2048] [--json]

For each layer shape (in x out: 4096x4096 and 4096x11008), bit width and M it times (median of
``triton.testing.do_bench_cudagraph``, i.e. GPU time without Python launch overhead; ``do_bench``
where capture fails or with ``--no-graphs``):

* ``fwd``: the triton backend's fused forward (dequant-matmul + LoRA epilogue), against dense
  ``F.linear`` + LoRA in the activation dtype (``dense``) and against dequantize-then-matmul
  (``deq+mm``: the standalone dequant kernel, then ``F.linear`` + LoRA);
* ``bwd``: the fused backward (dX in one transposed-dequant kernel, dA, dB) against autograd through
  dense ``F.linear`` + LoRA;
* ``step``: forward + backward of ``QuantLoRALinear`` against an ``nn.Linear`` (frozen) + LoRA.

It reports time, achieved GB/s and the share of the roofline max(bytes / 3.35 TB/s,
flops / 989 TFLOP/s) (H100 SXM, dense bf16) for the fused kernels, and the speed-up over the dense
baseline. On a machine without a CUDA GPU it says so and exits 0. ``--smoke`` runs every code path
once at tiny shapes on the CPU under the Triton interpreter (no timing), to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass

PEAK_BW = 3.35e12  # H100 SXM HBM3, bytes/s
PEAK_FLOPS = 989e12  # H100 SXM dense bf16
SHAPES = ((4096, 4096), (4096, 11008))  # (in_features, out_features)
RANK = 16
GROUP = 128

logger = logging.getLogger("benchmarks.kernels")


@dataclass
class Row:
    op: str
    bits: int
    in_features: int
    out_features: int
    m: int
    ms: float
    gbps: float
    roofline_share: float
    dense_ms: float
    deq_mm_ms: float
    speedup_vs_dense: float


def _make_layer(in_f, out_f, bits, dtype, device):
    import torch

    from cloq_engine.formats import QuantizedWeight, packed_rows

    g = torch.Generator(device="cpu").manual_seed(0)
    groups = in_f // GROUP
    qweight = torch.randint(-2**31, 2**31 - 1, (packed_rows(in_f, bits), out_f), generator=g, dtype=torch.int64)
    qw = QuantizedWeight(
        qweight=qweight.to(torch.int32).to(device),
        scales=(0.01 * torch.rand(groups, out_f, generator=g) + 1e-3).half().to(device),
        zeros=torch.randint(0, 2**bits, (groups, out_f), generator=g).half().to(device),
        bits=bits, group_size=GROUP, in_features=in_f, out_features=out_f, method="rtn",
    )
    A = (0.01 * torch.randn(RANK, in_f, generator=g)).to(device, dtype)
    B = (0.01 * torch.randn(out_f, RANK, generator=g)).to(device, dtype)
    return qw, A, B


def _io_bytes(m, in_f, out_f, elem, qw, backward=False):
    """Bytes a perfect kernel moves: packed weight once, activations in and out, LoRA factors."""
    lora = RANK * (in_f + out_f) * elem
    acts = (m * in_f + m * out_f) * elem
    if backward:
        acts += m * in_f * elem  # read x for dA, read dy, write dx
    return qw.nbytes + acts + lora


def _flops(m, in_f, out_f, backward=False):
    base = 2 * m * in_f * out_f
    lora = 2 * m * RANK * (in_f + out_f)
    return base + lora if not backward else base + 3 * lora


def run(args) -> list:
    import torch
    import torch.nn.functional as F

    from cloq_engine import LoRAConfig, QuantConfig
    from cloq_engine.backends import triton_backend as tb
    from cloq_engine.nn import QuantLoRALinear

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if smoke:
        dtype = torch.float16  # the interpreter computes bf16 wrongly
    shapes = ((128, 96),) if smoke else SHAPES
    ms_list = [1, 33] if smoke else [int(v) for v in args.m.split(",")]
    bits_list = [int(v) for v in args.bits.split(",")]
    s = 2.0

    if smoke:
        def bench(fn):
            fn()
            return float("nan")
    else:
        from triton.testing import do_bench, do_bench_cudagraph

        def bench(fn):
            fn()  # autotune outside any graph capture
            torch.cuda.synchronize()
            if args.graphs:
                try:  # GPU time without Python launch overhead
                    return do_bench_cudagraph(fn, rep=100, return_mode="median")
                except Exception as e:  # e.g. autograd state that cannot be captured
                    logger.info("CUDA graph capture failed (%s); timing with do_bench", type(e).__name__)
            return do_bench(fn, warmup=25, rep=100, return_mode="median")

    rows = []
    for in_f, out_f in shapes:
        for bits in bits_list:
            qw, A, B = _make_layer(in_f, out_f, bits, dtype, device)
            W = tb.dequantize(qw).to(dtype)  # the dense baseline's weight
            layer = QuantLoRALinear.from_quantized(
                qw, A, B, LoRAConfig(rank=RANK, alpha=2 * RANK, init="zero"),
                QuantConfig(bits=bits, group_size=GROUP, method="rtn"), dtype=dtype)
            A_p = A.clone().requires_grad_(True)
            B_p = B.clone().requires_grad_(True)
            for m in ms_list:
                x = torch.randn(m, in_f, device=device, dtype=dtype)
                dy = torch.randn(m, out_f, device=device, dtype=dtype)
                elem = x.element_size()

                def dense_fwd():
                    return F.linear(x, W) + s * F.linear(F.linear(x, A), B)

                def deq_mm_fwd():
                    return F.linear(x, tb.dequantize(qw).to(dtype)) + s * F.linear(F.linear(x, A), B)

                fused_fwd = lambda: tb.forward(x, qw, A, B, s)  # noqa: E731
                _, S = tb.forward(x, qw, A, B, s)
                fused_bwd = lambda: tb.backward(dy, x, S, qw, A, B, s)  # noqa: E731

                def dense_bwd():
                    xg = x.detach().requires_grad_(True)
                    y = F.linear(xg, W) + s * F.linear(F.linear(xg, A_p), B_p)
                    return torch.autograd.grad(y, (xg, A_p, B_p), dy)

                xs = x.detach().requires_grad_(True)

                def fused_step():
                    layer.lora_A.grad = layer.lora_B.grad = None
                    layer(xs).backward(dy)

                dense_layer = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
                dense_layer.weight.data.copy_(W)
                dense_layer.weight.requires_grad_(False)

                def dense_step():
                    A_p.grad = B_p.grad = None
                    (dense_layer(xs) + s * F.linear(F.linear(xs, A_p), B_p)).backward(dy)

                t = {name: bench(fn) for name, fn in [
                    ("fwd", fused_fwd), ("fwd_dense", dense_fwd), ("fwd_deq", deq_mm_fwd),
                    ("bwd", fused_bwd), ("bwd_dense", dense_bwd), ("step", fused_step), ("step_dense", dense_step)]}
                for op, fused, dense, deq, back in [
                    ("fwd", t["fwd"], t["fwd_dense"], t["fwd_deq"], False),
                    ("bwd", t["bwd"], t["bwd_dense"], float("nan"), True),
                    ("step", t["step"], t["step_dense"], float("nan"), True),
                ]:
                    nbytes = _io_bytes(m, in_f, out_f, elem, qw, back)
                    flops = _flops(m, in_f, out_f, back)
                    if op == "step":  # forward + backward
                        nbytes += _io_bytes(m, in_f, out_f, elem, qw)
                        flops += _flops(m, in_f, out_f)
                    roof_ms = 1e3 * max(nbytes / PEAK_BW, flops / PEAK_FLOPS)
                    rows.append(Row(op, bits, in_f, out_f, m, fused, nbytes / (fused * 1e-3) / 1e9,
                                    roof_ms / fused, dense, deq, dense / fused))
    return rows


def _print_table(rows, dtype_name):
    print(f"dtype {dtype_name}; roofline = max(bytes / {PEAK_BW / 1e12:.2f} TB/s, flops / {PEAK_FLOPS / 1e12:.0f} TFLOP/s)")
    print(f"{'op':5} {'bits':>4} {'in x out':>11} {'M':>5} {'ms':>8} {'GB/s':>7} {'roof%':>6} "
          f"{'dense ms':>9} {'deq+mm ms':>9} {'x dense':>7}")
    for r in rows:
        print(f"{r.op:5} {r.bits:4d} {f'{r.in_features}x{r.out_features}':>11} {r.m:5d} {r.ms:8.4f} {r.gbps:7.0f} "
              f"{100 * r.roofline_share:5.1f}% {r.dense_ms:9.4f} {r.deq_mm_ms:9.4f} {r.speedup_vs_dense:6.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--bits", default="2,3,4")
    p.add_argument("--m", default="1,16,64,256,2048", help="token counts M")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="time with do_bench (includes launch overhead) instead of CUDA graphs")
    p.add_argument("--smoke", action="store_true", help="run each path once on CPU (Triton interpreter), no timing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        os.environ["CLOQ_BACKEND"] = "triton"  # QuantLoRALinear on CPU tensors goes through the kernels
    else:
        import torch

        if not torch.cuda.is_available():
            print("no GPU: CUDA is not available on this machine; nothing to benchmark")
            return 0
    rows = run(args)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        _print_table(rows, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
