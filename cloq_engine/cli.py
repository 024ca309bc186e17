"""The ``cloq`` command line: prepare | eval | compare | finetune | export | bench.

With no ``--model`` the embedded real MiniLM is used; with no ``--calib``/``--data`` the embedded
text (calibration half / held-out half of CPython's pydoc topics).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("cloq")


# -- argument types: a bad value exits 2 with a message naming the argument ----------------------
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _group_size(text: str) -> int:
    if text not in ("32", "64", "128", "-1"):
        raise argparse.ArgumentTypeError(f"must be one of 32, 64, 128, -1; got {text!r}")
    return int(text)


def _existing_dir(text: str) -> str:
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a directory (a Hugging Face model or "
                                         "checkpoint directory holding config.json)")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def _model(text: str) -> str:
    """A model directory, or the name of an embedded model (``minilm``, ``smollm2``), resolved later."""
    from .models import NAMED_MODELS

    if text in NAMED_MODELS and not os.path.isdir(text):
        return text
    try:
        return _existing_dir(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or one of the embedded models: {', '.join(NAMED_MODELS)}") from None


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def _add_quant_args(p: argparse.ArgumentParser, bits_multi: bool = False) -> None:
    p.add_argument("--model", type=_model, default=None,
                   help="local Hugging Face model directory, or an embedded model: minilm (the default) or "
                        "smollm2 (SmolLM2-135M-Instruct, a causal LM)")
    # Defaults are filled in by commands.quant_defaults, so that `prepare --from-gptq` can tell a
    # --bits the user gave (and that conflicts with the checkpoint) from the default.
    if bits_multi:
        p.add_argument("--bits", type=int, nargs="+", choices=(2, 3, 4), default=[2, 3, 4])
    else:
        p.add_argument("--bits", type=int, choices=(2, 3, 4), default=None, help="(default 4)")
    p.add_argument("--group-size", type=_group_size, default=None, help="32, 64, 128 or -1 (default 64)")
    p.add_argument("--quantizer", choices=("gptq", "rtn", "nf4"), default=None, help="(default gptq)")
    p.add_argument("--sym", action="store_true", default=None,
                   help="symmetric quantization (zero at the middle code; exportable as GPTQ v1 at any width)")
    p.add_argument("--act-order", action="store_true", help="GPTQ in decreasing diag(H) order (desc_act)")
    p.add_argument("--grid", choices=("q4_1", "q4_k", "q3_k", "q2_k", "q4_0"), default=None,  # config.GRID_LATTICES
                   help="quantize on llama.cpp's lattice of that GGUF type, so `cloq export --format gguf` writes it "
                        "exactly (sets --bits, --sym and --group-size 32 unless given)")
    p.add_argument("--rank", type=_positive_int, default=16)
    p.add_argument("--alpha", type=_positive_float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--calib", type=_existing_file, default=None,
                   help="UTF-8 text file for calibration (default: the embedded calibration text)")
    p.add_argument("--samples", type=_positive_int, default=64, help="calibration blocks (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per calibration block")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # calibrated-init options (LoRAConfig.init_*; defaults: the config's)
    p.add_argument("--init-solver", choices=("auto", "exact", "krylov", "randomized"), default=None,
                   help="truncated SVD of the calibrated inits (default auto)")
    p.add_argument("--power-iters", type=int, default=None, help="Krylov/randomized iterations (default: adaptive)")
    p.add_argument("--init-damp", type=float, default=None, help="damping of H, fraction of mean(diag H) (default 1e-6)")
    p.add_argument("--init-iters", type=_positive_int, default=None, help="QuAILoRA sweeps / LoftQ alternations")
    p.add_argument("--requant-rounds", type=int, default=0,
                   help="joint re-quantization rounds for cloq/quailora (default 0: one-shot)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cloq-engine")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloq", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"cloq-engine {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="quantize a model and initialise its LoRA factors")
    _add_quant_args(p)
    p.add_argument("--init", choices=("cloq", "quailora", "loftq", "svd", "zero"), default="cloq")
    p.add_argument("--out", required=True, help="checkpoint directory to write (atomically); a new or empty "
                   "directory, or a previous cloq checkpoint with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace a previous cloq checkpoint at --out")
    p.add_argument("--from-gptq", type=_existing_dir, default=None, metavar="DIR",
                   help="keep the Q of this GPTQ checkpoint (AutoGPTQ/GPTQModel layout); --model is its original")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype the unquantized tensors (embeddings, norms, biases, head) are stored in; auto: the "
                        "model's own (its config's dtype). Calibration runs in float32 and the LoRA factors stay "
                        "float32 whatever this says")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.add_argument("--resume", action="store_true",
                   help="prepare block by block from the safetensors shards in bounded memory, keeping finished "
                        "blocks in <out>.partial/; rerun with --resume after an interruption to continue")

    p = sub.add_parser("eval", help="evaluate prepared checkpoints against their full-precision model")
    p.add_argument("checkpoint", type=_existing_dir, nargs="+",
                   help="one or more checkpoints of the same full-precision model, scored in one table")
    p.add_argument("--data", type=_existing_file, default=None, help="held-out UTF-8 text (default: embedded)")
    p.add_argument("--base", type=_existing_dir, default=None, help="full-precision model (default: recorded one)")
    p.add_argument("--samples", type=_positive_int, default=256, help="held-out paragraphs or blocks")
    p.add_argument("--prompt", default=None,
                   help="causal LMs: also print each model's greedy answer to this prompt (chat template when "
                        "the tokenizer has one)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compare", help="every init method at every bit width: table, JSON and PNG plot")
    _add_quant_args(p, bits_multi=True)
    p.add_argument("--inits", nargs="+", choices=("zero", "loftq", "quailora", "cloq", "cloq+requant", "cloq+ranks"),
                   default=["zero", "loftq", "quailora", "cloq", "cloq+requant", "cloq+ranks"],
                   help="cloq+requant: joint re-quantization (3 rounds); cloq+ranks: per-layer ranks, same parameters")
    p.add_argument("--eval-samples", type=_positive_int, default=256)
    p.add_argument("--out", default="results/compare", help="directory for compare.json and compare.png")

    p = sub.add_parser("finetune", help="fine-tune the LoRA factors of a checkpoint with the HF Trainer")
    p.add_argument("checkpoint", type=_existing_dir)
    p.add_argument("--data", type=_existing_file, default=None,
                   help="UTF-8 text: its even paragraphs train, its odd ones are scored before and after "
                        "(default: the embedded calibration / held-out halves)")
    p.add_argument("--eval-samples", type=_positive_int, default=32,
                   help="held-out blocks of 256 tokens (paragraphs for an encoder) scored before and after (default 32)")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--lr", type=_positive_float, default=2e-4)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--out", default=None, help="where to save (default: <checkpoint>-ft)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous cloq checkpoint at --out")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a prepared checkpoint: GPTQ base + PEFT adapter, or merged dense")
    p.add_argument("checkpoint", type=_existing_dir)
    p.add_argument("--format", choices=("gptq", "merged", "gguf"), default="gptq",
                   help="gguf: one llama.cpp file, every quantized layer in its exact ggml type")
    p.add_argument("--adapter", default=None, metavar="FILE.gguf",
                   help="with --format gguf: also write the LoRA factors as a GGUF LoRA adapter (llama.cpp --lora)")
    p.add_argument("--float-type", choices=("f16", "f32"), default="f16",
                   help="with --format gguf: type of the tensors that are not quantized (default f16, as llama.cpp)")
    p.add_argument("--merge", nargs="?", const="gptq", choices=("gptq", "rtn"), default=None,
                   help="with --format gguf, for engines without LoRA: fold s·B·A into the base and re-quantize it "
                        "on each layer's grid; gptq (default): with the Grams of the calibration text, captured "
                        "again block by block (the calibrated merge); rtn: round to nearest (the naive merge). "
                        "Prints each one's layer error against keeping the adapter")
    p.add_argument("--calib", type=_existing_file, default=None,
                   help="with --merge: calibration text (default: the embedded calibration half)")
    p.add_argument("--samples", type=_positive_int, default=64, help="with --merge: calibration blocks (default 64)")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="with --merge: tokens per block (default 128)")
    p.add_argument("--json", action="store_true", help="with --merge: also print the layer errors as JSON")
    p.add_argument("--checkpoint-format", choices=("auto", "gptq", "gptq_v2"), default="auto",
                   help="GPTQ v1 (AutoGPTQ/vLLM, stores zero-1) or v2 (GPTQModel, exact zeros); "
                        "auto (default): v1 when the zeros fit it, else v2")
    p.add_argument("--out", default=None, help="directory to write (default: <checkpoint>-<format>); "
                   "--format gguf: the file (default: <checkpoint>.gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous cloq export at --out")

    from .bench import BENCHMARKS, help_text

    p = sub.add_parser("bench", help="run a benchmark of the source checkout (benchmarks/)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="benchmarks (`cloq bench NAME --help` for each one's options):\n" + help_text())
    p.add_argument("which", metavar="NAME", choices=tuple(BENCHMARKS), help="the benchmark (listed below)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every cleanup an interrupt runs (staging
    directories removed, the caller's model restored) runs for it too."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if getattr(args, "no_progress", False):
        # transformers' own bars ("Loading weights") read this when it is imported
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if "cloq_engine.hf.output_dir" in sys.modules:  # the --out this command claimed (commands._check_out)
            sys.modules["cloq_engine.hf.output_dir"].release_claims()


def _run(args) -> int:
    from . import commands

    handler = getattr(commands, f"cmd_{args.command}")
    try:
        if getattr(args, "model", None):  # a named embedded model becomes its (cached) directory, once
            from .models import resolve

            args.model = resolve(args.model)
        return handler(args) or 0
    except (commands.CLIError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        if args.verbose:
            raise
        print(f"cloq {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        kept = commands.interrupted_note(args)
        if isinstance(e, Terminated):
            print(f"cloq {args.command}: terminated (SIGTERM); {kept}", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"cloq {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
