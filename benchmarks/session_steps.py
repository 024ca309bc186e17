"""The steps of ``session.py``: what a GPU call measures, in order, with estimates (H100/H200, JIT
included), registered in ``session_registry.STEPS``. Plans only build closures; nothing heavy is
imported until a measurement runs.

quick (one call, <= 6 min): env and the two ceilings; bf16 correctness of every width against the
reference; decode at M = 1 with rotated weights against tinygemm / GemLite / bitsandbytes; the
4096 <-> 14336 layer steps at M = 8192 and the dequant kernel alone; the 2-block Llama-3-8B-shaped
model step against PEFT (both adapter dtypes), the dense base with our fold and PEFT + bitsandbytes;
one prepare block. full-N (one call each, < 8 min): the GPU test suite, the kernel sweep, the other
widths of the model step, a larger prepare, config tuning.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from . import common
from .session_registry import Context, Measurement, Skip, step

ROOT = Path(__file__).resolve().parent.parent
RANK, SCALING = 16, 2.0
BUDGETS = {"quick": 320, **{f"full-{i}": 450 for i in range(1, 7)}}  # seconds; +20 s grace, then killed
NOMINAL = {"copy_bytes_per_s": 3.0e12, "bf16_flops": 700e12}  # used only when the ceilings step failed
VARIANTS = ("2", "3", "4", "nf4")

# CLOQ_SESSION_SMOKE=1 (with TRITON_INTERPRET=1): every measurement's code on the CPU at tiny sizes, in
# float16 (the interpreter's bf16 arithmetic is wrong), timed by one call: tests the session itself.
SMOKE = os.environ.get("CLOQ_SESSION_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
_SMALL = {4096: 96, 14336: 128, 1001: 40, 8192: 24, 2048: 20, 64: 17}  # labels keep the real sizes; idempotent


def size(n: int) -> int:
    return _SMALL.get(n, n) if SMOKE else n


def act_dtype():
    import torch

    return torch.float16 if SMOKE else torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Helpers (imported lazily: the plans must build on a machine without CUDA)
# ---------------------------------------------------------------------------------------------
def _cuda():
    import torch

    if not (SMOKE or torch.cuda.is_available()):
        raise Skip("no CUDA device")
    return torch


def _sync(torch) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def packed_weight(variant: str, out_f: int, in_f: int, seed: int = 0):
    """A random valid packed weight on the GPU (group 128; NF4 64, as bitsandbytes)."""
    _cuda()
    return common.random_packed_weight(variant, size(in_f), size(out_f), DEVICE, group=32 if SMOKE else None,
                                       seed=seed)


def randn(*shape, dtype, seed: int = 1, scale: float = 1.0):
    """Random values (never zeros: they hide unwritten outputs), sizes mapped by :func:`size`."""
    torch = _cuda()
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (scale * torch.randn(*(size(n) for n in shape), generator=g, device=DEVICE)).to(dtype)


def rel_err(a, ref) -> float:
    """‖a − ref‖ / ‖ref‖ in float64 (NaN stays NaN: it never passes)."""
    d = (a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)
    return float(d)


def bench_us(fn, graph: bool = False) -> float:
    """Median microseconds: CUDA-graph replays for small launches (no launch gaps), else do_bench."""
    _cuda()
    return common.bench_us(fn, graph=graph, smoke=SMOKE, warmup=10, rep=50 if graph else 60)


def ceilings(ctx: Context) -> dict:
    """The measured ceilings of this call (from the env step), else nominal ones (marked)."""
    path = ctx.out / "ceilings.json"
    try:
        return {**json.loads(path.read_text()), "nominal": False}
    except (OSError, ValueError):
        return {**NOMINAL, "nominal": True}


def copies_for(nbytes: int) -> int:
    return 2 if SMOKE else common.copies_for(nbytes)


def _name(variant: str) -> str:
    return variant if variant == "nf4" else f"w{variant}"


def _env(var: str, value):
    """Set (or, with None, unset) an environment variable; returns the previous value."""
    old = os.environ.get(var)
    if value is None:
        os.environ.pop(var, None)
    else:
        os.environ[var] = value
    return old


# ---------------------------------------------------------------------------------------------
# quick
# ---------------------------------------------------------------------------------------------
@step("env", "quick", "GPU, versions, peers; the two ceilings (device copy, bf16 GEMM) on random data")
def plan_env(ctx: Context) -> List[Measurement]:
    def info():
        torch = _cuda()
        from . import baselines

        if SMOKE:
            return {"gpu": "cpu (smoke)", **baselines.versions()}
        p = torch.cuda.get_device_properties(0)
        return {"gpu": p.name, "cc": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "mem_gib": round(p.total_memory / 2**30, 1), **baselines.versions()}

    def copy():
        _cuda()
        us, bw = common.copy_bandwidth(2**12 if SMOKE else 2**30, DEVICE, smoke=SMOKE)  # 2 GiB each way
        ctx.state["copy"] = bw
        return {"us": us, "gbps": bw / 1e9}

    def gemm():
        _cuda()
        us, rate = common.gemm_rate(size(8192), act_dtype(), DEVICE, smoke=SMOKE)
        (ctx.out / "ceilings.json").write_text(json.dumps({"copy_bytes_per_s": ctx.state.get("copy", NOMINAL[
            "copy_bytes_per_s"]), "bf16_flops": rate}))
        return {"us": us, "tflops": rate / 1e12}

    return [Measurement("gpu, versions, peers", 1, info), Measurement("ceiling: device copy 2 GiB", 3, copy),
            Measurement("ceiling: bf16 GEMM 8192^3", 3, gemm)]


CORRECT_SHAPES = ((4096, 4096), (4096, 1001))  # (in, out): square, and an odd N
CORRECT_MS = (1, 64, 2048)  # the GEMV, the fused tiles, dequant + cuBLAS (default path table)
BF16_TOL = 1e-2  # ‖err‖/‖ref‖ for bf16 operands (docs/design.md §6, "Tolerances": 1e-3 .. 1e-2)


@step("correct", "quick", "bf16 forward + backward vs the float32 reference: bits 2/3/4/NF4, 4096x4096 and odd N, "
                          "M 1/64/2048")
def plan_correct(ctx: Context) -> List[Measurement]:
    def case(variant, in_f, out_f, m):
        def run():
            torch = _cuda()
            from cloq_engine.backends import torch_ref
            from cloq_engine.backends import triton_backend as tb

            qw = packed_weight(variant, out_f, in_f, seed=in_f + out_f)
            A = randn(RANK, in_f, dtype=torch.float32, seed=4, scale=0.02)
            B = randn(out_f, RANK, dtype=torch.float32, seed=5, scale=0.02)
            bias = randn(out_f, dtype=act_dtype(), seed=6, scale=0.1)
            x = randn(m, in_f, dtype=act_dtype(), seed=m)
            dy = randn(m, out_f, dtype=act_dtype(), seed=m + 1)
            y, S = tb.forward(x, qw, A, B, SCALING, bias=bias)
            dx, _, dA, dB = tb.backward(dy, x, S, qw, A, B, SCALING)
            y_ref, S_ref = torch_ref.forward(x, qw, A, B, SCALING, bias=bias.float())
            dx_ref, _, dA_ref, dB_ref = torch_ref.backward(dy, x, S_ref, qw, A, B, SCALING)
            errs = {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref), "dA": rel_err(dA, dA_ref),
                    "dB": rel_err(dB, dB_ref)}
            worst = max(errs.values())
            return {"rel_err": worst, **{f"err_{k}": v for k, v in errs.items()},
                    "path_fwd": tb.forward_path(m).value, "path_bwd": tb.backward_path(m).value,
                    "ok": bool(worst < BF16_TOL), "status": "ok" if worst < BF16_TOL else "fail"}
        return run

    return [Measurement(f"{_name(v)} {i}x{o} M={m} fwd+bwd", 2.5, case(v, i, o, m))
            for v in VARIANTS for i, o in CORRECT_SHAPES for m in CORRECT_MS]


def _decode_ours(ctx, variant, in_f, out_f):
    def run():
        _cuda()
        from cloq_engine.backends import triton_backend as tb

        nbytes = packed_weight(variant, out_f, in_f).nbytes
        layers = [(packed_weight(variant, out_f, in_f, seed=s), randn(RANK, in_f, dtype=act_dtype(), seed=s + 100,
                                                                      scale=0.02),
                   randn(out_f, RANK, dtype=act_dtype(), seed=s + 200, scale=0.02))
                  for s in range(copies_for(nbytes))]
        x = randn(1, in_f, dtype=act_dtype(), seed=7)
        us = bench_us(lambda: [tb.forward(x, qw, A, B, SCALING) for qw, A, B in layers], graph=True) / len(layers)
        return _bw_row(ctx, us, nbytes, in_f, out_f, copies=len(layers))
    return run


def _bw_row(ctx, us, nbytes, in_f, out_f, copies) -> dict:
    ceil = ceilings(ctx)
    floor_us = (nbytes + 2 * (in_f + out_f)) / ceil["copy_bytes_per_s"] * 1e6
    return {"us": us, "gbps": nbytes / (us * 1e-6) / 1e9, "roof_pct": 100 * floor_us / us, "floor_us": floor_us,
            "weight_bytes": nbytes, "copies": copies, "nominal_ceiling": ceil["nominal"]}


def _decode_dense(ctx, in_f, out_f):
    def run():
        _cuda()
        import torch.nn.functional as F

        ws = [randn(out_f, in_f, dtype=act_dtype(), seed=s) for s in range(copies_for(2 * in_f * out_f))]
        A = randn(RANK, in_f, dtype=act_dtype(), seed=8, scale=0.02)
        B = randn(out_f, RANK, dtype=act_dtype(), seed=9, scale=0.02)
        x = randn(1, in_f, dtype=act_dtype(), seed=7)
        us = bench_us(lambda: [F.linear(x, w) + SCALING * F.linear(F.linear(x, A), B) for w in ws], graph=True) / len(ws)
        return _bw_row(ctx, us, 2 * in_f * out_f, in_f, out_f, copies=len(ws))
    return run


def _decode_peer(ctx, name, in_f, out_f):
    def run():
        _cuda()
        from . import baselines

        against, build = baselines.DECODE_PEERS[name]
        nbytes = packed_weight(against, out_f, in_f).nbytes  # the same bytes a peer must stream (about)
        x = randn(1, in_f, dtype=act_dtype(), seed=7)
        copies = copies_for(nbytes)
        try:
            fn = build(x, in_f, out_f, copies)
        except baselines.Unavailable as e:
            raise Skip(str(e)) from e
        return _bw_row(ctx, bench_us(fn, graph=True) / copies, nbytes, in_f, out_f, copies)
    return run


def _graph_survives_growth():
    """Capture a decode forward, then make the workspace grow (a large-M call), then replay."""
    torch = _cuda()
    if SMOKE:
        raise Skip("smoke: CUDA graphs need a GPU")
    from cloq_engine.backends import torch_ref, workspace
    from cloq_engine.backends import triton_backend as tb

    K, N = 4096, 14336
    qw = packed_weight("4", N, K)
    A = randn(RANK, K, dtype=act_dtype(), seed=10, scale=0.02)
    B = randn(N, RANK, dtype=act_dtype(), seed=11, scale=0.02)
    x = randn(1, K, dtype=act_dtype(), seed=12)
    stream = torch.cuda.Stream()  # warm up on the capture stream, so the capture uses its persistent slots
    torch.cuda.synchronize()  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        tb.forward(x, qw, A, B, SCALING)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y, _ = tb.forward(x, qw, A, B, SCALING)
    # grow every workspace slot the capture used: the split-K partials and counters (a wider layer,
    # M = 1 and M = 16) and the dequant buffer (M = 4096)
    qw2 = packed_weight("4", 2 * N, K, seed=1)
    B2 = randn(2 * N, RANK, dtype=act_dtype(), seed=16, scale=0.02)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        for m in (1, 16, 4096):
            tb.forward(randn(m, K, dtype=act_dtype(), seed=13), qw2, A, B2, SCALING)
    torch.cuda.synchronize()
    retired = workspace.nbytes() - workspace.nbytes(retired=False)
    errs = []
    for seed in (14, 15):
        x.copy_(randn(1, K, dtype=act_dtype(), seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        errs.append(rel_err(y, torch_ref.forward(x, qw, A, B, SCALING)[0]))
    worst = max(errs)
    good = worst < BF16_TOL and retired > 0
    return {"rel_err": worst, "retired_bytes": retired, "ok": bool(good), "status": "ok" if good else "fail"}


UP, DOWN = (4096, 14336), (14336, 4096)


@step("decode", "quick", "M = 1, bf16, weights rotated past the L2, CUDA-graph timing; vs dense bf16 and peers")
def plan_decode(ctx: Context) -> List[Measurement]:
    ms = [Measurement(f"decode ours {_name(v)} {UP[0]}->{UP[1]}", 3, _decode_ours(ctx, v, *UP)) for v in VARIANTS]
    ms.append(Measurement(f"decode dense bf16 {UP[0]}->{UP[1]}", 2, _decode_dense(ctx, *UP)))
    ms += [Measurement(f"decode {name} {UP[0]}->{UP[1]}", 10 if "gemlite" in name else 3,
                       _decode_peer(ctx, name, *UP))
           for name in ("tinygemm-w4", "gemlite-w4", "gemlite-w2", "bnb-nf4")]
    ms += [Measurement(f"decode ours w{v} {DOWN[0]}->{DOWN[1]}", 2.5, _decode_ours(ctx, v, *DOWN)) for v in ("4", "2")]
    ms.append(Measurement(f"decode tinygemm-w4 {DOWN[0]}->{DOWN[1]}", 2, _decode_peer(ctx, "tinygemm-w4", *DOWN)))
    ms.append(Measurement("decode graph replays after the workspace grew", 3, _graph_survives_growth))
    return ms


LAYER_M = 8192


def _layer_step(ctx, kind: str, in_f: int, out_f: int, fold=None):
    """A layer's training step (forward + backward, M = 8192 tokens) under autograd."""
    def run():
        torch = _cuda()
        import torch.nn.functional as F

        from cloq_engine import LoRAConfig

        from . import baselines
        from cloq_engine.nn import QuantLoRALinear

        x = randn(LAYER_M, in_f, dtype=act_dtype(), seed=20).requires_grad_(True)
        dy = randn(LAYER_M, out_f, dtype=act_dtype(), seed=21)
        lc = LoRAConfig(rank=RANK, alpha=SCALING * RANK, init="zero")
        if kind.startswith("w"):
            qw = packed_weight(kind[1:], out_f, in_f)
            A = randn(RANK, in_f, dtype=torch.float32, seed=22, scale=0.02)
            B = randn(out_f, RANK, dtype=torch.float32, seed=23, scale=0.02)
            layer = QuantLoRALinear.from_quantized(qw, A, B, lc, dtype=act_dtype())
            forward = layer
        elif kind == "dense-fold":
            lin = torch.nn.Linear(size(in_f), size(out_f), bias=False, device=DEVICE, dtype=act_dtype())
            layer = baselines.DenseFoldLoRALinear(lin.requires_grad_(False), RANK, SCALING * RANK)
            forward = layer
        else:  # dense: frozen bf16 nn.Linear + LoRA, bf16 adapters (PEFT with autocast_adapter_dtype=False)
            lin = torch.nn.Linear(size(in_f), size(out_f), bias=False, device=DEVICE, dtype=act_dtype()).requires_grad_(False)
            A = randn(RANK, in_f, dtype=act_dtype(), seed=22, scale=0.02).requires_grad_(True)
            B = randn(out_f, RANK, dtype=act_dtype(), seed=23, scale=0.02).requires_grad_(True)
            forward = lambda t: lin(t) + SCALING * F.linear(F.linear(t, A), B)  # noqa: E731

        def step_fn():
            x.grad = None
            forward(x).backward(dy)

        old = _env("CLOQ_LORA_FOLD", fold)
        try:
            us = bench_us(step_fn)
        finally:
            _env("CLOQ_LORA_FOLD", old)
        flops = 3 * 2 * LAYER_M * in_f * out_f
        return {"ms": us / 1e3, "tflops": flops / (us * 1e-6) / 1e12,
                "gemm_pct": 100 * flops / ceilings(ctx)["bf16_flops"] / (us * 1e-6)}
    return run


