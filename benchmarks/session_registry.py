"""What a GPU session is made of: steps of measurements, the context they record into, and the
registry of steps (``@step``) that ``session_steps.py`` fills and ``session.py`` runs. It imports
neither of them, nor anything heavy.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple


class Skip(Exception):
    """Raised by a measurement that cannot run here (a peer not installed, no CUDA); the reason is kept."""


@dataclass
class Measurement:
    label: str
    est_s: float
    run: Callable[[], object]  # returns a dict (or a list of dicts) of results


@dataclass
class Step:
    name: str
    group: str
    what: str
    plan: Callable[["Context"], List[Measurement]]  # builds the measurements; imports nothing heavy


@dataclass
class Context:
    out: Path
    group: str
    step: str = ""
    deadline: float = float("inf")  # epoch seconds: no measurement starts that cannot finish by then
    only: Tuple[str, ...] = ()  # run only measurements whose label contains one of these (all when empty)
    state: Dict[str, object] = field(default_factory=dict)  # shared between the measurements of a step

    def left(self) -> float:
        return self.deadline - time.time()

    def plan(self, s: "Step") -> List["Measurement"]:
        return [m for m in s.plan(self) if not self.only or any(o in m.label for o in self.only)]

    @property
    def jsonl(self) -> Path:
        return self.out / f"{self.group}.jsonl"

    def record(self, **row) -> None:
        """Append one result line now (flushed and fsync-ed: a kill right after keeps it)."""
        row = {"group": self.group, "step": self.step, "time": round(time.time(), 2), **row}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row, default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _jsonable(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


STEPS: Dict[str, Step] = {}


def step(name: str, group: str, what: str):
    """Register a step's plan function under ``name`` in ``group`` (groups run in registration order)."""
    def deco(plan):
        STEPS[name] = Step(name, group, what, plan)
        return plan
    return deco


def groups() -> Dict[str, List[Step]]:
    out: Dict[str, List[Step]] = {}
    for s in STEPS.values():
        out.setdefault(s.group, []).append(s)
    return out
