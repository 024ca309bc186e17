"""CPU timings: the C++ backend (``cloq_engine._C``) against the torch reference backend.

Measures median wall times of ``forward`` and ``backward`` (x @ Ŵ^T + LoRA, and dx/dA/dB) for
M in {1, 16, 256} rows on several (out, in) shapes and bit widths, plus the C++ pack/unpack
against the Python ones. ``--tune`` also sweeps the blocked path's BLOCK_K and the fused/blocked
crossover in M. Prints a table and writes JSON.

    cloq bench cpu_backend --out results/cpu_backend.json
    cloq bench cpu_backend --quick            # small shapes only
    cloq bench cpu_backend --tune --out results/cpu_backend_tune.json

"torch" is the reference backend as shipped (its unpack already uses the C++ fast path when the
extension is loaded); "torch_py" is the same with the pure-Python unpack (as without the extension).
"""
from __future__ import annotations

import logging
import os
import platform
import sys
from contextlib import contextmanager

import torch

from cloq_engine import _ext, formats
from cloq_engine.backends import torch_ref
from cloq_engine.config import QuantConfig
from cloq_engine.quant import quantize_weight

from . import common

logger = logging.getLogger("benchmarks.cpu_backend")

SHAPES = [(1536, 384), (384, 1536), (4096, 4096)]  # (out_features, in_features)
QUICK_SHAPES = [(1536, 384), (384, 1536)]
SMOKE_SHAPES = [(96, 128)]  # --smoke: runs every code path at once, times nothing of interest
MS = [1, 16, 256]
BITS = [2, 3, 4]
RANK = 16


def median_time(fn, reps: int) -> float:
    """Median wall seconds of ``reps`` calls after one warm-up call."""
    return common.timed(fn, reps, warmup=1).wall_s


@contextmanager
def python_pack_unpack():
    """Route formats.pack/unpack_codes to the pure-Python spec for the duration."""
    saved = formats._extension
    formats._extension = lambda t: None
    try:
        yield
    finally:
        formats._extension = saved


