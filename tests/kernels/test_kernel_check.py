"""The ahead-of-time code-generation check (compiles for sm_80/sm_90 without a GPU)."""
import json
import os
import subprocess
import sys

import pytest

from cloq_engine.kernels import check

KEYS = {"kernel", "arch", "config", "regs", "spill_bytes", "shared_bytes", "barriers"}


@pytest.mark.slow
def test_json_report_for_a_compiled_subset():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "cloq_engine.kernels.check", "--json", "--bits", "3",
         "--kernel", "gemv[3]", "--max-configs", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [r["arch"] for r in rows] == ["sm_80", "sm_90"]
    for r in rows:
        assert set(r) == KEYS
        assert r["kernel"] == "gemv[3]" and "SPLIT_K=" in r["config"]
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0
        assert 0 < r["shared_bytes"] <= 166912
        assert r["barriers"] <= 6  # the split-K hand-off and the epilogue only: none in the K loop


@pytest.mark.parametrize("cap,spill,shared,ok", [
    (80, 0, 166912, True), (80, 0, 166913, False), (90, 0, 232448, True), (90, 0, 232449, False), (90, 8, 1024, False),
])
def test_limits_are_the_architecture_maxima(cap, spill, shared, ok):
    assert check.within_limits(cap, spill, shared) is ok


@pytest.mark.parametrize("failing,rc", [(False, 0), (True, 1)])
def test_exit_status_reports_failing_configs(monkeypatch, capsys, failing, rc):
    monkeypatch.delenv("TRITON_INTERPRET")

    def fake_compile(case, cfg, cap):
        return check.CheckResult(case.name, f"sm_{cap}", "cfg", 64, 16 if failing else 0, 1024, 0,
                                 ok=not failing)

    monkeypatch.setattr(check, "compile_case", fake_compile)
    assert check.main(["--bits", "2", "--kernel", "dequant[2]", "--arch", "80"]) == rc
    out = capsys.readouterr().out
    assert "dequant[2]" in out and ("FAIL" in out) == failing


def test_every_shipped_config_is_covered():
    cases = check.kernel_cases()
    names = {c.name.split("[")[0] for c in cases}
    assert names == {"dequant_gemm", "gemv", "gemv_dot", "dequant_gemm_t", "dequant", "gram_syrk"}
    from cloq_engine.kernels.dequant_gemm import gemm_configs

    gemm = next(c for c in cases if c.name == "dequant_gemm[4]")
    assert len(gemm.configs) == len(gemm_configs())


@pytest.mark.parametrize("variant", ["3", "nf4"])
@pytest.mark.slow
def test_dequant_streams_3_bit_and_nf4_without_shared_memory_round_trips(variant):
    """The 3-bit planes and the NF4 register codebook keep one layout from the word loads to the stores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "cloq_engine.kernels.check", "--json", "--bits", variant, "--kernel",
         f"dequant[{variant}]", "--max-configs", "1", "--arch", "90", "--dtype", "bf16"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(proc.stdout)
    assert row["barriers"] == 0 and row["spill_bytes"] == 0
