"""Served quality and speed in llama.cpp itself: held-out perplexity (llama-perplexity) and CPU
generation tokens/s (llama-completion) of GGUF files, against our engine's perplexity of the same
model on the same tokens.

    bash benchmarks/build_llamacpp.sh       # once: llama.cpp's tools (not in the default set-up)
    cloq bench gguf [--build] [--model smollm2] [--ours NAME=CKPT ...] [--merge NAME=CKPT ...]
        [--peer Q2_K Q3_K Q4_K] [--ctx 256] [--chunks 8] [--threads 2] [--gen-tokens 64]
        [--work results/gguf-bench] [--out docs/results/gguf-served.json]

Rows (each written to ``--out`` as soon as it is measured, the table printed at the end):

* ``fp F32`` / ``fp F16``: the full-precision model written by our exporter (``allow_dense``: names,
  permutation, vocabulary as llama.cpp's converter), F32 exact and F16 as ``--outtype f16``;
* ``llama.cpp T``: ``llama-quantize`` of the F32 file to T (its default mix, whose fallbacks and
  bumped tensors it picks itself), ``+ imatrix``: with ``llama-imatrix`` of the F32 file on the
  engine's calibration text (the peer at its best), ``pure + imatrix, f16 embd``: ``--pure`` (every
  tensor T or its fallback) with the embedding kept F16 as ours: the same bytes as our export;
* ``NAME base`` / ``NAME base + LoRA``: ``cloq export`` of a cloq checkpoint, alone and with its GGUF
  LoRA adapter (``--lora``);
* ``NAME merged (gptq|rtn)``: ``cloq export --merge`` of the checkpoint (calibrated or naive merge);
  with ``--merge-peer T``: also the merged dense model re-quantized by llama-quantize to T with the
  imatrix (what merging into 16 bits and quantizing with llama.cpp gives).

Engine perplexity (``engine_ppl``) scores the same token ids (``llama-tokenize`` of the file) the
way llama-perplexity does (``llamacpp.tools.chunked_perplexity``), on: the full-precision model
(fp rows), transformers' GGUF loader of the file (dequantized to fp32: llama.cpp's own and our
base/merged files; ours equal our dequantized base bit for bit, ``tests/test_gguf.py``), or the
checkpoint (base + LoRA). ``gap`` = llama.cpp / engine - 1: what llama.cpp's activation quantization
(and its float16 accumulation of F16 weights) costs. Bits/weight count the linear layers' tensors
(``blk.*`` attention and MLP weights); the file size counts everything (the embedding included).
Timings are never asserted; say what else ran when quoting them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="cloq bench gguf", description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="build llama.cpp's tools first if absent (build_llamacpp.sh)")
    p.add_argument("--model", default="smollm2", help="full-precision model: a directory or an embedded name")
    p.add_argument("--ours", nargs="*", default=[], metavar="NAME=CKPT", help="cloq checkpoints to export and serve")
    p.add_argument("--merge", nargs="*", default=[], metavar="NAME=CKPT[:rtn]",
                   help="checkpoints to export with --merge (gptq; ':rtn' for the naive merge)")
    p.add_argument("--merge-peer", nargs="*", default=[], metavar="T",
                   help="also quantize each --merge checkpoint's dense merge with llama-quantize to T (+ imatrix)")
    p.add_argument("--peer", nargs="*", default=["Q2_K", "Q3_K", "Q4_K"], help="llama-quantize types of the fp model")
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision and llama-quantize rows")
    p.add_argument("--ctx", type=int, default=256, help="llama-perplexity -c (each chunk scores its second half)")
    p.add_argument("--chunks", type=int, default=8, help="chunks of --ctx tokens, the same for every row")
    p.add_argument("--imatrix-ctx", type=int, default=128)
    p.add_argument("--imatrix-chunks", type=int, default=64, help="calibration chunks (64 x 128: prepare's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated for the tokens/s figure (0: skip)")
    p.add_argument("--engine", choices=("all", "ours", "none"), default="all",
                   help="which rows also get the engine's perplexity: all, ours (fp, our exports, merges), none")
    p.add_argument("--work", default="results/gguf-bench", help="where the GGUF files and texts are written")
    p.add_argument("--out", default="results/gguf-bench/gguf-served.json")
    return p.parse_args(argv)


def _pairs(items, what):
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{what} takes NAME=CHECKPOINT; got {item!r}")
        out.append((name, path))
    return out


def _size(path):
    import gguf

    reader = gguf.GGUFReader(path)
    lin_bytes = lin_n = 0
    types = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR:
            lin_bytes += int(t.n_bytes)
            lin_n += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"file_mb": os.path.getsize(path) / 1e6, "linear_bpw": 8 * lin_bytes / lin_n if lin_n else None,
            "linear_types": types}


def _vocab_bos(path):
    import gguf

    f = gguf.GGUFReader(path).fields
    add = f.get("tokenizer.ggml.add_bos_token")
    bos = f.get("tokenizer.ggml.bos_token_id")
    return int(bos.contents()) if (add is not None and bool(add.contents()) and bos is not None) else None


class Bench:
    def __init__(self, args):
        from cloq_engine.llamacpp import tools

        self.args, self.tools = args, tools
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.llama = tools.LlamaCpp.found(args.threads)
        self.rows = []
        self.meta = {"ctx": args.ctx, "chunks": args.chunks, "threads": args.threads, "gen_tokens": args.gen_tokens,
                     "model": args.model, "llama_cpp": f"llama-cpp-python {tools.VERSION} sdist's vendor/llama.cpp",
                     "load": os.getloadavg(), "commit": _commit()}
        self._fp = None

    # -- texts -------------------------------------------------------------------------------------
    def texts(self, tok):
        from cloq_engine import data

        need = self.args.ctx * self.args.chunks
        paras, n = [], 0
        for p in data.heldout_paragraphs():  # a prefix of the held-out half with ~25% more tokens than scored
            paras.append(p)
            n += len(tok(p, add_special_tokens=False)["input_ids"]) + 1
            if n > 1.25 * need + 64:
                break
        self.heldout = str(self.work / "heldout.txt")
        self.calib = str(self.work / "calibration.txt")
        _write_text(self.heldout, "\n\n".join(paras))
        _write_text(self.calib, data.calibration_text())

    def fp_model(self):
        if self._fp is None:
            from cloq_engine import data

            self._fp = data.load_model(self.args.model)
        return self._fp

    # -- one row -----------------------------------------------------------------------------------
    def row(self, name, gguf_path, lora=None, engine=None, **extra):
        a = self.args
        t0 = time.perf_counter()
        r = {"name": name, "file": gguf_path, "lora": lora, **_size(gguf_path), **extra}
        if lora:
            r["lora_mb"] = os.path.getsize(lora) / 1e6
        r.update({f"llama_{k}": v for k, v in self.llama.perplexity(gguf_path, self.heldout, a.ctx, a.chunks, lora).items()})
        if a.gen_tokens:
            r.update(self.llama.generation_speed(gguf_path, a.gen_tokens, lora))
        wanted = a.engine == "all" or (a.engine == "ours" and "peer" not in extra)
        if engine is not None and wanted:
            tokens = self.llama.tokenize(gguf_path, self.heldout)
            model = engine()
            r["engine_ppl"] = self.tools.chunked_perplexity(model, tokens, a.ctx, a.chunks, _vocab_bos(gguf_path))["ppl"]
            r["gap"] = r["llama_ppl"] / r["engine_ppl"] - 1
            del model
        r["seconds"] = time.perf_counter() - t0
        self.rows.append(r)
        self.save()
        print(f"  {name}: llama.cpp ppl {r['llama_ppl']:.3f}" + (f", engine {r['engine_ppl']:.3f}" if "engine_ppl" in r else "")
              + (f", {r['gen_tok_s']:.1f} tok/s" if "gen_tok_s" in r else "") + f", {r['linear_bpw'] or 0:.3f} bits/w",
              flush=True)
        return r

    def save(self):
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".partial")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        os.replace(tmp, out)

    def gguf_engine(self, path):
        """transformers' GGUF loader of ``path``, dequantized to fp32."""
        def load():
            import torch
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                        gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        return load

    # -- row groups --------------------------------------------------------------------------------
    def fp_and_peer(self):
        from cloq_engine.llamacpp.gguf_file import export_gguf
        from cloq_engine.models import resolve

        model, tok = self.fp_model()
        src = resolve(self.args.model)
        files = {}
        for ft in ("f32", "f16"):
            files[ft] = str(self.work / f"fp-{ft}.gguf")
            if not os.path.exists(files[ft]):
                export_gguf(model, files[ft], tokenizer=tok, tokenizer_dir=src, float_type=ft, allow_dense=True)
        fp = lambda: self.fp_model()[0]  # noqa: E731
        self.row("fp F32", files["f32"], engine=fp)
        self.row("fp F16", files["f16"], engine=fp)
        imat = str(self.work / "imatrix.gguf")
        if not os.path.exists(imat):
            self.llama.imatrix(files["f32"], self.calib, imat, self.args.imatrix_ctx, self.args.imatrix_chunks)
        self.imatrix = imat
        for t in self.args.peer:
            for label, kw in ((f"llama.cpp {t}", {}), (f"llama.cpp {t} + imatrix", {"imatrix": imat}),
                              (f"llama.cpp {t} pure + imatrix, f16 embd",
                               {"imatrix": imat, "pure": True, "embedding_type": "f16"})):
                path = str(self.work / (label.replace("llama.cpp ", "peer-").replace(" + ", "-").replace(", ", "-")
                                        .replace(" ", "-") + ".gguf"))
                if not os.path.exists(path):
                    self.llama.quantize(files["f32"], path, t, **kw)
                self.row(label, path, engine=self.gguf_engine(path), peer=t)

    def ours(self, name, ckpt):
        base, lora = str(self.work / f"{name}.gguf"), str(self.work / f"{name}.lora.gguf")
        if not (os.path.exists(base) and os.path.exists(lora)):
            _cloq("export", ckpt, "--format", "gguf", "--out", base, "--adapter", lora, "--overwrite")
        self.row(f"{name} base", base, engine=self.gguf_engine(base), checkpoint=ckpt)
        self.row(f"{name} base + LoRA", base, lora=lora, engine=lambda: _load(ckpt), checkpoint=ckpt)

    def merged(self, name, spec):
        ckpt, _, method = spec.partition(":")
        method = method or "gptq"
        path = str(self.work / f"{name}.merged-{method}.gguf")
        report = str(self.work / f"{name}.merged-{method}.json")
        if not (os.path.exists(path) and os.path.exists(report)):
            out = _cloq("export", ckpt, "--format", "gguf", "--merge", method, "--json", "--out", path, "--overwrite")
            line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
            _write_text(report, line)
        summary = json.loads(Path(report).read_text())["summary"]
        self.row(f"{name} merged ({method})", path, engine=self.gguf_engine(path), checkpoint=ckpt,
                 merge_errors=summary)
        for t in self.args.merge_peer:
            self.merge_peer(name, ckpt, t)

    def merge_peer(self, name, ckpt, t):
        """The others' path: the dense merge (F32 GGUF) re-quantized by llama-quantize with the imatrix."""
        from cloq_engine.hf.merge import merge_and_unload
        from cloq_engine.llamacpp.gguf_file import export_gguf
        from cloq_engine.models import resolve

        dense_f32 = str(self.work / f"{name}.dense-f32.gguf")
        path = str(self.work / f"{name}.dense-{t}-imatrix.gguf")
        if not os.path.exists(dense_f32):
            model = merge_and_unload(_load(ckpt))
            export_gguf(model, dense_f32, tokenizer=self.fp_model()[1], tokenizer_dir=resolve(self.args.model),
                        float_type="f32", allow_dense=True)
        if not os.path.exists(path):
            self.llama.quantize(dense_f32, path, t, imatrix=self.imatrix)
        self.row(f"{name} merged to 16 bits -> llama.cpp {t} + imatrix", path, engine=self.gguf_engine(path),
                 checkpoint=ckpt, peer=t)

    def table(self):
        head = ["row", "linear bits/w", "file MB", "llama.cpp ppl", "engine ppl", "gap", "gen tok/s"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            size = f"{r['file_mb']:.1f}" + (f" + {r['lora_mb']:.1f}" if r.get("lora_mb") else "")
            eng = f"{r['engine_ppl']:.3f}" if "engine_ppl" in r else "-"
            gap = f"{100 * r['gap']:+.2f}%" if "gap" in r else "-"
            speed = f"{r['gen_tok_s']:.1f}" if "gen_tok_s" in r else "-"
            bpw = f"{r['linear_bpw']:.3f}" if r.get("linear_bpw") else "-"
            lines.append(f"| {r['name']} | {bpw} | {size} | {r['llama_ppl']:.3f} | {eng} | {gap} | {speed} |")
        return "\n".join(lines)


def _write_text(path, text):
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _cloq(*argv):
    """A cloq command in a subprocess (its own memory), its stdout; SystemExit with its stderr on failure."""
    p = subprocess.run([sys.executable, "-m", "cloq_engine.cli", *argv], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"cloq {' '.join(argv)} failed:\n{p.stderr.strip()[-2000:]}")
    return p.stdout


def _load(ckpt):
    from cloq_engine.hf import load_pretrained

    return load_pretrained(ckpt).eval()


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cloq_engine.llamacpp import tools

    if args.build:
        try:
            tools.find_tools()
        except tools.ToolError:
            script = Path(__file__).resolve().parent / "build_llamacpp.sh"
            if subprocess.run(["bash", str(script)]).returncode != 0:
                raise SystemExit(f"building llama.cpp failed (see above); rerun `bash {script}` to resume")
    try:
        bench = Bench(args)
    except tools.ToolError as e:
        raise SystemExit(str(e))
    import torch

    torch.set_num_threads(args.threads)
    bench.texts(bench.fp_model()[1])
    print(f"llama.cpp rows: -c {args.ctx}, {args.chunks} chunks of {bench.heldout}; {args.threads} threads", flush=True)
    try:
        if not args.no_fp:
            bench.fp_and_peer()
        else:
            imat = bench.work / "imatrix.gguf"
            bench.imatrix = str(imat) if imat.exists() else None
        for name, ckpt in _pairs(args.ours, "--ours"):
            bench.ours(name, ckpt)
        for name, spec in _pairs(args.merge, "--merge"):
            bench.merged(name, spec)
    except tools.ToolError as e:
        raise SystemExit(str(e))
    print(bench.table())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
