"""CPU figures of a prepared causal LM against its full-precision model, in one run.

    cloq bench causal_cpu CHECKPOINT [--threads 2] [--repeats 5] [--seq-len 256] [--batch 4]
        [--train-seq 128] [--decode-tokens 32] [--out results/causal_cpu.json]

Each measurement is taken for both sides in alternation (A B A B ...), ``--repeats`` times, and the
medians compared, so that a load that comes and goes on a shared machine hits both alike:

* forward: one ``(1, seq-len)`` forward, the dense fp32 model (with PEFT LoRA of the same rank and
  targets, as it would train) against the checkpoint (packed base + LoRA);
* train step: forward + backward + AdamW on ``(batch, train-seq)`` tokens, PEFT LoRA (fp32 adapters on
  the fp32 model) against the checkpoint's LoRA factors;
* decode: greedy ``generate`` of ``decode-tokens`` tokens after a 32-token prompt with the KV cache,
  tokens/s, the plain fp32 model against the checkpoint.

Writes one JSON line per measurement to ``--out`` as it goes (``.jsonl``) and the table last.
Timings are never asserted anywhere; say what else ran on the machine when you quote them.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(prog="cloq bench causal_cpu", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a prepared cloq checkpoint of a causal LM")
    p.add_argument("--base", default=None, help="its full-precision model (default: the recorded one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out", default="results/causal_cpu.jsonl")
    return p.parse_args(argv)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch

    from cloq_engine import data
    from cloq_engine.backends import active_backend
    from cloq_engine.hf import load_pretrained

    torch.set_num_threads(args.threads)
    ours = load_pretrained(args.checkpoint).eval()
    cfg = ours.cloq_config
    qcfg = ours.config.quantization_config
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    base_dir = args.base or qcfg.get("base_model")
    if not base_dir:
        raise SystemExit("cloq bench causal_cpu: error: the full-precision model is not recorded: pass --base DIR")
    dense, tok = data.load_model(base_dir)
    lc = cfg["lora"]
    targets = sorted({t.rsplit(".", 1)[-1] for t in cfg["targets"]})
    pl = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(r=lc["rank"], lora_alpha=lc["alpha"],
                                                                     target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.seq_len), generator=g)
    batch = torch.randint(3, vocab, (args.batch, args.train_seq), generator=g)
    prompt = data.token_blocks(data.heldout_paragraphs(), tok, 32, 1)[0]
    records = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def forward(model):
        with torch.no_grad():
            model(input_ids=ids)

    def step_of(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            model.train()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def decode(model):
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.decode_tokens,
                           min_new_tokens=args.decode_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id or tok.eos_token_id)

    pairs = [
        ("forward (1 x %d tokens), s" % args.seq_len, "dense fp32 + PEFT LoRA", lambda: forward(pl),
         lambda: forward(ours)),
        ("train step (%d x %d tokens), s" % (args.batch, args.train_seq), "PEFT LoRA on fp32",
         step_of(pl), step_of(ours)),
        ("decode (%d tokens after 32), s" % args.decode_tokens, "dense fp32", lambda: decode(dense),
         lambda: decode(ours)),
    ]
    backend = active_backend(torch.device("cpu"))
    for name, peer, a, b in pairs:
        a(), b()  # warm-up: first-call allocations, the extension's thread pool
        ta, tb = [], []
        for _ in range(args.repeats):
            ta.append(_timed(a))
            tb.append(_timed(b))
        rec = {"measurement": name, "peer": peer, "peer_s": statistics.median(ta), "ours_s": statistics.median(tb),
               "peer_all": ta, "ours_all": tb, "threads": args.threads, "backend": backend,
               "checkpoint": args.checkpoint}
        rec["ratio"] = rec["ours_s"] / rec["peer_s"]
        records.append(rec)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"  {name}: {peer} {rec['peer_s']:.3f} | ours {rec['ours_s']:.3f} | ratio {rec['ratio']:.2f}",
              file=sys.stderr)
    q = cfg["quant"]
    print(f"\n{q['bits']}-bit {q['method']} g{q['group_size']} + LoRA r{lc['rank']} ({backend} backend, "
          f"{args.threads} threads, medians of {args.repeats}, pairs alternated)")
    print("| measurement | peer | peer | ours | ours / peer |\n|---|---|---|---|---|")
    for r in records:
        print(f"| {r['measurement']} | {r['peer']} | {r['peer_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.2f}x |")
    dec = records[-1]
    print(f"decode tokens/s: peer {args.decode_tokens / dec['peer_s']:.1f}, ours {args.decode_tokens / dec['ours_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
