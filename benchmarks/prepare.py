"""prepare_model benchmark: seconds per block by stage (capture, GPTQ, init, forward, report).

A Llama-shaped model with random weights (synthetic, says so) and random calibration tokens:

* ``--shape small`` (default on a CPU): hidden 512, MLP 1408, GQA 8/2 heads, 8 x 256 tokens.
* ``--shape llama3-8b`` (the target on a GPU): hidden 4096, MLP 14336, GQA 32/8 heads, vocab
  128256, 128 x 2048 tokens, bf16.

2-bit GPTQ g128 + CLoQ rank 64 unless told otherwise. With ``--runs 2`` (default on a GPU) the
first run pays Triton's compile/autotune and the table shows the second.

    cloq bench prepare [--shape small|llama3-8b] [--blocks 4] [--samples N] [--seq-len T]
        [--bits 2] [--rank 64] [--one-pass] [--report sampled|exact|off] [--out results/prepare.json]
"""
from __future__ import annotations

import resource
import sys
import time

import torch

import cloq_engine as ce

from . import common

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=1024, samples=8, seq_len=256),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, samples=128, seq_len=2048),
}


def build_model(shape: str, blocks: int, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = {k: v for k, v in SHAPES[shape].items() if k not in ("samples", "seq_len")}
    config = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=8192, **s)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process peak RSS


def one_run(args, device, dtype):
    model = build_model(args.shape, args.blocks, dtype, device)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=g) for _ in range(args.samples)]
    qc = ce.QuantConfig(bits=args.bits, group_size=args.group_size, method="gptq")
    lc = ce.LoRAConfig(rank=args.rank, alpha=args.rank, init=args.init)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    ce.prepare_model(model, qc, lc, calib=calib, true_sequential=not args.one_pass, batch_size=args.batch_size,
                     report=args.report)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return model.cloq_report, wall, peak_memory_gib(device)


def main(argv=None) -> int:
    p = common.parser("prepare", __doc__)
    p.add_argument("--shape", choices=tuple(SHAPES), default=None)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--init", default="cloq")
    p.add_argument("--one-pass", action="store_true", help="no true-sequential inside a block")
    p.add_argument("--report", default="sampled", choices=("sampled", "exact", "off"))
    p.add_argument("--runs", type=int, default=None, help="report the last of N runs (default: 2 on a GPU, 1 on a CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/prepare.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.shape = args.shape or ("llama3-8b" if device.type == "cuda" else "small")
    args.samples = args.samples or SHAPES[args.shape]["samples"]
    args.seq_len = args.seq_len or SHAPES[args.shape]["seq_len"]
    runs = args.runs or (2 if device.type == "cuda" else 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; Llama-shaped '{args.shape}' x {args.blocks} blocks, random weights and tokens (synthetic); "
          f"{args.bits}-bit GPTQ g{args.group_size} + {args.init} r{args.rank}; {args.samples} x {args.seq_len} tokens, "
          f"batches of {args.batch_size}; true-sequential {'off' if args.one_pass else 'on'}; report {args.report}")
    for r in range(runs):
        rep, wall, peak = one_run(args, device, dtype)
        print(f"run {r + 1}/{runs}: {wall:.1f} s", flush=True)

    cols = ("capture_s", "quantize_s", "init_s", "forward_s", "report_s", "total_s")
    print(f"\n{'block':>5} " + " ".join(f"{c[:-2]:>9}" for c in cols))
    rows = []
    for b in rep.blocks:
        row = {"block": b.index, **{c: getattr(b, c) for c in cols}}
        rows.append(row)
        print(f"{b.index:>5} " + " ".join(f"{row[c]:9.2f}" for c in cols))
    per_block = sum(r["total_s"] for r in rows) / max(1, len(rows))
    first_capture = rep.capture_s - sum(r["capture_s"] + r["forward_s"] for r in rows)
    print(f"\nper block {per_block:.2f} s (mean); embeddings + capture of block inputs {first_capture:.2f} s; "
          f"whole prepare {wall:.1f} s; peak {'GPU' if device.type == 'cuda' else 'RSS'} memory {peak:.2f} GiB")
    mean_q = sum(r.err_quant for r in rep.layers) / len(rep.layers)
    mean_i = sum(r.err_init for r in rep.layers) / len(rep.layers)
    print(f"mean relative calibrated error: quantized {mean_q:.4f}, after init {mean_i:.4f}")
    common.write_json(args.out, {"device": name, "args": vars(args), "wall_s": wall, "per_block_s": per_block,
                                 "peak_memory_gib": peak, "blocks": rows, "layers": [r.__dict__ for r in rep.layers]},
                      indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
