"""What each ``cloq`` sub-command does (argument parsing lives in cli.py)."""
from __future__ import annotations

import copy
import json
import logging
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import data
from .config import LoRAConfig, QuantConfig

logger = logging.getLogger("cloq")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# -- shared helpers ---------------------------------------------------------------------------------
def _init_fields(args) -> dict:
    """LoRAConfig init_* fields given on the command line (the rest keep the config's defaults)."""
    fields = {"init_solver": "init_solver", "init_power_iters": "power_iters", "init_damp": "init_damp",
              "init_iters": "init_iters", "requant_rounds": "requant_rounds"}
    return {f: getattr(args, a) for f, a in fields.items() if getattr(args, a, None) is not None}


QUANT_DEFAULTS = {"bits": 4, "group_size": 64, "quantizer": "gptq", "sym": False}
_OPTION = {"bits": "--bits", "group_size": "--group-size", "quantizer": "--quantizer", "sym": "--sym"}


def quant_defaults(args) -> dict:
    """Fill in the quantization options the command line left out; returns those it gave."""
    given = {k: getattr(args, k) for k in QUANT_DEFAULTS if getattr(args, k, None) is not None}
    for k, v in QUANT_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return given


def interrupted_note(args) -> str:
    """What an interrupted command leaves (cli.py prints it)."""
    if args.command == "prepare" and getattr(args, "resume", False):
        return f"the finished blocks are kept in {args.out}.partial: run the same command again to continue"
    return "nothing was written"


def _quant_flags(args) -> dict:
    return {"sym": bool(getattr(args, "sym", False)), "act_order": bool(getattr(args, "act_order", False))}


def _lora_config(args, init: str) -> LoRAConfig:
    """The command line's LoRAConfig for ``init`` (a method, or a variant such as cloq+ranks: its method)."""
    method = init.partition("+")[0]
    fields = _init_fields(args)
    if method not in ("cloq", "quailora"):
        fields.pop("requant_rounds", None)  # compare runs every init with the same flags
    return LoRAConfig(rank=args.rank, alpha=args.alpha or args.rank, init=method, **fields)


def _configs(args, init: str):
    qc = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.quantizer, **_quant_flags(args))
    return qc, _lora_config(args, init)


MIN_SEQ_LEN = 16  # shorter blocks are fragments of sentences: the activations are not the model's usual ones


def _calibration(args, tokenizer, config=None) -> List[torch.Tensor]:
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and args.seq_len > positions:
        raise CLIError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings={positions}")
    paras = data.read_text_file(args.calib) if args.calib else data.calibration_paragraphs()
    blocks = data.token_blocks(paras, tokenizer, args.seq_len, args.samples)
    if not blocks:
        raise CLIError(f"too little calibration data: the text holds fewer than --seq-len={args.seq_len} tokens")
    if len(blocks) < args.samples:
        print(f"note: the calibration text gives {len(blocks)} blocks of {args.seq_len} tokens "
              f"(--samples asked for {args.samples})", file=sys.stderr)
    return blocks


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _heldout(path: Optional[str]) -> List[str]:
    return data.read_text_file(path) if path else data.heldout_paragraphs()


