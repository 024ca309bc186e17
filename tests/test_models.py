"""The named embedded models: ``smollm2`` materialized once from its GGUF file into an HF directory,
verified by checksum on reuse, and correct on what it exercises (GQA, tied embeddings, chat template)."""
import json
import os

import pytest
import torch

from cloq_engine import data, models


@pytest.fixture(scope="session")
def smollm2_dir():
    return models.resolve("smollm2")


@pytest.mark.slow
def test_smollm2_is_a_plain_hf_llama_with_gqa_tied_embeddings_and_chat_template(smollm2_dir):
    files = set(os.listdir(smollm2_dir))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", models.MANIFEST} <= files
    cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (9, 3, 576)
    model, tok = data.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.generation_config.eos_token_id == tok.eos_token_id == 2
    # a second resolve reuses the verified copy (same directory, no rebuild)
    mtime = os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns
    assert models.resolve("smollm2") == smollm2_dir
    assert os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns == mtime


def test_verify_names_a_corrupted_or_missing_file(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.bin").write_bytes(b"\0" * 64)
    src = {"file": "x.gguf", "size": 1, "version": models.MATERIALIZE_VERSION}
    files = {n: models._sha256(tmp_path / n) for n in ("a.json", "b.bin")}
    (tmp_path / models.MANIFEST).write_text(json.dumps({"source": src, "files": files}))
    assert models._verify(tmp_path, src) == ""
    assert "another source" in models._verify(tmp_path, dict(src, size=2))
    (tmp_path / "b.bin").write_bytes(b"\0" * 63 + b"\1")
    assert models._verify(tmp_path, src) == "b.bin fails its checksum"
    os.remove(tmp_path / "a.json")
    assert models._verify(tmp_path, src) == "a.json is missing"


def test_a_corrupted_cache_is_rebuilt_not_reused(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLOQ_CACHE_DIR", str(tmp_path))
    calls = []

    def fake_write(tmp, gguf):  # the real conversion is exercised by the fixture above
        calls.append(tmp)
        (models.Path(tmp) / "config.json").write_text(json.dumps({"n": len(calls)}))
        files = {"config.json": models._sha256(models.Path(tmp) / "config.json")}
        (models.Path(tmp) / models.MANIFEST).write_text(json.dumps({"source": models._source_id(gguf), "files": files}))

    monkeypatch.setattr(models, "_write_smollm2", fake_write)
    path = models.smollm2_path()
    assert models.smollm2_path() == path and len(calls) == 1
    with open(os.path.join(path, "config.json"), "a") as f:
        f.write(" ")
    assert models.smollm2_path() == path and len(calls) == 2
    assert "config.json fails its checksum" in caplog.text
    assert json.load(open(os.path.join(path, "config.json"))) == {"n": 2}


def test_cli_accepts_the_names_and_says_them_for_a_bad_value():
    from cloq_engine import cli

    assert cli.build_parser().parse_args(["prepare", "--model", "smollm2", "--out", "x"]).model == "smollm2"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["prepare", "--model", "no-such-dir", "--out", "x"])