def _dequant_alone(ctx, variant, in_f, out_f):
    def run():
        torch = _cuda()
        from cloq_engine.kernels.dequant import dequant_into
        from cloq_engine.kernels.utils import codebook_on

        qw = packed_weight(variant, out_f, in_f)
        out = torch.empty(qw.in_features, qw.out_features, dtype=act_dtype(), device=DEVICE)
        cb = codebook_on(DEVICE) if qw.is_nf4 else qw.scales
        us = bench_us(lambda: dequant_into(out, qw.qweight, qw.scales, qw.zeros, cb, qw.bits, qw.group_size,
                                           qw.in_features))
        nbytes = qw.nbytes + out.numel() * 2
        ceil = ceilings(ctx)
        return {"us": us, "gbps": nbytes / (us * 1e-6) / 1e9,
                "roof_pct": 100 * nbytes / ceil["copy_bytes_per_s"] / (us * 1e-6)}
    return run


@step("layer", "quick", "layer training step at M = 8192 (fwd + bwd) vs dense LoRA and dense-with-fold; dequant alone")
def plan_layer(ctx: Context) -> List[Measurement]:
    ms = [Measurement(f"dequant {_name(v)} {UP[0]}x{UP[1]} -> bf16", 2, _dequant_alone(ctx, v, *UP)) for v in VARIANTS]
    for in_f, out_f in (UP, DOWN):
        shape = f"{in_f}->{out_f}"
        ms += [Measurement(f"step ours w4 {shape}", 3, _layer_step(ctx, "w4", in_f, out_f)),
               Measurement(f"step ours w2 {shape}", 2.5, _layer_step(ctx, "w2", in_f, out_f)),
               Measurement(f"step ours w4 {shape} concat forced", 2.5, _layer_step(ctx, "w4", in_f, out_f, "concat")),
               Measurement(f"step ours w4 {shape} addmm forced", 2.5, _layer_step(ctx, "w4", in_f, out_f, "addmm")),
               Measurement(f"step dense bf16 LoRA {shape}", 2, _layer_step(ctx, "dense", in_f, out_f)),
               Measurement(f"step dense-fold {shape}", 2, _layer_step(ctx, "dense-fold", in_f, out_f))]
    return ms


