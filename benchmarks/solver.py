"""The default CLoQ solve alone and beside a busy process, against the eigendecomposition route.

    cloq bench solver [--size 4096] [--rank 64] [--tokens 8192] [--repeats 3] [--busy 1] [--no-eig]
                      [--threads N] [--solve-threads N] [--out results/solver.jsonl]

One synthetic layer (Gaussian W, a correlated synthetic X, 2-bit RTN g128: not real data). In
pairs, alternated ``--repeats`` times: the default solve (``init_lora(method="cloq")``: the damped
Cholesky, block Krylov whose products with E take the idle cores, the triangular solve) alone, then
beside ``--busy`` processes that this script starts, each spinning on one core, and stops after
the solve. Then once, alone, the route published reproductions use (eigh of H, the full SVD of
R·H^{1/2}, every thread): the reference. Reported: medians of wall and CPU seconds, the thread
count the solve's products got and the machine's runnable tasks before each run, and the two
ratios the solver is held to on a quiet 2-core CPU: eigh route / default alone (at least 20x) and
default beside the busy process / default alone (at most 2x). On a machine that is not quiet,
"alone" is not alone: the runnable-task count says so, and the figures must be quoted with it.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from . import common

SPIN = "while True: pass"


def runnable_tasks() -> int:
    """procs_running of /proc/stat (the whole machine, this process included); -1 where unreadable."""
    try:
        with open("/proc/stat") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
    except (OSError, StopIteration, ValueError):
        return -1


class Spinners:
    """``n`` processes spinning on a core each, started on entry and ended (by their ids) on exit."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(self.n)]
        time.sleep(0.5)  # scheduled and spinning before the solve starts
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        return False


def main(argv=None) -> int:
    p = common.parser("solver", __doc__)
    p.add_argument("--size", type=int, default=4096, help="the square layer (in = out)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default 2 x size)")
    p.add_argument("--repeats", type=int, default=3, help="pairs (alone, busy)")
    p.add_argument("--busy", type=int, default=1, help="spinning processes beside the busy runs")
    p.add_argument("--no-eig", action="store_true", help="skip the eigh route (minutes on 2 cores at 4096)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--solve-threads", type=int, default=None,
                   help="fix the threads of the solve's products (CLOQ_SOLVE_THREADS; default: the idle cores)")
    p.add_argument("--out", default="results/solver.jsonl", help="one JSON line per run, as it goes")
    args = p.parse_args(argv)
    for name in ("size", "rank", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.busy < 0:
        p.error("--busy must be at least 0")
    if args.solve_threads is not None:
        if args.solve_threads < 1:
            p.error("--solve-threads must be at least 1")
        os.environ["CLOQ_SOLVE_THREADS"] = str(args.solve_threads)
    import torch

    import cloq_engine as ce
    from cloq_engine import linalg
    from cloq_engine.init import calibrated_error

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.size
    W, qw, H = common.synthetic_layer(n, n, args.tokens or 2 * n)
    R = W - qw.dequantize()
    start = calibrated_error(R, H)
    solve = lambda: ce.init_lora(W, qw, H, args.rank, method="cloq")  # noqa: E731
    env = {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "size": n, "rank": args.rank,
           "busy": args.busy, "solve_threads": args.solve_threads}
    print(f"{n}x{n} rank {args.rank}, synthetic; {env['cores']} cores, torch {env['torch_threads']} threads, "
          f"load average {env['load_avg'][0]:.2f}", flush=True)
    solve()  # warm-up: first-call allocations, the thread pool
    rows = {"alone": [], "busy": []}

    def one(kind: str):
        tasks = runnable_tasks()
        threads = linalg.product_threads_count()
        t = common.timed(solve, 1)
        A, B = t.result
        row = {"run": kind, "wall_s": t.wall_s, "cpu_s": t.cpu_s, "product_threads": threads,
               "runnable_before": tasks, "objective_rel": calibrated_error(R, H, A, B, 1.0) / start, **env}
        rows[kind].append(row)
        common.append_jsonl(args.out, row)
        print(f"  {kind:5s} {t.wall_s:7.3f} s wall {t.cpu_s:7.3f} s CPU, products on {threads} thread(s), "
              f"{tasks} runnable before", flush=True)

    for _ in range(args.repeats):
        one("alone")
        if args.busy:
            with Spinners(args.busy):
                one("busy")
    eig = None
    if not args.no_eig:
        t = common.timed(lambda: common.eig_route(R, H, args.rank), 1)
        A, B = t.result
        eig = {"run": "eig route", "wall_s": t.wall_s, "cpu_s": t.cpu_s, "runnable_before": runnable_tasks(),
               "objective_rel": calibrated_error(R, H, A, B, 1.0) / start, **env}
        common.append_jsonl(args.out, eig)
        print(f"  eigh route {t.wall_s:.2f} s wall {t.cpu_s:.2f} s CPU", flush=True)
    alone = statistics.median(r["wall_s"] for r in rows["alone"])
    summary = {"alone_s": alone, **env}
    print("\n| run | median wall s | median CPU s | product threads | objective / start |\n|---|---|---|---|---|")
    for kind, rs in rows.items():
        if rs:
            print(f"| {kind} | {statistics.median(r['wall_s'] for r in rs):.3f} | "
                  f"{statistics.median(r['cpu_s'] for r in rs):.3f} | "
                  f"{','.join(sorted({str(r['product_threads']) for r in rs}))} | {rs[-1]['objective_rel']:.6f} |")
    if eig:
        print(f"| eig route | {eig['wall_s']:.3f} | {eig['cpu_s']:.3f} | all | {eig['objective_rel']:.6f} |")
        summary["speedup_vs_eig"] = eig["wall_s"] / alone
        print(f"eigh route / default alone: {summary['speedup_vs_eig']:.1f}x (held to >= 20x on a quiet 2-core CPU)")
    if rows["busy"]:
        summary["busy_slowdown"] = statistics.median(r["wall_s"] for r in rows["busy"]) / alone
        print(f"default beside {args.busy} busy process(es) / alone: {summary['busy_slowdown']:.2f}x (held to <= 2x)")
    common.append_jsonl(args.out, {"run": "summary", **summary})
    print(json.dumps({"summary": summary}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
