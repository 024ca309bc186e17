"""Which jobs a fine-tuning study runs, and the learning rate each (task, init) gets.

Jobs are small dicts (they pickle to a worker, their results go to JSON) with an ``id`` that
names them in ``runs.jsonl``: ``prepare/<bits>/<variant>``, ``search/<task>/<bits>/<variant>/<seed>/<lr>``
(the learning-rate search on the validation split) and ``run/...`` (the reported runs on held-out data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .study import FULL_PRECISION
from .tasks import TASKS

MAX_BITS = 4  # the widest the engine quantizes to: the one-width-up reference stops there


@dataclass(frozen=True)
class Plan:
    """What a study compares (the per-run settings are :class:`~.study.StudyConfig`'s).

    ``bits`` the widths studied (ascending), ``inits`` the init variants, ``seeds`` runs per
    (width, init), ``lr_grid`` the rates searched at the lowest width with seed 0 (``lr``: one
    rate for every run, no search), ``reference``: also LoRA on the full-precision base and zero
    init one width up.
    """

    bits: Tuple[int, ...]
    inits: Tuple[str, ...]
    seeds: int
    lr_grid: Tuple[float, ...]
    lr: Optional[float] = None
    reference: bool = True


def reference_widths(plan: Plan) -> List[int]:
    """Zero init one width up of each studied width, when the engine has that width."""
    if not plan.reference:
        return []
    return sorted({b + 1 for b in plan.bits if b + 1 <= MAX_BITS} - set(plan.bits))


def variants_with_reference(plan: Plan) -> List[str]:
    return list(plan.inits) + ([FULL_PRECISION] if plan.reference else [])


def prepare_jobs(plan: Plan) -> List[dict]:
    seeds = list(range(plan.seeds))
    jobs = [{"kind": "prepare", "id": f"prepare/{b}/{v}", "bits": b, "variant": v, "seeds": seeds}
            for b in plan.bits for v in plan.inits]
    jobs += [{"kind": "prepare", "id": f"prepare/{b}/zero", "bits": b, "variant": "zero", "seeds": seeds}
             for b in reference_widths(plan) if "zero" in plan.inits]
    if plan.reference:
        jobs.append({"kind": "prepare", "id": f"prepare/-/{FULL_PRECISION}", "bits": None, "variant": FULL_PRECISION,
                     "seeds": seeds})
    return jobs


def train_job(task: str, bits: Optional[int], variant: str, seed: int, lr: float, split: str,
              targets: Optional[Sequence[str]]) -> dict:
    tag = "search" if split == "val" else "run"
    return {"kind": "train", "id": f"{tag}/{task}/{bits}/{variant}/{seed}/{lr:g}", "task": task, "bits": bits,
            "variant": variant, "seed": seed, "lr": lr, "split": split, "targets": targets}


def search_jobs(plan: Plan, tasks: Sequence[str], targets) -> List[dict]:
    if plan.lr is not None:
        return []
    low = plan.bits[0]
    return [train_job(t, None if v == FULL_PRECISION else low, v, 0, lr, "val", targets)
            for t in tasks for v in variants_with_reference(plan) for lr in plan.lr_grid]


def choose_rates(plan: Plan, tasks: Sequence[str], done: Dict[str, dict]) -> Dict[str, Dict[str, float]]:
    """{task: {variant: lr}}: the best validation score of the grid (a diverged rate never wins)."""
    rates: Dict[str, Dict[str, float]] = {}
    for t in tasks:
        rates[t] = {}
        better = max if TASKS[t].higher_is_better else min
        for v in variants_with_reference(plan):
            if plan.lr is not None:
                rates[t][v] = plan.lr
                continue
            low = None if v == FULL_PRECISION else plan.bits[0]
            scored = [(done[j["id"]]["scores"][TASKS[t].metric], lr) for lr in plan.lr_grid
                      for j in [train_job(t, low, v, 0, lr, "val", None)] if j["id"] in done]
            scored = [(s, lr) for s, lr in scored if s == s]
            if not scored:
                raise RuntimeError(f"every learning rate of the grid diverged for {v} on {t}: no rate to use")
            rates[t][v] = better(scored)[1]
    return rates


def main_jobs(plan: Plan, tasks: Sequence[str], rates: Dict[str, Dict[str, float]], targets) -> List[dict]:
    jobs = []
    for t in tasks:
        for b in plan.bits:
            for v in plan.inits:
                jobs += [train_job(t, b, v, s, rates[t][v], "heldout", targets) for s in range(plan.seeds)]
        if "zero" in plan.inits:
            for b in reference_widths(plan):
                jobs += [train_job(t, b, "zero", s, rates[t]["zero"], "heldout", targets) for s in range(plan.seeds)]
        if plan.reference:
            jobs += [train_job(t, None, FULL_PRECISION, s, rates[t][FULL_PRECISION], "heldout", targets)
                     for s in range(plan.seeds)]
    return jobs


def job_count(plan: Plan, tasks: Sequence[str]) -> int:
    """Every job the study runs (for the progress bar): prepares, the search and the reported runs."""
    n_search = 0 if plan.lr is not None else len(tasks) * len(variants_with_reference(plan)) * len(plan.lr_grid)
    any_rate = {t: {v: 1.0 for v in variants_with_reference(plan)} for t in tasks}
    return len(prepare_jobs(plan)) + n_search + len(main_jobs(plan, tasks, any_rate, None))
