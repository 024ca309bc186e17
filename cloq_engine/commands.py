"""What each ``cloq`` sub-command does (argument parsing lives in cli.py)."""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from . import data
from .config import LoRAConfig, QuantConfig
from .eval import Evaluator
from .plots import plot_compare
from .tables import text_table

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
    defaults = dict(QUANT_DEFAULTS)
    if getattr(args, "grid", None):  # a llama.cpp lattice fixes the width, symmetry and group
        from .config import GRID_LATTICES

        bits, sym = GRID_LATTICES[args.grid]
        defaults.update(bits=bits, group_size=32, sym=sym)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return given


def interrupted_note(args) -> str:
    """What an interrupted command leaves (cli.py prints it)."""
    if args.command == "prepare" and getattr(args, "resume", False):
        return f"the finished blocks are kept in {args.out}.partial: run the same command again to continue"
    return "nothing was written"


def _quant_flags(args) -> dict:
    return {"sym": bool(getattr(args, "sym", False)), "act_order": bool(getattr(args, "act_order", False)),
            "grid": getattr(args, "grid", None)}


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


# -- prepare ----------------------------------------------------------------------------------------
_API_WORDS = (("overwrite=True", "--overwrite"), ("output directory", "--out"), ("pass `calib`", "pass --calib"),
              ("use prepare_model", "run without --resume"), ("without `resume`", "without --resume"))


def _cli_words(message: str) -> str:
    """An API message in the command line's words (its options, not the Python arguments)."""
    for api, cli in _API_WORDS:
        message = message.replace(api, cli)
    return message


def _check_out(out: str, overwrite: bool, inputs: List[str], **kwargs) -> str:
    """Refuse a dangerous --out before any work (see hf/output_dir.py), and claim it for this run:
    a second run writing the same --out meanwhile is refused at its start, not after its work."""
    from .hf.output_dir import check_output_dir, claim_output

    try:
        target = check_output_dir(out, overwrite=overwrite, inputs=inputs, flag="--overwrite", **kwargs)
        claim_output(target, out)
        return target
    except ValueError as e:
        raise CLIError(_cli_words(str(e))) from None


def _save(model, out: str, tok, overwrite: bool) -> None:
    """save_pretrained, its refusals in the command line's words."""
    from .hf.persistence import save_pretrained

    try:
        save_pretrained(model, out, tokenizer=tok, overwrite=overwrite)
    except ValueError as e:
        raise CLIError(_cli_words(str(e))) from None


def _storage_dtype(choice: str, model_path: str) -> torch.dtype:
    """--dtype: the dtype the unquantized tensors are stored in ("auto": the model's own, from its
    config; float32 when it records none)."""
    if choice != "auto":
        return getattr(torch, choice)
    from transformers import AutoConfig

    from .models import resolve

    own = getattr(AutoConfig.from_pretrained(resolve(model_path)), "dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if own in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


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
    return (text_table(rows, ["expert projection", "expert", "tokens", "err quantized", f"err +{lc.init.value}",
                          "fallback", "bits/w"])
            + f"\n{n} experts: mean calibrated error {mean_q:.4f} -> {mean_i:.4f}; "
              f"{below}/{n} below the quantized-only (zero-init) error")


def cmd_prepare(args) -> int:
    from .layer_factory import cast_dense
    from .hf import prepare_model
    from .hf.quantizer import update_cloq_config

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
    storage = _storage_dtype(getattr(args, "dtype", "auto"), model_path)
    model, tok = data.load_model(model_path)  # float32: calibration runs in float32 whatever --dtype
    qc, lc = _configs(args, args.init)
    calib = _calibration(args, tok, model.config)
    t_load = time.perf_counter() - t0
    prepare_model(model, qc, lc, calib=calib, progress=not args.no_progress)
    cast_dense(model, storage)  # the unquantized tensors as --dtype stores them (LoRA factors: float32)
    update_cloq_config(model, base_model=os.path.abspath(model_path))
    t1 = time.perf_counter()
    _save(model, out, tok, args.overwrite)
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
    print(text_table(rows, ["layer", "shape", "err quantized", f"err +{lc.init.value}", "bits/w"]))
    if rep.experts:
        print("\n" + _experts_table(rep, lc))
    print("\n" + _summary(rep, qc, lc))
    from .hf.moe import storage_summary

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
                                      progress=not args.no_progress, tokenizer=tok, return_report=True,
                                      storage_dtype=_storage_dtype(getattr(args, "dtype", "auto"), model_path))
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(_cli_words(str(e))) from None
    # the written checkpoint's skeleton on meta: its storage summary, nothing loaded
    _print_prepared(args, rep, qc, lc, empty_model(out), torch.device("cpu"),
                    f"capture+forward {rep.capture_s:.1f}s | quantize {rep.quantize_s:.1f}s | init {rep.init_s:.1f}s | "
                    f"total {time.perf_counter() - t0:.1f}s")
    return 0


