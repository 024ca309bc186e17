"""Fine-tuning tasks: what the LoRA factors are trained on and how the result is scored.

Every task holds tokenized examples in three disjoint parts: ``train`` and ``val`` (every fifth
example of the training half, for choosing a learning rate) and ``heldout`` (the held-out half,
for reporting only), plus ``curve`` (an evenly spaced subset of ``heldout`` scored during training).

* ``recovery`` (encoders): distil the full-precision sentence embeddings, loss 1 - cosine of the
  mean-pooled, normalised last hidden states; scored by held-out cosine and the Spearman
  correlation of pairwise similarities (:func:`eval.embedding_agreement`).
* ``topics`` (encoders): a supervised task the calibration objective does not aim at: classify
  each paragraph by the ``pydoc_data.topics`` key it comes from (:func:`data.topic_split`) with a
  trainable linear head on the mean-pooled embedding; scored by held-out accuracy and macro-F1.
* ``lm`` (causal LMs): next-token loss on blocks of the training text; held-out perplexity on the
  pydoc text and on a second domain calibration does not resemble (standard-library source code,
  :func:`data.code_paragraphs`), and a four-way multiple choice scored by log-likelihood: which of
  four topic titles a held-out paragraph belongs to (:data:`TOPIC_TITLES`; chance 25%).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import data, models
from ..eval import classification_scores, embedding_agreement, mean_pool

VAL_EVERY = 5  # every fifth training example is validation


@dataclass(frozen=True)
class TaskSettings:
    max_len: int = 64  # tokens per paragraph (encoders), truncated
    eval_samples: Optional[int] = None  # held-out examples scored at the end (None: the task's default)
    curve_samples: int = 128  # held-out examples scored at each curve point
    lm_seq_len: int = 128  # tokens per block (causal LMs)
    lm_blocks: int = 512  # training-half blocks (causal LMs)
    eval_batch: int = 64


@dataclass
class Split:
    """Tokenized examples: token ids (1-D, variable length) and per-example targets."""

    ids: List[torch.Tensor]
    targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: Sequence[int]) -> "Split":
        idx = list(idx)
        return Split([self.ids[i] for i in idx], None if self.targets is None else self.targets[idx])


def _evenly(n: int, k: Optional[int]) -> List[int]:
    if k is None or k >= n:
        return list(range(n))
    return [int(i * n / k) for i in range(k)]


def _carve(n: int):
    """(train, val) indices of the training half."""
    return [i for i in range(n) if i % VAL_EVERY != VAL_EVERY - 1], [i for i in range(n) if i % VAL_EVERY == VAL_EVERY - 1]


class Task:
    """One fine-tuning objective and its held-out score (see the module docstring)."""

    name = ""
    metric = ""  # the headline metric
    higher_is_better = True
    default_eval_samples: Optional[int] = None
    has_head = False

    def __init__(self, base: nn.Module, tokenizer, settings: TaskSettings = TaskSettings()):
        self.tokenizer, self.settings = tokenizer, settings
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train, self.val, self.heldout = self._build(base)
        n_eval = settings.eval_samples or self.default_eval_samples
        self.heldout = self.heldout.subset(_evenly(len(self.heldout), n_eval))
        self.curve = self.heldout.subset(_evenly(len(self.heldout), settings.curve_samples))
        if not len(self.train) or not len(self.heldout):
            raise ValueError(f"task {self.name!r}: the text gives no training or no held-out example")

    # -- what a subclass defines ----------------------------------------------------------------
    def _build(self, base: nn.Module):
        raise NotImplementedError

    def loss(self, model: nn.Module, head: Optional[nn.Module], batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, head: Optional[nn.Module], split: Split) -> Dict[str, float]:
        raise NotImplementedError

    def make_head(self, hidden: int, seed: int) -> Optional[nn.Module]:
        return None

    # -- shared machinery -----------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]) -> List[torch.Tensor]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.settings.max_len)
        return [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]

    def collate(self, split: Split, idx: Sequence[int]) -> dict:
        """A padded batch (padding to the longest example of the batch) with its targets."""
        idx = list(idx)
        ids = [split.ids[i] for i in idx]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)], mask[r, : len(x)] = x, 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if split.targets is not None:
            batch["targets"] = split.targets[idx]
        return batch

    def batch_order(self, split: Split, steps: int, batch_size: int, seed: int) -> List[List[int]]:
        """``steps`` batches of indices: a fresh permutation per epoch from ``seed``; within chunks
        of 8 batches examples are sorted by length (less padding, as HF's group_by_length) and the
        chunk's batches shuffled. The same seed gives the same order for every init."""
        g = torch.Generator().manual_seed(int(seed))
        n, bs = len(split), min(batch_size, len(split))
        out: List[List[int]] = []
        while len(out) < steps:
            perm = torch.randperm(n, generator=g).tolist()
            chunk = 8 * bs
            for c in range(0, n - bs + 1, chunk):
                part = sorted(perm[c: c + chunk], key=lambda i: len(split.ids[i]))
                batches = [part[b: b + bs] for b in range(0, len(part) - bs + 1, bs)]
                for j in torch.randperm(len(batches), generator=g).tolist():
                    out.append(batches[j])
        return out[:steps]

    def _eval_batches(self, split: Split):
        """Length-sorted batches for scoring (order restored by the caller via the indices)."""
        order = sorted(range(len(split)), key=lambda i: len(split.ids[i]))
        bs = self.settings.eval_batch
        for s in range(0, len(order), bs):
            idx = order[s: s + bs]
            yield idx, self.collate(split, idx)

    @torch.no_grad()
    def pooled(self, model: nn.Module, split: Split, normalize: bool) -> torch.Tensor:
        """Mean-pooled last hidden states of every example of ``split`` (eval mode), in order."""
        was = model.training
        model.eval()
        out = None
        try:
            for idx, batch in self._eval_batches(split):
                h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
                e = mean_pool(h.float(), batch["attention_mask"], normalize=normalize)
                out = torch.empty(len(split), e.shape[-1]) if out is None else out
                out[idx] = e
        finally:
            model.train(was)
        return out


TASKS: Dict[str, type] = {}


def register_task(cls):
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, base: nn.Module, tokenizer, settings: TaskSettings = TaskSettings()) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    causal = models.is_causal_lm(base.config)
    if TASKS[name].causal != causal:
        kind = "a causal LM" if causal else "an encoder"
        raise ValueError(f"task {name!r} does not apply to {kind}; use {task_names_for(base)}")
    return TASKS[name](base, tokenizer, settings)


