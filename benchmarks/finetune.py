"""After fine-tuning, across inits, widths and seeds: does a calibrated LoRA init still win?

    cloq bench finetune [--bits 2 3 4] [--inits zero loftq quailora cloq cloq+requant cloq+ranks]
        [--tasks recovery topics | lm] [--seeds 3] [--steps 60] [--lr-grid 1e-4 3e-4 1e-3 | --lr LR]
        [--model DIR] [--workers 2] [--quick] [--out results/finetune]

For each width and init variant the model is prepared once (cached in ``<out>/cache``), then its
LoRA factors are fine-tuned with the same data order, steps, batch, schedule and optimizer for
every seed (the seed sets data order, dropout, the task head and a zero init's A). References in
the same run: LoRA (PEFT) on the full-precision base, the ceiling; and zero init one width up, for
QuAILoRA's measure (the fraction of the gap to the next width an init closes).

Protocol: one learning rate per (task, init), chosen from ``--lr-grid`` at the lowest width with
seed 0 on a validation split carved from the training half (every fifth example), never on
held-out data; then fixed for every width and seed. Scores after fine-tuning are on the held-out
half only; the learning curves on an evenly spaced subset of it.

Writes ``<out>/runs.jsonl`` (one line per finished job: every logged loss and curve point; a rerun
with the same settings resumes from it), ``<out>/results.json`` (settings, chosen rates, summary,
every run) and ``<out>/finetune.png`` (learning curves per width, bars after fine-tuning), and
prints the tables. Quality outcomes are measured here, never asserted in the test suite.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, List, Optional

from cloq_engine import study
from cloq_engine.finetune import TrainSettings
from cloq_engine.study import FULL_PRECISION, StudyConfig
from cloq_engine.tasks import TASKS, TaskSettings
from cloq_engine.variants import VARIANTS

DEFAULT_INITS = ["zero", "loftq", "quailora", "cloq", "cloq+requant", "cloq+ranks"]
QUICK = dict(bits=[2], inits=["zero", "cloq"], seeds=2, steps=8, lr_grid=[3e-4, 1e-3], samples=16,
             eval_samples=48, curve_samples=16, batch_size=8)
MAX_BITS = 4


def parse_args(argv):
    p = argparse.ArgumentParser(prog="cloq bench finetune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local HF model directory (default: the embedded MiniLM)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None,
                   help="default: recovery topics for an encoder, lm for a causal LM")
    p.add_argument("--bits", type=int, nargs="+", choices=(2, 3, 4), default=[2, 3, 4])
    p.add_argument("--inits", nargs="+", choices=sorted(VARIANTS), default=DEFAULT_INITS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64, help="tokens per paragraph (encoders)")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--lr", type=float, default=None, help="one rate for every run (skips the search)")
    p.add_argument("--head-lr", type=float, default=3e-2, help="the topic head's rate (fixed; see the README)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--quantizer", choices=("gptq", "rtn", "nf4"), default="gptq")
    p.add_argument("--samples", type=int, default=64, help="calibration blocks of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=None, help="held-out examples (default: 256 / 384 / 64)")
    p.add_argument("--curve-samples", type=int, default=128)
    p.add_argument("--no-reference", action="store_true", help="skip the full-precision and one-width-up references")
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each (1: in this process)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 2 bits, zero and cloq, 2 seeds, 8 steps")
    p.add_argument("--out", default="results/finetune")
    p.add_argument("--cache", default=None, help="prepared models (default: <out>/cache)")
    p.add_argument("--restart", action="store_true", help="discard <out>/runs.jsonl from an earlier study")
    p.add_argument("--at-init", action="store_true",
                   help="only prepare and score every (width, init) at init: the table before fine-tuning")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # the quick settings, except where an option was given
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    for name, lo in (("seeds", 1), ("steps", 1), ("batch_size", 1), ("workers", 1), ("rank", 1)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be at least {lo}")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lr_grid + ([args.lr] if args.lr else [])):
        p.error("learning rates must be positive")
    args.bits = sorted(set(args.bits))
    return args


# -- the jobs ----------------------------------------------------------------------------------------
def reference_widths(args) -> List[int]:
    """Zero init one width up of each studied width, when the engine has that width."""
    return [] if args.no_reference else sorted({b + 1 for b in args.bits if b + 1 <= MAX_BITS} - set(args.bits))


def prepare_jobs(args) -> List[dict]:
    seeds = list(range(args.seeds))
    jobs = [{"kind": "prepare", "id": f"prepare/{b}/{v}", "bits": b, "variant": v, "seeds": seeds}
            for b in args.bits for v in args.inits]
    jobs += [{"kind": "prepare", "id": f"prepare/{b}/zero", "bits": b, "variant": "zero", "seeds": seeds}
             for b in reference_widths(args) if "zero" in args.inits]
    if not args.no_reference:
        jobs.append({"kind": "prepare", "id": f"prepare/-/{FULL_PRECISION}", "bits": None, "variant": FULL_PRECISION,
                     "seeds": seeds})
    return jobs


def _train_job(task, bits, variant, seed, lr, split, targets) -> dict:
    tag = "search" if split == "val" else "run"
    return {"kind": "train", "id": f"{tag}/{task}/{bits}/{variant}/{seed}/{lr:g}", "task": task, "bits": bits,
            "variant": variant, "seed": seed, "lr": lr, "split": split, "targets": targets}


def variants_with_reference(args) -> List[str]:
    return args.inits + ([] if args.no_reference else [FULL_PRECISION])


def search_jobs(args, tasks, targets) -> List[dict]:
    if args.lr is not None:
        return []
    low = args.bits[0]
    return [_train_job(t, None if v == FULL_PRECISION else low, v, 0, lr, "val", targets)
            for t in tasks for v in variants_with_reference(args) for lr in args.lr_grid]


def choose_rates(args, tasks, done: Dict[str, dict]) -> Dict[str, Dict[str, float]]:
    """{task: {variant: lr}}: the best validation score of the grid (a diverged rate never wins)."""
    rates: Dict[str, Dict[str, float]] = {}
    for t in tasks:
        rates[t] = {}
        better = max if TASKS[t].higher_is_better else min
        for v in variants_with_reference(args):
            if args.lr is not None:
                rates[t][v] = args.lr
                continue
            low = None if v == FULL_PRECISION else args.bits[0]
            scored = [(done[j["id"]]["scores"][TASKS[t].metric], lr) for lr in args.lr_grid
                      for j in [_train_job(t, low, v, 0, lr, "val", None)] if j["id"] in done]
            scored = [(s, lr) for s, lr in scored if s == s]
            if not scored:
                raise RuntimeError(f"every learning rate of the grid diverged for {v} on {t}: no rate to use")
            rates[t][v] = better(scored)[1]
    return rates


def main_jobs(args, tasks, rates, targets) -> List[dict]:
    jobs = []
    for t in tasks:
        for b in args.bits:
            for v in args.inits:
                jobs += [_train_job(t, b, v, s, rates[t][v], "heldout", targets) for s in range(args.seeds)]
        if "zero" in args.inits:
            for b in reference_widths(args):
                jobs += [_train_job(t, b, "zero", s, rates[t]["zero"], "heldout", targets) for s in range(args.seeds)]
        if not args.no_reference:
            jobs += [_train_job(t, None, FULL_PRECISION, s, rates[t][FULL_PRECISION], "heldout", targets)
                     for s in range(args.seeds)]
    return jobs


# -- running them ------------------------------------------------------------------------------------
class Runner:
    """Runs jobs on ``workers`` processes (one thread each), appending each result to runs.jsonl as
    it arrives; results already in runs.jsonl are not run again."""

    def __init__(self, args, config: StudyConfig, total: int):
        self.args, self.config = args, config
        self.path = os.path.join(args.out, "runs.jsonl")
        self.done: Dict[str, dict] = {}
        self._load()
        self.pool = None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="run", desc="finetune study", disable=args.no_progress, file=sys.stderr,
                        dynamic_ncols=True)

    def _load(self) -> None:
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: run that job again
                    continue
                self.done[rec["id"]] = rec

    def run(self, jobs: List[dict]) -> None:
        todo = [j for j in jobs if j["id"] not in self.done]
        self.bar.update(len(jobs) - len(todo))
        if not todo:
            return
        if self.args.workers == 1:
            if study._STATE.get("config") != self.config.to_dict():
                study.init_worker(self.config.to_dict())
            for j in todo:
                self._record(study.run_job(j))
            return
        if self.pool is None:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(self.args.workers, mp_context=mp.get_context("spawn"),
                                            initializer=study.init_worker, initargs=(self.config.to_dict(),))
        futures = [self.pool.submit(study.run_job, j) for j in _longest_first(todo)]
        for fut in as_completed(futures):
            self._record(fut.result())

    def _record(self, rec: dict) -> None:
        self.done[rec["id"]] = rec
        with open(self.path, "a") as f:
            f.write(json.dumps(_jsonable(rec)) + "\n")
        self.bar.update(1)
        self.bar.set_postfix_str(rec["id"], refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown()


def _longest_first(jobs: List[dict]) -> List[dict]:
    """Slow prepares (re-quantization, rank planning) first, so two workers finish together."""
    slow = {"cloq+requant": 0, "cloq+ranks": 1}
    return sorted(jobs, key=lambda j: slow.get(j.get("variant"), 2) if j["kind"] == "prepare" else 3)


def _jsonable(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# -- summary -----------------------------------------------------------------------------------------
def _num(v):
    return float("nan") if v is None else v


def _mean_std(vals: List[float]):
    vals = [_num(v) for v in vals]
    if not vals or any(v != v for v in vals):
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(args, tasks, rates, done) -> dict:
    out = {}
    for t in tasks:
        cls = TASKS[t]
        metrics = _metrics_of(t)
        rows = []
        widths = [(b, v) for b in args.bits for v in args.inits]
        widths += [(b, "zero") for b in reference_widths(args) if "zero" in args.inits]
        if not args.no_reference:
            widths.append((None, FULL_PRECISION))
        by_key = {}
        for b, v in widths:
            runs = [done.get(_train_job(t, b, v, s, rates[t][v], "heldout", None)["id"]) for s in range(args.seeds)]
            runs = [r for r in runs if r is not None]
            prep = done.get(f"prepare/{'-' if b is None else b}/{v}")
            at_init = (prep or {}).get("at_init", {}).get(t, {}).get("heldout", {})
            row = {"task": t, "bits": b, "init": v, "lr": rates[t][v], "seeds": len(runs),
                   "diverged": sum(bool(r.get("diverged")) for r in runs),
                   "at_init": {m: _num(at_init.get(m)) for m in metrics}}
            for m in metrics:
                row[m] = _mean_std([r["scores"].get(m) for r in runs])
            row["per_seed"] = [_num(r["scores"].get(cls.metric)) for r in runs]
            if prep and prep.get("record"):
                row["mean_err_init"] = prep["record"].get("mean_err_init")
                row["lora_norms"] = prep["record"].get("lora_norms")
            by_key[(b, v)] = row
            rows.append(row)
        for row in rows:
            b, v = row["bits"], row["init"]
            zero = by_key.get((b, "zero"))
            if zero and v != "zero" and b is not None and len(zero["per_seed"]) == len(row["per_seed"]):
                diffs = [x - z for x, z in zip(row["per_seed"], zero["per_seed"])]  # same seed: same data order
                row["vs_zero"] = _mean_std(diffs)
            up = by_key.get((b + 1, "zero")) if b is not None else None
            if zero and up and b is not None:
                gap = up[cls.metric][0] - zero[cls.metric][0]
                # a gap no larger than the two seed spreads gives a fraction of noise: not reported
                row["gap_within_noise"] = not abs(gap) > zero[cls.metric][1] + up[cls.metric][1]
                row["gap_closed"] = (float("nan") if row["gap_within_noise"]
                                     else (row[cls.metric][0] - zero[cls.metric][0]) / gap)
                gap0 = up["at_init"][cls.metric] - zero["at_init"][cls.metric]
                row["gap_closed_at_init"] = ((row["at_init"][cls.metric] - zero["at_init"][cls.metric]) / gap0
                                             if gap0 else float("nan"))
        out[t] = rows
    return out


def _metrics_of(task: str) -> List[str]:
    return {"recovery": ["cosine", "spearman"], "topics": ["accuracy", "macro_f1"], "lm": ["perplexity", "code_perplexity", "topic_accuracy"]}[task]


def _fmt(ms, digits=4):
    m, s = ms
    return "n/a" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def print_tables(summary, args) -> None:
    for t, rows in summary.items():
        metrics = _metrics_of(t)
        head = TASKS[t].metric
        print(f"\n## {t}: held-out {', '.join(metrics)} after {args.steps} steps, mean ± std over {args.seeds} seeds")
        cols = ["bits", "init", "lr", f"{head} at init", *[f"{m} after" for m in metrics], f"vs zero ({head})",
                "gap closed"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for r in rows:
            b = "-" if r["bits"] is None else str(r["bits"])
            vs = _fmt(r["vs_zero"]) if "vs_zero" in r else ""
            gap = r.get("gap_closed")
            gap = ("n/a: gap within noise" if r.get("gap_within_noise") else
                   "" if gap is None or gap != gap else f"{100 * gap:.0f}%")
            warn = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            at = r["at_init"][head]
            print(f"| {b} | {r['init']}{warn} | {r['lr']:g} | {'n/a' if at != at else f'{at:.4f}'} | "
                  + " | ".join(_fmt(r[m]) for m in metrics) + f" | {vs} | {gap} |")


def print_at_init(args, tasks, done, config, elapsed) -> int:
    """The at-init table of an ``--at-init`` run (every metric of every task) and at_init.json."""
    rows = []
    for job in prepare_jobs(args):
        rec = done.get(job["id"])
        if rec is None:
            continue
        row = {"bits": job["bits"], "init": job["variant"], "quantizer": rec["record"].get("quantizer", "-"),
               "mean_err_init": rec["record"].get("mean_err_init"), "prepare_s": rec["record"].get("prepare_s")}
        for t in tasks:
            row.update({f"{t}:{m}": v for m, v in rec["at_init"].get(t, {}).get("heldout", {}).items()})
        rows.append(row)
    metrics = [k for k in rows[0] if ":" in k] if rows else []
    print(f"\n## at init: rank {args.rank}, group {args.group_size}, {args.quantizer}, {args.samples} x {args.seq_len} "
          "calibration tokens")
    cols = ["bits", "init", "quantizer", "mean layer error", *metrics]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        err = r["mean_err_init"]
        print(f"| {'-' if r['bits'] is None else r['bits']} | {r['init']} | {r['quantizer']} | "
              f"{'' if err is None else f'{err:.4f}'} | " + " | ".join(f"{_num(r.get(m)):.4f}" for m in metrics) + " |")
    path = os.path.join(args.out, "at_init.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable({"commit": source_commit(), "settings": config.to_dict(), "rows": rows,
                             "elapsed_s": elapsed}), f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path} ({elapsed / 60:.1f} min)")
    return 0


def plot(summary, done, args, rates, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    ncols = len(args.bits) + 1
    fig, axes = plt.subplots(len(tasks), ncols, figsize=(4 * ncols, 3.2 * len(tasks)), squeeze=False)
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(args.inits + ["zero", FULL_PRECISION]))}
    for ti, t in enumerate(tasks):
        metric = TASKS[t].metric
        for bi, b in enumerate(args.bits):
            ax = axes[ti][bi]
            for v in args.inits + ([] if args.no_reference else [FULL_PRECISION]):
                bits = None if v == FULL_PRECISION else b
                runs = [done.get(_train_job(t, bits, v, s, rates[t][v], "heldout", None)["id"]) for s in range(args.seeds)]
                runs = [r for r in runs if r and r.get("curve")]
                if not runs:
                    continue
                prep = done.get(f"prepare/{'-' if bits is None else bits}/{v}") or {}
                start = prep.get("at_init", {}).get(t, {}).get("curve", {}).get(metric)
                steps = [0] if start is not None else []
                steps += [p[0] for p in runs[0]["curve"]]
                series = [([start] if start is not None else []) + [_num(p[1].get(metric)) for p in r["curve"]]
                          for r in runs]
                mean = [statistics.fmean(col) for col in zip(*series)]
                sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*series)]
                style = "--" if v == FULL_PRECISION else "-"
                ax.plot(steps, mean, style, color=colors[v], label=v)
                ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                                color=colors[v], alpha=0.15)
            ax.set_title(f"{t}, {b}-bit: held-out {metric}")
            ax.set_xlabel("step")
            if bi == 0:
                ax.legend(fontsize=7)
        ax = axes[ti][-1]
        width = 0.8 / max(1, len(args.inits))
        rows = {(r["bits"], r["init"]): r for r in summary[t]}
        for vi, v in enumerate(args.inits):
            xs = [bi + vi * width for bi in range(len(args.bits))]
            ms = [rows[(b, v)][metric][0] for b in args.bits]
            ss = [rows[(b, v)][metric][1] for b in args.bits]
            ax.bar(xs, ms, width, yerr=ss, color=colors[v], label=v, capsize=2)
        fp = rows.get((None, FULL_PRECISION))
        if fp and fp[metric][0] == fp[metric][0]:
            ax.axhline(fp[metric][0], color="k", ls="--", lw=1, label="full-precision LoRA")
        ax.set_xticks([bi + 0.4 - width / 2 for bi in range(len(args.bits))], [f"{b}-bit" for b in args.bits])
        vals = [rows[(b, v)][metric][0] for b in args.bits for v in args.inits]
        vals = [x for x in vals if x == x]
        if vals and TASKS[t].higher_is_better:
            ax.set_ylim(max(0.0, min(vals) - 0.05), max(vals + [fp[metric][0] if fp else 0]) + 0.02)
        ax.set_title(f"{t}: after fine-tuning")
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def source_commit() -> str:
    """The commit of the source tree that ran the study (with "+dirty" for uncommitted changes), or
    "unknown" outside a git checkout: every results file says which code produced it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_results(args, config, tasks, rates, summary, done, elapsed) -> str:
    path = os.path.join(args.out, "results.json")
    payload = {"commit": source_commit(), "settings": config.to_dict(), "bits": args.bits, "inits": args.inits, "seeds": args.seeds,
               "lr_grid": args.lr_grid, "lr": args.lr, "chosen_lr": rates, "elapsed_s": elapsed,
               "workers": args.workers, "summary": summary, "runs": list(done.values())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
    os.replace(tmp, path)
    return path


def _check_settings(args, config: StudyConfig) -> None:
    """runs.jsonl resumes only the same study: other settings would mix incomparable runs."""
    path = os.path.join(args.out, "settings.json")
    mine = _jsonable(config.to_dict())
    runs = os.path.join(args.out, "runs.jsonl")
    if os.path.isfile(path) and os.path.isfile(runs) and not args.restart:
        with open(path) as f:
            theirs = json.load(f)
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SystemExit(f"cloq bench finetune: error: {runs} holds a study with other settings "
                             f"({', '.join(changed)}); pass --restart to discard it or choose another --out")
    if args.restart and os.path.isfile(runs):
        os.replace(runs, runs + ".old")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(mine, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cloq_engine import data

    base = data.load_model(args.model)[0]
    if args.tasks is None:
        args.tasks = ["lm"] if data.is_causal_lm(base.config) else ["recovery", "topics"]
    tasks = args.tasks
    eval_samples = args.eval_samples
    config = StudyConfig(
        model=args.model, tasks=tuple(tasks), rank=args.rank, alpha=args.alpha, group_size=args.group_size,
        quantizer=args.quantizer, samples=args.samples, seq_len=args.seq_len,
        cache=args.cache or os.path.join(args.out, "cache"), threads=1,
        task=TaskSettings(max_len=args.max_len, eval_samples=eval_samples, curve_samples=args.curve_samples),
        train=TrainSettings(steps=args.steps, batch_size=args.batch_size, head_lr=args.head_lr))
    os.makedirs(args.out, exist_ok=True)
    _check_settings(args, config)
    targets = None if args.no_reference else study.target_names(base, args.rank)
    t0 = time.perf_counter()
    n_search = 0 if args.lr is not None else len(tasks) * len(variants_with_reference(args)) * len(args.lr_grid)
    n_main = len(main_jobs(args, tasks, {t: {v: 1.0 for v in variants_with_reference(args)} for t in tasks}, targets))
    runner = Runner(args, config, len(prepare_jobs(args)) + n_search + n_main)
    if args.at_init:
        try:
            runner.run(prepare_jobs(args))
        finally:
            runner.close()
        return print_at_init(args, tasks, runner.done, config, time.perf_counter() - t0)
    try:
        runner.run(prepare_jobs(args))
        runner.run(search_jobs(args, tasks, targets))
        rates = choose_rates(args, tasks, runner.done)
        runner.run(main_jobs(args, tasks, rates, targets))
    finally:
        runner.close()
    elapsed = time.perf_counter() - t0
    summary = summarize(args, tasks, rates, runner.done)
    print_tables(summary, args)
    print("\nchosen learning rates (validation split, lowest width, seed 0): "
          + "; ".join(f"{t}: " + ", ".join(f"{v} {lr:g}" for v, lr in r.items()) for t, r in rates.items()))
    path = write_results(args, config, tasks, rates, summary, runner.done, elapsed)
    png = os.path.join(args.out, "finetune.png")
    plot(summary, runner.done, args, rates, png)
    print(f"wrote {path}, {png} and {runner.path} ({elapsed / 60:.1f} min, {args.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
