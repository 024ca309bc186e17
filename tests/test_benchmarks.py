"""The benchmarks as a package: every module is registered with ``cloq bench`` and answers
``--help``, and each runs end to end at tiny settings on the CPU (``--smoke`` where it has one), so a
GPU session can trust them to run in one call. Timings are never asserted."""
import ast
import json
import logging
import sys
from pathlib import Path

import pytest

from benchmarks import baselines, causal_cpu, cpu_backend, init, kernels, moe_init, prepare, quantize, solver, train
from cloq_engine import bench

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _defines_main(path: Path) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)


def test_every_benchmark_module_is_registered_and_every_entry_exists():
    """A benchmark is a module with main(): each one is reachable from `cloq bench`, and nothing else."""
    scripts = {f"benchmarks.{p.stem}" for p in BENCH.glob("*.py") if _defines_main(p)}
    assert {b.module for b in bench.BENCHMARKS.values()} == scripts


def test_no_benchmark_edits_sys_path():
    offenders = [p.name for p in BENCH.glob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, offenders


@pytest.mark.parametrize("name", sorted(bench.BENCHMARKS))
def test_cloq_bench_help_of_every_benchmark(name, capsys):
    from cloq_engine.cli import main

    assert main(["bench", name, "--help"]) == 0  # the benchmark's own argparse exit, as a status
    assert f"usage: cloq bench {name}" in capsys.readouterr().out


def test_cloq_bench_help_lists_every_benchmark(capsys):
    from cloq_engine.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in bench.BENCHMARKS)


def test_cloq_bench_without_the_source_tree_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    """An installed package has no benchmarks/ beside it: a clear error, exit 1."""
    from cloq_engine.cli import main

    monkeypatch.setattr(bench, "source_root", lambda: tmp_path)
    monkeypatch.delitem(sys.modules, "benchmarks")
    assert main(["bench", "quantize"]) == 1
    err = capsys.readouterr().err
    assert "cloq bench: error:" in err and "source checkout" in err and str(tmp_path) in err


