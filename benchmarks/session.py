"""One GPU call that measures what matters, within its own time budget, and returns what it got.

    cloq bench session quick [--dry-run] [--budget S] [--out DIR]   # or: python -m benchmarks.session ...
    cloq bench session full-1 | full-2 | ... [--dry-run]
    cloq bench session list

``bash benchmarks/gpu_session.sh`` is the entry point a lent GPU runs (it records the GPU first).

A *group* (``quick``, ``full-N``) is a list of *steps*; a step is a list of *measurements*, each
with an estimated time (H100/H200, JIT included). The parent runs every step in its own process
(a crash, a CUDA error or a hang stays in that step: it is recorded and the next step runs), with
a hard timeout at the end of the budget. Inside a step, a measurement starts only while the
budget has time left for it; else it is recorded as skipped. Every result is appended to
``$OUT/<group>.jsonl`` (and fsync-ed) the moment it exists, so a call cut at its limit still
returns everything measured so far. A short table of the group's records is printed last.

``--dry-run`` lists every measurement with its estimate and the sum, imports nothing heavy and
runs anywhere (it is tested on the CPU). The ahead-of-time compile check is not here: it needs no
GPU (``python -m cloq_engine.kernels.check``, run in CI).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Tuple

from . import common, session_steps
from .session_registry import STEPS, Context, Skip, groups

ROOT = Path(__file__).resolve().parent.parent  # steps run as `python -m benchmarks.session` from here

STARTUP_S = 6.0  # a step's process: python, torch, triton, transformers imports and CUDA context
GRACE_S = 20.0  # past the budget, the running step gets this long before it is killed
STEP_SLACK = 1.6  # a step may overrun its estimate by this factor (+ 20 s) before its own measurements stop


def run_step(name: str, ctx: Context) -> int:
    """In the step's own process: every measurement in order, each independent of the others."""
    ctx.step = name
    try:
        plan = ctx.plan(STEPS[name])
    except Exception as e:
        ctx.record(label="(plan)", status="error", error=f"{type(e).__name__}: {e}",
                   trace=traceback.format_exc()[-1500:])
        return 1
    failures = 0
    for m in plan:
        if ctx.left() < m.est_s:
            ctx.record(label=m.label, status="skipped", reason=f"budget: {ctx.left():.0f} s left, needs ~{m.est_s:.0f}")
            continue
        t0 = time.time()
        try:
            result = m.run()
        except Skip as e:
            ctx.record(label=m.label, status="skipped", reason=str(e))
            continue
        except Exception as e:  # recorded; the next measurement still runs
            failures += 1
            ctx.record(label=m.label, status="error", error=f"{type(e).__name__}: {str(e)[:500]}",
                       trace=traceback.format_exc()[-1500:], wall_s=round(time.time() - t0, 2))
            _recover()
            continue
        for r in result if isinstance(result, list) else [result or {}]:
            ctx.record(label=m.label, status=r.pop("status", "ok"), wall_s=round(time.time() - t0, 2), **r)
    return 1 if failures else 0


