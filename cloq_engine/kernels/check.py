"""Ahead-of-time GPU code-generation check, runnable without a GPU.

``python -m cloq_engine.kernels.check [--json]`` compiles every kernel in every shipped config for
sm_80 and sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``. The
signature, the integers specialized to constants and the ``tt.divisibility`` attributes are derived
from a representative call (a 4096 x 4096 layer, rank 16, group 128) exactly as the JIT's
specializer would derive them. Registers and spills come from ``cuobjdump --dump-resource-usage``
of the cubin (the cuobjdump shipped with triton): ``spill_bytes`` is the per-thread stack frame plus
local memory, where ptxas puts spilled registers (ptxas' "bytes spill stores" to within alignment;
0 exactly when nothing spills). Shared memory is the kernel's ``metadata.shared``. Under
``TRITON_INTERPRET=1`` it re-runs itself without that variable (interpreted kernels cannot be
compiled). It exits 1 when any config spills or needs more shared memory than the architecture
offers (232448 bytes on H100, 166912 on A100).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

logger = logging.getLogger(__name__)

ARCHS = (80, 90)
BIT_VARIANTS = ("2", "3", "4", "nf4")
_PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32"}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Ptr:
    """A tensor argument: the JIT sees its element type and a 16-byte aligned address."""

    dtype: torch.dtype


@dataclass
class CheckResult:
    kernel: str
    arch: str
    config: str
    regs: int
    spill_bytes: int
    shared_bytes: int
    barriers: int  # bar.sync in the PTX: block-wide barriers (layout round trips, split-K hand-off)
    ok: bool


@dataclass
class KernelCase:
    """One kernel specialization with its shipped configs."""

    name: str
    fn: object  # the @triton.jit function
    args: Dict[str, object]  # runtime argument values by name (Ptr for tensors)
    constexprs: Dict[str, object]  # non-config constexprs
    configs: list  # triton.Config


# ---------------------------------------------------------------------------------------------
# Representative calls
# ---------------------------------------------------------------------------------------------
def _quant_args(bits: int, N: int, K: int, group: int) -> dict:
    return dict(
        q_ptr=Ptr(torch.int32), scales_ptr=Ptr(torch.float16), zeros_ptr=Ptr(torch.float16),
        codebook_ptr=Ptr(torch.float32), KP=K, group_size=group, num_groups=K // group,
        stride_qk=N, stride_qn=1, stride_sg=N, stride_sn=1,
    )


def kernel_cases(bits_variants=BIT_VARIANTS, dtype: torch.dtype = torch.float16) -> List[KernelCase]:
    from . import dequant, dequant_gemm, dequant_gemm_t, gemv, gram_syrk
    from .utils import dot_precision

    N = K = 4096
    R, group = 16, 128
    prec = dot_precision(dtype)
    cases = []
    for variant in bits_variants:
        nf4 = variant == "nf4"
        bits = 4 if nf4 else int(variant)
        q = _quant_args(bits, N, K, group)
        meta = dict(BITS=bits, NF4=nf4, R_PAD=16, DOT_PRECISION=prec)
        fwd = dict(
            x_ptr=Ptr(dtype), s_ptr=Ptr(torch.float32), b_ptr=Ptr(dtype), bias_ptr=Ptr(dtype),
            M=2048, N=N, K=K, R=R, stride_xm=K, stride_xk=1, stride_lm=R, stride_lr=1, stride_bn=R, stride_br=1,
            stride_ym=N, stride_yn=1, scaling=2.0, **q,
        )
        cases.append(KernelCase(f"dequant_gemm[{variant}]", dequant_gemm.dequant_gemm_kernel,
                                dict(fwd, y_ptr=Ptr(dtype)), dict(meta, HAS_LORA=True, HAS_BIAS=True),
                                dequant_gemm.gemm_configs()))
        split4 = lambda cfgs: [_config({**c.kwargs, "SPLIT_K": c.kwargs["SPLIT_K"] or 4}, c.num_warps, c.num_stages)
                               for c in cfgs]
        m1 = {k: v for k, v in fwd.items() if k not in ("M", "stride_xm", "stride_lm", "stride_ym")}
        cases.append(KernelCase(
            f"gemv[{variant}]", gemv.gemv_kernel,
            dict(m1, y_ptr=Ptr(dtype), part_ptr=Ptr(torch.float32), lock_ptr=Ptr(torch.int32), tiles_per_split=8),
            dict(BITS=bits, NF4=nf4, R_PAD=16, HAS_LORA=True, HAS_BIAS=True), split4(gemv.gemv_configs())))
        cases.append(KernelCase(
            f"gemv_dot[{variant}]", gemv.gemv_dot_kernel,
            dict(fwd, M=gemv.MAX_M, y_ptr=Ptr(dtype), part_ptr=Ptr(torch.float32), lock_ptr=Ptr(torch.int32),
                 tiles_per_split=8),
            dict(meta, HAS_LORA=True, HAS_BIAS=True, BLOCK_M=gemv.MAX_M), split4(gemv.gemv_dot_configs())))
        cases.append(KernelCase(
            f"dequant_gemm_t[{variant}]", dequant_gemm_t.dequant_gemm_t_kernel,
            dict(dy_ptr=Ptr(dtype), ds_ptr=Ptr(torch.float32), a_ptr=Ptr(dtype), dx_ptr=Ptr(dtype), M=2048, N=N,
                 K=K, R=R, stride_dym=N, stride_dyn=1, stride_dsm=R, stride_dsr=1, stride_ar=K, stride_ak=1,
                 stride_dxm=K, stride_dxk=1, **q),
            dict(meta, FUSE_LORA=True), dequant_gemm_t.gemm_t_configs()))
        cases.append(KernelCase(  # into a [K + r, N] workspace in the activation dtype
            f"dequant[{variant}]", dequant.dequant_kernel,
            dict(w_ptr=Ptr(dtype), N=N, K=K, stride_wk=N, stride_wn=1, **q),
            dict(BITS=bits, NF4=nf4), dequant.dequant_configs()))
    cases.append(KernelCase(
        "gram_syrk", gram_syrk.gram_syrk_kernel,
        dict(x_ptr=Ptr(dtype), h_ptr=Ptr(torch.float32), T=8192, K=K, t_bucket=8192, stride_xt=K, stride_xk=1, stride_hi=K,
             stride_hj=1),
        dict(DOT_PRECISION=prec), gram_syrk.syrk_configs()))
    return cases


def _config(kwargs, num_warps, num_stages):
    import triton

    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------------------------------------
# Compile and measure
# ---------------------------------------------------------------------------------------------
def ast_source(fn, args: dict, constexprs: dict):
    """ASTSource with the signature, constants and divisibility attrs the JIT would produce."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        if name not in args:
            raise ValueError(f"no representative value for argument {name!r} of {fn.__name__}")
        value = args[name]
        if isinstance(value, Ptr):
            ty, spec = _PTR_TYPES[value.dtype], "D"
        else:
            ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # integers equal to 1 become constants
            signature[name] = "constexpr"
            consts[name] = spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, consts, attrs)


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK (the per-thread stack frame ptxas spills into), SHARED and LOCAL from cuobjdump."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out, re.S)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "static_shared": int(m.group(3)),
            "local": int(m.group(4))}


