"""A thin Hugging Face Trainer loop over the LoRA factors of a prepared model.

Decoders train on the causal LM loss; encoders (the embedded MiniLM) distil the full-precision
model's sentence embeddings (loss = 1 - cosine of mean-pooled embeddings).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .eval import mean_pool


def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """Matches the student's sentence embeddings to a frozen teacher's."""

        def __init__(self, *a, teacher: nn.Module, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                target = mean_pool(self.teacher(**inputs).last_hidden_state.float(), inputs["attention_mask"], normalize=True)
            out = model(**inputs)
            emb = mean_pool(out.last_hidden_state.float(), inputs["attention_mask"], normalize=True)
            loss = (1 - (emb * target).sum(-1)).mean()
            return (loss, out) if return_outputs else loss

    return DistillTrainer


def training_examples(paragraphs: List[str], tokenizer, seq_len: int, count: int, causal: bool) -> List[dict]:
    from . import data

    if causal:
        return [{"input_ids": b[0], "labels": b[0]} for b in data.token_blocks(paragraphs, tokenizer, seq_len, count)]
    enc = tokenizer(paragraphs[:count], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(len(enc["input_ids"]))]


def finetune(model: nn.Module, teacher: nn.Module, tokenizer, paragraphs: List[str], steps: int, lr: float = 2e-4,
             batch_size: int = 8, seq_len: int = 128, causal: bool = True) -> List[float]:
    """Train the LoRA factors for ``steps`` optimizer steps; returns the logged training losses."""
    from transformers import Trainer, TrainingArguments

    examples = training_examples(paragraphs, tokenizer, seq_len, steps * batch_size, causal)
    if not examples:
        raise ValueError(f"too little training text for one example of {seq_len} tokens")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, dataloader_num_workers=0,
            disable_tqdm=False,
        )
        if causal:
            trainer = Trainer(model=model, args=targs, train_dataset=examples)
        else:
            trainer = _trainer_class()(model=model, args=targs, train_dataset=examples, teacher=teacher)
        trainer.train()
    model.eval()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# -- the study's training loop ----------------------------------------------------------------------
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
    from .eval import classification_scores

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