MODEL_VARIANTS = {  # variant -> estimate (build, first step incl. JIT, 2 warm-up + 5 timed steps)
    "w4": 16, "w2": 11, "peft": 10, "peft-bf16": 10, "dense-fold": 10, "bnb": 14}


def _model_args(layers=2, steps=5, warmup=2):
    import argparse

    if SMOKE:
        return argparse.Namespace(layers=1, batch=2, seq=16, steps=1, warmup=0, smoke=True)
    return argparse.Namespace(layers=layers, batch=4, seq=2048, steps=steps, warmup=warmup, smoke=False)


def _model_variant(variant: str, **kw):
    def run():
        _cuda()
        from dataclasses import asdict

        from . import train

        why = train.available(variant)
        if why:
            raise Skip(why)
        row = asdict(train.run_variant(variant, _model_args(**kw), DEVICE))
        row["ms"] = row["median_step_ms"]
        return row
    return run


def _lm_head(**kw):
    def run():
        _cuda()
        from . import train

        share = train.lm_head_share(_model_args(**kw), DEVICE)
        return {"ms": share["lm_head_loss_ms"], **share}
    return run


@step("model", "quick", "2 Llama-3-8B-shaped blocks, batch 4x2048, LoRA r16 on 7 linears, AdamW: step ms and memory "
                        "per variant (clean allocator each), and the LM-head+loss share")