def make_case(n: int, k: int, bits: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    qw = quantize_weight(W, QuantConfig(bits=bits, group_size=128 if k % 128 == 0 else -1, method="rtn"))
    A = 0.01 * torch.randn(RANK, k, generator=g)
    B = 0.01 * torch.randn(n, RANK, generator=g)
    return qw, A, B


def time_backend(mod, qw, A, B, m: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, qw.in_features, generator=g)
    dy = torch.randn(m, qw.out_features, generator=g)
    _, S = mod.forward(x, qw, A, B, 1.0)
    fwd = median_time(lambda: mod.forward(x, qw, A, B, 1.0), reps)
    bwd = median_time(lambda: mod.backward(dy, x, S, qw, A, B, 1.0), reps)
    return {"forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd}


def bench_backends(shapes, ms, bits_list, reps: int, with_py: bool) -> list:
    from cloq_engine.backends import cpp_backend

    rows = []
    for n, k in shapes:
        for bits in bits_list:
            qw, A, B = make_case(n, k, bits)
            for m in ms:
                r = max(2, reps if n * k <= 1 << 21 else reps // 2)
                row = {"out": n, "in": k, "bits": bits, "M": m}
                row["cpp"] = time_backend(cpp_backend, qw, A, B, m, r)
                row["torch"] = time_backend(torch_ref, qw, A, B, m, r)
                if with_py:
                    with python_pack_unpack():
                        row["torch_py"] = time_backend(torch_ref, qw, A, B, m, max(2, r // 2))
                for d in ("forward", "backward"):
                    row[f"{d}_speedup_vs_torch"] = row["torch"][f"{d}_ms"] / row["cpp"][f"{d}_ms"]
                rows.append(row)
                logger.info("%s", row)
    return rows


def bench_pack(reps: int, n: int = 4096, k: int = 4096) -> list:
    C = _ext.load()
    rows = []
    for bits in BITS:
        codes = torch.randint(0, 2**bits, (k, n), generator=torch.Generator().manual_seed(bits))
        words = formats.pack_codes_torch(codes, bits)
        rows.append({
            "shape": [k, n], "bits": bits,
            "pack_cpp_ms": 1e3 * median_time(lambda: C.pack_codes(codes, bits), reps),
            "pack_py_ms": 1e3 * median_time(lambda: formats.pack_codes_torch(codes, bits), reps),
            "unpack_cpp_ms": 1e3 * median_time(lambda: C.unpack_codes(words, bits, k), reps),
            "unpack_py_ms": 1e3 * median_time(lambda: formats.unpack_codes_torch(words, bits, k), reps),
        })
        logger.info("%s", rows[-1])
    return rows


def bench_tune(reps: int) -> dict:
    """BLOCK_K sweep of the blocked path, fused vs blocked by M, and baseline vs AVX2 kernels."""
    from cloq_engine.backends import cpp_backend

    C = _ext.load()
    out = {"block_k": [], "crossover": [], "isa": []}
    for n, k in [(1536, 384), (4096, 4096)]:
        qw, _, _ = make_case(n, k, 4)
        args = cpp_backend._weight_args(qw)
        for m in (64, 256):
            x, dy = torch.randn(m, k), torch.randn(m, n)
            y, dx = torch.zeros(m, n), torch.zeros(m, k)
            for bk in (128, 256, 512, 1024, 2048):
                out["block_k"].append({
                    "out": n, "in": k, "M": m, "block_k": bk,
                    "qmm_ms": 1e3 * median_time(lambda: C.qmm_(y, x, *args, bk), reps),
                    "qmm_t_ms": 1e3 * median_time(lambda: C.qmm_t_(dx, dy, *args, bk), reps),
                })
                logger.info("%s", out["block_k"][-1])
        for m in (1, 4, 8, 16, 32, 64):
            x, dy = torch.randn(m, k), torch.randn(m, n)
            y, dx = torch.zeros(m, n), torch.zeros(m, k)
            row = {"out": n, "in": k, "M": m}
            for name, bk in (("fused", 0), ("blocked", cpp_backend.BLOCK_K)):
                row[f"{name}_qmm_ms"] = 1e3 * median_time(lambda: C.qmm_(y, x, *args, bk), reps)
                row[f"{name}_qmm_t_ms"] = 1e3 * median_time(lambda: C.qmm_t_(dx, dy, *args, bk), reps)
            out["crossover"].append(row)
            logger.info("%s", row)
        if C.kernel_isa() == "avx2":
            for m in (1, 16):
                x, dy = torch.randn(m, k), torch.randn(m, n)
                y, dx = torch.zeros(m, n), torch.zeros(m, k)
                row = {"out": n, "in": k, "M": m}
                for isa in ("baseline", "avx2"):
                    prev = C.set_kernel_isa(isa)
                    row[f"{isa}_qmm_ms"] = 1e3 * median_time(lambda: C.qmm_(y, x, *args, 0), reps)
                    row[f"{isa}_qmm_t_ms"] = 1e3 * median_time(lambda: C.qmm_t_(dx, dy, *args, 0), reps)
                    C.set_kernel_isa(prev)
                out["isa"].append(row)
                logger.info("%s", row)
    return out


def print_tables(res: dict) -> None:
    print(f"\nthreads={res['env']['threads']}  isa={res['env']['isa']}  (median ms; speedup = torch / cpp)")
    hdr = f"{'out x in':>11} {'bits':>4} {'M':>4} | {'fwd cpp':>8} {'fwd torch':>9} {'x':>6} | {'bwd cpp':>8} {'bwd torch':>9} {'x':>6}"
    has_py = any("torch_py" in r for r in res["backends"])
    if has_py:
        hdr += f" | {'fwd torch_py':>12} {'bwd torch_py':>12}"
    print(hdr)
    for r in res["backends"]:
        line = (
            f"{r['out']:>5}x{r['in']:<5} {r['bits']:>4} {r['M']:>4} | {r['cpp']['forward_ms']:8.2f} "
            f"{r['torch']['forward_ms']:9.2f} {r['forward_speedup_vs_torch']:6.1f} | {r['cpp']['backward_ms']:8.2f} "
            f"{r['torch']['backward_ms']:9.2f} {r['backward_speedup_vs_torch']:6.1f}"
        )
        if "torch_py" in r:
            line += f" | {r['torch_py']['forward_ms']:12.2f} {r['torch_py']['backward_ms']:12.2f}"
        print(line)
    print(f"\n{'K x N':>11} {'bits':>4} | {'pack cpp':>9} {'pack py':>9} | {'unpack cpp':>10} {'unpack py':>10}")
    for r in res["pack"]:
        print(
            f"{r['shape'][0]:>5}x{r['shape'][1]:<5} {r['bits']:>4} | {r['pack_cpp_ms']:9.2f} {r['pack_py_ms']:9.2f} | "
            f"{r['unpack_cpp_ms']:10.2f} {r['unpack_py_ms']:10.2f}"
        )
    if "tune" in res:
        t = res["tune"]
        print("\nblocked path, BLOCK_K sweep (bits 4): out x in, M, block_k, qmm ms, qmm_t ms")
        for r in t["block_k"]:
            print(f"  {r['out']}x{r['in']} M={r['M']:<4} bk={r['block_k']:<5} {r['qmm_ms']:8.2f} {r['qmm_t_ms']:8.2f}")
        print("fused vs blocked by M (bits 4): qmm fused/blocked, qmm_t fused/blocked (ms)")
        for r in t["crossover"]:
            print(
                f"  {r['out']}x{r['in']} M={r['M']:<3} {r['fused_qmm_ms']:8.2f} {r['blocked_qmm_ms']:8.2f}   "
                f"{r['fused_qmm_t_ms']:8.2f} {r['blocked_qmm_t_ms']:8.2f}"
            )
        for r in t["isa"]:
            print(
                f"  isa {r['out']}x{r['in']} M={r['M']}: baseline {r['baseline_qmm_ms']:.2f}/{r['baseline_qmm_t_ms']:.2f}"
                f"  avx2 {r['avx2_qmm_ms']:.2f}/{r['avx2_qmm_t_ms']:.2f} ms (qmm/qmm_t)"
            )


def main(argv=None) -> int:
    p = common.parser("cpu_backend", __doc__)
    p.add_argument("--out", default="results/cpu_backend.json", help="JSON output path")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per case (median)")
    p.add_argument("--quick", action="store_true", help="small shapes only, no torch_py column")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, 2 repetitions: tests the script")
    p.add_argument("--tune", action="store_true", help="also sweep BLOCK_K and the fused/blocked crossover")
    p.add_argument("--no-torch-py", action="store_true", help="skip the pure-Python reference column")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    C = _ext.load()
    if C is None:
        raise SystemExit(f"the C++ extension is not available: {_ext.unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from cloq_engine.backends import cpp_backend

    res = {
        "env": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "isa": C.kernel_isa(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "FUSED_MAX_M": cpp_backend.FUSED_MAX_M, "BLOCK_K": cpp_backend.BLOCK_K,
        },
        "backends": bench_backends(
            SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else SHAPES, MS, BITS,
            2 if args.smoke else args.reps, not (args.quick or args.no_torch_py)
        ),
        "pack": bench_pack(2, 128, 96) if args.smoke else bench_pack(args.reps),
    }
    if args.tune:
        res["tune"] = bench_tune(args.reps)
    print_tables(res)
    if args.out:
        print(f"\nwrote {common.write_json(args.out, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
