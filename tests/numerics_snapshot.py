"""Checksums of what a set of prepares write, to show a refactor leaves the numerics bitwise alone.

Not a test (a pinned checksum depends on one CPU's rounding): run it on the commit before a change
and on the commit after, on the same machine and thread count, and compare::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/numerics_snapshot.py before.json
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tests/numerics_snapshot.py after.json --against before.json

Each case prepares a model, saves it, and records the sha256 of every saved tensor, the
quantization record (quant, lora, targets) and the per-layer / per-expert report rows (errors,
shapes, bits; timings left out). Cases: tiny Llama and tiny Qwen3-MoE (tests/tiny_models.py,
tests/tiny_moe.py) with RTN / GPTQ x cloq / quailora / zero, in memory (sequential and one pass),
streamed (``prepare_pretrained``) and streamed with an interruption then ``resume``; a tiny BERT
(pooler outside the block stack); ``prepare_from_gptq`` (cloq, quailora, svd) from an exported
GPTQ checkpoint; and ``cloq prepare --bits 2`` on the embedded MiniLM with every other option at
its default, in memory and with ``--resume``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_models, tiny_moe

import torch  # noqa: E402

import cloq_engine as ce  # noqa: E402
from cloq_engine.hf import streaming  # noqa: E402
from cloq_engine.hf.record import tensor_checksum  # noqa: E402


def _sums(path: str) -> dict:
    from safetensors import safe_open

    out = {}
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k)
            out[k] = f"{t.dtype}:{tuple(t.shape)}:{tensor_checksum(t)}"
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        record = json.load(f)["quantization_config"]
    out["__record__"] = {k: record[k] for k in ("quant", "lora", "targets")}
    return out


def _rows(report) -> dict:
    if report is None:
        return {}
    return {"layers": [[r.name, list(r.shape), repr(r.err_quant), repr(r.err_init), repr(r.bits_per_weight)]
                       for r in report.layers],
            "experts": [[r.name, r.expert, r.tokens, list(r.shape), repr(r.err_quant), repr(r.err_init),
                         r.fallback] for r in report.experts],
            "calib_tokens": report.calib_tokens, "underdetermined": dict(report.underdetermined),
            "full_precision": list(report.full_precision)}


def _model(kind: str):
    from tiny_models import tiny_model
    from tiny_moe import tiny_moe

    return tiny_moe("qwen3_moe") if kind == "qwen3_moe" else tiny_model(kind)


def _calib(kind: str):
    from tiny_models import tiny_calib
    from tiny_moe import tiny_moe_calib

    return tiny_moe_calib(8) if kind == "qwen3_moe" else tiny_calib(4)


def _configs(method: str, init: str):
    return (ce.QuantConfig(bits=2 if method == "gptq" else 3, group_size=32, method=method),
            ce.LoRAConfig(rank=4, alpha=8, init=init))


def in_memory(kind, method, init, tmp, sequential=True):
    model = _model(kind)
    qc, lc = _configs(method, init)
    torch.manual_seed(0)
    ce.prepare_model(model, qc, lc, calib=None if init == "zero" and method == "rtn" else _calib(kind),
                     sequential=sequential)
    path = ce.save_pretrained(model, os.path.join(tmp, "out"))
    return _sums(path), _rows(model.cloq_report)


def _source(kind, tmp) -> str:
    src = os.path.join(tmp, "src")
    if not os.path.isdir(src):
        _model(kind).save_pretrained(src)
    return src


def streamed(kind, method, init, tmp, interrupt=False):
    qc, lc = _configs(method, init)
    src = _source(kind, tmp)
    calib = None if init == "zero" and method == "rtn" else _calib(kind)
    out = os.path.join(tmp, "stream")
    if interrupt:  # stop once block 0 is written, then resume
        save = streaming._save_atomic

        def interrupted(tensors, file):
            if "block-00001" in file:
                raise KeyboardInterrupt
            save(tensors, file)

        streaming._save_atomic = interrupted
        try:
            with contextlib.suppress(KeyboardInterrupt):
                torch.manual_seed(0)
                streaming.prepare_pretrained(src, out, qc, lc, calib=calib)
        finally:
            streaming._save_atomic = save
    torch.manual_seed(0)
    path, report = streaming.prepare_pretrained(src, out, qc, lc, calib=calib, resume=interrupt, return_report=True)
    return _sums(path), _rows(report)


def from_gptq(init, tmp):
    from cloq_engine import export

    model = _model("llama")
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="gptq"),
                     ce.LoRAConfig(rank=4, alpha=8, init="zero"), calib=_calib("llama"))
    export.export_gptq(model, os.path.join(tmp, "gptq"), checkpoint_format="gptq_v2")
    original = _model("llama")
    torch.manual_seed(0)
    export.prepare_from_gptq(original, os.path.join(tmp, "gptq"), ce.LoRAConfig(rank=4, alpha=8, init=init),
                             calib=_calib("llama") if init not in ("svd", "zero") else None)
    path = ce.save_pretrained(original, os.path.join(tmp, "out"))
    return _sums(path), _rows(getattr(original, "cloq_report", None))


def minilm_cli(tmp, resume=False):
    from cloq_engine.cli import main

    out = os.path.join(tmp, "minilm")
    argv = ["prepare", "--bits", "2", "--out", out, "--no-progress"] + (["--resume"] if resume else [])
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        rc = main(argv)
    assert rc in (0, None), rc
    return _sums(out), {}


def cases():
    out = {}
    for kind in ("llama", "qwen3_moe"):
        for method, init in (("rtn", "cloq"), ("gptq", "cloq"), ("rtn", "quailora"), ("gptq", "quailora"),
                             ("rtn", "zero")):
            out[f"{kind}/{method}/{init}/memory"] = lambda t, a=(kind, method, init): in_memory(*a, t)
            out[f"{kind}/{method}/{init}/stream"] = lambda t, a=(kind, method, init): streamed(*a, t)
        out[f"{kind}/gptq/cloq/one-pass"] = lambda t, k=kind: in_memory(k, "gptq", "cloq", t, sequential=False)
        out[f"{kind}/gptq/cloq/stream-resumed"] = lambda t, k=kind: streamed(k, "gptq", "cloq", t, interrupt=True)
    out["bert/gptq/cloq/memory"] = lambda t: in_memory("bert", "gptq", "cloq", t)
    out["bert/gptq/cloq/stream"] = lambda t: streamed("bert", "gptq", "cloq", t)
    for init in ("cloq", "quailora", "svd", "zero"):
        out[f"llama/from-gptq/{init}"] = lambda t, i=init: from_gptq(i, t)
    out["minilm/cli/2bit-default"] = lambda t: minilm_cli(t)
    out["minilm/cli/2bit-default-resume"] = lambda t: minilm_cli(t, resume=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSON file to write the checksums to")
    p.add_argument("--against", help="an earlier run's JSON: report every case that differs")
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = p.parse_args(argv)
    results = {}
    for name, run in cases().items():
        if args.only not in name:
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            tensors, rows = run(tmp)
        results[name] = {"tensors": tensors, "report": rows}
        print(f"{name:40s} {len(tensors) - 1:4d} tensors  {time.perf_counter() - t0:6.1f} s", flush=True)
        with open(args.out, "w", encoding="utf-8") as f:  # as it goes
            json.dump(results, f, indent=1, sort_keys=True)
    if not args.against:
        return 0
    with open(args.against, encoding="utf-8") as f:
        ref = json.load(f)
    bad = 0
    for name, got in results.items():
        want = ref.get(name)
        if want is None:
            print(f"{name}: not in {args.against}")
            continue
        diff = sorted(k for k in set(got["tensors"]) | set(want["tensors"])
                      if got["tensors"].get(k) != want["tensors"].get(k))
        same_report = got["report"] == want["report"]
        if diff or not same_report:
            bad += 1
            print(f"DIFFERS {name}: {len(diff)} tensor(s) {diff[:4]}; report {'same' if same_report else 'differs'}")
    print(f"{len(results) - bad} of {len(results)} cases bitwise identical to {args.against}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
