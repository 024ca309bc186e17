"""llama.cpp's own command-line tools, driven from Python: where they are, how to call them, and
what their output says.

The tools are not part of the default set-up: ``bash benchmarks/build_llamacpp.sh`` builds them from
the C++ source vendored in the llama-cpp-python sdist into ``$CLOQ_CACHE_DIR/llama.cpp/<version>/bin``
(``LLAMACPP_BIN`` points elsewhere). :func:`find_tools` says what to run when they are absent.

:func:`chunked_perplexity` scores a model in our engine exactly as ``llama-perplexity`` scores a
GGUF: the file's tokens (from ``llama-tokenize``, so both sides read the same ids) cut into chunks of
``n_ctx``, the first token of each chunk replaced by BOS when the vocabulary adds one, and only the
second half of each chunk scored (tokens ``n_ctx/2 + 1 .. n_ctx - 1``), so the two perplexities
differ only by the arithmetic: llama.cpp quantizes activations (Q8_0/Q8_1/Q8_K) in its CPU matmuls.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendor/llama.cpp is built
TOOLS = ("llama-perplexity", "llama-imatrix", "llama-quantize", "llama-bench", "llama-completion", "llama-tokenize")
BUILD_SCRIPT = "benchmarks/build_llamacpp.sh"


class ToolError(RuntimeError):
    """A llama.cpp tool is missing or failed (the message says which and what it printed)."""


def bin_dir() -> Path:
    env = os.environ.get("LLAMACPP_BIN")
    if env:
        return Path(env)
    from ..models import cache_dir

    return cache_dir() / "llama.cpp" / VERSION / "bin"


def find_tools(names: Sequence[str] = TOOLS) -> Dict[str, str]:
    """{tool: path} for each of ``names``; ToolError naming the build step when any is absent."""
    d = bin_dir()
    missing = [n for n in names if not os.access(d / n, os.X_OK)]
    if missing:
        raise ToolError(f"llama.cpp tools not found in {d}: {', '.join(missing)}. Build them once with "
                        f"`bash {BUILD_SCRIPT}` (from the source tree; about 10-30 min on 2 cores, "
                        "cmake and a C++ compiler needed), or point LLAMACPP_BIN at a directory holding them")
    return {n: str(d / n) for n in names}


def run(cmd: List[str], timeout: Optional[float] = None) -> str:
    """Run a tool; its stdout + stderr, or ToolError with the tail of what it printed."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                           errors="replace")
    except FileNotFoundError:
        raise ToolError(f"{cmd[0]}: not found") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{os.path.basename(cmd[0])} ran past {timeout} s") from None
    if p.returncode != 0:
        tail = "\n".join(p.stdout.strip().splitlines()[-12:])
        raise ToolError(f"{os.path.basename(cmd[0])} exited {p.returncode}:\n{tail}")
    return p.stdout


# ---- what the tools print ------------------------------------------------------------------------
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_EVAL = re.compile(r"(?<!prompt )eval time =\s*([0-9.]+) ms /\s*(\d+) (?:runs|tokens).*?([0-9.]+) tokens per second")
_PROMPT = re.compile(r"prompt eval time =\s*([0-9.]+) ms /\s*(\d+) tokens.*?([0-9.]+) tokens per second")


def parse_perplexity(text: str) -> Dict[str, float]:
    m = _PPL.search(text)
    if not m:
        raise ToolError("llama-perplexity printed no 'Final estimate' line:\n" + "\n".join(text.splitlines()[-8:]))
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", text)
    out = {"ppl": float(m.group(1)), "ppl_err": float(m.group(2))}
    if chunks:
        out.update(chunks=int(chunks.group(1)), n_ctx=int(chunks.group(2)))
    return out


def parse_eval_speed(text: str) -> Dict[str, float]:
    """Generation (and prompt) tokens/s from llama's ``llama_perf_context_print`` lines."""
    m = _EVAL.search(text)
    if not m:
        raise ToolError("no 'eval time' line in the tool's output:\n" + "\n".join(text.splitlines()[-8:]))
    out = {"gen_ms": float(m.group(1)), "gen_tokens": int(m.group(2)), "gen_tok_s": float(m.group(3))}
    p = _PROMPT.search(text)
    if p:
        out.update(prompt_tokens=int(p.group(2)), prompt_tok_s=float(p.group(3)))
    return out


