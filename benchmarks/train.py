"""Model-level training step: Llama-3-8B-shaped decoder blocks, LoRA on all 7 linears, AdamW.

    cloq bench train [--variants w2,w3,w4,nf4,peft,bnb] [--layers 2] [--batch 4] [--seq 2048]
                     [--steps 20] [--json PATH] [--smoke]

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` (hidden 4096, intermediate 14336,
32 heads, 8 KV heads, vocab 128256, ``--layers`` blocks) with random bf16 weights, no download.
Each variant trains ``--steps`` steps of next-token loss on random tokens (batch x seq), LoRA rank
16 (alpha 32) on q/k/v/o/gate/up/down, AdamW on the LoRA factors only:

* ``w2`` / ``w3`` / ``w4`` / ``nf4``: ours (``prepare_model``, RTN or NF4, zero init: the step
  cost does not depend on the init), group 128 (NF4: 64, as bitsandbytes);
* ``peft``: PEFT LoRA on the bf16 base;
* ``bnb``: PEFT + bitsandbytes QLoRA (NF4, bf16 compute), when bitsandbytes imports.

Reported per variant: the first step's wall time (compilation, any autotuning), the median step
time over the timed steps (CUDA events), peak memory (``torch.cuda.max_memory_allocated``), and the
loss (finite, as a sanity check). A table on stdout, JSON with ``--json``. On a machine without
CUDA it prints "no GPU" and exits 0; ``--smoke`` instead runs a tiny config on the CPU through
the torch reference backend (no timing meaning), to test the script itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
VARIANTS = ("w2", "w3", "w4", "nf4", "peft", "bnb")

logger = logging.getLogger("benchmarks.train")


@dataclass
class Row:
    variant: str
    first_step_s: float
    median_step_ms: float
    peak_gib: float
    trainable_params: int
    loss: float
    device: str


def llama_config(args):
    from transformers import LlamaConfig

    if args.smoke:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=args.layers, vocab_size=256, max_position_embeddings=64)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=args.layers, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def build_model(variant: str, args, device, dtype):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    if variant in ("w2", "w3", "w4", "nf4"):
        import cloq_engine as ce

        nf4 = variant == "nf4"
        group = 32 if args.smoke else (64 if nf4 else 128)
        qc = ce.QuantConfig(bits=4 if nf4 else int(variant[1]), group_size=group, method="nf4" if nf4 else "rtn")
        lc = ce.LoRAConfig(rank=RANK, alpha=ALPHA, init="zero", target_modules=TARGETS)
        model = ce.prepare_model(model, qc, lc)
    elif variant == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    elif variant == "bnb":
        model = _to_bnb_qlora(model, dtype)
    else:
        raise ValueError(f"--variants: unknown variant {variant!r}; choose from {VARIANTS}")
    return model


def _to_bnb_qlora(model, dtype):
    """Swap the target linears for bitsandbytes NF4 ``Linear4bit`` (quantized on the GPU), then PEFT."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q.to(child.weight.device))
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))


def run_variant(variant: str, args, device) -> Row:
    import torch

    cuda = device == "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(variant, args, device, dtype)
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
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            loss = step()
            times.append(1e3 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    row = Row(variant, first, statistics.median(times), peak, sum(p.numel() for p in params), float(loss.detach()),
              torch.cuda.get_device_name() if cuda else "cpu")
    del model, opt, params
    gc.collect()
    return row


def available(variant: str) -> Optional[str]:
    """None if the variant can run here, else why not."""
    if variant == "bnb":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # not installed, or no CUDA build
            return f"bitsandbytes unavailable ({type(e).__name__})"
    return None


def print_table(rows, args) -> None:
    shape = f"{args.layers} block(s), batch {args.batch}x{args.seq}, LoRA r{RANK} on {len(TARGETS)} linears, AdamW"
    print(f"training step: {shape}; device {rows[0].device if rows else '?'}")
    print(f"{'variant':8} {'median ms':>10} {'peak GiB':>9} {'first step s':>13} {'trainable':>11} {'loss':>8}")
    for r in rows:
        print(f"{r.variant:8} {r.median_step_ms:10.2f} {r.peak_gib:9.2f} {r.first_step_s:13.2f} "
              f"{r.trainable_params:11d} {r.loss:8.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, from {VARIANTS}")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
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
    for v in variants:
        why = available(v)
        if why:
            logger.info("skipping %s: %s", v, why)
            continue
        logger.info("running %s", v)
        rows.append(run_variant(v, args, device))
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
