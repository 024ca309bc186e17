"""CPU figures of a quantized causal LM against its full-precision model, and where the time goes.

    cloq bench causal_cpu [CHECKPOINT] [--base DIR] [--bits 2] [--group-size 64] [--rank 16]
        [--threads 2] [--repeats 5] [--clock wall|cpu] [--seq-len 256] [--batch 4] [--train-seq 128]
        [--prompt 32] [--decode-tokens 32] [--only forward,prefill,decode,train] [--profile]
        [--out results/causal_cpu.jsonl] [--json FILE]

The quantized side is CHECKPOINT (a prepared cloq checkpoint; its full-precision model is the one
it records, or ``--base``) or, without one, the embedded SmolLM2-135M prepared here with RTN + zero
init at ``--bits``/``--group-size``/``--rank``: the packed layout, the LoRA shapes and so the
compute of GPTQ + CLoQ at those settings (only the values differ, and preparing takes seconds).

Each measurement is taken for both sides in alternation (A B A B ...), ``--repeats`` times, and the
medians compared (with the median of the pairwise ratios), so that a load that comes and goes on a
shared machine hits both alike:

* forward: ``(1, seq-len)`` tokens of held-out text, no cache: the fp32 model against ours;
* prefill: the ``--prompt``-token prompt's forward and the first token (``generate``, one token);
* decode: greedy ``generate`` of ``--decode-tokens`` tokens after the prompt with the KV cache,
  tokens/s, and one single-token step (decode minus prefill, over the tokens after the first);
* train step: forward + backward + AdamW on ``(batch, train-seq)`` random tokens, PEFT LoRA of the
  same rank and targets on the fp32 model (fp32 adapters) against our LoRA factors.

``--profile`` adds, for forward, prefill and decode on both sides: the share of every linear-layer
shape (forward hooks around each linear layer, so the shares include each call's own overhead;
attention, norms, rotary, embedding lookup and the cache are "the rest"), the top operators from
``torch.profiler``, and the cost of one call of each quantized layer shape at M = 1, split into the
C++ kernel, the LoRA branch and what is left (the Python and dispatch overhead).

``--clock cpu`` (with ``--threads 1``) times with the process's CPU clock, which a machine shared
with other jobs does not stretch as it stretches wall time (a descheduled process spends no CPU
time); wall time is the default. One JSON line per measurement goes to ``--out`` as it is measured,
everything to ``--json`` at the end, the table last. Timings are never asserted anywhere; say
what else ran on the machine when you quote them.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from collections import defaultdict

from . import common

MEASUREMENTS = ("forward", "prefill", "decode", "train")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def parse_args(argv):
    p = common.parser("causal_cpu", __doc__)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a prepared cloq checkpoint of a causal LM (default: SmolLM2-135M quantized here)")
    p.add_argument("--base", default=None, help="its full-precision model (default: the recorded one)")
    p.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="without a checkpoint: the RTN width")
    p.add_argument("--group-size", type=int, default=64, help="without a checkpoint: the group size")
    p.add_argument("--rank", type=int, default=16, help="without a checkpoint: the LoRA rank")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="cpu: the process's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma separated, from {MEASUREMENTS}")
    p.add_argument("--profile", action="store_true", help="also: per layer shape, top operators, one call at M = 1")
    p.add_argument("--out", default="results/causal_cpu.jsonl", help="one JSON line per measurement, as it goes")
    p.add_argument("--json", default=None, help="also write every figure here at the end")
    args = p.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in args.only if m not in MEASUREMENTS]
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {MEASUREMENTS}")
    for name in ("repeats", "seq_len", "batch", "train_seq", "prompt", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2 (one step after the first token)")
    return args


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------
def load_sides(args):
    """(fp32 model, tokenizer, our model, a description of ours, LoRA rank, alpha, target suffixes)."""
    import cloq_engine as ce
    from cloq_engine import data

    if args.checkpoint:
        ours = ce.load_pretrained(args.checkpoint).eval()
        qcfg = ours.config.quantization_config
        qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
        base_dir = args.base or qcfg.get("base_model")
        if not base_dir:
            raise SystemExit("cloq bench causal_cpu: error: the full-precision model is not recorded: pass --base DIR")
        dense, tok = data.load_model(base_dir)
    else:
        dense, tok = data.load_model(args.base or "smollm2")
        ours = ce.prepare_model(copy.deepcopy(dense), ce.QuantConfig(bits=args.bits, group_size=args.group_size,
                                                                     method="rtn"),
                                ce.LoRAConfig(rank=args.rank, alpha=args.rank, init="zero")).eval()
    cfg = ours.cloq_config
    q, lc = cfg["quant"], cfg["lora"]
    what = f"{q['bits']}-bit {q['method']} g{q['group_size']} + LoRA r{lc['rank']}"
    targets = sorted({t.rsplit(".", 1)[-1] for t in cfg["targets"]})
    return dense.eval(), tok, ours, what, lc["rank"], lc["alpha"], targets


def inference(model, ids, prompt, decode_tokens: int, pad_id: int) -> dict:
    """The inference workloads of one model: forward, prefill, decode (each a no-argument call)."""
    import torch

    @torch.no_grad()
    def forward():
        model(input_ids=ids, use_cache=False)

    def generate(n):
        @torch.no_grad()
        def run():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=pad_id)
        return run

    return {"forward": forward, "prefill": generate(1), "decode": generate(decode_tokens)}


def train_step(model, batch):
    """One forward + backward + AdamW step on ``batch`` over the trainable parameters of ``model``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
    return step


