"""The jobs of the fine-tuning study (``cloq bench finetune``), run in worker processes.

Two kinds of job, each a small dict so that it pickles to a worker and its result to JSON:

* ``prepare``: quantize + initialise one (width, init variant) once, save it in the cache
  (reused by every later run and study with the same settings), and score it at init on every task
  (embedding agreement / perplexity as it is; for ``topics`` a linear probe on its frozen features);
* ``train``: load a prepared model (or the full-precision base with a PEFT LoRA, the ceiling),
  fine-tune its LoRA factors on one task with one learning rate and seed, and score it on the
  validation split (learning-rate search) or on held-out data (the reported runs).

A worker builds its base model, tokenizer, calibration blocks and tasks once (:func:`init_worker`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import data
from ..config import LoRAConfig, QuantConfig
from .tasks import TaskSettings, make_task
from .training import TrainSettings, linear_probe, train_lora

FULL_PRECISION = "full-precision"  # the ceiling: LoRA (PEFT) on the full-precision base
CACHE_VERSION = 2  # 2: calibrated inits balanced by default (LoRAConfig.balance=None)


@dataclass(frozen=True)
class StudyConfig:
    model: Optional[str] = None  # a local HF directory; None = the embedded MiniLM
    tasks: Sequence[str] = ("recovery", "topics")
    rank: int = 16
    alpha: Optional[float] = None  # default: the rank
    group_size: int = 64
    quantizer: str = "gptq"
    samples: int = 64  # calibration blocks
    seq_len: int = 128
    cache: str = "results/finetune/cache"
    threads: int = 1
    task: TaskSettings = field(default_factory=TaskSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        d = dict(d)
        d["task"], d["train"] = TaskSettings(**d["task"]), TrainSettings(**d["train"])
        d["tasks"] = tuple(d["tasks"])
        return cls(**d)


_STATE: dict = {}


def init_worker(config: dict) -> None:
    """Per process: thread count, base model, tokenizer, calibration blocks, tasks."""
    cfg = StudyConfig.from_dict(config)
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base, tok = data.load_model(cfg.model)
    for p in base.parameters():
        p.requires_grad_(False)
    calib = data.token_blocks(data.calibration_paragraphs(), tok, cfg.seq_len, cfg.samples)
    _STATE.clear()
    _STATE.update(config=config, cfg=cfg, base=base, tok=tok, calib=calib,
                  tasks={name: make_task(name, base, tok, cfg.task) for name in cfg.tasks})


def run_job(job: dict) -> dict:
    t0 = time.perf_counter()
    out = {"prepare": _prepare, "train": _train}[job["kind"]](job)
    out.update(id=job["id"], job=job, seconds=time.perf_counter() - t0)
    return out


# -- prepare ----------------------------------------------------------------------------------------
def cache_key(bits: int, variant: str) -> str:
    return f"{bits}bit-{variant}"


def _fingerprint(cfg: StudyConfig, bits: int, variant: str) -> dict:
    from .. import __version__

    return {"cache_version": CACHE_VERSION, "engine": __version__, "model": cfg.model or "embedded MiniLM",
            "bits": bits, "variant": variant, "rank": cfg.rank, "alpha": cfg.alpha or cfg.rank,
            "group_size": cfg.group_size, "quantizer": cfg.quantizer, "samples": cfg.samples, "seq_len": cfg.seq_len}


def _prepared(bits: int, variant: str):
    """The prepared model of (bits, variant) from the cache, preparing and caching it if needed.
    Returns (model, prepare record)."""
    from ..hf import load_pretrained, prepare_model, save_pretrained
    from .variants import resolve_variant

    cfg = _STATE["cfg"]
    path = os.path.join(cfg.cache, cache_key(bits, variant))
    meta_path = path + ".json"
    want = _fingerprint(cfg, bits, variant)
    if os.path.isfile(meta_path) and os.path.isdir(path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") == want:
            return load_pretrained(path), dict(meta["record"], cached=True)
    base = _STATE["base"]
    qc, lc = resolve_variant(variant, LoRAConfig(rank=cfg.rank, alpha=cfg.alpha or cfg.rank),
                             QuantConfig(bits=bits, group_size=cfg.group_size, method=cfg.quantizer),
                             base, _STATE["calib"])
    t0 = time.perf_counter()
    model = prepare_model(copy.deepcopy(base), qc, lc, calib=_STATE["calib"])
    rep = model.cloq_report
    record = {"quantizer": qc.method.value, "prepare_s": time.perf_counter() - t0,
              "mean_err_quant": sum(r.err_quant for r in rep.layers) / len(rep.layers),
              "mean_err_init": sum(r.err_init for r in rep.layers) / len(rep.layers),
              "lora_norms": _factor_norms(model)}
    os.makedirs(cfg.cache, exist_ok=True)
    save_pretrained(model, path, tokenizer=_STATE["tok"], overwrite=True)
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"fingerprint": want, "record": record}, f, indent=1)
    os.replace(tmp, meta_path)
    return model, dict(record, cached=False)


def _factor_norms(model: nn.Module) -> dict:
    """Mean RMS of the LoRA factors: how far from PEFT's init scale a calibrated init starts (Adam's
    steps are about lr in size whatever the factor's scale, so the relative step is lr / RMS)."""
    a, b = [], []
    for name, p in model.named_parameters():
        if "lora_A" in name:
            a.append(float(p.detach().float().pow(2).mean().sqrt()))
        elif "lora_B" in name:
            b.append(float(p.detach().float().pow(2).mean().sqrt()))
    return {"rms_A": sum(a) / max(1, len(a)), "rms_B": sum(b) / max(1, len(b))}


