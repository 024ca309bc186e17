"""``cloq bench NAME``: the registry of benchmarks and how one is run.

Each benchmark is a module of the ``benchmarks`` package of the source checkout, with
``main(argv) -> int``; adding one is one line in :data:`BENCHMARKS`. The package ships with the
source tree, not with an installed ``cloq_engine``: there ``cloq bench --help`` still lists every
benchmark, and running one says where to get them. Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple


class Benchmark(NamedTuple):
    module: str  # in the source tree's benchmarks/ package
    what: str  # one line for `cloq bench --help`


BENCHMARKS: Dict[str, Benchmark] = {
    "quantize": Benchmark("benchmarks.quantize", "RTN vs GPTQ: time and calibrated error at 2/3/4 bits (CPU)"),
    "init": Benchmark("benchmarks.init", "calibrated inits: solve time and objective per method (CPU or GPU)"),
    "solver": Benchmark("benchmarks.solver", "the default CLoQ solve vs the eigh route, alone and beside a busy process"),
    "cpu_backend": Benchmark("benchmarks.cpu_backend", "the C++ CPU backend vs the torch reference (--tune: its constants)"),
    "causal_cpu": Benchmark("benchmarks.causal_cpu", "a quantized causal LM vs its fp32 model on the CPU (--profile: where the time goes)"),
    "prepare": Benchmark("benchmarks.prepare", "prepare_model seconds per block by stage"),
    "moe_init": Benchmark("benchmarks.moe_init", "per-expert calibrated error after init on tiny MoE models"),
    "finetune": Benchmark("benchmarks.finetune", "the fine-tuning study: inits after training (--at-init: before)"),
    "kernels": Benchmark("benchmarks.kernels", "GPU kernels: every forward path by M, the layer step, peers"),
    "train": Benchmark("benchmarks.train", "GPU model training step vs PEFT, QLoRA and dense baselines"),
    "gguf": Benchmark("benchmarks.gguf", "llama.cpp serving: perplexity and tokens/s of our GGUF exports vs llama-quantize"),
    "session": Benchmark("benchmarks.session", "the GPU session (quick, full-N) in one call: gpu_session.sh runs it"),
}


class SourceTreeMissing(RuntimeError):
    """The benchmarks are not beside this cloq_engine (an installed package)."""


def source_root() -> Path:
    """The checkout this ``cloq_engine`` was imported from."""
    return Path(__file__).resolve().parent.parent


def _benchmarks_package():
    """The ``benchmarks`` package of this checkout, imported once under its own name (no sys.path change)."""
    root = source_root()
    init = root / "benchmarks" / "__init__.py"
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() != init.resolve():
            raise SourceTreeMissing(f"another `benchmarks` package is imported ({loaded.__file__}), not {init}")
        return loaded
    if not init.is_file():
        raise SourceTreeMissing(
            f"the benchmarks ship with the source checkout, not the installed package ({root} has no "
            "benchmarks/): clone the repository, install it there (`make setup`) and run `cloq bench` from it")
    spec = importlib.util.spec_from_file_location("benchmarks", init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules["benchmarks"]
        raise
    return package


def run(name: str, argv: List[str]) -> int:
    """Run benchmark ``name`` with ``argv``; its exit status."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    _benchmarks_package()
    module = importlib.import_module(BENCHMARKS[name].module)
    return module.main(list(argv)) or 0


def help_text() -> str:
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"  {n:<{width}}  {b.what}" for n, b in BENCHMARKS.items())