def task_names_for(base: nn.Module) -> List[str]:
    causal = models.is_causal_lm(base.config)
    return [n for n, c in TASKS.items() if c.causal == causal]


@register_task
class RecoveryTask(Task):
    name, metric, causal = "recovery", "cosine", False
    default_eval_samples = 256

    def _build(self, base):
        paras = data.calibration_paragraphs()
        tr, va = _carve(len(paras))
        ids = self._tokenize(paras)
        held = Split(self._tokenize(data.heldout_paragraphs()))
        whole = Split(ids)
        # the teacher is frozen: its embeddings are computed once, not at every step
        whole.targets = self.pooled(base, whole, normalize=True)
        held.targets = self.pooled(base, held, normalize=True)
        return whole.subset(tr), whole.subset(va), held

    def loss(self, model, head, batch):
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        emb = mean_pool(h.float(), batch["attention_mask"], normalize=True)
        return (1 - (emb * batch["targets"]).sum(-1)).mean()

    def evaluate(self, model, head, split):
        return embedding_agreement(self.pooled(model, split, normalize=True), split.targets)


@register_task
class TopicTask(Task):
    name, metric, causal = "topics", "accuracy", False
    default_eval_samples = 384
    has_head = True

    def _build(self, base):
        ts = data.topic_split()
        self.names = ts.names
        tr, va = _carve(len(ts.train_texts))
        whole = Split(self._tokenize(ts.train_texts), torch.tensor(ts.train_labels))
        held = Split(self._tokenize(ts.heldout_texts), torch.tensor(ts.heldout_labels))
        return whole.subset(tr), whole.subset(va), held

    def make_head(self, hidden, seed):
        g = torch.Generator().manual_seed(int(seed) + 7919)  # not the data-order stream
        head = nn.Linear(hidden, len(self.names))
        with torch.no_grad():
            bound = 1 / math.sqrt(hidden)  # nn.Linear's own init, drawn from the run's seed
            head.weight.uniform_(-bound, bound, generator=g)
            head.bias.uniform_(-bound, bound, generator=g)
        return head

    def loss(self, model, head, batch):
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return nn.functional.cross_entropy(head(mean_pool(h.float(), batch["attention_mask"])), batch["targets"])

    def evaluate(self, model, head, split):
        with torch.no_grad():
            logits = head(self.pooled(model, split, normalize=False))
        return classification_scores(logits.argmax(-1), split.targets, len(self.names))


# Readable titles of the pydoc topics that data.topic_split keeps (the multiple-choice options).
TOPIC_TITLES = {
    "assignment": "assignment statements", "calls": "function calls", "comparisons": "comparison operators",
    "compound": "compound statements", "debugger": "the pdb debugger", "formatstrings": "format string syntax",
    "import": "the import statement", "raise": "the raise statement", "specialnames": "special method names",
    "string-methods": "string methods", "strings": "string and bytes literals",
    "types": "the standard type hierarchy", "typesmapping": "mapping types (dict)",
    "typesseq": "sequence types (list, tuple, range)",
}
MC_CHOICES, MC_CONTEXT_TOKENS = 4, 64


