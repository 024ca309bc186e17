"""The shipped config table: matching rules, coverage of the kernels, the on-disk cache."""
import json

import pytest
import triton

from cloq_engine.kernels import configs, dequant, dequant_gemm, dequant_gemm_t, gemv

KERNEL_CONFIGS = {
    "dequant": dequant.dequant_configs,
    "gemv": gemv.gemv_configs,
    "gemv_dot": gemv.gemv_dot_configs,
    "dequant_gemm": dequant_gemm.gemm_configs,
    "dequant_gemm_t": dequant_gemm_t.gemm_t_configs,
}


def test_most_specific_matching_entry_wins():
    entries = [{"config": {"a": 0}}, {"bits": 3, "config": {"a": 1}}, {"bits": 3, "n": 64, "config": {"a": 2}},
               {"m": 16, "config": {"a": 3}}]
    key = {"m": 1, "n": 64, "k": 128, "bits": 3, "group": 128}
    assert configs.match(entries, key) == {"a": 2}
    assert configs.match(entries, {**key, "n": 32}) == {"a": 1}
    assert configs.match(entries, {**key, "bits": 4}) == {"a": 0}
    assert configs.match(entries, {**key, "bits": 4, "m": 16}) == {"a": 3}
    assert configs.match(entries[1:3], {**key, "bits": 2}) is None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_arch_ships_a_default_for_every_kernel_drawn_from_its_checked_configs(arch):
    table = configs.shipped_table()[arch]
    assert set(table) == set(KERNEL_CONFIGS)
    for kernel, entries in table.items():
        assert any(set(e) == {"config"} for e in entries), f"{kernel}: no catch-all entry"
        checked = [configs.config_to_dict(c) for c in KERNEL_CONFIGS[kernel]()]
        for e in entries:
            cfg = configs.config_to_dict(configs.to_config(e["config"]))
            assert cfg in checked, f"{arch} {kernel}: {cfg} is not among the compile-checked configs"


def test_unknown_arch_uses_the_cache_then_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_memo", {})
    monkeypatch.setattr(configs, "arch_of", lambda device: "sm_120")
    default = triton.Config({"BLOCK_N": 1}, num_warps=4, num_stages=1)
    got = configs.lookup("gemv", "cpu", default, m=1, n=64, k=128, bits=4, group=32)
    assert got is default  # no table, no cache, no GPU to tune on
    cached = {"gemv|bits=4,group=32,k=128,m=1,n=64": {"BLOCK_N": 7, "num_warps": 2, "num_stages": 3}}
    (tmp_path / f"triton-configs-sm_120-triton{triton.__version__}.json").write_text(json.dumps(cached))
    monkeypatch.setattr(configs, "_memo", {})
    got = configs.lookup("gemv", "cpu", default, m=1, n=64, k=128, bits=4, group=32)
    assert (got.kwargs, got.num_warps, got.num_stages) == ({"BLOCK_N": 7}, 2, 3)
