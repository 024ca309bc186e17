"""The `cloq` command line on the embedded real MiniLM and text (small settings to stay fast)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cloq_engine.cli import main

FAST = ["--samples", "26", "--seq-len", "64", "--no-progress"]  # 1664 tokens: more than any in_features (1536)


def _run(*argv):
    """Run the real console entry point in a subprocess; returns (code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "cloq_engine.cli", *argv], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, p.stderr


def _main(capsys, *argv):
    """The same in this process (no interpreter start-up, no second import of torch and transformers):
    for every command but the end-to-end test of the console entry point above."""
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, word", [
    (["prepare", "--bits", "5", "--out", "x"], "--bits"),
    (["prepare", "--group-size", "48", "--out", "x"], "--group-size"),
    (["prepare", "--rank", "0", "--out", "x"], "--rank"),
    (["prepare", "--quantizer", "awq", "--out", "x"], "--quantizer"),
    (["prepare", "--model", "/no/such/dir", "--out", "x"], "--model"),
    (["prepare", "--model", __file__, "--out", "x"], "is a file; expected a directory"),
    (["eval", "/no/such/ckpt"], "checkpoint"),
    (["finetune", ".", "--steps", "-3"], "--steps"),
])
def test_bad_arguments_exit_2_with_one_line_naming_the_argument(argv, word, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err


@pytest.mark.slow
def test_prepare_then_eval_on_embedded_default(tmp_path, capsys):
    out = tmp_path / "ckpt"
    code, stdout, stderr = _run("prepare", "--bits", "4", "--group-size", "64", "--out", str(out), *FAST)
    assert code == 0, stderr
    assert "encoder.layer.0.attention.self.query" in stdout and "mean calibrated error" in stdout
    assert "% lower" in stdout and "WARNING" not in stdout + stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    code, stdout, stderr = _run("eval", str(out), "--samples", "32", "--json")
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert 0.8 < result["score"]["cosine"] < 1.0 and result["score"]["spearman"] > 0.5
    one = tmp_path / "one.txt"
    one.write_text("A single paragraph of held-out text, long enough to embed.\n")
    assert main(["eval", str(out), "--data", str(one), "--json"]) == 0
    captured = capsys.readouterr()
    assert "Spearman cannot be computed from 1 paragraph(s)" in captured.err and "n/a" in captured.out
    assert json.loads(captured.out.strip().splitlines()[-1])["score"]["spearman"] is None


@pytest.mark.slow
def test_failed_prepare_leaves_nothing_at_out(tmp_path, capsys):
    out = tmp_path / "ckpt"
    text = tmp_path / "tiny.txt"
    text.write_text("Too short to calibrate.\n")
    code, _, stderr = _main(capsys, "prepare", "--calib", str(text), "--out", str(out), *FAST)
    assert code == 1 and "too little calibration data" in stderr and "Traceback" not in stderr
    assert not out.exists() and not any(tmp_path.glob("ckpt*tmp*"))


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, stderr = _main(capsys, "eval", str(bad))
    assert code == 1 and "Traceback" not in stderr and "error" in stderr


@pytest.mark.slow
def test_compare_writes_table_json_and_png(tmp_path, capsys):
    # RTN: the table, JSON and plot are the point here; GPTQ of every layer is tested elsewhere
    code, stdout, stderr = _main(capsys, "compare", "--bits", "2", "--inits", "zero", "cloq", "--quantizer", "rtn",
                                 "--eval-samples", "16", "--out", str(tmp_path), *FAST)
    assert code == 0, stderr
    res = json.load(open(tmp_path / "compare.json"))
    by_init = {r["init"]: r for r in res["results"]}
    assert by_init["cloq"]["mean_err_init"] < by_init["zero"]["mean_err_init"]
    assert (tmp_path / "compare.png").stat().st_size > 1000


@pytest.mark.slow
def test_compare_passes_the_init_flags_to_every_init(tmp_path, monkeypatch):
    """`cloq compare` built its LoRAConfig without the init flags: they were accepted and ignored.
    prepare_model is replaced by a recorder (the real one is tested above): the configs are the point."""
    from cloq_engine import hf
    from cloq_engine.hf.prepare import LayerReport, PrepareReport

    seen = {}

    def record(model, qc, lc, **kwargs):
        seen[(lc.init.value, lc.requant_rounds)] = lc
        model.cloq_report = PrepareReport(layers=[LayerReport("x", (1, 1), 0.1, 0.1, 4.0, 0.0, 0.0)])
        return model

    monkeypatch.setattr(hf, "prepare_model", record)
    assert main(["compare", "--bits", "4", "--inits", "zero", "loftq", "cloq", "cloq+requant",
                 "--init-solver", "exact", "--power-iters", "3", "--init-damp", "0.01", "--init-iters", "7",
                 "--requant-rounds", "2", "--eval-samples", "4", "--samples", "2", "--seq-len", "32",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    assert set(seen) == {("zero", 0), ("loftq", 0), ("cloq", 2), ("cloq", 3)}  # cloq+requant: its own 3 rounds
    for lc in seen.values():
        assert (lc.init_solver.value, lc.init_power_iters, lc.init_damp, lc.init_iters) == ("exact", 3, 0.01, 7)


@pytest.mark.slow
def test_finetune_runs_trainer_and_saves_adapter(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert _main(capsys, "prepare", "--bits", "2", "--init", "zero", "--quantizer", "rtn", "--out", str(ckpt),
                 *FAST)[0] == 0
    code, stdout, stderr = _main(capsys, "finetune", str(ckpt), "--steps", "3", "--batch-size", "4", "--seq-len", "32",
                                "--out", str(tmp_path / "ft"), "--json")
    assert code == 0, stderr
    res = json.loads(stdout.strip().splitlines()[-1])
    assert len(res["losses"]) == 3 and all(l == l for l in res["losses"])
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()


@pytest.fixture(scope="module")
def tiny_causal_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded tokenizer, standing in for a local decoder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cloq_engine import data

    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         architectures=["LlamaForCausalLM"])
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_decoder_prepare_eval_finetune_report_perplexity(tiny_causal_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    code, _, stderr = _main(capsys, "prepare", "--model", str(tiny_causal_dir), "--bits", "4", "--group-size", "32",
                           "--out", str(ck), "--samples", "4", "--seq-len", "32", "--no-progress")
    assert code == 0, stderr
    assert "Loading weights" not in stderr  # transformers' own bar obeys --no-progress too
    code, stdout, stderr = _main(capsys, "eval", str(ck), "--samples", "4", "--json")
    assert code == 0, stderr
    res = json.loads(stdout.strip().splitlines()[-1])
    ppl, base_ppl = res["score"]["perplexity"], res["full_precision"]["perplexity"]
    assert 1 < ppl < 1e6 and abs(ppl - base_ppl) / base_ppl < 0.5  # a random model: ppl ~ vocab size
    code, stdout, stderr = _main(capsys, "finetune", str(ck), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                                "--out", str(tmp_path / "ft"), "--json")
    assert code == 0, stderr
    assert len(json.loads(stdout.strip().splitlines()[-1])["losses"]) == 2


def test_eval_scores_several_checkpoints_on_both_domains_and_prints_greedy_answers(tiny_causal_dir, tmp_path):
    cks = []
    for init in ("cloq", "zero"):
        cks.append(str(tmp_path / init))
        code, _, stderr = _run("prepare", "--model", str(tiny_causal_dir), "--bits", "2", "--group-size", "32",
                               "--init", init, "--out", cks[-1], "--samples", "4", "--seq-len", "32", "--no-progress")
        assert code == 0, stderr
    code, stdout, stderr = _run("eval", *cks, "--samples", "2", "--prompt", "a list is", "--max-new-tokens", "4",
                                "--json")
    assert code == 0, stderr
    res = json.loads(stdout.strip().splitlines()[-1])
    assert [set(s) for s in res["scores"]] == [{"perplexity", "perplexity (code)"}] * 2
    assert res["scores"][0] != res["scores"][1]
    assert set(res["answers"]) == {"full precision", "2-bit gptq, init=cloq", "2-bit gptq, init=zero"}
    assert "[2-bit gptq, init=zero]" in stdout and "prompt: a list is" in stdout


# -- --out never destroys what the program did not write (all refused before any work) -------------
def _user_dir(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def _fake_checkpoint(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "cloq"}}))
    return path


@pytest.mark.parametrize("case, message", [
    ("non-empty", "is not empty and is not a cloq checkpoint"),
    ("non-empty --overwrite", "is not empty and is not a cloq checkpoint"),
    ("dot", "is or contains the working directory"),
    ("empty string", "is empty"),
    ("model dir", "is, holds or lies inside the input"),
    ("inside model dir", "is, holds or lies inside the input"),
    ("previous checkpoint", "holds a cloq checkpoint: pass --overwrite to replace it"),
    ("parent is a file", "is not a directory"),
])
def test_prepare_out_refusals_keep_every_file(case, message, tmp_path, monkeypatch, capsys):
    work = _user_dir(tmp_path / "work")
    model = _user_dir(tmp_path / "model")
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    other = _user_dir(tmp_path / "other")
    monkeypatch.chdir(work)
    out, extra = {
        "non-empty": (str(other), []), "non-empty --overwrite": (str(other), ["--overwrite"]),
        "dot": (".", []), "empty string": ("", []), "model dir": (str(model), []),
        "inside model dir": (str(model / "q"), []), "previous checkpoint": (str(ckpt), []),
        "parent is a file": ("notes.txt/ck", []),
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["prepare", "--model", str(model), "--out", out, *extra, *FAST]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cloq prepare: error: --out") and message in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model", "other", "work"]


def test_finetune_refuses_to_write_over_its_checkpoint(tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    assert main(["finetune", str(ckpt), "--out", str(ckpt)]) == 1
    assert "inside the input" in capsys.readouterr().err


@pytest.mark.slow
def test_too_little_calibration_is_not_reported_as_a_success(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "ck"), "--samples", "2", "--seq-len", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: not a measure of quality: calibration had 128 tokens, fewer than in_features (up to 1536)" in out
    assert "% lower" not in out


@pytest.mark.parametrize("seq_len, message", [
    ("4", "--seq-len 4 is too short to calibrate on"),
    ("600", "--seq-len 600 exceeds the model's max_position_embeddings=512"),
])
def test_seq_len_out_of_range_is_named(seq_len, message, tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "ck"), "--seq-len", seq_len, "--no-progress"]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_eval_refuses_a_quantized_base(tmp_path):
    """(Before: `--model X --out X` replaced X, then eval compared the checkpoint with itself: cosine 1.0000.)"""
    from cloq_engine import commands

    other = _fake_checkpoint(tmp_path / "other")
    with pytest.raises(commands.CLIError, match="is a cloq checkpoint, not full precision"):
        commands._base_model(None, {"base_model": str(other)})


# -- signals, space, summaries -------------------------------------------------------------------
def test_sigterm_is_handled_like_an_interrupt_staging_removed_exit_143(tmp_path, monkeypatch, capsys):
    import signal
    import time

    import safetensors.torch

    from tiny_models import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "m")

    def killed(tensors, filename, metadata=None):  # SIGTERM arrives while the weights are written
        with open(filename, "wb") as f:
            f.write(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["prepare", "--model", model, "--out", str(tmp_path / "ck"), "--quantizer", "rtn", "--init", "zero",
                 "--group-size", "32", "--rank", "4", "--samples", "2", "--seq-len", "32", "--no-progress"])
    assert code == 143
    assert "terminated (SIGTERM); nothing was written" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no .ck.tmp-* staging directory left
    assert signal.getsignal(signal.SIGTERM) == before


def test_finetune_checks_free_space_before_training(tmp_path, monkeypatch, capsys):
    import collections

    from cloq_engine.hf import output_dir

    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 4096)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    assert main(["finetune", str(ckpt), "--out", str(tmp_path / "ft")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not enough free space to write" in err and str(tmp_path / "ft") in err
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("metric, before, after, full, words", [
    ("perplexity", 20.0, 15.0, 10.0, "recovered 50.0% of the gap"),
    ("perplexity", 20.0, 9.0, 10.0, "closed the whole gap to full precision and went 1.0000 past it"),  # was -2131.5%
    ("perplexity", 20.0, 30.0, 10.0, "widened the gap to full precision by 100.0%"),
    ("perplexity", 9.0, 8.0, 10.0, "already matched full precision before fine-tuning"),
    ("cosine", 0.90, 0.95, 1.0, "recovered 50.0% of the gap"),
])
def test_finetune_gap_summary_is_right_on_both_sides_of_full_precision(metric, before, after, full, words):
    from cloq_engine.commands import gap_summary

    line = gap_summary(metric, before, after, full)
    assert words in line and "-" not in line.split("(")[0].replace("fine-tuning", "")


def test_help_and_version_answer_without_importing_torch():
    code = ("import sys\nfrom cloq_engine import cli\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[-1] == "False False"  # before: --help imported torch (2 s)
    usage = "\n".join(out)
    assert "{prepare,eval,compare,finetune,export,bench}" in usage and "export" in usage.split("positional")[0]
    assert any(line.startswith("cloq-engine ") for line in out)


def test_the_package_has_no_import_cycle():
    """Every import (module level or deferred inside a function) follows the data flow; the last
    circle was hf/persistence <-> hf/quantizer."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    mods = {}
    for path in (root / "cloq_engine").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names}
        # package __init__ files only re-export: an edge into one is not a dependency on its siblings
        graph[mod] = {d for d in deps if d in mods and d != mod and mods[d].name != "__init__.py"}
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen:
            return
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)


# -- --dtype, and messages in the command line's words (issue 23) ---------------------------------
@pytest.fixture(scope="module")
def tiny_bf16_dir(tmp_path_factory):
    """A tiny Llama saved in bfloat16 (its config says so), with MiniLM's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_models import tiny_llama_dir

    path = tiny_llama_dir(tmp_path_factory.mktemp("fp32"))
    bf16 = tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(path).save_pretrained(bf16)
    return bf16


def _stored_bits_per_weight(ckpt, total_weights):
    """Whole-model bits per weight from the file itself: every tensor but the LoRA factors."""
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys() if ".lora_" not in k)
    return 8 * nbytes / total_weights


@pytest.mark.parametrize("dtype, stored", [("auto", torch.bfloat16), ("float32", torch.float32),
                                           ("float16", torch.float16)])
def test_prepare_dtype_stores_the_unquantized_tensors_so_and_reports_what_is_stored(dtype, stored, tiny_bf16_dir,
                                                                                   tmp_path, capsys):
    """The CLI loaded every model in float32 and stored a bf16 model's embeddings and norms in float32."""
    from safetensors import safe_open

    ck = tmp_path / "ck"
    assert main(["prepare", "--model", str(tiny_bf16_dir), "--bits", "4", "--group-size", "32", "--dtype", dtype,
                 "--out", str(ck), "--samples", "4", "--seq-len", "32", "--no-progress", "--json"]) == 0
    storage = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["storage"]
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    name = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[stored]
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == name
    assert {v for k, v in dtypes.items() if ".lora_" in k} == {"F32"}  # calibrated factors stay float32
    assert json.loads((ck / "config.json").read_text())["dtype"] == str(stored).rpartition(".")[2]
    assert storage["whole_model_bits_per_weight"] == pytest.approx(
        _stored_bits_per_weight(ck, storage["total_weights"]), rel=1e-9)


def test_an_out_another_run_is_writing_is_refused_before_any_work(tmp_path, capsys):
    """Two runs with the same --out: the second refused only after all of its compute."""
    out = tmp_path / "ck"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from cloq_engine.hf.output_dir import claim_output; "
                               f"claim_output({str(out)!r}); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["prepare", "--out", str(out), *FAST]) == 1
        err = capsys.readouterr().err
        assert f"is being written by another process (pid {holder.pid})" in err and not out.exists()
    finally:
        holder.communicate("")
    assert main(["prepare", "--out", str(out), "--seq-len", "4", "--no-progress"]) == 1  # claims, then refuses
    assert "--seq-len 4 is too short" in capsys.readouterr().err  # the dead holder's claim was taken over
    assert os.listdir(tmp_path) == []  # and given back when the command ended


def test_refusals_at_save_time_speak_the_cli_words(tmp_path):
    from cloq_engine import commands
    from tiny_models import prepared_tiny

    ckpt = _fake_checkpoint(tmp_path / "ckpt")
    with pytest.raises(commands.CLIError, match="pass --overwrite to replace it"):
        commands._save(prepared_tiny("llama"), str(ckpt), None, overwrite=False)


def test_eval_of_a_plain_model_directory_says_it_is_not_a_cloq_checkpoint(tiny_bf16_dir, capsys):
    assert main(["eval", str(tiny_bf16_dir)]) == 1
    assert "is not a cloq checkpoint (its config.json has no cloq `quantization_config`)" in capsys.readouterr().err


def test_eval_says_when_the_recorded_base_model_is_not_on_this_machine():
    from cloq_engine import commands

    with pytest.raises(commands.CLIError, match=r"\(/elsewhere/model\) is not on this machine .*pass --base DIR"):
        commands._base_model(None, {"base_model": "/elsewhere/model"})


def test_a_benchmark_exiting_with_a_message_prints_it_as_is_and_exits_1(tmp_path, capsys):
    """A string SystemExit from a benchmark (benchmarks/finetune.py refusing a study of other settings)
    was passed to int() and the message printed wrapped in "invalid literal for int()"."""
    out = tmp_path / "study"
    out.mkdir()
    (out / "settings.json").write_text('{"rank": 999}')
    (out / "runs.jsonl").write_text("")
    assert main(["bench", "finetune", "--out", str(out)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("cloq bench finetune: error: ") and "holds a study with other settings" in last
    assert "invalid literal" not in last and last.count("error:") == 1
