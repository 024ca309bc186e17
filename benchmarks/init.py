"""Calibrated-init benchmark: solve time and objective per method, in one run.

Part 1 (synthetic, says so): W Gaussian, Q = RTN 2-bit g128, H = X^T X from a correlated synthetic X.
Methods: cloq (default = block Krylov on large layers, exact, randomized with 4 power iterations,
the previous default), quailora, and the route published reproductions use (eigendecomposition of
H, full SVD of the whitened error, truncate). Times are wall seconds and CPU (process) seconds.
Part 2 (real): mean relative calibrated error on the 37 MiniLM layers per bits, rank and method,
including joint re-quantization ("cloq+requant": 3 rounds, keep the best).

    cloq bench init [--quick] [--big] [--no-eig] [--size N] [--no-minilm] [--threads N] [--out results/init.json]
"""
from __future__ import annotations

import sys

import torch

import cloq_engine as ce
from cloq_engine.init import calibrated_error

from . import common


def synthetic(out_f: int, in_f: int, rank: int, tokens: int, repeats: int, with_eig: bool):
    W, qw, H = common.synthetic_layer(out_f, in_f, tokens)
    R = W - qw.dequantize()
    base = calibrated_error(R, H)
    rows = []
    methods = {
        "cloq (default)": lambda: ce.init_lora(W, qw, H, rank, method="cloq"),
        "cloq exact": lambda: ce.init_lora(W, qw, H, rank, method="cloq", svd="exact"),
        "cloq randomized": lambda: ce.init_lora(W, qw, H, rank, method="cloq", svd="randomized", power_iters=4),
        "quailora": lambda: ce.init_lora(W, qw, H, rank, method="quailora"),
    }
    if with_eig:
        methods["eig + full SVD"] = lambda: common.eig_route(R, H, rank)
    for name, fn in methods.items():
        t, cpu, _, (A, B) = common.timed(fn, repeats if name != "eig + full SVD" else 1)
        rows.append({"shape": f"{out_f}x{in_f}", "rank": rank, "method": name, "seconds": t, "cpu_seconds": cpu,
                     "objective_rel": calibrated_error(R, H, A, B, 1.0) / base})
        print(f"  {out_f}x{in_f} r{rank} {name:16s} {t:8.2f}s ({cpu:.2f} CPU s)  objective/start "
              f"{rows[-1]['objective_rel']:.6f}", flush=True)
    return rows


def minilm_table(ranks, bits_list):
    from cloq_engine import data

    model, tok = data.load_model()
    X = data.capture_linear_inputs(model, data.token_blocks(data.calibration_paragraphs(), tok, 128, 32), max_tokens=4096)
    rows = []
    for bits in bits_list:
        qc = ce.QuantConfig(bits=bits, group_size=64, method="gptq")
        layers = []
        for name, x in X.items():
            W = model.get_submodule(name).weight.detach().float()
            H = x.t() @ x
            layers.append((W, H, ce.quantize_weight(W, qc, H)))
        for rank in ranks:
            for method in ("zero", "loftq", "quailora", "cloq", "cloq+requant"):
                rel = []
                for W, H, qw in layers:
                    if method == "loftq":
                        qw2, A, B = ce.init.init_loftq(W, ce.QuantConfig(bits=bits, group_size=64, method="rtn"), rank)
                    elif method == "cloq+requant":
                        lc = ce.LoRAConfig(rank=rank, alpha=rank, requant_rounds=3)
                        qw2, A, B = ce.init.initialize(W, qc, lc, H)
                    else:
                        qw2, (A, B) = qw, ce.init_lora(W, qw, H, rank, method=method)
                    rel.append(calibrated_error(W - qw2.dequantize(), H, A, B, 1.0) / calibrated_error(W, H))
                rows.append({"bits": bits, "rank": rank, "method": method, "mean_rel_error": sum(rel) / len(rel)})
                print(f"  MiniLM {bits}-bit r{rank} {method:9s} mean rel. calibrated error {rows[-1]['mean_rel_error']:.5f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = common.parser("init", __doc__)
    p.add_argument("--quick", action="store_true", help="smaller synthetic layer (1024x1024), MiniLM at 2 bits only")
    p.add_argument("--big", action="store_true", help="also 11008x4096 and 4096x11008 (slow on a CPU)")
    p.add_argument("--no-eig", action="store_true", help="skip the eigendecomposition route (slow) in part 1")
    p.add_argument("--size", type=int, default=None, help="the synthetic square layer (default 4096; 1024 with --quick)")
    p.add_argument("--no-minilm", action="store_true", help="skip part 2 (the MiniLM table)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/init.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}; synthetic layers (Gaussian W, correlated synthetic X) are not real data")
    n = args.size or (1024 if args.quick else 4096)
    rows = synthetic(n, n, 64, 2 * n, repeats=3 if args.quick else 1, with_eig=not args.no_eig)
    if args.big:
        rows += synthetic(11008, 4096, 64, 8192, 1, with_eig=not args.quick)
        rows += synthetic(4096, 11008, 64, 16384, 1, with_eig=not args.quick)
    by = {r["method"]: r for r in rows if r["shape"] == f"{n}x{n}"}
    ref = by.get("eig + full SVD", by["cloq exact"])
    speedup = ref["seconds"] / by["cloq (default)"]["seconds"]
    gap = by["cloq (default)"]["objective_rel"] / ref["objective_rel"] - 1
    cpu_ratio = by["cloq (default)"]["cpu_seconds"] / by["cloq randomized"]["cpu_seconds"]
    print(f"\n{n}x{n} rank 64: default cloq is {speedup:.1f}x faster than {ref['method']}, objective "
          f"{100 * gap:+.4f}% relative to it; {cpu_ratio:.2f}x the CPU time of 4-power-iteration randomized "
          f"(same run)\n")
    minilm = [] if args.no_minilm else minilm_table([16, 64], [2] if args.quick else [2, 3, 4])
    common.write_json(args.out, {"device": dev, "synthetic": rows, "minilm": minilm,
                                 "headline": {"speedup": speedup, "objective_gap": gap, "cpu_vs_randomized": cpu_ratio}},
                      indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