def plan_model(ctx: Context) -> List[Measurement]:
    ms = [Measurement(f"model step {v}", est, _model_variant(v)) for v, est in MODEL_VARIANTS.items()]
    ms.append(Measurement("model LM head + loss alone", 3, _lm_head()))
    return ms


def _prepare_block(blocks=1, samples=16):
    def run():
        torch = _cuda()
        import argparse

        from . import prepare

        args = argparse.Namespace(shape="small" if SMOKE else "llama3-8b", blocks=blocks, samples=2 if SMOKE else samples,
                                  seq_len=32 if SMOKE else 2048, batch_size=8, bits=2, group_size=128,
                                  rank=8 if SMOKE else 64, init="cloq", one_pass=False, report="sampled")
        rep, wall, peak = prepare.one_run(args, torch.device(DEVICE), torch.float32 if SMOKE else torch.bfloat16)
        cols = ("capture_s", "quantize_s", "init_s", "forward_s", "report_s", "total_s")
        return {"wall_s_prepare": wall, "peak_gib": peak, "samples": samples,
                "blocks": [{c: getattr(b, c) for c in cols} for b in rep.blocks]}
    return run


@step("prepare", "quick", "prepare_model on 1 Llama-3-8B block: GPTQ 2-bit g128 + CLoQ r64, 16 x 2048 tokens "
                          "(first run: JIT included)")