@pytest.mark.slow
def test_train_smoke_writes_a_row_per_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLOQ_BACKEND", "torch")  # the smoke run sets it; restored after the test
    out = tmp_path / "train.json"
    lines = tmp_path / "train.jsonl"
    assert train.main(["--smoke", "--layers", "1", "--variants", "w2,nf4,peft,peft-bf16,dense-fold",
                                "--json", str(out), "--jsonl", str(lines)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["w2", "nf4", "peft", "peft-bf16", "dense-fold"]
    streamed = [json.loads(line) for line in lines.read_text().splitlines()]
    assert [r["variant"] for r in streamed] == ["w2", "nf4", "peft", "peft-bf16", "dense-fold", "lm-head+loss"]
    assert streamed[-1]["lm_head_loss_ms"] > 0
    assert all(r["trainable_params"] == rows[0]["trainable_params"] > 0 for r in rows)  # same LoRA everywhere
    assert all(r["loss"] == r["loss"] and r["median_step_ms"] > 0 for r in rows)
    assert "median ms" in capsys.readouterr().out


def test_train_without_a_gpu_says_so_and_succeeds(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(["--variants", "w4"]) == 0
    assert "no GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_kernels_smoke_runs_every_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLOQ_BACKEND", "triton")  # the smoke run sets both; restored after the test
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "kernels.json"
    assert kernels.main(["--smoke", "--bits", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["op"], r["variant"], r["m"]) for r in rows}
    assert {("fwd", "gemv", 1), ("fwd", "fused", 40), ("fwd", "dequant_mm:concat", 40), ("fwd", "dequant_mm:addmm", 1),
            ("fwd", "dense", 40), ("step", "auto", 40), ("step", "dense", 40)} <= seen
    assert "CLOQ_TRITON_PATH" not in __import__("os").environ


def test_dense_fold_baseline_matches_dense_lora_in_both_folds(monkeypatch):
    """The dense-with-our-folding baseline computes the same function and gradients as a plain
    frozen Linear + LoRA, whichever fold each product takes."""
    import torch

    torch.manual_seed(0)
    for K, N in ((24, 40), (40, 24)):  # forward concat / dX addmm, and the reverse
        lin = torch.nn.Linear(K, N, bias=True).double()
        layer = baselines.DenseFoldLoRALinear(lin, rank=5, alpha=10.0)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(3, 7, K, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(3, 7, N, dtype=torch.float64)
        layer(x).backward(dy)
        xr = x.detach().clone().requires_grad_(True)
        A, B = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
        (lin(xr) + 2.0 * (xr @ A.t()) @ B.t()).backward(dy)
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(layer.lora_A.grad, A.grad)
        torch.testing.assert_close(layer.lora_B.grad, B.grad)


@pytest.mark.slow
def test_causal_cpu_measures_each_pair_and_writes_a_line_each(tmp_path, capsys):
    import cloq_engine as ce
    from tiny_models import tiny_llama_dir

    from cloq_engine import data

    base = tiny_llama_dir(tmp_path / "m")
    model, tok = data.load_model(base)
    calib = data.token_blocks(data.calibration_paragraphs(), tok, 16, 2)
    model = ce.prepare_model(model, ce.QuantConfig(bits=2, group_size=32, method="rtn"),
                             ce.LoRAConfig(rank=4, init="zero"), calib=calib)
    model.cloq_config["base_model"] = base
    from cloq_engine.hf.quantizer import attach_quantization_config

    attach_quantization_config(model)
    ck = ce.save_pretrained(model, tmp_path / "ck", tokenizer=tok)
    out, js = tmp_path / "cpu.jsonl", tmp_path / "cpu.json"
    assert causal_cpu.main([str(ck), "--repeats", "1", "--seq-len", "16", "--batch", "2", "--train-seq", "8",
                            "--prompt", "4", "--decode-tokens", "2", "--threads", "1", "--profile",
                            "--out", str(out), "--json", str(js)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["measurement"].split(" ")[0] for r in rows] == ["forward", "prefill", "decode", "train"]
    assert all(r["peer_s"] > 0 and r["ours_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "decode tokens/s" in printed and "one call at M = 1" in printed
    profile = json.loads(js.read_text())["profile"]
    assert {"fp32 forward", "ours decode", "one_call_m1"} <= set(profile)
    assert profile["ours forward"]["hooked"]["by_shape"]  # the quantized layers were timed by shape


def test_quantize_synthetic_layer_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert quantize.main(["--size", "64", "--tokens", "96", "--bits", "2", "--group-size", "32", "--repeats", "1",
                          "--skip-minilm", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["bits"] for r in res["rows"]] == [2] and res["rows"][0]["rtn_rel_err"] > 0
    assert res["command"].startswith("cloq bench quantize --size 64")
    assert "geomean ratio" in capsys.readouterr().out


def test_init_synthetic_part_writes_the_headline(tmp_path):
    out = tmp_path / "init.json"
    assert init.main(["--size", "128", "--no-minilm", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {r["method"] for r in res["synthetic"]} >= {"cloq (default)", "eig + full SVD", "quailora"}
    assert res["headline"]["speedup"] > 0 and res["minilm"] == []


def test_solver_alone_and_beside_a_spinning_process(tmp_path, capsys):
    import subprocess

    out = tmp_path / "solver.jsonl"
    assert solver.main(["--size", "128", "--rank", "4", "--repeats", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["run"] for r in rows] == ["alone", "busy", "eig route", "summary"]
    assert rows[-1]["speedup_vs_eig"] > 0 and rows[-1]["busy_slowdown"] > 0
    assert all(r["product_threads"] >= 1 for r in rows[:2])
    spinning = subprocess.run(["pgrep", "-f", solver.SPIN], capture_output=True, text=True).stdout.split()
    assert not spinning  # the spinners it started are gone
    assert "held to <= 2x" in capsys.readouterr().out


def test_cpu_backend_smoke(tmp_path):
    out = tmp_path / "cpu_backend.json"
    assert cpu_backend.main(["--smoke", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {(r["out"], r["in"]) for r in res["backends"]} == set(cpu_backend.SMOKE_SHAPES)
    assert len(res["pack"]) == 3


@pytest.mark.slow
def test_prepare_one_small_block(tmp_path, capsys):
    out = tmp_path / "prepare.json"
    assert prepare.main(["--shape", "small", "--blocks", "1", "--samples", "2", "--seq-len", "16", "--rank", "4",
                         "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["blocks"]) == 1 and res["layers"]
    assert "per block" in capsys.readouterr().out


def test_moe_init_table_and_lines(tmp_path, capsys):
    out = tmp_path / "moe.jsonl"
    assert moe_init.main(["--archs", "qwen3_moe", "--bits", "2", "--samples", "2", "--seq-len", "16", "--rank", "2",
                          "--jsonl", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["arch"], r["bits"]) for r in rows] == [("qwen3_moe", 2)] and rows[0]["experts"] > 0
    assert "| qwen3_moe | 2 |" in capsys.readouterr().out
    # run in-process, it must not leave the engine's warnings silenced for what runs next
    assert logging.getLogger("cloq_engine").level == logging.NOTSET