def _recover() -> None:
    """After a failed measurement: drop what it allocated so the next starts clean."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")  # only if the failed measurement used it
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # a poisoned context: the next measurement will record its own error
        pass


def run_group(group: str, out: Path, budget: float, grace: float = GRACE_S, only: Tuple[str, ...] = (),
              step_slack: float = STEP_SLACK) -> int:
    """The parent: each step in a fresh process, no step started past the budget, a table last.

    A step's own deadline is the budget's end or ``STEP_SLACK`` x its estimate, whichever comes
    first, so a slow step (a long JIT) cannot starve the ones after it; time it leaves unused
    passes on."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, group=group, deadline=time.time() + budget, only=only)
    ctx.step = "(session)"
    ctx.record(label="start", status="ok", budget_s=budget, steps=[s.name for s in groups()[group]])
    for s in groups()[group]:
        left = ctx.left()
        plan = ctx.plan(s)
        if not plan:
            continue
        if left < STARTUP_S + min((m.est_s for m in plan), default=0):
            ctx.step = s.name
            ctx.record(label="(step)", status="skipped", reason=f"budget: {left:.0f} s left")
            continue
        est = STARTUP_S + sum(m.est_s for m in plan)
        deadline = min(ctx.deadline, time.time() + max(step_slack * est, est + 20))
        cmd = [sys.executable, "-m", "benchmarks.session", group, "--step", s.name, "--out", str(out),
               "--deadline", str(deadline)] + (["--only", ",".join(only)] if only else [])
        t0 = time.time()
        with open(out / f"{group}.{s.name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=deadline - time.time() + grace).returncode
                status = "ok" if rc == 0 else "error"
            except subprocess.TimeoutExpired:
                rc, status = 124, "timeout"
        ctx.step = s.name
        ctx.record(label="(step)", status=status, rc=rc, wall_s=round(time.time() - t0, 1))
    print_table(ctx.jsonl)
    return 0


# ---------------------------------------------------------------------------------------------
# Listing and the table
# ---------------------------------------------------------------------------------------------
def dry_run(group: str, only: Tuple[str, ...] = ()) -> float:
    """Print every measurement of ``group`` with its estimate; returns the total (startups included)."""
    ctx = Context(out=Path("/nonexistent"), group=group, only=only)
    total = 0.0
    print(f"group {group!r}: every measurement and its estimated time (H100/H200, JIT included)")
    for s in groups()[group]:
        ctx.step = s.name
        plan = ctx.plan(s)
        if not plan:
            continue
        sub = STARTUP_S + sum(m.est_s for m in plan)
        total += sub
        print(f"\n[{s.name}] {s.what}  (~{sub:.0f} s incl. {STARTUP_S:.0f} s start-up)")
        for m in plan:
            print(f"  {m.est_s:6.1f} s  {m.label}")
    print(f"\ntotal estimate: {total:.0f} s ({total / 60:.1f} min)")
    return total


SUMMARY_KEYS = ("us", "ms", "median_step_ms", "rel_err", "gbps", "roof_pct", "tflops", "peak_gib", "x_ref", "ok")


def print_table(path: Path) -> None:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        print(f"no results at {path}")
        return
    print(f"\n{'step':12} {'measurement':44} {'status':8} result")
    for r in rows:
        if r.get("label") in ("start", "(step)") and r.get("status") == "ok":
            continue
        bits = [f"{k}={_fmt(r[k])}" for k in SUMMARY_KEYS if k in r]
        if r.get("status") != "ok":
            bits.append(str(r.get("reason") or r.get("error") or f"rc={r.get('rc')}")[:90])
        print(f"{r.get('step', '')[:12]:12} {str(r.get('label'))[:44]:44} {r.get('status', ''):8} {' '.join(bits)}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = common.parser("session", __doc__)
    p.add_argument("group", nargs="?", default="quick", help="quick, full-1, full-2, ... or list")
    p.add_argument("--dry-run", action="store_true", help="list the measurements and their estimates, run nothing")
    p.add_argument("--budget", type=float, default=None, help="seconds; no measurement starts past it "
                                                             "(default: the group's, 320 for quick)")
    p.add_argument("--out", default=os.environ.get("OUT", "out/gpu"))
    p.add_argument("--grace", type=float, default=GRACE_S, help="seconds a step may run past its deadline")
    p.add_argument("--step-slack", type=float, default=STEP_SLACK,
                   help="a step may run this many times its estimate (within the budget)")
    p.add_argument("--only", default="", help="comma-separated label substrings: run just those measurements "
                                              "(e.g. a rerun of what failed)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    only = tuple(o for o in a.only.split(",") if o)
    if a.step:
        return run_step(a.step, Context(out=Path(a.out), group=a.group, deadline=a.deadline or float("inf"), only=only))
    known = groups()
    if a.group == "list":
        for g, steps in known.items():
            print(f"{g}: {', '.join(s.name for s in steps)}")
        return 0
    if a.group not in known:
        p.error(f"unknown group {a.group!r}; choose from {sorted(known)}")
    if a.dry_run:
        dry_run(a.group, only)
        return 0
    return run_group(a.group, Path(a.out), a.budget or session_steps.BUDGETS.get(a.group, 450), a.grace, only,
                     a.step_slack)


if __name__ == "__main__":
    sys.exit(main())