def plan_prepare(ctx: Context) -> List[Measurement]:
    return [Measurement("prepare 1 block w2 gptq+cloq r64", 35, _prepare_block())]


# ---------------------------------------------------------------------------------------------
# full: the rest, one call each
# ---------------------------------------------------------------------------------------------
def _command(ctx: Context, name: str, argv: List[str]):
    """Run a command (pytest, a benchmark script) as one measurement, output to $OUT/<name>.txt."""
    def run():
        out = ctx.out / f"{name}.txt"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        try:
            with open(out, "w") as f:
                rc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    timeout=max(ctx.left(), 1)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        tail = out.read_text()[-600:] if out.exists() else ""
        return {"rc": rc, "ok": rc == 0, "status": "ok" if rc == 0 else "error", "tail": tail}
    return run


PY = sys.executable


@step("gpu-tests-a", "full-1", "pytest -m gpu: every shipped config, autograd module, CUDA-graph decode")
def plan_full1(ctx: Context) -> List[Measurement]:
    return [Measurement("pytest -m gpu (shipped configs, module, graphs)", 300, _command(
        ctx, "pytest_gpu_a", [PY, "-m", "pytest", "-m", "gpu", "-q", "tests/kernels/test_gpu.py", "-k",
                              "not paths_match"]))]


