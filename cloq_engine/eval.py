"""Quality measures: perplexity for causal LMs, embedding agreement for encoders; :class:`Evaluator`
scores models against the full-precision one on held-out text (``cloq eval``, ``compare``, ``finetune``)."""
from __future__ import annotations

import logging
import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from . import data
from .models import is_causal_lm

logger = logging.getLogger(__name__)


def _model_inputs(batch, device) -> dict:
    batch = batch if isinstance(batch, dict) else {"input_ids": batch}
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean of the hidden states over the unmasked positions; L2-normalised on request."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def classification_scores(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class never predicted nor
    present is left out of the mean, one present but never predicted counts as F1 = 0)."""
    pred, labels = pred.long().cpu(), labels.long().cpu()
    acc = float((pred == labels).float().mean())
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else float("nan")}


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (sentence-transformers' MiniLM recipe)."""
    device = next(model.parameters()).device
    out: List[torch.Tensor] = []
    for batch in batches:
        inputs = _model_inputs(batch, device)
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2], device=device))
        out.append(mean_pool(hidden, mask, normalize=True).cpu())
    return torch.cat(out)


def _ranks(v: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(v)
    r[v.argsort()] = torch.arange(len(v), dtype=v.dtype)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-30))


def embedding_agreement(emb: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Mean cosine similarity of paired embeddings, and the Spearman correlation of the two
    models' pairwise-similarity matrices (upper triangles). Spearman is NaN for fewer than 3
    texts: it correlates the pairwise similarities, and fewer than 3 pairs give no ranking."""
    cos = float((emb * ref).sum(-1).mean())
    if len(emb) < 3:
        logger.warning("Spearman cannot be computed from %d text(s): it ranks pairwise similarities and needs "
                       "at least 3 texts", len(emb))
        return {"cosine": cos, "spearman": float("nan")}
    iu = torch.triu_indices(len(emb), len(emb), offset=1)
    sim, sim_ref = (emb @ emb.t())[iu[0], iu[1]], (ref @ ref.t())[iu[0], iu[1]]
    return {"cosine": cos, "spearman": spearman(sim, sim_ref)}


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Iterable[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over token blocks (1, L)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for ids in blocks:
        ids = ids.to(device)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    if count == 0:
        raise ValueError("no evaluation tokens: the evaluation text is too short")
    return math.exp(nll / count)


class Evaluator:
    """Scores models against the full-precision one on held-out text: perplexity for causal LMs (on
    each held-out domain of :data:`data.HELDOUT_DOMAINS` unless ``paragraphs`` are given), embedding
    agreement (cosine, Spearman of pairwise similarities) for encoders."""

    def __init__(self, base_model, tokenizer, paragraphs: Optional[List[str]], samples: int,
                 what: str = "the evaluation text"):
        self.causal = is_causal_lm(base_model.config)
        if self.causal:
            seq = min(256, getattr(base_model.config, "max_position_embeddings", 256) or 256)
            texts = ({"perplexity": paragraphs} if paragraphs is not None else
                     {("perplexity" if d == "pydoc" else f"perplexity ({d})"): data.heldout_domain(d)
                      for d in data.HELDOUT_DOMAINS})
            self.inputs = {k: data.token_blocks(t, tokenizer, seq, samples) for k, t in texts.items()}
            if not all(self.inputs.values()):
                raise ValueError(f"{what} is too short for one block of {seq} tokens")
            self.base_score = {k: perplexity(base_model, b) for k, b in self.inputs.items()}
        else:
            self.inputs = data.sentence_batches(data.heldout_paragraphs() if paragraphs is None else paragraphs,
                                                tokenizer, limit=samples)
            if not self.inputs:
                raise ValueError(f"{what} has no paragraphs")
            self.reference = sentence_embeddings(base_model, self.inputs)
            self.base_score = {"cosine": 1.0, "spearman": 1.0}

    def score(self, model) -> Dict[str, float]:
        if self.causal:
            return {k: perplexity(model, b) for k, b in self.inputs.items()}
        return embedding_agreement(sentence_embeddings(model, self.inputs), self.reference)

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "cosine"
