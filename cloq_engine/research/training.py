"""The fine-tuning study's training loop: one recipe (:class:`TrainSettings`) applied identically to
every init it compares, over a task of :mod:`.tasks` (``train_lora``), and the linear probe that
scores an init's frozen features before any fine-tuning (``linear_probe``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    """One fine-tuning recipe, identical for every init it is compared across.

    AdamW (no weight decay) on the LoRA factors at ``lr`` and on the task head (if any) at
    ``head_lr``; the rate warms up linearly over the first ``warmup`` fraction of the steps and
    then decays linearly to 0 (the HF Trainer's default schedule); gradients clipped to
    ``max_grad_norm`` (the Trainer's default). ``seed`` sets the data order, dropout and any
    random factor (the head, a zero init's A); ``curve_points`` held-out scores are taken at
    evenly spaced steps (the last one at the end).
    """

    steps: int = 60
    batch_size: int = 16
    lr: float = 3e-4
    head_lr: float = 1e-3
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    curve_points: int = 4


def _schedule(steps: int, warmup: float):
    w = max(1, int(round(warmup * steps)))

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < w:
            return (step + 1) / w
        return max(0.0, (steps - step) / max(1, steps - w))

    return factor


def train_lora(model: nn.Module, task, settings: TrainSettings, head: Optional[nn.Module] = None,
               curve: bool = True, on_step=None) -> dict:
    """Train the trainable parameters of ``model`` (its LoRA factors) and ``head`` on ``task.train``.

    Returns ``{"losses": [...every step...], "curve": [[step, {metric: value}], ...], "diverged": bool}``:
    a non-finite loss stops training and marks the run diverged (its scores cannot be trusted).
    """
    torch.manual_seed(settings.seed)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (expected its lora_A / lora_B)")
    groups = [{"params": params, "lr": settings.lr}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": settings.head_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(settings.steps, settings.warmup))
    every = max(1, settings.steps // max(1, settings.curve_points))
    marks = {min(settings.steps, every * k) for k in range(1, settings.curve_points + 1)} if curve else set()
    clip = [p for g in groups for p in g["params"]]
    losses, points, diverged = [], [], False
    model.train()
    if head is not None:
        head.train()
    for step, idx in enumerate(task.batch_order(task.train, settings.steps, settings.batch_size, settings.seed), 1):
        loss = task.loss(model, head, task.collate(task.train, idx))
        if not torch.isfinite(loss):
            diverged = True
            losses.append(float("nan"))
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip, settings.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step in marks:
            points.append([step, task.evaluate(model, head, task.curve)])
        if on_step is not None:
            on_step(step)
    model.eval()
    if head is not None:
        head.eval()
    return {"losses": losses, "curve": points, "diverged": diverged}


def linear_probe(model: nn.Module, task, settings: TrainSettings, seeds=(0,), split=None) -> List[Dict[str, float]]:
    """The task head trained alone on the frozen model's features (same optimizer, schedule, steps,
    batches and seeds as :func:`train_lora`), scored on ``split`` (default held-out), one score per
    seed: what an init's features are worth for the task before any fine-tuning. The features are
    computed once (eval mode) and shared by the seeds."""
    from ..eval import classification_scores

    split = task.heldout if split is None else split
    feats = task.pooled(model, task.train, normalize=False)
    test = task.pooled(model, split, normalize=False)
    scores = []
    for seed in seeds:
        head = task.make_head(feats.shape[-1], seed)
        opt = torch.optim.AdamW(head.parameters(), lr=settings.head_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(settings.steps, settings.warmup))
        for idx in task.batch_order(task.train, settings.steps, settings.batch_size, seed):
            loss = nn.functional.cross_entropy(head(feats[idx]), task.train.targets[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), settings.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            scores.append(classification_scores(head(test).argmax(-1), split.targets, len(task.names)))
    return scores