@step("gpu-tests-b", "full-2", "pytest -m gpu: every path in bf16 and fp16, M 1..8192, 4096^2 and odd N")
def plan_full2(ctx: Context) -> List[Measurement]:
    return [Measurement("pytest -m gpu (every path)", 400, _command(
        ctx, "pytest_gpu_b", [PY, "-m", "pytest", "-m", "gpu", "-q", "tests/kernels/test_gpu.py", "-k",
                              "paths_match"]))]


@step("kernel-sweep", "full-3", "benchmarks.kernels: every path by M at 4096->14336 and 14336->4096, peers")
def plan_full3(ctx: Context) -> List[Measurement]:
    jsonl = str(ctx.out / "kernels.jsonl")
    return [Measurement("kernels.py sweep", 400, _command(
        ctx, "kernels", [PY, "-m", "benchmarks.kernels", "--shapes", "4096x14336,14336x4096", "--jsonl", jsonl,
                         "--json", str(ctx.out / "kernels.json")]))]


@step("model-rest", "full-4", "model step for w3 and nf4, and w4 / peft-bf16 / dense-fold again with 20 steps")
def plan_full4(ctx: Context) -> List[Measurement]:
    ms = [Measurement(f"model step {v}", 14, _model_variant(v)) for v in ("w3", "nf4")]
    ms += [Measurement(f"model step {v} (20 steps)", 16, _model_variant(v, steps=20, warmup=3))
           for v in ("w4", "w2", "peft-bf16", "dense-fold")]
    ms.append(Measurement("model step w4, 4 blocks", 20, _model_variant("w4", layers=4)))
    ms.append(Measurement("model step dense-fold, 4 blocks", 15, _model_variant("dense-fold", layers=4)))
    return ms


