"""What every benchmark shares, written once: timing (medians; pairs in alternation on a shared
CPU; CUDA-graph or ``do_bench`` medians on a GPU), weight-copy rotation past the L2, the two GPU
ceilings, a random valid packed weight, JSON lines written as results come, and the parser.

The calibrated error is the engine's own (``cloq_engine.init.calibrated_error``: ``tr(M H M^T)``
in float64); every benchmark that reports one uses it. Nothing here imports torch at module
level: ``cloq bench --help`` and the session's dry run stay light.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

logger = logging.getLogger("benchmarks")

# H100 and H200: 50 MiB of L2, rounded up; rotated weights add up to at least 4x this, so that a
# small-M call reads its weight from HBM, not from the cache a previous call left warm
L2_BYTES = 60 * 2**20
MAX_COPIES = 64


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of benchmark ``name``: ``cloq bench NAME`` in usage lines and errors (``python -m
    benchmarks.NAME`` runs the same), the docstring's first paragraph as the description."""
    return argparse.ArgumentParser(prog=f"cloq bench {name}", description=doc.strip().split("\n\n")[0])


def append_jsonl(path, record: dict) -> None:
    """Append one result line to ``path`` now, so that a run cut short keeps what it measured."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, payload: dict, indent: int = 1) -> str:
    """Write ``payload`` to ``path`` atomically (a temporary file, then a rename: a reader or a kill
    never sees half a file) and return the path; values JSON cannot hold are written as strings."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=indent, default=str)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# CPU timing
# ---------------------------------------------------------------------------------------------
class Timed(NamedTuple):
    wall_s: float  # median wall seconds
    cpu_s: float  # median CPU seconds of this process (all its threads)
    runs_s: List[float]  # every wall time
    result: object  # what the last call returned


def timed(fn: Callable[[], object], repeats: int, warmup: int = 0) -> Timed:
    """Median wall and CPU seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    walls, cpus, out = [], [], None
    for _ in range(max(1, repeats)):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return Timed(statistics.median(walls), statistics.median(cpus), walls, out)


def alternated(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter) -> Dict[str, dict]:
    """Each function run in turn (A B A B ...) ``repeats`` times, so that a machine whose speed drifts
    (other jobs) moves all alike: per name the median seconds, every run, and the median of the
    pairwise ratios to the first function (``ratio_to_<first>``)."""
    for _ in range(warmup):  # first-call allocations, kernel selection, thread pools
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    first = next(iter(fns))
    return {k: {"median_s": statistics.median(v), "runs_s": v,
                "ratio_to_" + first: statistics.median(a / b for a, b in zip(v, times[first]))}
            for k, v in times.items()}


# ---------------------------------------------------------------------------------------------
# GPU timing, rotation and ceilings
# ---------------------------------------------------------------------------------------------
def bench_us(fn: Callable[[], object], graph: bool = False, smoke: bool = False, warmup: int = 25,
             rep: int = 100) -> float:
    """Median microseconds of ``fn`` on the GPU: CUDA-graph replays for small launches (no launch
    gaps; ``do_bench`` if the capture fails), else ``triton.testing.do_bench``. ``smoke``: one
    call on the CPU, timed by the wall clock (tests the code, means nothing)."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)
    import torch
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compile and allocate workspaces outside any capture
    torch.cuda.synchronize()
    if graph:
        try:
            return 1e3 * do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except Exception as e:  # noqa: BLE001 (an op that cannot be captured: timed with launches)
            logger.info("CUDA graph capture failed (%s: %s); timing with do_bench", type(e).__name__, e)
    return 1e3 * do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate over so that they add up to at least 4x the L2 (2 to 64)."""
    return int(min(MAX_COPIES, max(2, math.ceil(4 * L2_BYTES / max(nbytes, 1)))))


def copy_bandwidth(numel: int = 2**30, device: str = "cuda", smoke: bool = False) -> Tuple[float, float]:
    """(us, bytes/s read + written) of a device-to-device copy of ``numel`` bf16 values (2 GiB by
    default, far past the L2)."""
    import torch

    a = torch.empty(numel, device=device, dtype=torch.bfloat16).normal_()  # never zeros: nothing to elide
    b = torch.empty_like(a)
    us = bench_us(lambda: b.copy_(a), smoke=smoke, warmup=5, rep=50)
    return us, 2 * a.numel() * a.element_size() / (us * 1e-6)


def gemm_rate(n: int = 8192, dtype=None, device: str = "cuda", smoke: bool = False) -> Tuple[float, float]:
    """(us, flop/s) of an ``n``³ matrix product in ``dtype`` (bf16 by default)."""
    import torch

    dtype = dtype or torch.bfloat16
    x = torch.empty(n, n, device=device, dtype=dtype).normal_()
    y = torch.empty(n, n, device=device, dtype=dtype).normal_()
    us = bench_us(lambda: torch.mm(x, y), smoke=smoke, warmup=5, rep=50)
    return us, 2 * n**3 / (us * 1e-6)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def random_packed_weight(variant: str, in_f: int, out_f: int, device="cpu", group: int = None, seed: int = 0):
    """A random valid packed weight: ``variant`` "2" | "3" | "4" | "nf4", group 128 (NF4: 64, as
    bitsandbytes) unless given. Random codes: the speed of what reads it does not depend on them."""
    import torch

    from cloq_engine.formats import QuantizedWeight, packed_rows

    nf4 = variant == "nf4"
    bits = 4 if nf4 else int(variant)
    group = group or (64 if nf4 else 128)
    g = torch.Generator(device=device).manual_seed(seed)
    words = torch.randint(-2**31, 2**31 - 1, (packed_rows(in_f, bits), out_f), generator=g, device=device,
                          dtype=torch.int64).to(torch.int32)
    scales = (0.02 * torch.rand(in_f // group, out_f, generator=g, device=device) + 1e-3).half()
    zeros = None if nf4 else torch.randint(0, 2**bits, (in_f // group, out_f), generator=g, device=device).half()
    return QuantizedWeight(words, scales, zeros, bits, group, in_f, out_f, "nf4" if nf4 else "rtn")


def eig_route(R, H, rank: int):
    """(A, B) of CLoQ the way published reproductions solve it, the reference its solver is timed
    against: an eigendecomposition of H, the full SVD of R·H^{1/2}, truncated, then back-transformed."""
    import torch

    lam, V = torch.linalg.eigh(H)
    lam = lam.clamp(min=lam.max() * 1e-10)
    root = V * lam.sqrt()
    U, S, Vh = torch.linalg.svd(R @ root, full_matrices=False)
    B = U[:, :rank] * S[:rank]
    A = (Vh[:rank] * lam.rsqrt()) @ V.t()
    return A, B


def synthetic_layer(out_f: int, in_f: int, tokens: int, seed: int = 0):
    """(W, qw, H): a Gaussian W (out, in), qw its 2-bit RTN g128 and H = X^T X of a correlated
    synthetic X (tokens, in): not real data, the shapes and conditioning of a layer."""
    import torch

    import cloq_engine as ce

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    X = torch.randn(tokens, in_f, generator=g) @ mix
    H = X.t() @ X
    qw = ce.quantize_weight(W, ce.QuantConfig(bits=2, group_size=128 if in_f % 128 == 0 else -1, method="rtn"))
    return W, qw, H
