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
prints the tables. Quality outcomes are measured here, never asserted in the test suite. The study
itself (jobs, workers, summary, plot) is ``cloq_engine.research``; this is its command line.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from cloq_engine.research import plan as study_plan
from cloq_engine.research import report, study
from cloq_engine.research.runner import Runner, check_settings
from cloq_engine.research.study import StudyConfig
from cloq_engine.research.tasks import TASKS, TaskSettings
from cloq_engine.research.training import TrainSettings
from cloq_engine.research.variants import VARIANTS

DEFAULT_INITS = ["zero", "loftq", "quailora", "cloq", "cloq+requant", "cloq+ranks"]
QUICK = dict(bits=[2], inits=["zero", "cloq"], seeds=2, steps=8, lr_grid=[3e-4, 1e-3], samples=16,
             eval_samples=48, curve_samples=16, batch_size=8)


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


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cloq_engine import data, models

    base = data.load_model(args.model)[0]
    if args.tasks is None:
        args.tasks = ["lm"] if models.is_causal_lm(base.config) else ["recovery", "topics"]
    tasks = args.tasks
    config = StudyConfig(
        model=args.model, tasks=tuple(tasks), rank=args.rank, alpha=args.alpha, group_size=args.group_size,
        quantizer=args.quantizer, samples=args.samples, seq_len=args.seq_len,
        cache=args.cache or os.path.join(args.out, "cache"), threads=1,
        task=TaskSettings(max_len=args.max_len, eval_samples=args.eval_samples, curve_samples=args.curve_samples),
        train=TrainSettings(steps=args.steps, batch_size=args.batch_size, head_lr=args.head_lr))
    plan = study_plan.Plan(bits=tuple(args.bits), inits=tuple(args.inits), seeds=args.seeds,
                           lr_grid=tuple(args.lr_grid), lr=args.lr, reference=not args.no_reference)
    os.makedirs(args.out, exist_ok=True)
    check_settings(args.out, config, args.restart)
    targets = study.target_names(base, args.rank) if plan.reference else None
    t0 = time.perf_counter()
    runner = Runner(args.out, args.workers, config, study_plan.job_count(plan, tasks), progress=not args.no_progress)
    if args.at_init:
        try:
            runner.run(study_plan.prepare_jobs(plan))
        finally:
            runner.close()
        return report.print_at_init(plan, tasks, runner.done, config, args.out, time.perf_counter() - t0)
    try:
        runner.run(study_plan.prepare_jobs(plan))
        runner.run(study_plan.search_jobs(plan, tasks, targets))
        rates = study_plan.choose_rates(plan, tasks, runner.done)
        runner.run(study_plan.main_jobs(plan, tasks, rates, targets))
    finally:
        runner.close()
    elapsed = time.perf_counter() - t0
    summary = report.summarize(plan, tasks, rates, runner.done)
    report.print_tables(summary, plan, args.steps)
    print("\nchosen learning rates (validation split, lowest width, seed 0): "
          + "; ".join(f"{t}: " + ", ".join(f"{v} {lr:g}" for v, lr in r.items()) for t, r in rates.items()))
    path = report.write_results(args.out, plan, config, rates, summary, runner.done, elapsed, args.workers)
    png = os.path.join(args.out, "finetune.png")
    report.plot(summary, runner.done, plan, rates, png)
    print(f"wrote {path}, {png} and {runner.path} ({elapsed / 60:.1f} min, {args.workers} worker(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