def _export_gptq(args, model, tok, out) -> None:
    from .export import export_gptq

    export_gptq(model, out, checkpoint_format=args.checkpoint_format, tokenizer=tok, overwrite=args.overwrite)


def _export_merged(args, model, tok, out) -> None:
    from .export import export_merged

    export_merged(model, out, tokenizer=tok, overwrite=args.overwrite)


def _merge_for_gguf(args, model, tok) -> None:
    """``--merge``: the adapter folded into the base and re-quantized (llamacpp/merge.py), its table printed."""
    from .llamacpp import merge

    calib = _calibration(args, tok, getattr(model, "config", None))
    rows = merge.calibrated_merge(model, calib, method=args.merge)
    print(merge.table(rows))
    print(f"(relative to W' = Q + s·B·A, the function keeping the adapter serves; {len(rows)} layers, "
          f"{len(calib)} x {args.seq_len} calibration tokens; written: the {args.merge} merge)")
    if args.json:
        print(json.dumps({"merge": args.merge, "summary": merge.summarize(rows), "layers": rows}))


def _export_gguf(args, model, tok, out) -> None:
    from .llamacpp.gguf_file import export_gguf

    if getattr(args, "merge", None):
        _merge_for_gguf(args, model, tok)
    types = export_gguf(model, out, adapter_file=args.adapter, tokenizer=tok, tokenizer_dir=args.checkpoint,
                        float_type=args.float_type, overwrite=args.overwrite)
    counts = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    print("tensors: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    if args.adapter:
        print(f"wrote {args.adapter} (LoRA adapter)")


# --format -> (writer, whether --out is a file)
EXPORTERS = {"gptq": (_export_gptq, False), "merged": (_export_merged, False), "gguf": (_export_gguf, True)}


def cmd_export(args) -> int:
    """``cloq export CHECKPOINT --format gptq|merged|gguf --out DIR|FILE [--adapter FILE.gguf] [--overwrite]``."""
    from .export import is_cloq_export

    write, to_file = EXPORTERS[args.format]
    if getattr(args, "adapter", None) and args.format != "gguf":
        raise CLIError("--adapter is for --format gguf (the other formats write their adapter inside --out)")
    if getattr(args, "merge", None) and args.format != "gguf":
        raise CLIError("--merge is for --format gguf (--format merged writes the dense merge)")
    if getattr(args, "merge", None) and args.adapter:
        raise CLIError("--merge folds the adapter into the base: there is no --adapter file to write")
    if to_file:
        from .llamacpp.gguf_file import check_target

        out = args.out or f"{args.checkpoint.rstrip('/')}.{args.format}"
        try:
            for target in [out] + ([args.adapter] if args.adapter else []):
                check_target(target, args.overwrite)
        except ValueError as e:
            raise CLIError(_cli_words(str(e))) from None
    else:
        out = args.out or f"{args.checkpoint.rstrip('/')}-{args.format}"
        _check_out(out, args.overwrite, [args.checkpoint], recognise=is_cloq_export, what="cloq export")
    model, tok, _ = _load_checkpoint(args.checkpoint)
    try:
        write(args, model, tok, out)
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
    """``cloq prepare --from-gptq DIR --model ORIG --out OUT``: keep DIR's Q, calibrated init against ORIG;
    the same report as the other prepares."""
    from .config import LoRAConfig
    from .layer_factory import cast_dense
    from .hf.from_gptq import prepare_from_gptq
    from .hf.quantizer import update_cloq_config

    if not args.model:
        raise CLIError("--from-gptq needs --model: the original full-precision model the checkpoint came from")
    _gptq_conflicts(given, args.from_gptq)
    t0 = time.perf_counter()
    model, tok = data.load_model(args.model)
    fields = {k: v for k, v in _init_fields(args).items() if k != "requant_rounds"}  # Q is kept
    lc = LoRAConfig(rank=args.rank, alpha=args.alpha or args.rank, init=args.init, **fields)
    calib = _calibration(args, tok, model.config) if lc.init.value in ("cloq", "quailora") else None
    t_load = time.perf_counter() - t0
    try:
        prepare_from_gptq(model, args.from_gptq, lc, calib=calib, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e).replace("the model's", "--model's").replace("the model", "--model")) from None
    cast_dense(model, _storage_dtype(getattr(args, "dtype", "auto"), args.model))
    update_cloq_config(model, base_model=os.path.abspath(args.model))
    t1 = time.perf_counter()
    _save(model, args.out, tok, args.overwrite)
    t_save = time.perf_counter() - t1
    rep = model.cloq_report
    print(f"kept the Q of {len(model.cloq_config['targets'])} GPTQ layers from {args.from_gptq}")
    _print_prepared(args, rep, QuantConfig.from_dict(model.cloq_config["quant"]), lc, model,
                    next(model.parameters()).device,
                    f"load {t_load:.1f}s | capture+forward {rep.capture_s:.1f}s | init {rep.init_s:.1f}s | "
                    f"save {t_save:.1f}s | total {time.perf_counter() - t0:.1f}s")
    return 0


