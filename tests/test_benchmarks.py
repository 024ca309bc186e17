"""The benchmark scripts run end to end at tiny shapes on the CPU (``--smoke``), so a GPU session
can trust them to run in one call."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_train_smoke_writes_a_row_per_variant(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLOQ_BACKEND", "torch")  # the smoke run sets it; restored after the test
    out = tmp_path / "train.json"
    lines = tmp_path / "train.jsonl"
    assert _load("train").main(["--smoke", "--layers", "1", "--variants", "w2,nf4,peft,peft-bf16,dense-fold",
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
    assert _load("train").main(["--variants", "w4"]) == 0
    assert "no GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_kernels_smoke_runs_every_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLOQ_BACKEND", "triton")  # the smoke run sets both; restored after the test
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "kernels.json"
    assert _load("kernels").main(["--smoke", "--bits", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["op"], r["variant"], r["m"]) for r in rows}
    assert {("fwd", "gemv", 1), ("fwd", "fused", 40), ("fwd", "dequant_mm:concat", 40), ("fwd", "dequant_mm:addmm", 1),
            ("fwd", "dense", 40), ("step", "auto", 40), ("step", "dense", 40)} <= seen
    assert "CLOQ_TRITON_PATH" not in __import__("os").environ


def test_dense_fold_baseline_matches_dense_lora_in_both_folds(monkeypatch):
    """The dense-with-our-folding baseline computes the same function and gradients as a plain
    frozen Linear + LoRA, whichever fold each product takes."""
    import torch

    baselines = _load("baselines")
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
    out = tmp_path / "cpu.jsonl"
    assert _load("causal_cpu").main([str(ck), "--repeats", "1", "--seq-len", "16", "--batch", "2",
                                     "--train-seq", "8", "--decode-tokens", "2", "--threads", "1",
                                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["measurement"].split(" ")[0] for r in rows] == ["forward", "train", "decode"]
    assert all(r["peer_s"] > 0 and r["ours_s"] > 0 for r in rows)
    assert "decode tokens/s" in capsys.readouterr().out
