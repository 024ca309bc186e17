"""Runs a study's jobs on worker processes and keeps every result in ``<out>/runs.jsonl``.

A result is appended the moment it arrives, so a study cut short resumes where it stopped; it
resumes only the same study (``settings.json``), never mixing runs of other settings.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Dict, List

from . import study
from .study import StudyConfig


class Runner:
    """Runs jobs on ``workers`` processes (one thread each), appending each result to runs.jsonl as
    it arrives; results already in runs.jsonl are not run again."""

    def __init__(self, out: str, workers: int, config: StudyConfig, total: int, progress: bool = True):
        self.workers, self.config = workers, config
        self.path = os.path.join(out, "runs.jsonl")
        self.done: Dict[str, dict] = {}
        self._load()
        self.pool = None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="run", desc="finetune study", disable=not progress, file=sys.stderr,
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
        if self.workers == 1:
            if study._STATE.get("config") != self.config.to_dict():
                study.init_worker(self.config.to_dict())
            for j in todo:
                self._record(study.run_job(j))
            return
        if self.pool is None:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                            initializer=study.init_worker, initargs=(self.config.to_dict(),))
        futures = [self.pool.submit(study.run_job, j) for j in _longest_first(todo)]
        for fut in as_completed(futures):
            self._record(fut.result())

    def _record(self, rec: dict) -> None:
        self.done[rec["id"]] = rec
        with open(self.path, "a") as f:
            f.write(json.dumps(jsonable(rec)) + "\n")
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


def jsonable(x):
    """``x`` with NaN as None (JSON has no NaN), through dicts, lists and tuples."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def check_settings(out: str, config: StudyConfig, restart: bool, prog: str = "cloq bench finetune") -> None:
    """runs.jsonl resumes only the same study: other settings would mix incomparable runs.

    Refuses (SystemExit naming the changed settings) when ``out`` holds a study of other settings,
    unless ``restart``, which moves the old runs.jsonl aside; then records these settings."""
    path = os.path.join(out, "settings.json")
    mine = jsonable(config.to_dict())
    runs = os.path.join(out, "runs.jsonl")
    if os.path.isfile(path) and os.path.isfile(runs) and not restart:
        with open(path) as f:
            theirs = json.load(f)
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SystemExit(f"{prog}: error: {runs} holds a study with other settings "
                             f"({', '.join(changed)}); pass --restart to discard it or choose another --out")
    if restart and os.path.isfile(runs):
        os.replace(runs, runs + ".old")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(mine, f, indent=1)
    os.replace(tmp, path)
