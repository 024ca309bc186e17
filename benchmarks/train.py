"""Model-level training step: Llama-3-8B-shaped decoder blocks, LoRA on all 7 linears, AdamW.

    cloq bench train [--variants w2,w3,w4,nf4,peft,peft-bf16,dense-fold,bnb] [--layers 2] [--batch 4]
                     [--seq 2048] [--steps 20] [--json PATH] [--jsonl PATH] [--smoke]

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` (hidden 4096, intermediate 14336,
32 heads, 8 KV heads, vocab 128256, ``--layers`` blocks) with random bf16 weights, no download.
Each variant trains ``--steps`` steps of next-token loss on random tokens (batch x seq), LoRA rank
16 (alpha 32) on q/k/v/o/gate/up/down, AdamW on the LoRA factors only:

* ``w2`` / ``w3`` / ``w4`` / ``nf4``: ours (``prepare_model``, RTN or NF4, zero init: the step
  cost does not depend on the init), group 128 (NF4: 64, as bitsandbytes);
* ``peft``: PEFT LoRA on the bf16 base, its default (fp32 adapters, x cast to fp32 in the branch);
* ``peft-bf16``: the same with ``autocast_adapter_dtype=False`` (bf16 adapters);
* ``dense-fold``: the bf16 base with our LoRA folding (``baselines.DenseFoldLoRALinear``), the limit
  the dequantization can only add to;
* ``bnb``: PEFT + bitsandbytes QLoRA (NF4, bf16 compute), when bitsandbytes imports.
A variant that cannot run here is reported as skipped, with the reason.

Reported per variant: the first step's wall time (compilation, any autotuning), the median step
time over the timed steps (CUDA events), the memory the built model holds, the peak while it was
built, and the training peak measured from after the build (each variant starts from a clean
allocator: the previous model, optimizer and our workspace freed, the cache emptied), and the loss
(finite, as a sanity check). ``lm_head_share`` times the LM head + loss alone (forward and backward
on random hidden states): at vocab 128256 it is a large part of a small model's step, the same for
every variant. A table on stdout, JSON with ``--json``, one line per variant as soon as it is
measured with ``--jsonl``. On a machine without CUDA it prints "no GPU" and exits 0; ``--smoke``
instead runs a tiny config on the CPU through the torch reference backend (no timing meaning).
"""
from __future__ import annotations

import gc
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

from . import baselines, common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
VARIANTS = ("w2", "w3", "w4", "nf4", "peft", "peft-bf16", "dense-fold", "bnb")

logger = logging.getLogger("benchmarks.train")


@dataclass
class Row:
    variant: str
    first_step_s: float
    median_step_ms: float
    peak_gib: float  # training peak, from after the build
    trainable_params: int
    loss: float
    device: str
    model_gib: float = float("nan")  # allocated once built
    build_peak_gib: float = float("nan")
    status: str = "ok"


def llama_config(args):
    from transformers import LlamaConfig

    if args.smoke:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=args.layers, vocab_size=256, max_position_embeddings=64)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=args.layers, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def _ours(bits: str):
    def build(model, args, dtype):
        import cloq_engine as ce

        nf4 = bits == "nf4"
        group = 32 if args.smoke else (64 if nf4 else 128)
        qc = ce.QuantConfig(bits=4 if nf4 else int(bits), group_size=group, method="nf4" if nf4 else "rtn")
        lc = ce.LoRAConfig(rank=RANK, alpha=ALPHA, init="zero", target_modules=TARGETS)
        return ce.prepare_model(model, qc, lc)
    return build


def _baseline(name: str):
    def build(model, args, dtype):
        if name == "bnb":
            return baselines.bnb_qlora(model, TARGETS, RANK, ALPHA, dtype)
        if name == "dense-fold":
            return baselines.dense_fold_model(model, TARGETS, RANK, ALPHA)
        return baselines.peft_lora(model, TARGETS, RANK, ALPHA, fp32_adapters=name == "peft")
    return build


BUILDERS = {"w2": _ours("2"), "w3": _ours("3"), "w4": _ours("4"), "nf4": _ours("nf4"),
            **{name: _baseline(name) for name in ("peft", "peft-bf16", "dense-fold", "bnb")}}


def build_model(variant: str, args, device, dtype):
    import torch
    from transformers import LlamaForCausalLM

    if variant not in BUILDERS:
        raise ValueError(f"--variants: unknown variant {variant!r}; choose from {VARIANTS}")
    torch.manual_seed(0)
    cfg = llama_config(args)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return BUILDERS[variant](model, args, dtype)


