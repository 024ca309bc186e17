"""Mean per-expert calibrated error after init, zero (QLoRA) vs CLoQ, at 2/3/4 bits, on tiny random
mixture-of-experts models built from transformers configs (mechanics only: random weights).

Each expert's error is ||X_e (W_e - Q_e - s·B_e·A_e)^T||^2 / ||X_e W_e^T||^2 in its own H_e (the
tokens the router sent to it); Q_e is the same GPTQ for both inits, so "zero" is the quantized-only
error. Calibration: blocks of the embedded CPython text through MiniLM's tokenizer.

    cloq bench moe_init [--archs qwen3_moe gpt_oss] [--samples 32] [--seq-len 64] [--rank 4]
    cloq bench moe_init --save DIR --archs gpt_oss   # DIR/<arch>: a model + tokenizer for `cloq prepare`
"""
from __future__ import annotations

import copy
import logging
import sys

import torch

import cloq_engine as ce
from cloq_engine import data

from . import common

# Tiny shapes: hidden 64, 8 experts (top-2) of intermediate 32, two blocks; vocab of MiniLM's tokenizer.
SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, num_experts_per_tok=2)


def tiny(arch: str, vocab: int):
    from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    configs = {
        "qwen3_moe": lambda: Qwen3MoeConfig(**SHAPES, vocab_size=vocab, moe_intermediate_size=32,
                                            intermediate_size=128, num_experts=8, head_dim=16,
                                            norm_topk_prob=True),
        "mixtral": lambda: MixtralConfig(**SHAPES, vocab_size=vocab, intermediate_size=32, num_local_experts=8),
        "olmoe": lambda: OlmoeConfig(**SHAPES, vocab_size=vocab, intermediate_size=32, num_experts=8),
        "gpt_oss": lambda: GptOssConfig(**SHAPES, vocab_size=vocab, intermediate_size=32, num_local_experts=8,
                                        head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"]),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[arch]())
    with torch.no_grad():  # gpt-oss starts its router and expert biases at zero: randomize like the tests
        for name, p in model.named_parameters():
            if p.dim() == 3 or "router" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.08)
            elif name.endswith("_bias"):
                p.normal_(0, 0.02)
    return model.eval()


def main(argv=None) -> int:
    ap = common.parser("moe_init", __doc__)
    ap.add_argument("--archs", nargs="+", default=["qwen3_moe", "gpt_oss"])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--save", default=None, help="only write each tiny model with MiniLM's tokenizer to SAVE/<arch>")
    ap.add_argument("--jsonl", default="results/moe_init.jsonl", help="append one JSON line per row as it is measured")
    args = ap.parse_args(argv)
    # quiet the engine's per-layer warnings for this run only: main() also runs in-process (cloq bench,
    # the test suite), where a level left at ERROR would hide every later warning
    engine_log = logging.getLogger("cloq_engine")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)
    try:
        return _run(args)
    finally:
        engine_log.setLevel(level)


def _run(args) -> int:
    tok = data.load_model()[1]
    if args.save:
        for arch in args.archs:
            tiny(arch, len(tok)).save_pretrained(f"{args.save}/{arch}")
            tok.save_pretrained(f"{args.save}/{arch}")
            print(f"wrote {args.save}/{arch}")
        return 0
    calib = data.token_blocks(data.calibration_paragraphs(), tok, args.seq_len, args.samples)
    print("| model | bits | experts | mean tokens/expert | zero (quantized only) | CLoQ | experts with CLoQ < zero |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        base = tiny(arch, len(tok))
        for bits in args.bits:
            qc = ce.QuantConfig(bits=bits, group_size=args.group_size, method="gptq")
            errs = {}
            for init in ("zero", "cloq"):
                lc = ce.LoRAConfig(rank=args.rank, alpha=args.rank, init=init)
                rep = ce.prepare_model(copy.deepcopy(base), qc, lc, calib=calib).cloq_report.experts
                errs[init] = rep
            n = len(errs["cloq"])
            zero = sum(r.err_init for r in errs["zero"]) / n
            cloq = sum(r.err_init for r in errs["cloq"]) / n
            below = sum(c.err_init < z.err_init for c, z in zip(errs["cloq"], errs["zero"]))
            tokens = sum(r.tokens for r in errs["cloq"]) / n
            print(f"| {arch} | {bits} | {n} | {tokens:.0f} | {zero:.4f} | {cloq:.4f} | {below}/{n} |", flush=True)
            common.append_jsonl(args.jsonl, {"arch": arch, "bits": bits, "experts": n, "mean_tokens": tokens,
                                             "zero": zero, "cloq": cloq, "cloq_below_zero": below,
                                             "rank": args.rank, "group_size": args.group_size,
                                             "samples": args.samples, "seq_len": args.seq_len})
    return 0


if __name__ == "__main__":
    sys.exit(main())
