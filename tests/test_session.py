"""The GPU session runner (benchmarks/session.py) on the CPU: the dry-run plan and its time budget,
results streamed to JSONL, and steps that fail, crash or hang without taking the rest down."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import session_steps

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
QUICK_LIMIT_S = 360  # one call, start-ups and JIT included
FULL_LIMIT_S = 480


@pytest.fixture(scope="module")
def session():
    from benchmarks import session

    return session


def _total(text: str) -> float:
    return float(re.search(r"total estimate: (\d+) s", text).group(1))


def test_quick_dry_run_lists_every_measurement_within_six_minutes(session, capsys):
    assert session.main(["quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _total(out) < QUICK_LIMIT_S
    assert sum(session.STARTUP_S + sum(m.est_s for m in s.plan(session.Context(Path("."), "quick")))
               for s in session.groups()["quick"]) < QUICK_LIMIT_S
    for what in ("ceiling: device copy", "ceiling: bf16 GEMM", "w3 4096x1001 M=2048 fwd+bwd", "nf4 4096x4096 M=1",
                 "decode ours w2 4096->14336", "decode gemlite-w4", "decode tinygemm-w4", "decode bnb-nf4",
                 "step ours w4 4096->14336", "step dense-fold 14336->4096", "model step peft-bf16",
                 "model step dense-fold", "model step bnb", "model LM head + loss alone", "prepare 1 block"):
        assert what in out, what


@pytest.mark.parametrize("group", [f"full-{i}" for i in range(1, 7)])
def test_each_full_group_fits_one_eight_minute_call(session, capsys, group):
    assert session.main([group, "--dry-run"]) == 0
    assert _total(capsys.readouterr().out) < FULL_LIMIT_S
    assert session_steps.BUDGETS[group] + session.GRACE_S < FULL_LIMIT_S


def test_quick_budget_and_grace_end_within_six_minutes(session):
    assert session_steps.BUDGETS["quick"] + session.GRACE_S < QUICK_LIMIT_S


def test_shell_entry_point_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), "quick", "--dry-run"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable, "OUT": str(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _total(proc.stdout) < QUICK_LIMIT_S
    proc = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), "full", "3", "--dry-run"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PY": sys.executable}, timeout=120)
    assert proc.returncode == 0 and "kernels.py sweep" in proc.stdout


def test_failures_crashes_and_hangs_are_recorded_and_the_session_goes_on(session, tmp_path, capsys):
    assert session.main(["selftest", "--out", str(tmp_path), "--budget", "8", "--grace", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "selftest.jsonl").read_text().splitlines()]
    got = {(r["step"], r["label"]): r for r in rows}
    assert got[("selftest-a", "first")]["us"] == 1.5
    assert got[("selftest-a", "fails")]["status"] == "error" and "a measurement that fails" in got[
        ("selftest-a", "fails")]["error"]
    assert got[("selftest-a", "skips")]["status"] == "skipped" and got[("selftest-a", "skips")]["reason"] == \
        "not installed"
    assert [r["us"] for r in rows if r["label"] == "after the failure"] == [2.0, 3.0]
    assert got[("selftest-a", "too long for the budget")]["status"] == "skipped"
    assert got[("selftest-crash", "before the crash")]["status"] == "ok"
    assert got[("selftest-crash", "(step)")]["rc"] == 3
    assert got[("selftest-hang", "before the hang")]["status"] == "ok"  # written before the kill
    assert got[("selftest-hang", "(step)")]["status"] == "timeout"
    assert got[("selftest-late", "(step)")]["status"] == "skipped"
    table = capsys.readouterr().out
    assert "a measurement that fails" in table and "timeout" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_without_a_gpu_every_measurement_is_skipped_with_the_reason(session, tmp_path):
    ctx = session.Context(out=tmp_path, group="quick")
    for name in ("correct", "decode", "model"):
        assert session.run_step(name, ctx) == 0
    rows = [json.loads(line) for line in (tmp_path / "quick.jsonl").read_text().splitlines()]
    assert rows and all(r["status"] == "skipped" and r["reason"] == "no CUDA device" for r in rows)


@pytest.mark.slow
def test_quick_runs_end_to_end_on_the_cpu_in_smoke_mode(tmp_path):
    """Every kind of quick measurement, its code run at tiny sizes under the Triton interpreter
    (CLOQ_SESSION_SMOKE=1), through the real parent/child runner: results or reasoned skips, no errors."""
    only = ["gpu, versions", "ceiling", "w3 4096x1001 M=1 ", "decode ours w4 4096", "decode gemlite-w2",
            "step dense-fold 14336", "model step w2", "model step bnb", "LM head"]  # one of each kind
    env = {**__import__("os").environ, "CLOQ_SESSION_SMOKE": "1", "TRITON_INTERPRET": "1", "CLOQ_NO_EXT": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.session", "quick", "--out", str(tmp_path), "--only",
                           ",".join(only), "--budget", "1500", "--step-slack", "100"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "quick.jsonl").read_text().splitlines()]
    measured = [r for r in rows if not r["label"].startswith(("(", "start"))]
    bad = [(r["label"], r.get("error")) for r in measured if r["status"] not in ("ok", "skipped")]
    assert not bad, bad
    assert all(r.get("reason") for r in measured if r["status"] == "skipped")
    labels = {r["label"] for r in measured if r["status"] == "ok"}
    for what in ("w3 4096x1001 M=1 fwd+bwd", "decode ours w4 4096->14336", "step dense-fold 14336->4096",
                 "model step w2", "model LM head + loss alone"):
        assert what in labels, what
    assert all(r["ok"] for r in measured if "fwd+bwd" in r["label"])
    assert "measurement" in proc.stdout  # the table came last