def clean_allocator(cuda: bool) -> None:
    """Free what an earlier variant left: Python garbage, our dequant workspace, the CUDA cache."""
    import torch

    from cloq_engine.backends import workspace

    gc.collect()
    workspace.clear()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(variant: str, args, device) -> Row:
    import torch

    cuda = device == "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    clean_allocator(cuda)
    model = build_model(variant, args, device, dtype)
    if cuda:
        torch.cuda.synchronize()
        model_gib = torch.cuda.memory_allocated() / 2**30
        build_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()  # the training peak counts from here
    else:
        model_gib = build_peak = float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    times, loss = step_times_ms(step, args.steps, cuda)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    row = Row(variant, first, statistics.median(times), peak, sum(p.numel() for p in params), float(loss.detach()),
              torch.cuda.get_device_name() if cuda else "cpu", model_gib, build_peak)
    del model, opt, params, loss
    clean_allocator(cuda)
    return row


def step_times_ms(step: Callable[[], object], n: int, cuda: bool):
    """(milliseconds of each of ``n`` calls of ``step``, what the last returned): CUDA events on a
    GPU (the GPU's time, not the launch queue's), the wall clock on the CPU."""
    import torch

    times: List[float] = []
    out = None
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            out = step()
            times.append(1e3 * (time.perf_counter() - t))
    return times, out


def lm_head_share(args, device) -> dict:
    """Median ms of the LM head + loss alone, forward and backward, on random hidden states."""
    import torch
    import torch.nn.functional as F

    cfg = llama_config(args)
    cuda = device == "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    clean_allocator(cuda)
    g = torch.Generator(device="cpu").manual_seed(2)
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype).requires_grad_(False)
    h = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=g).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, cfg.vocab_size, (args.batch * args.seq,), generator=g).to(device)

    def step():
        h.grad = None
        logits = head(h).float()
        F.cross_entropy(logits.view(-1, cfg.vocab_size), labels).backward()

    step()
    times, _ = step_times_ms(step, max(args.steps, 1), cuda)
    del head, h, labels
    clean_allocator(cuda)
    return {"lm_head_loss_ms": statistics.median(times), "vocab": cfg.vocab_size, "tokens": args.batch * args.seq}


def available(variant: str) -> Optional[str]:
    """None if the variant can run here, else why not."""
    return baselines.availability(variant)


def print_table(rows, args) -> None:
    shape = f"{args.layers} block(s), batch {args.batch}x{args.seq}, LoRA r{RANK} on {len(TARGETS)} linears, AdamW"
    print(f"training step: {shape}; device {rows[0].device if rows else '?'}")
    print(f"{'variant':10} {'median ms':>10} {'peak GiB':>9} {'model GiB':>9} {'build GiB':>9} {'first step s':>13} "
          f"{'trainable':>11} {'loss':>8}")
    for r in rows:
        print(f"{r.variant:10} {r.median_step_ms:10.2f} {r.peak_gib:9.2f} {r.model_gib:9.2f} {r.build_peak_gib:9.2f} "
              f"{r.first_step_s:13.2f} {r.trainable_params:11d} {r.loss:8.3f}")


def main(argv=None) -> int:
    p = common.parser("train", __doc__)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, from {VARIANTS}")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--jsonl", default=None, help="append one JSON line per variant as soon as it is measured")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (torch backend): tests the script")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {VARIANTS}")

    if args.smoke:
        os.environ["CLOQ_BACKEND"] = "torch"
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 2, 0
        device = "cpu"
        variants = [v for v in variants if v != "bnb"]
    else:
        import torch

        if not torch.cuda.is_available():
            print("no GPU: CUDA is not available on this machine; nothing to benchmark")
            return 0
        device = "cuda"
    rows = []

    def emit(record: dict) -> None:
        common.append_jsonl(args.jsonl, record)

    for v in variants:
        why = available(v)
        if why:
            logger.info("skipping %s: %s", v, why)
            emit({"variant": v, "status": "skipped", "reason": why})
            continue
        logger.info("running %s", v)
        rows.append(run_variant(v, args, device))
        emit(asdict(rows[-1]))
    share = lm_head_share(args, device)
    emit({"variant": "lm-head+loss", **share})
    print_table(rows, args)
    print(f"LM head + loss alone (every variant pays it): {share['lm_head_loss_ms']:.2f} ms")
    if args.json:
        common.write_json(args.json, {"args": vars(args), "rows": [asdict(r) for r in rows], "lm_head": share})
    return 0


if __name__ == "__main__":
    sys.exit(main())