def parse_token_ids(text: str) -> List[int]:
    """The ``[1, 2, ...]`` list ``llama-tokenize --ids`` prints (its last bracketed line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[") and ln.strip().endswith("]")]
    if not lines:
        raise ToolError("llama-tokenize printed no id list")
    body = lines[-1][1:-1].strip()
    return [int(t) for t in body.split(",")] if body else []


# ---- the tools -----------------------------------------------------------------------------------
@dataclass
class LlamaCpp:
    tools: Dict[str, str]
    threads: int = 2

    @classmethod
    def found(cls, threads: int = 2) -> "LlamaCpp":
        return cls(find_tools(), threads)

    def tokenize(self, model: str, text_file: str) -> List[int]:
        """The ids ``llama-perplexity`` reads from ``text_file`` (BOS added as the vocabulary says)."""
        return parse_token_ids(run([self.tools["llama-tokenize"], "-m", model, "-f", text_file, "--ids",
                                    "--log-disable"]))

    def perplexity(self, model: str, text_file: str, n_ctx: int, chunks: int, lora: Optional[str] = None,
                   lora_scale: Optional[float] = None) -> Dict[str, float]:
        cmd = [self.tools["llama-perplexity"], "-m", model, "-f", text_file, "-c", str(n_ctx), "-b", str(n_ctx),
               "--chunks", str(chunks), "-t", str(self.threads)]
        cmd += _lora_args(lora, lora_scale)
        return parse_perplexity(run(cmd))

    def generation_speed(self, model: str, n_tokens: int = 64, lora: Optional[str] = None,
                         prompt: str = "The Python language reference says that") -> Dict[str, float]:
        """Greedy decode of ``n_tokens`` on ``threads`` CPU threads (llama-completion's own timing)."""
        cmd = [self.tools["llama-completion"], "-m", model, "-p", prompt, "-n", str(n_tokens), "-t", str(self.threads),
               "--temp", "0", "--ignore-eos", "-no-cnv", "-c", "512", "--seed", "0"] + _lora_args(lora, None)
        return parse_eval_speed(run(cmd))

    def imatrix(self, model: str, text_file: str, out: str, n_ctx: int, chunks: int) -> str:
        run([self.tools["llama-imatrix"], "-m", model, "-f", text_file, "-o", out, "-c", str(n_ctx), "-b", str(n_ctx),
             "--chunks", str(chunks), "-t", str(self.threads)])
        return out

    def quantize(self, src: str, out: str, ftype: str, imatrix: Optional[str] = None, pure: bool = False,
                 embedding_type: Optional[str] = None) -> str:
        cmd = [self.tools["llama-quantize"]]
        if imatrix:
            cmd += ["--imatrix", imatrix]
        if pure:
            cmd += ["--pure"]
        if embedding_type:
            cmd += ["--token-embedding-type", embedding_type, "--output-tensor-type", embedding_type]
        run(cmd + [src, out, ftype, str(self.threads)])
        return out


def _lora_args(lora: Optional[str], scale: Optional[float]) -> List[str]:
    if not lora:
        return []
    return ["--lora-scaled", f"{lora}:{scale}"] if scale is not None else ["--lora", lora]  # this version's form


# ---- our side --------------------------------------------------------------------------------------
def chunked_perplexity(model, tokens: Sequence[int], n_ctx: int, chunks: int, bos_id: Optional[int]) -> Dict[str, float]:
    """``llama-perplexity``'s estimate for ``model`` (a transformers causal LM) on ``tokens``: chunk i is
    ``tokens[i·n_ctx : (i+1)·n_ctx]`` with its first id replaced by ``bos_id`` (None: kept), and the
    next-token log-likelihood of positions ``n_ctx/2 .. n_ctx - 2`` is averaged. Returns ppl and the
    number of tokens scored."""
    import torch

    n_chunks = min(chunks, len(tokens) // n_ctx)
    if n_chunks < 1 or len(tokens) < 2 * n_ctx:
        raise ValueError(f"{len(tokens)} tokens: llama-perplexity needs at least {2 * n_ctx} for n_ctx={n_ctx}")
    first = n_ctx // 2
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_chunks):
            ids = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if bos_id is not None:
                ids[0] = bos_id
            x = torch.tensor([ids], device=device)
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
            targets = x[0, first + 1:]
            nll -= float(logp[first:n_ctx - 1].gather(1, targets.unsqueeze(1)).sum())
            count += n_ctx - first - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "chunks": n_chunks}
