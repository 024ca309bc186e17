"""A thin Hugging Face Trainer loop over the LoRA factors of a prepared model.

Decoders train on the causal LM loss; encoders (the embedded MiniLM) distil the full-precision
model's sentence embeddings (loss = 1 - cosine of mean-pooled embeddings).
"""
from __future__ import annotations

import tempfile
from typing import List

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
