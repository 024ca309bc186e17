"""Where the time goes on a causal LM on the CPU: the quantized SmolLM2-135M against its fp32 self.

    python benchmarks/profile_causal.py [--bits 2] [--group-size 64] [--rank 16] [--threads 2]
                                        [--seq 256] [--prompt 32] [--decode 16] [--repeats 3] [--json FILE]

Two workloads, each on the fp32 model and on the quantized one (RTN + zero init: the packed layout,
the LoRA shapes and so the compute are those of GPTQ + CLoQ at the same bits, group and rank; only
the values differ, and preparing takes seconds instead of minutes):

* a forward of ``--seq`` tokens (prefill, one sequence);
* greedy decoding of ``--decode`` tokens one at a time with the KV cache, after a ``--prompt``-token prompt.

For each: the median wall time of ``--repeats`` runs; the share of every layer shape (forward hooks
around each linear layer, so the shares include each call's own overhead; attention, norms, rotary,
embedding lookup and the cache are "the rest"); the top operators from ``torch.profiler``. Then the
cost of one call of a quantized 576 -> 576 layer at M = 1, split into the C++ kernel, the LoRA branch
and what is left (the Python and dispatch overhead), times the model's number of quantized layers.
Timings on a shared machine are noisy: say what else was running. ``--clock cpu`` (with
``--threads 1``) times with the process's CPU clock, which a machine shared with other jobs does not
stretch as it stretches wall time (a descheduled process spends no CPU time); wall time is the default.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def paired_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turn (A B A B ...) so that a machine whose speed
    drifts (other jobs) moves both alike; and the median of the pairwise ratios to the first."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocations, kernel selection
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
    first = next(iter(fns))
    return {k: {"median_s": statistics.median(v), "runs_s": v,
                "ratio_to_" + first: statistics.median(a / b for a, b in zip(v, times[first]))}
            for k, v in times.items()}


def layer_times(model, fn) -> dict:
    """Seconds spent inside each linear-layer shape during ``fn()``, and the call counts."""
    from cloq_engine.nn import QuantLoRALinear

    spent, calls, starts, hooks = defaultdict(float), defaultdict(int), {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, QuantLoRALinear)):
            key = ("head " if name == "lm_head" else "") + f"{m.in_features}->{m.out_features}"

            def pre(_m, _i, name=name):
                starts[name] = CLOCK()

            def post(_m, _i, _o, name=name, key=key):
                spent[key] += CLOCK() - starts.pop(name)
                calls[key] += 1

            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        t0 = CLOCK()
        fn()
        total = CLOCK() - t0
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


def workloads(model, ids, prompt, decode):
    @torch.no_grad()
    def forward():
        model(input_ids=ids, use_cache=False)

    def generate(n):
        @torch.no_grad()
        def run():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)

        return run

    # "prefill": the prompt's forward and the first token; decode - prefill: decode - 1 single-token steps
    return {"forward": forward, "prefill": generate(1), "decode": generate(decode)}


@torch.no_grad()
def one_call(layer, x, repeats: int = 2000) -> dict:
    """Microseconds per call at M = 1: the whole quantized layer, its C++ kernel alone, its LoRA branch
    alone, and the fp32 nn.Linear of the same shape."""
    from cloq_engine.backends import cpp_backend

    qw = layer.quantized_weight
    args = cpp_backend._weight_args(qw)
    dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
    y = torch.zeros(1, layer.out_features)

    def per_call(fn):
        for _ in range(50):
            fn()
        t0 = CLOCK()
        for _ in range(repeats):
            fn()
        return 1e6 * (CLOCK() - t0) / repeats

    return {
        "layer_us": per_call(lambda: layer(x)),
        "kernel_us": per_call(lambda: cpp_backend._C.qmm_(y, x, *args, 0)),
        "lora_us": per_call(lambda: torch.mm(x @ layer.lora_A.t(), layer.lora_B.t())),
        "fp32_linear_us": per_call(lambda: dense(x)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: the process's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import cloq_engine as ce
    from cloq_engine import data
    from cloq_engine.backends import active_backend

    fp, tok = data.load_model("smollm2")
    ids = data.token_blocks(data.heldout_paragraphs(), tok, args.seq, 1)[0]
    prompt = ids[:, : args.prompt]
    q = ce.prepare_model(copy.deepcopy(fp), ce.QuantConfig(bits=args.bits, group_size=args.group_size, method="rtn"),
                         ce.LoRAConfig(rank=args.rank, alpha=args.rank, init="zero"))
    layers = [m for m in q.modules() if isinstance(m, ce.QuantLoRALinear)]
    print(f"SmolLM2-135M, {len(layers)} quantized layers ({args.bits}-bit g{args.group_size}, rank {args.rank}), "
          f"backend {active_backend('cpu')}, {args.threads} threads, {args.clock} clock")
    result = {"settings": vars(args), "backend": active_backend("cpu"), "layers": len(layers)}
    models = {"fp32": fp, f"{args.bits}-bit": q}
    work = {label: workloads(model, ids, prompt, args.decode) for label, model in models.items()}
    timed = {w: paired_medians({label: work[label][w] for label in models}, args.repeats)
             for w in ("forward", "prefill", "decode")}
    for label, model in models.items():
        res = {}
        for wname, fn in work[label].items():
            t = timed[wname][label]["median_s"]
            per = layer_times(model, fn)
            res[wname] = {**timed[wname][label], "hooked": per, "top_ops": top_ops(fn)}
            step = ""
            if wname == "decode":  # single-token steps only: the prefill run taken away
                res[wname]["per_step_s"] = (t - res["prefill"]["median_s"]) / (args.decode - 1)
                step = f" ({1e3 * res[wname]['per_step_s']:.1f} ms a single-token step, prefill taken away)"
            print(f"\n{label} {wname}: median {t:.3f} s, x{timed[wname][label]['ratio_to_fp32']:.2f} fp32 (paired)"
                  + step)
            for k, v in per["by_shape"].items():
                print(f"  {k:>16s}  {v['s']:.3f} s  {100 * v['s'] / per['total_s']:5.1f}%  {v['calls']} calls "
                      f"({1e6 * v['s'] / v['calls']:.0f} us each)")
            print(f"  {'rest':>16s}  {per['rest_s']:.3f} s  {100 * per['rest_s'] / per['total_s']:5.1f}%  "
                  f"(attention, norms, rotary, cache, sampling)  [hooked run {per['total_s']:.3f} s]")
            print("  top ops: " + "; ".join(f"{o['op']} {o['self_ms']:.0f} ms/{o['calls']}" for o in res[wname]["top_ops"][:6]))
        result[label] = res
    by_shape = {}
    for layer in layers:
        key = f"{layer.in_features}->{layer.out_features}"
        if key not in by_shape:
            by_shape[key] = one_call(layer, torch.randn(1, layer.in_features))
    result["one_call_m1"] = by_shape
    print("\none call at M = 1 (us): layer | C++ kernel | LoRA branch | rest (Python, dispatch, casts) | fp32 nn.Linear")
    for k, v in by_shape.items():
        rest = v["layer_us"] - v["kernel_us"] - v["lora_us"]
        print(f"  {k:>10s}  {v['layer_us']:7.1f} | {v['kernel_us']:7.1f} | {v['lora_us']:6.1f} | {rest:6.1f} | "
              f"{v['fp32_linear_us']:7.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
