"""Shipped launch configs per architecture, with autotuning only as a cached fallback.

``configs.json`` (next to this file) maps an architecture (``sm_90``, ``sm_80``) and a kernel name
to a list of entries ``{"m": .., "n": .., "k": .., "bits": .., "group": .., "config": {...}}``;
a key left out matches anything, ``m`` is an M bucket (the next power of two). :func:`lookup`
returns the matching entry with the most keys given, so a table can hold one default per kernel
and exact rows for the shapes that were tuned. ``config`` holds the kernel's block sizes plus
``num_warps`` (and ``num_stages``).

For an architecture the file does not cover, and when a ``bench`` callable is given, every candidate
is timed once with ``triton.testing.do_bench`` and the winner is cached on disk under
``$CLOQ_CACHE_DIR`` (default ``~/.cache/cloq_engine``), so only the first call of a shape pays.
Without ``bench`` (or under CUDA-graph capture, or in the interpreter) the kernel's default is used.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import triton

from .utils import INTERPRET, shared_limit

logger = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).with_name("configs.json")
KEYS = ("m", "n", "k", "bits", "group")
_lock = threading.Lock()
_memo: Dict[tuple, triton.Config] = {}


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(max(int(m), 1))


@lru_cache(maxsize=None)
def shipped_table() -> dict:
    with open(TABLE_PATH) as f:
        return json.load(f)


def arch_of(device) -> str:
    """``sm_XY`` of a CUDA device; ``sm_80`` for anything else (the interpreter, meta)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return "sm_80"


def to_config(entry: dict) -> triton.Config:
    kw = {k: v for k, v in entry.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(kw, num_warps=entry.get("num_warps", 4), num_stages=entry.get("num_stages", 1))


def config_to_dict(cfg: triton.Config) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def match(entries: List[dict], key: dict) -> Optional[dict]:
    """The entry that matches ``key`` on every field it names, naming the most fields."""
    best, best_score = None, -1
    for e in entries:
        named = [k for k in KEYS if k in e]
        if all(e[k] == key[k] for k in named) and len(named) > best_score:
            best, best_score = e, len(named)
    return None if best is None else best["config"]


def cache_dir() -> Path:
    return Path(os.environ.get("CLOQ_CACHE_DIR") or Path.home() / ".cache" / "cloq_engine")


def _cache_file(arch: str) -> Path:
    return cache_dir() / f"triton-configs-{arch}-triton{triton.__version__}.json"


def _read_cache(arch: str) -> dict:
    try:
        with open(_cache_file(arch)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_cache(arch: str, data: dict) -> None:
    path = _cache_file(arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not break a forward pass
        logger.warning("cloq_engine: cannot cache tuned kernel configs in %s: %s", path, e)


def _autotune(candidates: List[triton.Config], bench: Callable[[triton.Config], None]) -> triton.Config:
    from triton.testing import do_bench

    times = []
    for cfg in candidates:
        try:
            times.append((do_bench(lambda: bench(cfg), warmup=5, rep=20, return_mode="median"), cfg))
        except Exception as e:  # a config that cannot launch here (resources) is skipped
            logger.info("cloq_engine: config %s failed to run: %s", cfg, e)
    if not times:
        raise RuntimeError("no candidate kernel config could run on this device")
    return min(times, key=lambda t: t[0])[1]


def lookup(kernel: str, device, default: triton.Config, candidates: Optional[List[triton.Config]] = None,
           bench: Optional[Callable[[triton.Config], None]] = None, **key) -> triton.Config:
    """The launch config of ``kernel`` for ``key`` (m, n, k, bits, group) on ``device``.

    Shipped table first, then the on-disk cache of earlier autotuning, then autotuning over
    ``candidates`` with ``bench`` (a GPU outside graph capture only), else ``default``.
    """
    arch = arch_of(device)
    key = {"m": m_bucket(key.get("m", 1)), **{k: int(key[k]) for k in ("n", "k", "bits", "group") if k in key}}
    memo_key = (kernel, arch, tuple(sorted(key.items())))
    cfg = _memo.get(memo_key)
    if cfg is not None:
        return cfg
    entry = match(shipped_table().get(arch, {}).get(kernel, []), key)
    if entry is not None:
        cfg = to_config(entry)
    else:
        cache_key = f"{kernel}|" + ",".join(f"{k}={v}" for k, v in sorted(key.items()))
        cached = _read_cache(arch).get(cache_key)
        if cached is not None:
            cfg = to_config(cached)
        elif bench is not None and candidates and _can_tune(device):
            logger.warning("cloq_engine: no shipped %s config for %s %s; autotuning once (cached in %s)",
                           kernel, arch, key, cache_dir())
            cfg = _autotune(candidates, bench)
            with _lock:
                data = _read_cache(arch)
                data[cache_key] = config_to_dict(cfg)
                _write_cache(arch, data)
        else:
            return default
    _memo[memo_key] = cfg
    return cfg


def _can_tune(device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return not torch.cuda.is_current_stream_capturing()


# ---- the two tiled GEMMs (forward and transposed backward) choose their configs alike ----------
# One tiny config under the interpreter: it cannot benchmark and is slow per program.
INTERPRET_TILE = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)


def prune_tiled(candidates: List[triton.Config], x: torch.Tensor, bits: int, group_size: int, num_groups: int,
                shared_bytes: Callable[[dict, int, int, int], int]) -> List[triton.Config]:
    """Configs whose BLOCK_K serves one scale row and whose pipelined buffers (``shared_bytes(kwargs,
    stages, x bytes, bits)``) fit the device's shared memory; the shallowest one if none does."""
    limit = shared_limit(x.device)
    kept = [
        c for c in candidates
        if (num_groups == 1 or group_size % c.kwargs["BLOCK_K"] == 0)
        and shared_bytes(c.kwargs, c.num_stages, x.element_size(), bits) <= limit
    ]
    return kept or [min(candidates, key=lambda c: c.kwargs["BLOCK_K"])]


def pick_tiled(kernel: str, x: torch.Tensor, candidates: List[triton.Config], default: triton.Config,
               shared_bytes: Callable[[dict, int, int, int], int], N: int, K: int, bits: int, group_size: int,
               bench=None) -> triton.Config:
    """Shipped config (``configs.json``) of a tiled GEMM for this shape; autotuned once and cached only
    off the table. ``x`` is the [M, ·] activation the kernel streams."""
    if INTERPRET:
        return INTERPRET_TILE
    num_groups = max(K // group_size, 1)
    kept = prune_tiled(candidates, x, bits, group_size, num_groups, shared_bytes)
    cfg = lookup(kernel, x.device, default, kept, bench, m=x.shape[0], n=N, k=K, bits=bits, group=group_size)
    if num_groups > 1 and group_size % cfg.kwargs["BLOCK_K"]:  # a shape-wide entry, too deep for this group
        cfg = kept[0]
    return cfg
