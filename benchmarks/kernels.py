"""Kernel benchmark for a CUDA machine: every forward path by M, the layer training step, peers.

    cloq bench kernels [--dtype bf16|fp16] [--bits 2,3,4,nf4] [--m 1,16,64,256,2048,8192]
                       [--shapes 4096x4096,4096x14336,14336x4096] [--json PATH] [--tune PATH] [--smoke]

First it measures the two ceilings on this GPU, in the same run: copy bandwidth (a 2 GiB
device-to-device copy: bytes read + written per second) and the bf16 GEMM rate (8192³ ``torch.mm``).
Then, per layer shape (in x out), bit width and M:

* ``fwd``: each forward path of the triton backend (``gemv`` for M <= 16, ``fused``, and
  ``dequant_mm`` with the LoRA folded into the GEMM (``concat``) or added by ``addmm_``), and the
  dense bf16 ``F.linear`` + LoRA baseline. At M <= 16 the weight is rotated over enough copies
  (>= 4x the L2 size in all) that every call reads HBM, and times come from CUDA graphs
  (``do_bench_cudagraph``: no launch overhead); above, ``do_bench`` medians.
  Columns: microseconds, packed-weight GB/s, share of the measured copy bandwidth roofline
  (packed weight + activations), share of the measured GEMM rate.
* ``step``: ``QuantLoRALinear`` forward + backward (the default path table) against dense LoRA
  under autograd (frozen bf16 ``nn.Linear`` + A, B), for M >= 256.
* peers at M <= 16 (``baselines.DECODE_PEERS``): torch's int4 tinygemm (``_weight_int4pack_mm``, W4
  g128), bitsandbytes ``matmul_4bit`` (NF4), GemLite (``GemLiteLinear(...).pack(...)``, W4 and W2);
  one that cannot run is reported as skipped with the reason.

``--tune PATH`` times every candidate config of every kernel at the given shapes and writes a
table in the format of ``cloq_engine/kernels/configs.json`` for this GPU (merge it there).
Without CUDA it prints "no GPU" and exits 0; ``--smoke`` runs each path once at tiny shapes on the
CPU under the Triton interpreter (no timing), to test the script itself.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List

from . import baselines, common

RANK = 16
SCALING = 2.0
logger = logging.getLogger("benchmarks.kernels")


@dataclass
class Row:
    op: str  # fwd | step
    variant: str  # gemv | fused | dequant_mm:concat | dequant_mm:addmm | dense | auto | peer names
    bits: str
    in_features: int
    out_features: int
    m: int
    us: float
    weight_gbps: float  # packed (or dense) weight bytes / time
    roofline_pct: float  # (weight + activation bytes) / copy bandwidth, over time
    gemm_pct: float  # flops / measured bf16 GEMM rate, over time
    vs_dense: float  # dense time / this time


# ---------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------
def make_layer(in_f: int, out_f: int, variant: str, dtype, device, seed: int = 0):
    """A random valid packed weight (group 128, NF4 64; 32 on the CPU) and LoRA factors in ``dtype``."""
    import torch

    qw = common.random_packed_weight(variant, in_f, out_f, device, group=32 if device == "cpu" else None, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    A = (0.01 * torch.randn(RANK, in_f, generator=g, device=device)).to(dtype)
    B = (0.01 * torch.randn(out_f, RANK, generator=g, device=device)).to(dtype)
    return qw, A, B


def copies_for(nbytes: int, m: int, smoke: bool = False) -> int:
    """Weight copies to rotate over: enough to defeat the L2 at small M, one at large M."""
    return 1 if m > 16 or smoke else common.copies_for(nbytes)


def make_timer(args):
    """``bench(fn, graph=False)`` -> median us; small-M calls (``graph``) from CUDA graphs unless --no-graphs."""
    def bench(fn, graph=False):
        if args.smoke:  # runs the code once; the time means nothing
            fn()
            return float("nan")
        return common.bench_us(fn, graph=graph and args.graphs)
    return bench


def ceilings(args) -> Dict[str, float]:
    """Measured copy bandwidth (bytes/s, read + write) and bf16 GEMM rate (flop/s)."""
    if args.smoke:
        return {"copy_bytes_per_s": float("nan"), "bf16_flops": float("nan")}
    _, copy_bw = common.copy_bandwidth()
    _, flops = common.gemm_rate()
    return {"copy_bytes_per_s": copy_bw, "bf16_flops": flops}


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def run(args, ceil) -> List[Row]:
    import torch
    import torch.nn.functional as F

    from cloq_engine.backends import triton_backend as tb

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if (args.smoke or args.dtype == "fp16") else torch.bfloat16
    bench = make_timer(args)
    shapes = [(128, 96)] if args.smoke else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms_list = [1, 40] if args.smoke else [int(v) for v in args.m.split(",")]
    rows: List[Row] = []
    skipped: List[dict] = []
    copy_bw, flops_rate = ceil["copy_bytes_per_s"], ceil["bf16_flops"]

    def emit(record: dict) -> None:  # one line per result as soon as it exists (--jsonl)
        common.append_jsonl(args.jsonl, record)

    def row(op, variant, bits, in_f, out_f, m, us, wbytes, dense_us):
        elem = torch.tensor([], dtype=dtype).element_size()
        total = wbytes + (m * in_f + m * out_f) * elem
        fl = 2 * m * in_f * out_f * (3 if op == "step" else 1)
        rows.append(Row(op, variant, bits, in_f, out_f, m, us, wbytes / (us * 1e-6) / 1e9,
                        100 * total / copy_bw / (us * 1e-6), 100 * fl / flops_rate / (us * 1e-6), dense_us / us))
        emit(asdict(rows[-1]))

    for in_f, out_f in shapes:
        for variant in args.bits.split(","):
            layers = [make_layer(in_f, out_f, variant, dtype, device)]
            for m in ms_list:
                n_copies = copies_for(layers[0][0].nbytes, m, args.smoke)
                while len(layers) < n_copies:
                    layers.append(make_layer(in_f, out_f, variant, dtype, device, seed=len(layers)))
                use = layers[:n_copies]
                small = m <= 16
                x = torch.randn(m, in_f, device=device, dtype=dtype)

                # dense bf16 baseline, rotated the same way
                dense_w = [torch.randn(out_f, in_f, device=device, dtype=dtype)
                           for _ in range(copies_for(out_f * in_f * 2, m, args.smoke))]
                A0, B0 = use[0][1], use[0][2]
                dense_us = bench(lambda: [F.linear(x, w) + SCALING * F.linear(F.linear(x, A0), B0) for w in dense_w],
                                 graph=small) / len(dense_w)
                row("fwd", "dense", variant, in_f, out_f, m, dense_us, out_f * in_f * 2, dense_us)

                paths = (["gemv"] if small else []) + ["fused", "dequant_mm", "dequant_mm:concat", "dequant_mm:addmm"]
                if m > 2048:
                    paths.remove("fused")
                for p in paths:
                    path, _, fold = p.partition(":")
                    os.environ["CLOQ_TRITON_PATH"] = path
                    if fold:  # forced; else the per-product choice
                        os.environ["CLOQ_LORA_FOLD"] = fold
                    else:
                        os.environ.pop("CLOQ_LORA_FOLD", None)
                    us = bench(lambda: [tb.forward(x, qw, A, B, SCALING) for qw, A, B in use], graph=small) / len(use)
                    row("fwd", p, variant, in_f, out_f, m, us, use[0][0].nbytes, dense_us)
                os.environ.pop("CLOQ_TRITON_PATH", None)
                os.environ.pop("CLOQ_LORA_FOLD", None)

                if small and not args.smoke:
                    for name, (against, build) in baselines.DECODE_PEERS.items():
                        if against != variant:
                            continue
                        try:
                            us = bench(build(x, in_f, out_f, n_copies), graph=True) / n_copies
                        except Exception as e:  # not installed, or failing here: reported, not dropped
                            logger.info("peer %s skipped: %s", name, e)
                            skipped.append({"op": "fwd", "variant": name, "bits": variant, "m": m,
                                            "reason": f"{type(e).__name__}: {str(e)[:200]}"})
                            emit({"status": "skipped", **skipped[-1]})
                            continue
                        row("fwd", name, variant, in_f, out_f, m, us, use[0][0].nbytes, dense_us)

                if m >= 256 or (args.smoke and m == ms_list[-1]):
                    step_rows(bench, use[0], in_f, out_f, variant, m, dtype, device, row)
    return rows


def step_rows(bench, layer_parts, in_f, out_f, variant, m, dtype, device, row) -> None:
    """QuantLoRALinear forward + backward against dense LoRA under autograd."""
    import torch
    import torch.nn.functional as F

    from cloq_engine import LoRAConfig, QuantConfig
    from cloq_engine.nn import QuantLoRALinear

    qw, A, B = layer_parts
    layer = QuantLoRALinear.from_quantized(qw, A, B, LoRAConfig(rank=RANK, alpha=SCALING * RANK, init="zero"),
                                           QuantConfig(bits=qw.bits, group_size=qw.group_size, method=qw.method),
                                           dtype=dtype)
    x = torch.randn(m, in_f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, out_f, device=device, dtype=dtype)
    dense = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
    Ad, Bd = A.clone().requires_grad_(True), B.clone().requires_grad_(True)

    def ours():
        layer.lora_A.grad = layer.lora_B.grad = x.grad = None
        layer(x).backward(dy)

    def dense_step():
        Ad.grad = Bd.grad = x.grad = None
        (dense(x) + SCALING * F.linear(F.linear(x, Ad), Bd)).backward(dy)

    dense_us = bench(dense_step)
    row("step", "dense", variant, in_f, out_f, m, dense_us, out_f * in_f * 2, dense_us)
    row("step", "auto", variant, in_f, out_f, m, bench(ours), qw.nbytes, dense_us)


def tune(args, path: str) -> None:
    """Time every candidate config of each kernel at the given shapes; write a configs.json-style table."""
    import torch

    from cloq_engine.kernels import configs, dequant, dequant_gemm, dequant_gemm_t, gemv
    from cloq_engine.kernels.utils import codebook_on
    from triton.testing import do_bench

    arch = configs.arch_of("cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    table: Dict[str, list] = {}
    original = configs.shipped_table

    def best(kernel, candidates, fn):
        times = []
        for c in candidates:
            configs._memo.clear()
            configs.shipped_table = lambda c=c: {arch: {kernel: [{"config": configs.config_to_dict(c)}]}}
            try:
                times.append((do_bench(fn, warmup=10, rep=50, return_mode="median"), c))
            except Exception as e:
                logger.info("%s %s failed: %s", kernel, c, e)
        configs.shipped_table = original
        configs._memo.clear()
        return min(times, key=lambda t: t[0])[1]

    try:
        for in_f, out_f in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
            for variant in args.bits.split(","):
                qw, A, B = make_layer(in_f, out_f, variant, dtype, "cuda")
                cb = codebook_on("cuda") if qw.is_nf4 else qw.scales
                g = qw.effective_group_size
                key = {"n": out_f, "k": in_f, "bits": qw.bits, "group": g}
                out = torch.empty(in_f, out_f, dtype=dtype, device="cuda")
                c = best("dequant", dequant.dequant_configs(),
                         lambda: dequant.dequant_into(out, qw.qweight, qw.scales, qw.zeros, cb, qw.bits, g, in_f))
                table.setdefault("dequant", []).append({**key, "config": configs.config_to_dict(c)})
                for m in (1, 16):
                    x = torch.randn(m, in_f, device="cuda", dtype=dtype)
                    S = x @ A.t()
                    c = best("gemv", gemv.gemv_configs(),
                             lambda: gemv.gemv(x, qw.qweight, qw.scales, qw.zeros, cb, S, B, None, SCALING, qw.bits,
                                               g, in_f))
                    table.setdefault("gemv", []).append({**key, "m": m, "config": configs.config_to_dict(c)})
                for m in (32, 64, 128):
                    x = torch.randn(m, in_f, device="cuda", dtype=dtype)
                    S = x @ A.t()
                    dy = torch.randn(m, out_f, device="cuda", dtype=dtype)
                    c = best("dequant_gemm", dequant_gemm.prune_configs(dequant_gemm.gemm_configs(), x, qw.bits, g,
                                                                        qw.num_groups),
                             lambda: dequant_gemm.dequant_gemm(x, qw.qweight, qw.scales, qw.zeros, cb, S, B, None,
                                                               SCALING, qw.bits, g, in_f))
                    table.setdefault("dequant_gemm", []).append({**key, "m": m, "config": configs.config_to_dict(c)})
                    c = best("dequant_gemm_t", dequant_gemm_t.prune_configs(dequant_gemm_t.gemm_t_configs(), dy,
                                                                            qw.bits, g, qw.num_groups),
                             lambda: dequant_gemm_t.dequant_gemm_t(dy, qw.qweight, qw.scales, qw.zeros, cb, dy @ B, A,
                                                                   qw.bits, g, in_f, dtype))
                    table.setdefault("dequant_gemm_t", []).append({**key, "m": m, "config": configs.config_to_dict(c)})
    finally:
        configs.shipped_table = original
    common.write_json(path, {arch: table})
    print(f"wrote tuned configs for {arch} to {path} (merge into cloq_engine/kernels/configs.json)")


def print_table(rows: List[Row], ceil: dict, dtype_name: str) -> None:
    print(f"dtype {dtype_name}; measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 GEMM {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s")
    print(f"{'op':5} {'variant':18} {'bits':>4} {'in x out':>11} {'M':>5} {'us':>9} {'wGB/s':>7} "
          f"{'roof%':>6} {'gemm%':>6} {'x dense':>7}")
    for r in rows:
        print(f"{r.op:5} {r.variant:18} {r.bits:>4} {f'{r.in_features}x{r.out_features}':>11} {r.m:5d} "
              f"{r.us:9.1f} {r.weight_gbps:7.0f} {r.roofline_pct:6.1f} {r.gemm_pct:6.1f} {r.vs_dense:7.2f}")


def main(argv=None) -> int:
    p = common.parser("kernels", __doc__)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--bits", default="2,3,4,nf4", help="bit variants: 2,3,4,nf4")
    p.add_argument("--m", default="1,16,64,256,2048,8192", help="token counts M")
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="in x out, comma separated")
    p.add_argument("--json", default=None, help="also write the rows and ceilings to this JSON file")
    p.add_argument("--jsonl", default=None, help="append one JSON line per result as soon as it is measured")
    p.add_argument("--tune", default=None, help="time every config instead, and write a configs table here")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="time small M with do_bench (launch overhead included) instead of CUDA graphs")
    p.add_argument("--smoke", action="store_true", help="run each path once on CPU (Triton interpreter), no timing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        os.environ["CLOQ_BACKEND"] = "triton"  # QuantLoRALinear on CPU tensors goes through the kernels
        args.bits = ",".join(b for b in args.bits.split(",") if b in ("2", "3", "4", "nf4"))
    else:
        import torch

        if not torch.cuda.is_available():
            print("no GPU: CUDA is not available on this machine; nothing to benchmark")
            return 0
    if args.tune:
        tune(args, args.tune)
        return 0
    ceil = ceilings(args)
    rows = run(args, ceil)
    print_table(rows, ceil, args.dtype)
    if args.json:
        common.write_json(args.json, {"ceilings": ceil, "args": vars(args), "rows": [asdict(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