# ---------------------------------------------------------------------------------------------
# Where the time goes (--profile)
# ---------------------------------------------------------------------------------------------
def layer_times(model, fn, clock) -> dict:
    """Seconds spent inside each linear-layer shape during ``fn()``, and the call counts."""
    import torch

    from cloq_engine.nn import QuantLoRALinear

    spent, calls, starts, hooks = defaultdict(float), defaultdict(int), {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, QuantLoRALinear)):
            key = ("head " if name.endswith("lm_head") else "") + f"{m.in_features}->{m.out_features}"

            def pre(_m, _i, name=name):
                starts[name] = clock()

            def post(_m, _i, _o, name=name, key=key):
                spent[key] += clock() - starts.pop(name)
                calls[key] += 1

            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        t0 = clock()
        fn()
        total = clock() - t0
    finally:
        for h in hooks:
            h.remove()
    return {"total_s": total, "by_shape": {k: {"s": spent[k], "calls": calls[k]} for k in sorted(spent)},
            "rest_s": total - sum(spent.values())}


def top_ops(fn, n: int = 8) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in rows]


def one_call(layer, clock, repeats: int = 2000) -> dict:
    """Microseconds per call at M = 1 (cache-hot): the whole quantized layer, its C++ kernel alone
    (None on another backend), its LoRA branch alone, and the fp32 nn.Linear of the same shape."""
    import torch

    from cloq_engine.backends import active_backend, cpp_backend

    x = torch.randn(1, layer.in_features)
    dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    y = torch.zeros(1, layer.out_features)

    @torch.no_grad()
    def per_call(fn):
        for _ in range(50):
            fn()
        t0 = clock()
        for _ in range(repeats):
            fn()
        return 1e6 * (clock() - t0) / repeats

    kernel = None
    if active_backend("cpu") == "cpp":
        args = cpp_backend._weight_args(layer.quantized_weight)
        kernel = per_call(lambda: cpp_backend._C.qmm_(y, x, *args, 0))
    return {"layer_us": per_call(lambda: layer(x)), "kernel_us": kernel,
            "lora_us": per_call(lambda: torch.mm(x @ layer.lora_A.t(), layer.lora_B.t())),
            "fp32_linear_us": per_call(lambda: dense(x))}