def _config_str(cfg) -> str:
    kw = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{kw},warps={cfg.num_warps},stages={cfg.num_stages}"


def compile_case(case: KernelCase, cfg, cap: int) -> CheckResult:
    import triton
    from triton.backends.compiler import GPUTarget

    src = ast_source(case.fn, case.args, {**case.constexprs, **cfg.kwargs})
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    usage = _resource_usage(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared) + usage["static_shared"]
    spill = usage["stack"] + usage["local"]  # ptxas spills into the stack frame (triton kernels use no other)
    return CheckResult(case.name, f"sm_{cap}", _config_str(cfg), usage["regs"], spill, shared,
                       compiled.asm["ptx"].count("bar.sync"), ok=within_limits(cap, spill, shared))


def within_limits(cap: int, spill_bytes: int, shared_bytes: int) -> bool:
    """No register spills, and shared memory within the architecture's per-block opt-in maximum."""
    from .utils import SHARED_LIMIT

    return spill_bytes == 0 and shared_bytes <= SHARED_LIMIT[cap]


def run_checks(cases: List[KernelCase], archs=ARCHS, max_configs: Optional[int] = None,
               on_result: Optional[Callable[[CheckResult], None]] = None) -> List[CheckResult]:
    results = []
    for case in cases:
        for cfg in case.configs[:max_configs]:
            for cap in archs:
                r = compile_case(case, cfg, cap)
                results.append(r)
                if on_result:
                    on_result(r)
    return results


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _table(results: List[CheckResult]) -> Iterator[str]:
    yield f"{'kernel':34} {'arch':6} {'regs':>4} {'spill':>5} {'shared':>7} {'bar':>4}  config"
    for r in results:
        flag = "" if r.ok else "  <-- FAIL"
        yield (f"{r.kernel:34} {r.arch:6} {r.regs:4d} {r.spill_bytes:5d} {r.shared_bytes:7d} {r.barriers:4d}  "
               f"{r.config}{flag}")


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # @triton.jit would build interpreter objects: re-run clean
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "cloq_engine.kernels.check", *args], env=env).returncode
    p = argparse.ArgumentParser(prog="python -m cloq_engine.kernels.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    p.add_argument("--bits", default=",".join(BIT_VARIANTS), help="bit variants: 2,3,4,nf4 (default all)")
    p.add_argument("--dtype", default="fp16", choices=sorted(_DTYPES), help="activation dtype (default fp16)")
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this string")
    p.add_argument("--max-configs", type=int, default=None, help="only the first N configs of each kernel")
    a = p.parse_args(argv)
    archs = tuple(int(s) for s in a.arch.split(","))
    if any(c not in ARCHS for c in archs):
        raise SystemExit(f"--arch must be among {ARCHS}; got {a.arch!r}")
    variants = tuple(a.bits.split(","))
    if any(v not in BIT_VARIANTS for v in variants):
        raise SystemExit(f"--bits must be among {BIT_VARIANTS}; got {a.bits!r}")

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    cases = kernel_cases(variants, _DTYPES[a.dtype])
    if a.kernel:
        cases = [c for c in cases if a.kernel in c.name]
    def stream(r: CheckResult) -> None:
        print(list(_table([r]))[1], flush=True)

    if not a.json:
        print(next(_table([])))
    results = run_checks(cases, archs, a.max_configs, on_result=None if a.json else stream)
    if a.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "ok"} for r in results], indent=1))
    bad = [r for r in results if not r.ok]
    if not a.json:
        print(f"{len(results)} compiles, {len(bad)} failing (spills or shared memory over the limit)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