@step("prepare-full", "full-5", "prepare_model on 2 Llama-3-8B blocks, 128 x 2048 calibration tokens")
def plan_full5(ctx: Context) -> List[Measurement]:
    return [Measurement("prepare 2 blocks w2 gptq+cloq r64, 128 x 2048", 300, _prepare_block(blocks=2, samples=128))]


@step("tune", "full-6", "benchmarks.kernels --tune: every candidate config timed, a configs.json table written")
def plan_full6(ctx: Context) -> List[Measurement]:
    return [Measurement("kernels.py --tune", 400, _command(
        ctx, "tune", [PY, "-m", "benchmarks.kernels", "--tune", str(ctx.out / "configs_tuned.json"),
                      "--shapes", "4096x4096,4096x14336,14336x4096"]))]



# ---------------------------------------------------------------------------------------------
# selftest: the runner itself, on any machine (tests/test_session.py)
# ---------------------------------------------------------------------------------------------
def _fail():
    raise RuntimeError("a measurement that fails")


def _slow():
    import time

    time.sleep(60)


@step("selftest-a", "selftest", "a result, a failure, a skip: the step goes on after each")
def plan_selftest_a(ctx: Context) -> List[Measurement]:
    return [Measurement("first", 0.1, lambda: {"us": 1.5}), Measurement("fails", 0.1, _fail),
            Measurement("skips", 0.1, lambda: (_ for _ in ()).throw(Skip("not installed"))),
            Measurement("after the failure", 0.1, lambda: [{"us": 2.0}, {"us": 3.0}]),
            Measurement("too long for the budget", 1e6, lambda: {})]


@step("selftest-crash", "selftest", "a step whose process dies: recorded, the next step runs")
def plan_selftest_crash(ctx: Context) -> List[Measurement]:
    return [Measurement("before the crash", 0.1, lambda: {"ms": 1.0}), Measurement("crash", 0.1, lambda: os._exit(3))]


@step("selftest-hang", "selftest", "a step that hangs past the budget: killed, what it wrote is kept")
def plan_selftest_hang(ctx: Context) -> List[Measurement]:
    return [Measurement("before the hang", 0.1, lambda: {"ms": 2.0}), Measurement("hang", 0.1, _slow)]


@step("selftest-late", "selftest", "a step after the budget: not started")
def plan_selftest_late(ctx: Context) -> List[Measurement]:
    return [Measurement("never", 0.1, lambda: {})]