def _table(rows: List[List], header: List[str]) -> str:
    def cell(c):
        if isinstance(c, float):
            return "n/a" if c != c else f"{c:.4f}"
        return str(c)

    cells = [[str(c) for c in header]] + [[cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Evaluator:
    """Scores models against the full-precision one on held-out text: perplexity for causal LMs,
    embedding agreement (cosine, Spearman of pairwise similarities) for encoders."""

    def __init__(self, base_model, tokenizer, paragraphs: List[str], samples: int):
        from .eval import perplexity, sentence_embeddings

        self.causal = data.is_causal_lm(base_model.config)
        if self.causal:
            seq = min(256, getattr(base_model.config, "max_position_embeddings", 256) or 256)
            self.inputs = data.token_blocks(paragraphs, tokenizer, seq, samples)
            if not self.inputs:
                raise CLIError("the evaluation text is too short for one block of tokens")
            self.base_score = {"perplexity": perplexity(base_model, self.inputs)}
        else:
            self.inputs = data.sentence_batches(paragraphs, tokenizer, limit=samples)
            if not self.inputs:
                raise CLIError("the evaluation text has no paragraphs")
            self.reference = sentence_embeddings(base_model, self.inputs)
            self.base_score = {"cosine": 1.0, "spearman": 1.0}

    def score(self, model) -> Dict[str, float]:
        from .eval import embedding_agreement, perplexity, sentence_embeddings

        if self.causal:
            return {"perplexity": perplexity(model, self.inputs)}
        return embedding_agreement(sentence_embeddings(model, self.inputs), self.reference)

    @property
    def metric(self) -> str:
        return "perplexity" if self.causal else "cosine"


# -- prepare ----------------------------------------------------------------------------------------
_API_WORDS = (("overwrite=True", "--overwrite"), ("output directory", "--out"), ("pass `calib`", "pass --calib"),
              ("use prepare_model", "run without --resume"), ("without `resume`", "without --resume"))


def _cli_words(message: str) -> str:
    """An API message in the command line's words (its options, not the Python arguments)."""
    for api, cli in _API_WORDS:
        message = message.replace(api, cli)
    return message


def _check_out(out: str, overwrite: bool, inputs: List[str], **kwargs) -> str:
    """Refuse a dangerous --out before any work (see hf/output_dir.py)."""
    from .hf.output_dir import check_output_dir

    try:
        return check_output_dir(out, overwrite=overwrite, inputs=inputs, flag="--overwrite", **kwargs)
    except ValueError as e:
        raise CLIError(_cli_words(str(e))) from None


def _check_seq_len(seq_len: int) -> None:
    if seq_len < MIN_SEQ_LEN:
        raise CLIError(f"--seq-len {seq_len} is too short to calibrate on: blocks of fewer than {MIN_SEQ_LEN} tokens "
                       "are fragments of sentences")


def _summary(rep, qc, lc) -> str:
    n = len(rep.layers)
    mean_q = sum(r.err_quant for r in rep.layers) / n
    mean_i = sum(r.err_init for r in rep.layers) / n
    head = (f"{n} layers, {qc.bits}-bit {qc.method.value} g{qc.group_size}, init={lc.init.value} rank={lc.rank}: "
            f"mean calibrated error {mean_q:.4f} -> {mean_i:.4f}")
    if rep.underdetermined:
        worst = max(rep.underdetermined.values())
        return (head + f"\nWARNING: not a measure of quality: calibration had {rep.calib_tokens} tokens, fewer than "
                f"in_features (up to {worst}) of {len(rep.underdetermined)} layer(s), so these errors are measured "
                f"on data the quantizer fitted exactly; calibrate on at least {worst} tokens (--samples, --seq-len)")
    if mean_q <= 0:
        return head
    return head + f" ({100 * (1 - mean_i / mean_q):.1f}% lower)"


def _experts_table(rep, lc) -> str:
    """One row per expert of each packed MoE projection: the calibration tokens the router sent to
    it and its calibrated errors (in its own H_e)."""
    rows = [[r.name, r.expert, r.tokens, r.err_quant, r.err_init, r.fallback, f"{r.bits_per_weight:.2f}"]
            for r in rep.experts]
    n = len(rep.experts)
    mean_q = sum(r.err_quant for r in rep.experts) / n
    mean_i = sum(r.err_init for r in rep.experts) / n
    below = sum(r.err_init < r.err_quant for r in rep.experts)
    return (_table(rows, ["expert projection", "expert", "tokens", "err quantized", f"err +{lc.init.value}",
                          "fallback", "bits/w"])
            + f"\n{n} experts: mean calibrated error {mean_q:.4f} -> {mean_i:.4f}; "
              f"{below}/{n} below the quantized-only (zero-init) error")


def cmd_prepare(args) -> int:
    from .hf import prepare_model
    from .hf.persistence import save_pretrained
    from .hf.quantizer import attach_quantization_config

    t0 = time.perf_counter()
    given = quant_defaults(args)
    model_path = args.model or data.minilm_path()
    from_gptq = getattr(args, "from_gptq", None)
    out = _check_out(args.out, args.overwrite, [model_path] + ([from_gptq] if from_gptq else []))
    _check_seq_len(args.seq_len)
    if from_gptq:
        return _prepare_from_gptq(args, given)
    if getattr(args, "resume", False):
        return _prepare_streaming(args, model_path, t0)
    model, tok = data.load_model(model_path)
    qc, lc = _configs(args, args.init)
    calib = _calibration(args, tok, model.config)
    t_load = time.perf_counter() - t0
    prepare_model(model, qc, lc, calib=calib, progress=not args.no_progress)
    model.cloq_config["base_model"] = os.path.abspath(model_path)
    attach_quantization_config(model)
    t1 = time.perf_counter()
    save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
    t_save = time.perf_counter() - t1
    _print_prepared(args, model.cloq_report, qc, lc, model, next(model.parameters()).device,
                    f"load {t_load:.1f}s | capture+forward {model.cloq_report.capture_s:.1f}s | "
                    f"quantize {model.cloq_report.quantize_s:.1f}s | init {model.cloq_report.init_s:.1f}s | "
                    f"save {t_save:.1f}s | total {time.perf_counter() - t0:.1f}s")
    return 0


def _print_prepared(args, rep, qc, lc, model, device, times: str) -> None:
    """What `cloq prepare` prints, in memory or streamed: the per-layer (and per-expert) table, the
    summary, the storage, the times, and with --json the whole report."""
    rows = [[r.name, "x".join(map(str, r.shape)), r.err_quant, r.err_init, f"{r.bits_per_weight:.2f}"] for r in rep.layers]
    print(_table(rows, ["layer", "shape", "err quantized", f"err +{lc.init.value}", "bits/w"]))
    if rep.experts:
        print("\n" + _experts_table(rep, lc))
    print("\n" + _summary(rep, qc, lc))
    from .hf.experts import storage_summary

    storage = storage_summary(model)
    print(f"storage: {storage['quantized_bits_per_weight']:.3f} bits/weight over the {storage['quantized_weights']} "
          f"quantized weights ({100 * storage['quantized_fraction']:.1f}% of the model's weights); whole model "
          f"{storage['whole_model_bits_per_weight']:.3f} bits/weight with everything else as stored, "
          f"{storage['body_bits_per_weight']:.3f} without the input/output embeddings")
    mean_q = sum(r.err_quant for r in rep.layers) / len(rep.layers)
    mean_i = sum(r.err_init for r in rep.layers) / len(rep.layers)
    print(f"time: {times}")
    from .backends import active_backend

    print(f"backend: {active_backend(device)} | "
          f"peak memory: {_peak_rss_mib():.0f} MiB resident (process)"
          + (f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB CUDA" if torch.cuda.is_available() else ""))
    print(f"wrote {args.out}")
    if args.json:
        print(json.dumps({"mean_err_quant": mean_q, "mean_err_init": mean_i, "calib_tokens": rep.calib_tokens,
                          "underdetermined": rep.underdetermined, "full_precision": rep.full_precision,
                          "layers": [r.__dict__ for r in rep.layers], "experts": [r.__dict__ for r in rep.experts],
                          "storage": storage}))


def _prepare_streaming(args, model_path: str, t0: float) -> int:
    """``cloq prepare --resume``: block by block, bounded memory, continuing a killed run; the same
    checks and the same report as the in-memory path."""
    from transformers import AutoConfig, AutoTokenizer

    from .hf.persistence import empty_model
    from .hf.streaming import prepare_pretrained

    tok = AutoTokenizer.from_pretrained(model_path)
    qc, lc = _configs(args, args.init)
    calib = _calibration(args, tok, AutoConfig.from_pretrained(model_path))
    try:
        out, rep = prepare_pretrained(model_path, args.out, qc, lc, calib=calib, resume=True, dtype=torch.float32,
                                      progress=not args.no_progress, tokenizer=tok, return_report=True)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(_cli_words(str(e))) from None
    # the written checkpoint's skeleton on meta: its storage summary, nothing loaded
    _print_prepared(args, rep, qc, lc, empty_model(out), torch.device("cpu"),
                    f"capture+forward {rep.capture_s:.1f}s | quantize {rep.quantize_s:.1f}s | init {rep.init_s:.1f}s | "
                    f"total {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_export(args) -> int:
    """``cloq export CHECKPOINT --format gptq|merged --out DIR [--checkpoint-format gptq|gptq_v2] [--overwrite]``."""
    from .export import export_gptq, export_merged, is_cloq_export

    out = args.out or f"{args.checkpoint.rstrip('/')}-{args.format}"
    _check_out(out, args.overwrite, [args.checkpoint], recognise=is_cloq_export, what="cloq export")
    model, tok, _ = _load_checkpoint(args.checkpoint)
    try:
        if args.format == "gptq":
            export_gptq(model, out, checkpoint_format=args.checkpoint_format, tokenizer=tok, overwrite=args.overwrite)
        else:
            export_merged(model, out, tokenizer=tok, overwrite=args.overwrite)
    except ValueError as e:
        raise CLIError(_cli_words(str(e))) from None
    print(f"wrote {out} ({args.format})")
    return 0


def _gptq_conflicts(given: dict, gptq_dir: str) -> None:
    """Quantization options given with --from-gptq that contradict the checkpoint (its Q is kept
    as it is, so they would be ignored)."""
    from .gptq_format import read_gptq_config

    try:
        cfg = read_gptq_config(gptq_dir)
    except ValueError as e:
        raise CLIError(f"--from-gptq {gptq_dir}: {e}") from None
    theirs = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "quantizer": "gptq"}
    clash = [k for k, v in given.items() if theirs[k] != v]
    if clash:
        words = ", ".join(_OPTION[k] if k == "sym" else f"{_OPTION[k]} {given[k]}" for k in clash)
        held = f"{cfg.bits}-bit, group size {cfg.group_size}, {'sym' if cfg.sym else 'asym'}"
        raise CLIError(f"{words} conflicts with the --from-gptq checkpoint ({held}), whose Q is kept as it is: "
                       f"leave {', '.join(_OPTION[k] for k in clash)} out")


def _prepare_from_gptq(args, given: dict) -> int:
    """``cloq prepare --from-gptq DIR --model ORIG --out OUT``: keep DIR's Q, calibrated init against ORIG."""
    from .config import LoRAConfig
    from .export import prepare_from_gptq
    from .hf.persistence import save_pretrained
    from .hf.quantizer import attach_quantization_config

    if not args.model:
        raise CLIError("--from-gptq needs --model: the original full-precision model the checkpoint came from")
    _gptq_conflicts(given, args.from_gptq)
    t0 = time.perf_counter()
    model, tok = data.load_model(args.model)
    fields = {k: v for k, v in _init_fields(args).items() if k != "requant_rounds"}  # Q is kept
    lc = LoRAConfig(rank=args.rank, alpha=args.alpha or args.rank, init=args.init, **fields)
    calib = _calibration(args, tok, model.config) if lc.init.value in ("cloq", "quailora") else None
    try:
        prepare_from_gptq(model, args.from_gptq, lc, calib=calib, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e).replace("the model's", "--model's").replace("the model", "--model")) from None
    model.cloq_config["base_model"] = os.path.abspath(args.model)
    attach_quantization_config(model)
    save_pretrained(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    print(f"kept the Q of {len(model.cloq_config['targets'])} GPTQ layers from {args.from_gptq}; "
          f"init={lc.init.value} rank={lc.rank}; wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


# -- eval -------------------------------------------------------------------------------------------
def _load_checkpoint(path: str):
    from transformers import AutoTokenizer

    from .hf.persistence import load_pretrained

    model = load_pretrained(path)
    model.eval()
    qcfg = getattr(model.config, "quantization_config", None) or {}
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model, tok, qcfg


def _base_model(args_base: Optional[str], qcfg: dict):
    base = args_base or qcfg.get("base_model")
    if not base or not os.path.isdir(base):
        raise CLIError("the full-precision model is not available: pass --base DIR")
    from .hf.output_dir import is_cloq_checkpoint

    if is_cloq_checkpoint(base):  # comparing a quantized model with one would read as agreement
        raise CLIError(f"the full-precision model {base!r} is a cloq checkpoint, not full precision: pass --base DIR")
    return data.load_model(base)


def cmd_eval(args) -> int:
    model, tok, qcfg = _load_checkpoint(args.checkpoint)
    base, base_tok = _base_model(args.base, qcfg)
    ev = Evaluator(base, tok or base_tok, _heldout(args.data), args.samples)
    score = ev.score(model)
    desc = (f"{qcfg.get('quant', {}).get('bits', '?')}-bit {qcfg.get('quant', {}).get('method', '?')}, "
            f"init={qcfg.get('lora', {}).get('init', '?')}")
    rows = [["full precision", *[ev.base_score[k] for k in score]], [desc, *score.values()]]
    print(_table(rows, ["model", *score.keys()]))
    if score.get("spearman", 0.0) != score.get("spearman", 0.0):  # NaN
        print(f"note: Spearman cannot be computed from {len(ev.reference)} paragraph(s): it ranks pairwise "
              "similarities and needs at least 3 (--data, --samples)", file=sys.stderr)
    if args.json:
        clean = {k: (None if v != v else v) for k, v in score.items()}  # JSON has no NaN
        print(json.dumps({"checkpoint": args.checkpoint, "score": clean, "full_precision": ev.base_score}))
    return 0


# -- compare ----------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from .hf import prepare_model
    from .variants import resolve_variant

    quant_defaults(args)
    _check_seq_len(args.seq_len)
    base, tok = data.load_model(args.model)
    calib = _calibration(args, tok, base.config)
    ev = Evaluator(base, tok, data.heldout_paragraphs(), args.eval_samples)
    results = []
    for bits in args.bits:
        for init in args.inits:
            t0 = time.perf_counter()
            # LoftQ alternates with its own RTN quantizer; cloq+requant/+ranks are CLoQ variants (variants.py)
            qc, lc = resolve_variant(init, _lora_config(args, init),
                                     QuantConfig(bits=bits, group_size=args.group_size, method=args.quantizer,
                                                 **_quant_flags(args)), base, calib)
            method = qc.method.value
            model = prepare_model(copy.deepcopy(base), qc, lc, calib=calib, progress=not args.no_progress)
            rep = model.cloq_report
            score = ev.score(model)
            results.append({"bits": bits, "init": init, "quantizer": method, **score, "prepare_s": time.perf_counter() - t0,
                            "mean_err_quant": sum(r.err_quant for r in rep.layers) / len(rep.layers),
                            "mean_err_init": sum(r.err_init for r in rep.layers) / len(rep.layers)})
            print(f"  {bits}-bit {init:9s} {ev.metric}={score[ev.metric]:.4f}", file=sys.stderr)
    keys = [k for k in results[0] if k not in ("bits", "init", "quantizer")]
    print(_table([[r["init"], r["bits"], r["quantizer"], *[r[k] for k in keys]] for r in results],
                 ["init", "bits", "quantizer", *keys]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"model": args.model or "embedded MiniLM", "quantizer": args.quantizer, "group_size": args.group_size,
                   "rank": args.rank, "metric": ev.metric, "full_precision": ev.base_score, "results": results}, f, indent=2)
    _plot(results, ev.metric, os.path.join(args.out, "compare.png"), args)
    print(f"wrote {args.out}/compare.json and compare.png")
    return 0


def _plot(results, metric, path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    inits = list(dict.fromkeys(r["init"] for r in results))
    bits = list(dict.fromkeys(r["bits"] for r in results))
    width = 0.8 / len(inits)
    for i, init in enumerate(inits):
        vals = [next(r[metric] for r in results if r["bits"] == b and r["init"] == init) for b in bits]
        ax.bar([j + i * width for j in range(len(bits))], vals, width, label=init)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))], [f"{b}-bit" for b in bits])
    ax.set_ylabel(f"{metric} vs full precision (held-out)")
    ax.set_title(f"LoRA init at rank {args.rank}, {args.quantizer} g{args.group_size}")
    if metric == "cosine":
        lo = min(r[metric] for r in results)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- finetune ---------------------------------------------------------------------------------------
def cmd_finetune(args) -> int:
    from .finetune import finetune
    from .hf.output_dir import check_free_space
    from .hf.peft_interop import export_peft_adapter
    from .hf.persistence import WEIGHTS_NAME, save_pretrained

    out = args.out or os.path.abspath(args.checkpoint).rstrip("/") + "-ft"
    out = _check_out(out, args.overwrite, [args.checkpoint])
    # The result is the size of the checkpoint (+ its adapter): refuse now, not after training.
    check_free_space(out, 2 * os.path.getsize(os.path.join(args.checkpoint, WEIGHTS_NAME)))
    model, tok, qcfg = _load_checkpoint(args.checkpoint)
    base, base_tok = _base_model(None, qcfg)
    tok = tok or base_tok
    ev = Evaluator(base, tok, data.heldout_paragraphs(), 128)
    before = ev.score(model)
    paras = data.read_text_file(args.data) if args.data else data.calibration_paragraphs()
    losses = finetune(model, base, tok, paras, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      seq_len=args.seq_len, causal=ev.causal)
    after = ev.score(model)
    save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
    export_peft_adapter(model, os.path.join(out, "adapter"), overwrite=True)  # inside the --out just written
    m = ev.metric
    print(_table([["before", before[m]], ["after", after[m]], ["full precision", ev.base_score[m]]], ["model", m]))
    print(gap_summary(m, before[m], after[m], ev.base_score[m])
          + f" ({args.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    print(f"wrote {out} (checkpoint) and {out}/adapter (PEFT adapter)")
    if args.json:
        print(json.dumps({"before": before, "after": after, "full_precision": ev.base_score, "losses": losses}))
    return 0


HIGHER_IS_BETTER = {"perplexity": False, "cosine": True, "spearman": True}


def gap_summary(metric: str, before: float, after: float, full: float) -> str:
    """One line on how fine-tuning moved ``metric`` relative to the full-precision model's: the share
    of the gap closed, or that it went past full precision (the held-out text then rewards fitting
    this text, which the full-precision model never saw, not recovering from quantization)."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    gap_before, gap_after = sign * (full - before), sign * (full - after)  # > 0: worse than full precision
    if gap_before <= 0:
        return (f"the model already matched full precision before fine-tuning ({metric} {before:.4f}, full "
                f"precision {full:.4f}); after: {after:.4f}")
    if gap_after < 0:
        return (f"fine-tuning closed the whole gap to full precision and went {abs(full - after):.4f} past it "
                f"({metric} {before:.4f} -> {after:.4f}, full precision {full:.4f})")
    share = 100 * (1 - gap_after / gap_before)
    if share < 0:
        return f"fine-tuning widened the gap to full precision by {-share:.1f}% ({metric} {before:.4f} -> {after:.4f})"
    return f"fine-tuning recovered {share:.1f}% of the gap to full precision"


# -- bench ------------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise CLIError(f"benchmark script not found: {script} (benchmarks ship with the source tree)")
    argv = sys.argv
    sys.argv = [str(script), *[a for a in args.args if a != "--"]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1; so do we
        return 1
    finally:
        sys.argv = argv
    return 0
