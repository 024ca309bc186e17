"""Streaming prepare: bitwise the in-memory result, in bounded memory, and resumable after SIGKILL."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cloq_engine as ce
from cloq_engine.hf import streaming
from tiny_models import tiny_calib, tiny_llama_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QC = ce.QuantConfig(bits=2, group_size=32, method="gptq")
LC = ce.LoRAConfig(rank=4, alpha=8, init="cloq")


def _llama(path, blocks=3, hidden=64, inter=128, shard="200KB"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path, max_shard_size=shard)
    return model


def _in_memory(src, out, qc, lc, calib, with_report=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ce.prepare_model(model, qc, lc, calib=calib)
    path = ce.save_pretrained(model, out)
    return (path, model.cloq_report) if with_report else path


def _rows(report):
    """What the per-layer table prints (timings aside)."""
    return [(r.name, r.shape, r.err_quant, r.err_init, r.bits_per_weight) for r in report.layers]


def _assert_same(a, b):
    sa, sb = ce.load_pretrained(a).state_dict(), ce.load_pretrained(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    _llama(d / "model")
    assert os.path.isfile(d / "model" / "model.safetensors.index.json")  # really sharded
    ref, report = _in_memory(d / "model", d / "ref", QC, LC, tiny_calib(4), with_report=True)
    return d / "model", ref, report


def _outside_source(path, kind):
    """A saved tiny model whose targets include a layer outside the block stack."""
    from tiny_models import tiny_model

    model = tiny_model("bert" if kind == "bert pooler" else "llama")
    model.save_pretrained(path)
    if kind == "bert pooler":
        return ce.LoRAConfig(rank=4, alpha=8, init="cloq")  # all-linear: pooler.dense is a target
    return ce.LoRAConfig(rank=4, alpha=8, init="cloq", target_modules=["q_proj", "down_proj", "lm_head"],
                          exclude=())


def _in_memory_any(src, out, qc, lc, calib):
    from transformers import AutoConfig

    from cloq_engine.hf.persistence import model_class_for

    model = model_class_for(AutoConfig.from_pretrained(src)).from_pretrained(src, dtype=torch.float32).eval()
    ce.prepare_model(model, qc, lc, calib=calib)
    return ce.save_pretrained(model, out)


@pytest.mark.parametrize("kind, outside", [("bert pooler", "pooler.dense"), ("targeted lm_head", "lm_head")])
@pytest.mark.slow
def test_targets_outside_the_block_stack_stream_and_resume_bitwise(kind, outside, tmp_path, monkeypatch):
    """Before: refused ("targets outside the block stack ['pooler.dense'] need the whole model in memory")."""
    lc = _outside_source(tmp_path / "src", kind)
    ref = _in_memory_any(tmp_path / "src", tmp_path / "ref", QC, lc, tiny_calib(4))
    out = streaming.prepare_pretrained(tmp_path / "src", tmp_path / "out", QC, lc, calib=tiny_calib(4))
    assert outside in ce.load_pretrained(out).cloq_config["targets"]
    _assert_same(out, ref)

    save = streaming._save_atomic

    def interrupted_at_the_tail(tensors, file):  # every block is written; the tail is not
        if file.endswith(streaming.TAIL_FILE):
            raise KeyboardInterrupt
        save(tensors, file)

    monkeypatch.setattr(streaming, "_save_atomic", interrupted_at_the_tail)
    with pytest.raises(KeyboardInterrupt):
        streaming.prepare_pretrained(tmp_path / "src", tmp_path / "again", QC, lc, calib=tiny_calib(4))
    monkeypatch.undo()
    streaming.prepare_pretrained(tmp_path / "src", tmp_path / "again", QC, lc, calib=tiny_calib(4), resume=True)
    _assert_same(tmp_path / "again", ref)


def test_nan_in_the_shards_is_refused_before_any_block_naming_every_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    _llama(tmp_path / "src", blocks=2, shard="10GB")
    file = tmp_path / "src" / "model.safetensors"
    state = load_file(file)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    state["model.norm.weight"][3] = float("inf")
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or Inf weights in 2 tensor\(s\): model.layers.1.mlp.up_proj.weight "
                                         r"\(1 NaN\); model.norm.weight \(1 Inf\)"):
        streaming.prepare_pretrained(tmp_path / "src", tmp_path / "out", QC, LC, calib=tiny_calib(4))
    assert not os.path.exists(str(tmp_path / "out") + streaming.PARTIAL_SUFFIX)


@pytest.mark.slow
def test_streaming_equals_in_memory_bitwise_and_reports_the_same(source, tmp_path):
    src, ref, ref_report = source
    out, report = streaming.prepare_pretrained(src, tmp_path / "out", QC, LC, calib=tiny_calib(4), return_report=True)
    assert not os.path.exists(str(out) + streaming.PARTIAL_SUFFIX)
    _assert_same(out, ref)
    assert _rows(report) == _rows(ref_report) and len(report.layers) == 21
    assert (report.calib_tokens, report.underdetermined) == (ref_report.calib_tokens, ref_report.underdetermined)


@pytest.mark.parametrize("sample, message", [
    (torch.tensor([[5, 200, 7]]), r"calibration sample 1 has token id 200 outside the model's vocabulary \(vocab_size=128\)"),
    (torch.randint(3, 128, (1, 65)), r"calibration sample 1 has 65 tokens; the model's max_position_embeddings is 64"),
])
def test_streaming_refuses_bad_calibration_before_any_block(source, tmp_path, sample, message):
    """Before: no calibration check (a token id outside the vocabulary failed in block 0's embedding)."""
    src = source[0]
    with pytest.raises(ValueError, match=message):
        streaming.prepare_pretrained(src, tmp_path / "out", QC, LC, calib=[tiny_calib(1)[0], sample])
    assert not os.path.exists(str(tmp_path / "out") + streaming.PARTIAL_SUFFIX)


def test_streaming_warns_when_calibration_is_underdetermined(source, tmp_path, caplog):
    src, _, _ = source
    out, report = streaming.prepare_pretrained(src, tmp_path / "out", QC, LC, calib=tiny_calib(1, seq_len=16),
                                               return_report=True)
    assert "calibration has 16 tokens, fewer than in_features of 21 layer(s) (up to 128" in caplog.text
    assert report.calib_tokens == 16 and len(report.underdetermined) == 21


_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import cloq_engine as ce
from cloq_engine.hf import streaming
from tiny_models import tiny_calib
save = streaming._save_atomic
def dying_save(tensors, file):
    if file.endswith("block-{kill:05d}.safetensors"):
        with open(file + ".tmp", "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    save(tensors, file)
streaming._save_atomic = dying_save
streaming.prepare_pretrained({src!r}, {out!r}, ce.QuantConfig(bits=2, group_size=32, method="gptq"),
                             ce.LoRAConfig(rank=4, alpha=8, init="cloq"), calib=tiny_calib(4))
"""


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_an_uninterrupted_run(source, tmp_path):
    src, ref, ref_report = source
    out = tmp_path / "out"
    script = _KILLER.format(root=ROOT, tests=os.path.join(ROOT, "tests"), src=str(src), out=str(out), kill=2)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = str(out) + streaming.PARTIAL_SUFFIX
    assert not os.path.exists(out)  # nothing that looks like a checkpoint
    with pytest.raises(FileNotFoundError):
        ce.load_pretrained(out)
    with open(os.path.join(partial, streaming.MANIFEST)) as f:
        assert json.load(f)["done"] == 2
    with pytest.raises(ValueError, match="different run"):
        streaming.prepare_pretrained(src, out, QC, ce.LoRAConfig(rank=2, init="cloq"), calib=tiny_calib(4),
                                     resume=True)
    _, report = streaming.prepare_pretrained(src, out, QC, LC, calib=tiny_calib(4), resume=True, return_report=True)
    _assert_same(out, ref)
    assert _rows(report) == _rows(ref_report)  # the blocks the killed run finished are reported too


_MEASURE = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
import cloq_engine as ce
from cloq_engine.hf import streaming
import accelerate, safetensors.torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
# Warm up on a one-block copy: lazy imports, kernel registries and allocator pools are paid once,
# whatever the machine, and must not count as memory that grows with the model.
streaming.prepare_pretrained({small!r}, {small_out!r}, ce.QuantConfig(bits=4, group_size=64, method="rtn"),
                             ce.LoRAConfig(rank=8, init="zero"))
try:  # reset the peak (VmHWM) to the current RSS; Linux >= 4.0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass  # then the peak includes the one-block warm-up, which is smaller still
base = rss("VmRSS:")
torch.manual_seed(0)
streaming.prepare_pretrained({src!r}, {out!r}, ce.QuantConfig(bits=4, group_size=64, method="rtn"),
                             ce.LoRAConfig(rank=8, init="zero"))
print(json.dumps({{"base": base, "peak": rss("VmHWM:")}}))
"""


@pytest.mark.slow
def test_bounded_memory_prepare_equals_in_memory(tmp_path):
    """A model whose float32 weights take 63 MB prepares with a peak RSS growth under a 30 MB cap
    (one block is 4 MB), and gives exactly what the in-memory path gives."""
    model = _llama(tmp_path / "big", blocks=16, hidden=256, inter=1024, shard="20MB")
    fp_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    assert fp_bytes > 60e6
    qc, lc = ce.QuantConfig(bits=4, group_size=64, method="rtn"), ce.LoRAConfig(rank=8, init="zero")
    _llama(tmp_path / "small", blocks=1, hidden=256, inter=1024, shard="20MB")
    script = _MEASURE.format(root=ROOT, src=str(tmp_path / "big"), out=str(tmp_path / "out"),
                             small=str(tmp_path / "small"), small_out=str(tmp_path / "small_out"))
    # glibc's dynamic mmap threshold would keep freed heap pages resident (RSS grows with depth
    # while live memory does not); a fixed threshold makes RSS measure what is really held.
    env = {**os.environ, "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    cap = 30e6
    print(f"peak RSS growth {(mem['peak'] - mem['base']) / 1e6:.1f} MB for {fp_bytes / 1e6:.0f} MB of fp32 weights")
    assert mem["peak"] - mem["base"] < cap, (mem["peak"] - mem["base"]) / 1e6
    _assert_same(tmp_path / "out", _in_memory(tmp_path / "big", tmp_path / "ref", qc, lc, None))


def test_cli_prepare_resume_writes_a_loadable_checkpoint_and_prints_the_report(tmp_path, capsys):
    """`cloq prepare --resume` on a causal LM directory (MiniLM's tokenizer, a tiny Llama). Before: no
    per-layer table, no summary, and --seq-len past the model's positions was not refused up front."""
    from cloq_engine import cli

    tiny_llama_dir(tmp_path / "m")
    argv = ["prepare", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--resume", "--bits", "2",
            "--group-size", "32", "--rank", "4", "--samples", "4", "--seq-len", "32", "--no-progress"]
    assert cli.main(argv[:-2] + ["128", "--no-progress"]) == 1
    assert "--seq-len 128 exceeds the model's max_position_embeddings=64" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(str(tmp_path / "out") + ".partial")
    assert cli.main(argv + ["--json"]) == 0
    model = ce.load_pretrained(tmp_path / "out")
    assert len(model.cloq_config["targets"]) == 14
    assert os.path.isfile(tmp_path / "out" / "tokenizer_config.json")
    stdout = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in stdout and "14 layers, 2-bit gptq g32, init=cloq rank=4" in stdout
    assert "storage: " in stdout and "wrote " in stdout
    report = json.loads(stdout.strip().splitlines()[-1])
    assert sorted(r["name"] for r in report["layers"]) == sorted(model.cloq_config["targets"])
    assert report["calib_tokens"] == 4 * 32


def test_storage_dtype_streams_as_the_in_memory_prepare_cast_after_calibration(source, tmp_path, monkeypatch):
    """`cloq prepare --resume --dtype bfloat16`: calibrated in float32, dense tensors stored in bf16,
    LoRA factors float32; equal to the in-memory prepare cast after calibration, also when resumed."""
    from transformers import AutoModelForCausalLM

    from cloq_engine.layer_factory import cast_dense

    src = source[0]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ce.prepare_model(model, QC, LC, calib=tiny_calib(4))
    cast_dense(model, torch.bfloat16)
    ref = ce.save_pretrained(model, tmp_path / "ref")
    save = streaming._save_atomic

    def interrupted(tensors, file):
        if file.endswith("block-00001.safetensors"):
            raise KeyboardInterrupt
        save(tensors, file)

    monkeypatch.setattr(streaming, "_save_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        streaming.prepare_pretrained(src, tmp_path / "out", QC, LC, calib=tiny_calib(4), dtype=torch.float32,
                                     storage_dtype=torch.bfloat16, resume=True)
    monkeypatch.setattr(streaming, "_save_atomic", save)
    out = streaming.prepare_pretrained(src, tmp_path / "out", QC, LC, calib=tiny_calib(4), dtype=torch.float32,
                                       storage_dtype=torch.bfloat16, resume=True)
    _assert_same(out, ref)
    state = ce.load_pretrained(out).state_dict()
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.layers.0.self_attn.q_proj.lora_A"].dtype == torch.float32