def print_profile(side: str, wname: str, per: dict, ops: list) -> None:
    print(f"\n{side} {wname}: hooked run {per['total_s']:.3f} s")
    for k, v in per["by_shape"].items():
        print(f"  {k:>16s}  {v['s']:.3f} s  {100 * v['s'] / per['total_s']:5.1f}%  {v['calls']} calls "
              f"({1e6 * v['s'] / v['calls']:.0f} us each)")
    print(f"  {'rest':>16s}  {per['rest_s']:.3f} s  {100 * per['rest_s'] / per['total_s']:5.1f}%  "
          "(attention, norms, rotary, cache, sampling)")
    print("  top ops: " + "; ".join(f"{o['op']} {o['self_ms']:.0f} ms/{o['calls']}" for o in ops[:6]))


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch

    import cloq_engine as ce
    from cloq_engine import data
    from cloq_engine.backends import active_backend

    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    dense, tok, ours, what, rank, alpha, targets = load_sides(args)
    backend = active_backend("cpu")
    ids = data.token_blocks(data.heldout_paragraphs(), tok, args.seq_len, 1)[0]
    prompt = data.token_blocks(data.heldout_paragraphs(), tok, args.prompt, 1)[0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    work = {"fp32": inference(dense, ids, prompt, args.decode_tokens, pad_id),
            "ours": inference(ours, ids, prompt, args.decode_tokens, pad_id)}
    pairs = {  # measurement -> (label, peer description, peer fn, our fn)
        "forward": (f"forward (1 x {args.seq_len} tokens), s", "dense fp32", work["fp32"]["forward"],
                    work["ours"]["forward"]),
        "prefill": (f"prefill ({args.prompt}-token prompt + 1 token), s", "dense fp32", work["fp32"]["prefill"],
                    work["ours"]["prefill"]),
        "decode": (f"decode ({args.decode_tokens} tokens after {args.prompt}), s", "dense fp32",
                   work["fp32"]["decode"], work["ours"]["decode"]),
    }
    if "train" in args.only:
        pl = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(r=rank, lora_alpha=alpha,
                                                                         target_modules=targets, lora_dropout=0.0))
        batch = torch.randint(3, dense.config.vocab_size, (args.batch, args.train_seq),
                              generator=torch.Generator().manual_seed(0))
        pairs["train"] = (f"train step ({args.batch} x {args.train_seq} tokens), s", "PEFT LoRA on fp32",
                          train_step(pl, batch), train_step(ours, batch))
    records = {}
    for key in [m for m in MEASUREMENTS if m in args.only]:
        label, peer, a, b = pairs[key]
        t = common.alternated({"peer": a, "ours": b}, args.repeats, clock=clock)
        rec = {"measurement": label, "peer": peer, "peer_s": t["peer"]["median_s"], "ours_s": t["ours"]["median_s"],
               "ratio": t["ours"]["median_s"] / t["peer"]["median_s"], "paired_ratio": t["ours"]["ratio_to_peer"],
               "peer_all": t["peer"]["runs_s"], "ours_all": t["ours"]["runs_s"], "threads": args.threads,
               "clock": args.clock, "backend": backend, "model": what, "checkpoint": args.checkpoint}
        records[key] = rec
        common.append_jsonl(args.out, rec)
        print(f"  {label}: {peer} {rec['peer_s']:.3f} | ours {rec['ours_s']:.3f} | ratio {rec['ratio']:.2f}",
              file=sys.stderr)
    result = {"settings": vars(args), "backend": backend, "model": what, "pairs": records}
    if args.profile:
        profile = {}
        for side, model in (("fp32", dense), ("ours", ours)):
            for wname in ("forward", "prefill", "decode"):
                if wname in args.only:
                    fn = work[side][wname]
                    per, ops = layer_times(model, fn, clock), top_ops(fn)
                    profile[f"{side} {wname}"] = {"hooked": per, "top_ops": ops}
                    print_profile(side, wname, per, ops)
        shapes = {}
        for layer in (m for m in ours.modules() if isinstance(m, ce.QuantLoRALinear)):
            key = f"{layer.in_features}->{layer.out_features}"
            if key not in shapes:
                shapes[key] = one_call(layer, clock)
        profile["one_call_m1"] = shapes
        result["profile"] = profile
        print("\none call at M = 1 (us): layer | C++ kernel | LoRA branch | rest (Python, dispatch, casts) | "
              "fp32 nn.Linear")
        for k, v in shapes.items():
            kern = "n/a" if v["kernel_us"] is None else f"{v['kernel_us']:7.1f}"
            rest = v["layer_us"] - (v["kernel_us"] or 0.0) - v["lora_us"]
            print(f"  {k:>10s}  {v['layer_us']:7.1f} | {kern:>7s} | {v['lora_us']:6.1f} | {rest:6.1f} | "
                  f"{v['fp32_linear_us']:7.1f}")
    print(f"\n{what} ({backend} backend, {args.threads} threads, {args.clock} clock, medians of {args.repeats}, "
          "pairs alternated)")
    print("| measurement | peer | peer | ours | ours / peer | paired ratio |\n|---|---|---|---|---|---|")
    for r in records.values():
        print(f"| {r['measurement']} | {r['peer']} | {r['peer_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.2f}x | "
              f"{r['paired_ratio']:.2f}x |")
    if "decode" in records:
        dec = records["decode"]
        line = f"decode tokens/s: peer {args.decode_tokens / dec['peer_s']:.1f}, ours {args.decode_tokens / dec['ours_s']:.1f}"
        if "prefill" in records:
            steps = {s: (dec[f"{s}_s"] - records["prefill"][f"{s}_s"]) / (args.decode_tokens - 1) for s in ("peer", "ours")}
            result["single_token_step_s"] = steps
            line += f"; a single-token step (prefill taken away): peer {1e3 * steps['peer']:.1f} ms, " \
                    f"ours {1e3 * steps['ours']:.1f} ms"
        print(line)
    if args.json:
        print(f"wrote {common.write_json(args.json, result, indent=2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
