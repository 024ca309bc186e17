"""What a fine-tuning study reports: the summary per (task, width, init), the tables, the plot
(learning curves per width, bars after fine-tuning) and the results files (``results.json``,
``at_init.json``), each recording the commit of the code that produced it.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import List

from .plan import Plan, prepare_jobs, reference_widths, train_job
from .runner import jsonable
from .study import FULL_PRECISION, StudyConfig
from .tasks import TASKS


def _num(v):
    return float("nan") if v is None else v


def _mean_std(vals: List[float]):
    vals = [_num(v) for v in vals]
    if not vals or any(v != v for v in vals):
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(plan: Plan, tasks, rates, done) -> dict:
    out = {}
    for t in tasks:
        cls = TASKS[t]
        metrics = metrics_of(t)
        rows = []
        widths = [(b, v) for b in plan.bits for v in plan.inits]
        widths += [(b, "zero") for b in reference_widths(plan) if "zero" in plan.inits]
        if plan.reference:
            widths.append((None, FULL_PRECISION))
        by_key = {}
        for b, v in widths:
            runs = [done.get(train_job(t, b, v, s, rates[t][v], "heldout", None)["id"]) for s in range(plan.seeds)]
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


def metrics_of(task: str) -> List[str]:
    return {"recovery": ["cosine", "spearman"], "topics": ["accuracy", "macro_f1"], "lm": ["perplexity", "code_perplexity", "topic_accuracy"]}[task]


def _fmt(ms, digits=4):
    m, s = ms
    return "n/a" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def print_tables(summary, plan: Plan, steps: int) -> None:
    for t, rows in summary.items():
        metrics = metrics_of(t)
        head = TASKS[t].metric
        print(f"\n## {t}: held-out {', '.join(metrics)} after {steps} steps, mean ± std over {plan.seeds} seeds")
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


def print_at_init(plan: Plan, tasks, done, config: StudyConfig, out: str, elapsed: float) -> int:
    """The at-init table of an ``--at-init`` run (every metric of every task) and at_init.json."""
    rows = []
    for job in prepare_jobs(plan):
        rec = done.get(job["id"])
        if rec is None:
            continue
        row = {"bits": job["bits"], "init": job["variant"], "quantizer": rec["record"].get("quantizer", "-"),
               "mean_err_init": rec["record"].get("mean_err_init"), "prepare_s": rec["record"].get("prepare_s")}
        for t in tasks:
            row.update({f"{t}:{m}": v for m, v in rec["at_init"].get(t, {}).get("heldout", {}).items()})
        rows.append(row)
    metrics = [k for k in rows[0] if ":" in k] if rows else []
    print(f"\n## at init: rank {config.rank}, group {config.group_size}, {config.quantizer}, {config.samples} x {config.seq_len} "
          "calibration tokens")
    cols = ["bits", "init", "quantizer", "mean layer error", *metrics]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        err = r["mean_err_init"]
        print(f"| {'-' if r['bits'] is None else r['bits']} | {r['init']} | {r['quantizer']} | "
              f"{'' if err is None else f'{err:.4f}'} | " + " | ".join(f"{_num(r.get(m)):.4f}" for m in metrics) + " |")
    path = os.path.join(out, "at_init.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable({"commit": source_commit(), "settings": config.to_dict(), "rows": rows,
                             "elapsed_s": elapsed}), f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path} ({elapsed / 60:.1f} min)")
    return 0


def plot(summary, done, plan: Plan, rates, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    ncols = len(plan.bits) + 1
    fig, axes = plt.subplots(len(tasks), ncols, figsize=(4 * ncols, 3.2 * len(tasks)), squeeze=False)
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(list(plan.inits) + ["zero", FULL_PRECISION]))}
    for ti, t in enumerate(tasks):
        metric = TASKS[t].metric
        for bi, b in enumerate(plan.bits):
            ax = axes[ti][bi]
            for v in list(plan.inits) + ([FULL_PRECISION] if plan.reference else []):
                bits = None if v == FULL_PRECISION else b
                runs = [done.get(train_job(t, bits, v, s, rates[t][v], "heldout", None)["id"]) for s in range(plan.seeds)]
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
        width = 0.8 / max(1, len(plan.inits))
        rows = {(r["bits"], r["init"]): r for r in summary[t]}
        for vi, v in enumerate(plan.inits):
            xs = [bi + vi * width for bi in range(len(plan.bits))]
            ms = [rows[(b, v)][metric][0] for b in plan.bits]
            ss = [rows[(b, v)][metric][1] for b in plan.bits]
            ax.bar(xs, ms, width, yerr=ss, color=colors[v], label=v, capsize=2)
        fp = rows.get((None, FULL_PRECISION))
        if fp and fp[metric][0] == fp[metric][0]:
            ax.axhline(fp[metric][0], color="k", ls="--", lw=1, label="full-precision LoRA")
        ax.set_xticks([bi + 0.4 - width / 2 for bi in range(len(plan.bits))], [f"{b}-bit" for b in plan.bits])
        vals = [rows[(b, v)][metric][0] for b in plan.bits for v in plan.inits]
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

    root = os.path.dirname(os.path.abspath(__file__))  # git finds the checkout from any folder in it
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_results(out: str, plan: Plan, config: StudyConfig, rates, summary, done, elapsed: float, workers: int) -> str:
    path = os.path.join(out, "results.json")
    payload = {"commit": source_commit(), "settings": config.to_dict(), "bits": list(plan.bits),
               "inits": list(plan.inits), "seeds": plan.seeds, "lr_grid": list(plan.lr_grid), "lr": plan.lr,
               "chosen_lr": rates, "elapsed_s": elapsed, "workers": workers, "summary": summary,
               "runs": list(done.values())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(jsonable(payload), f, indent=1)
    os.replace(tmp, path)
    return path