# -- eval -------------------------------------------------------------------------------------------
def _load_checkpoint(path: str):
    from transformers import AutoTokenizer

    from .hf.output_dir import is_cloq_checkpoint
    from .hf.persistence import load_pretrained

    if os.path.isfile(os.path.join(path, "config.json")) and not is_cloq_checkpoint(path):
        raise CLIError(f"{path} is not a cloq checkpoint (its config.json has no cloq `quantization_config`): "
                       f"make one with `cloq prepare --model {path} --out DIR`")
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
    if base and not args_base and not os.path.isdir(base):  # the record is a local path, as prepared
        raise CLIError(f"the full-precision model the checkpoint records ({base}) is not on this machine "
                       "(`quantization_config.base_model` is the absolute path it was prepared from): pass --base DIR")
    if not base or not os.path.isdir(base):
        raise CLIError("the full-precision model is not available: pass --base DIR")
    from .hf.output_dir import is_cloq_checkpoint

    if is_cloq_checkpoint(base):  # comparing a quantized model with one would read as agreement
        raise CLIError(f"the full-precision model {base!r} is a cloq checkpoint, not full precision: pass --base DIR")
    return data.load_model(base)


def describe_checkpoint(record: dict) -> str:
    """A checkpoint in a few words: "2-bit gptq, init=cloq", then ", fine-tuned N steps" when its
    LoRA factors were trained since (the init alone no longer describes them)."""
    desc = (f"{record.get('quant', {}).get('bits', '?')}-bit {record.get('quant', {}).get('method', '?')}, "
            f"init={record.get('lora', {}).get('init', '?')}")
    tuned = record.get("finetuned")
    if isinstance(tuned, dict):
        desc += f", fine-tuned {tuned.get('steps', '?')} steps"
    return desc


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``prompt`` (as a chat turn when the tokenizer has a template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def cmd_eval(args) -> int:
    paths = args.checkpoint if isinstance(args.checkpoint, list) else [args.checkpoint]
    loaded = [_load_checkpoint(p) for p in paths]
    bases = {args.base or q.get("base_model") for _, _, q in loaded}
    if len(bases) > 1:
        raise CLIError("the checkpoints come from different full-precision models "
                       f"({', '.join(sorted(map(str, bases)))}): evaluate them separately or pass --base DIR")
    base, base_tok = _base_model(args.base, loaded[0][2])
    tok = loaded[0][1] or base_tok
    ev = Evaluator(base, tok, None if args.data is None else _heldout(args.data), args.samples)
    scores = [ev.score(m) for m, _, _ in loaded]
    names = [describe_checkpoint(getattr(m, "cloq_config", None) or q) for m, _, q in loaded]
    if len(set(names)) < len(names):  # same settings: tell them apart by directory
        names = [f"{n} ({os.path.basename(os.path.normpath(p))})" for n, p in zip(names, paths)]
    keys = list(scores[0])
    rows = [["full precision", *[ev.base_score[k] for k in keys]]] + [[n, *s.values()] for n, s in zip(names, scores)]
    print(text_table(rows, ["model", *keys]))
    if any(s.get("spearman", 0.0) != s.get("spearman", 0.0) for s in scores):  # NaN
        print(f"note: Spearman cannot be computed from {len(ev.reference)} paragraph(s): it ranks pairwise "
              "similarities and needs at least 3 (--data, --samples)", file=sys.stderr)
    answers = {}
    if args.prompt is not None:
        if not ev.causal:
            raise CLIError("--prompt needs a causal LM (this model is an encoder)")
        print(f"\nprompt: {args.prompt}")
        for name, model in [("full precision", base)] + [(n, m) for n, (m, _, _) in zip(names, loaded)]:
            answers[name] = greedy_answer(model, tok, args.prompt, args.max_new_tokens)
            print(f"\n[{name}]\n{answers[name]}")
    if args.json:
        clean = [{k: (None if v != v else v) for k, v in s.items()} for s in scores]  # JSON has no NaN
        out = {"checkpoints": paths, "models": names, "scores": clean, "full_precision": ev.base_score, "answers": answers}
        if len(paths) == 1:  # the one-checkpoint layout of earlier versions
            out.update(checkpoint=paths[0], model=names[0], score=clean[0])
        print(json.dumps(out))
    return 0


# -- compare ----------------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from .hf import prepare_model
    from .research.variants import resolve_variant

    quant_defaults(args)
    _check_seq_len(args.seq_len)
    base, tok = data.load_model(args.model)
    calib = _calibration(args, tok, base.config)
    ev = Evaluator(base, tok, None, args.eval_samples)
    results = []
    for bits in args.bits:
        for init in args.inits:
            t0 = time.perf_counter()
            # LoftQ alternates with its own RTN quantizer; cloq+requant/+ranks are CLoQ variants (research/variants.py)
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
    print(text_table([[r["init"], r["bits"], r["quantizer"], *[r[k] for k in keys]] for r in results],
                 ["init", "bits", "quantizer", *keys]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"model": args.model or "embedded MiniLM", "quantizer": args.quantizer, "group_size": args.group_size,
                   "rank": args.rank, "metric": ev.metric, "full_precision": ev.base_score, "results": results}, f, indent=2)
    plot_compare(results, ev.metric, os.path.join(args.out, "compare.png"), args)
    print(f"wrote {args.out}/compare.json and compare.png")
    return 0


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
    train, heldout, what = _finetune_text(args.data)
    model, tok, qcfg = _load_checkpoint(args.checkpoint)
    base, base_tok = _base_model(None, qcfg)
    tok = tok or base_tok
    ev = Evaluator(base, tok, heldout, args.eval_samples, what=what)
    before = ev.score(model)
    losses = finetune(model, base, tok, train, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      seq_len=args.seq_len, causal=ev.causal)
    after = ev.score(model)
    tuned = model.cloq_config.get("finetuned") or {}
    model.cloq_config["finetuned"] = {"steps": int(tuned.get("steps", 0)) + args.steps,
                                      "data": os.path.abspath(args.data) if args.data else "embedded"}
    save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
    export_peft_adapter(model, os.path.join(out, "adapter"), overwrite=True)  # inside the --out just written
    m = ev.metric
    print(text_table([["before", before[m]], ["after", after[m]], ["full precision", ev.base_score[m]]], ["model", m]))
    print(gap_summary(m, before[m], after[m], ev.base_score[m])
          + f" ({args.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    print(f"wrote {out} (checkpoint) and {out}/adapter (PEFT adapter)")
    if args.json:
        print(json.dumps({"before": before, "after": after, "full_precision": ev.base_score, "losses": losses}))
    return 0


def _finetune_text(path: Optional[str]):
    """(training paragraphs, held-out paragraphs, how errors name the held-out text): --data's even
    paragraphs train and its odd ones are scored (data.split_paragraphs), as the embedded text's halves."""
    if not path:
        return data.calibration_paragraphs(), data.heldout_paragraphs(), "the embedded held-out text"
    paras = data.read_text_file(path)
    train, heldout = data.split_paragraphs(paras)
    if not heldout:
        raise CLIError(f"--data {path}: its {len(paras)} paragraph(s) leave none to hold out for scoring (the odd "
                       "paragraphs are scored, the even ones trained on): give at least 2 paragraphs separated by a "
                       "blank line")
    return train, heldout, f"the held-out (odd) paragraphs of --data {path}"


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
    from . import bench

    try:
        return bench.run(args.which, [a for a in args.args if a != "--"])
    except bench.SourceTreeMissing as e:
        raise CLIError(str(e)) from None
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1; so do we
        return 1