def _at_init(model: nn.Module, seeds: Sequence[int]) -> Dict[str, dict]:
    """Held-out scores before fine-tuning, per task (and on the curve subset, the curves' step 0)."""
    cfg = _STATE["cfg"]
    out = {}
    for name, task in _STATE["tasks"].items():
        if task.has_head:  # an untrained head scores chance: probe the frozen features instead
            probes = linear_probe(model, task, cfg.train, seeds=seeds)
            out[name] = {"heldout": {k: sum(p[k] for p in probes) / len(probes) for k in probes[0]},
                         "per_seed": probes}
        else:
            out[name] = {"heldout": task.evaluate(model, None, task.heldout),
                         "curve": task.evaluate(model, None, task.curve)}
    return out


def _prepare(job: dict) -> dict:
    if job["variant"] == FULL_PRECISION:
        return {"record": {}, "at_init": _at_init(_STATE["base"], job["seeds"])}
    model, record = _prepared(job["bits"], job["variant"])
    return {"record": record, "at_init": _at_init(model, job["seeds"])}


# -- train ------------------------------------------------------------------------------------------
def target_names(base: nn.Module, rank: int) -> List[str]:
    """The layers a prepare targets (the default LoRAConfig's): the ceiling's PEFT targets."""
    from ..hf.targets import find_targets

    return list(find_targets(base, LoRAConfig(rank=rank)))


def _full_precision_lora(seed: int, targets: List[str]) -> nn.Module:
    """PEFT LoRA on the full-precision base: same rank, alpha, targets; PEFT's init (A Kaiming, B 0)."""
    import peft

    cfg = _STATE["cfg"]
    torch.manual_seed(seed)
    lc = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(copy.deepcopy(_STATE["base"]), lc)


def _redraw_zero_A(model: nn.Module, seed: int) -> None:
    """A zero init's A is random (B = 0, so the model at init does not depend on it): each seed
    draws its own, as PEFT would for a fresh run."""
    from ..nn import QuantLoRALinear

    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLoRALinear):
                nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5), generator=g)


def _train(job: dict) -> dict:
    cfg = _STATE["cfg"]
    task = _STATE["tasks"][job["task"]]
    seed = job["seed"]
    if job["variant"] == FULL_PRECISION:
        model = _full_precision_lora(seed, job["targets"])
    else:
        model, _ = _prepared(job["bits"], job["variant"])
        if model.cloq_config["lora"]["init"] == "zero":
            _redraw_zero_A(model, seed)
    hidden = _STATE["base"].config.hidden_size
    head = task.make_head(hidden, seed) if task.has_head else None
    settings = dataclasses.replace(cfg.train, lr=job["lr"], seed=seed)
    t0 = time.perf_counter()
    res = train_lora(model, task, settings, head=head, curve=job["split"] == "heldout")
    train_s = time.perf_counter() - t0
    split = task.val if job["split"] == "val" else task.heldout
    scores = {k: float("nan") for k in ("cosine", "spearman", "accuracy", "macro_f1", "perplexity",
                                          "code_perplexity", "topic_accuracy")}
    if not res["diverged"]:
        scores = task.evaluate(model, head, split)
    return {"scores": scores, "train_s": train_s, **res}