@register_task
class CausalLMTask(Task):
    name, metric, causal = "lm", "perplexity", True
    higher_is_better = False
    default_eval_samples = 64
    mc_items = 64  # multiple-choice questions scored on the held-out half

    def _build(self, base):
        s = self.settings
        positions = getattr(base.config, "max_position_embeddings", None) or s.lm_seq_len
        seq = self.seq = min(s.lm_seq_len, positions)
        blocks = [b[0] for b in data.token_blocks(data.calibration_paragraphs(), self.tokenizer, seq, s.lm_blocks)]
        n_eval = s.eval_samples or self.default_eval_samples
        held = [b[0] for b in data.token_blocks(data.heldout_paragraphs(), self.tokenizer, seq, n_eval)]
        self.code = Split([b[0] for b in data.token_blocks(data.code_paragraphs(), self.tokenizer, seq, n_eval)])
        self.mc = self._choices()
        tr, va = _carve(len(blocks))
        whole = Split(blocks)
        return whole.subset(tr), whole.subset(va), Split(held)

    def _choices(self) -> List[tuple]:
        """(context ids, [option ids], answer) per question: a held-out paragraph (its first
        MC_CONTEXT_TOKENS tokens), then "This is from the Python documentation on", and four topic
        titles: the paragraph's own and three others drawn with a fixed seed, in a drawn order."""
        split = data.topic_split()
        names = split.names
        g = torch.Generator().manual_seed(0)
        items = []
        for i in _evenly(len(split.heldout_texts), self.mc_items):
            text, label = split.heldout_texts[i], split.heldout_labels[i]
            ctx = self.tokenizer(text, add_special_tokens=False)["input_ids"][:MC_CONTEXT_TOKENS]
            ctx = ctx + self.tokenizer("\nThis is from the Python documentation on", add_special_tokens=False)["input_ids"]
            others = [j for j in torch.randperm(len(names), generator=g).tolist() if j != label][:MC_CHOICES - 1]
            options = [label] + others
            order = torch.randperm(MC_CHOICES, generator=g).tolist()
            options = [options[k] for k in order]
            ids = [self.tokenizer(" " + TOPIC_TITLES.get(names[j], names[j]) + ".", add_special_tokens=False)["input_ids"]
                   for j in options]
            items.append((ctx, ids, options.index(label)))
        return items

    def loss(self, model, head, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def _perplexity(self, model, split: Split) -> float:
        nll, count = 0.0, 0
        for _, batch in self._eval_batches(split):
            logits = model(input_ids=batch["input_ids"]).logits.float()
            ids = batch["input_ids"]
            nll += float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
        return math.exp(nll / max(count, 1))

    def _choice_accuracy(self, model) -> float:
        """Share of questions whose right title has the highest mean token log-likelihood. The context
        runs once (its KV cache repeated for the options) and the head only at the option positions."""
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel
        body, head = lm.get_decoder(), lm.get_output_embeddings()
        right = 0
        for ctx, options, answer in self.mc:
            out = body(input_ids=torch.tensor([ctx]), use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(options))
            width = max(len(o) for o in options)
            # each option is fed after the context; its first token is predicted by the context's last state
            ids = torch.full((len(options), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(options), len(ctx) + width), dtype=torch.long)
            mask[:, : len(ctx)] = 1
            for r, o in enumerate(options):
                ids[r, : len(o)], mask[r, len(ctx): len(ctx) + len(o)] = torch.tensor(o), 1
            hid = body(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).last_hidden_state
            last = out.last_hidden_state[0, -1]
            scores = []
            for r, o in enumerate(options):
                states = torch.cat([last[None], hid[r, : len(o) - 1]])  # the states that predict o's tokens
                logp = head(states).float().log_softmax(-1)[torch.arange(len(o)), torch.tensor(o)]
                scores.append(float(logp.mean()))
            right += int(max(range(len(scores)), key=scores.__getitem__) == answer)
        return right / max(1, len(self.mc))

    @torch.no_grad()
    def evaluate(self, model, head, split):
        """Perplexity on ``split``; on the held-out half also the code-domain perplexity and the
        multiple-choice accuracy (not on the curve and validation splits: they cost a few seconds)."""
        was = model.training
        model.eval()
        try:
            out = {"perplexity": self._perplexity(model, split)}
            if split is self.heldout:
                out["code_perplexity"] = self._perplexity(model, self.code)
                out["topic_accuracy"] = self._choice_accuracy(model)
        finally:
            model.train(was)
        return out
