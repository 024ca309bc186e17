"""save_pretrained / load_pretrained / transformers' from_pretrained on cloq checkpoints."""
import copy
import functools
import json
import os

import pytest
import torch

import cloq_engine as ce
from cloq_engine.hf import persistence
from cloq_engine.nn import QuantLoRALinear
from tiny_models import ARCHS, prepared_tiny, tiny_calib, tiny_model


@functools.lru_cache(maxsize=None)
def prepared(arch, quant=None, seed=1):
    """Cached: tests only read it."""
    return prepared_tiny(arch, quant=quant, seed=seed)


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


IDS = tiny_calib(1, seed=3)[0]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    model = prepared("llama")
    path = ce.save_pretrained(model, tmp_path_factory.mktemp("ck") / "llama")
    return model, path


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_gives_identical_logits(arch, tmp_path):
    model = prepared(arch)
    path = ce.save_pretrained(model, tmp_path / "ck")
    assert sorted(os.listdir(path)) == sorted(
        ["config.json", "model.safetensors"] + (["generation_config.json"] if arch != "bert" else []))
    loaded = ce.load_pretrained(path)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert loaded.cloq_config == model.cloq_config
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLoRALinear)}
    assert set(layers) == set(model.cloq_config["targets"])
    assert all(m.qweight.dtype == torch.int32 and m.scales.dtype == torch.float16 for m in layers.values())
    assert {n.rpartition(".")[2] for n, p in loaded.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert not any(t.device.type == "meta" for t in list(loaded.parameters()) + list(loaded.buffers()))


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_tied_embeddings_are_stored_once_and_retied(arch, tmp_path):
    from safetensors import safe_open

    model = prepared(arch)
    path = ce.save_pretrained(model, tmp_path / "ck")
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    aliases = json.loads(meta[persistence.ALIASES_KEY])
    assert aliases == {"lm_head.weight": next(iter(aliases.values()))} and "lm_head.weight" not in keys
    loaded = ce.load_pretrained(path)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_from_pretrained_loads_cloq_checkpoint(arch, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model = prepared(arch)
    path = ce.save_pretrained(model, tmp_path / "ck")
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(path)
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert all(isinstance(loaded.get_submodule(n), QuantLoRALinear) for n in model.cloq_config["targets"])
    assert {n.rpartition(".")[2] for n, p in loaded.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert loaded.config.quantization_config.to_dict()["targets"] == model.cloq_config["targets"]


def test_from_pretrained_dtype_keeps_packed_buffers_and_resave_round_trips(tmp_path):
    """transformers' own save_pretrained of a loaded cloq model (what Trainer checkpoints do) drops
    tied tensors without our metadata; both loaders still rebuild it."""
    from transformers import AutoModelForCausalLM

    model = prepared("gpt2")
    path = ce.save_pretrained(model, tmp_path / "ck")
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    layer = half.get_submodule(model.cloq_config["targets"][0])
    assert (layer.lora_A.dtype, layer.scales.dtype, layer.qweight.dtype) == (torch.float32, torch.float16, torch.int32)
    assert layer.bias.dtype == torch.bfloat16  # frozen, in the load dtype; the trainable factors stay float32
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "resaved")
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "resaved"), ce.load_pretrained(tmp_path / "resaved")):
        assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_a_resave_after_transformers_from_pretrained_keeps_the_base_model(tmp_path):
    """The cloq_config rebuilt after transformers' from_pretrained dropped `base_model`, so a re-save
    lost it (and `cloq eval` of the re-saved checkpoint needed --base)."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    base.mkdir()
    model = copy.deepcopy(prepared("llama"))
    model.cloq_config["base_model"] = str(base)
    path = ce.save_pretrained(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.cloq_config["base_model"] == str(base)
    resaved = ce.save_pretrained(loaded, tmp_path / "resaved")
    assert persistence.read_config(resaved)["quantization_config"]["base_model"] == str(base)
    assert ce.load_pretrained(resaved).cloq_config["base_model"] == str(base)


@pytest.mark.parametrize("source", ["attach_quantization_config", "load_pretrained"])
def test_transformers_save_pretrained_keeps_the_quantization_record(source, tmp_path):
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(prepared("opt"))
    if source == "load_pretrained":
        live = ce.load_pretrained(ce.save_pretrained(model, tmp_path / "ck"))
    else:
        live = model
        ce.hf.attach_quantization_config(live)
    live.save_pretrained(tmp_path / "hf")  # what Trainer checkpoints call
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ce.load_pretrained(tmp_path / "hf")):
        assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_calibrated_gptq_cloq_model_round_trips(tmp_path):
    model = tiny_model("llama")
    ce.prepare_model(model, ce.QuantConfig(bits=2, group_size=32, method="gptq"), ce.LoRAConfig(rank=4, init="cloq"),
                     calib=tiny_calib(4))
    loaded = ce.load_pretrained(ce.save_pretrained(model, tmp_path / "ck"))
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert loaded.cloq_config["lora"]["init"] == "cloq" and loaded.cloq_config["quant"]["method"] == "gptq"


@pytest.mark.parametrize("quant", [
    ce.QuantConfig(bits=2, group_size=32, method="rtn"),
    ce.QuantConfig(bits=3, group_size=64, method="rtn", sym=True),
    ce.QuantConfig(bits=4, group_size=-1, method="nf4"),
], ids=["2bit", "3bit-sym", "nf4"])
def test_round_trip_keeps_every_packed_format(quant, tmp_path):
    model = prepared("qwen2", quant=quant)
    loaded = ce.load_pretrained(ce.save_pretrained(model, tmp_path / "ck"))
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    name = model.cloq_config["targets"][0]
    assert (loaded.get_submodule(name).zeros is None) == (quant.method.value == "nf4")


def test_load_with_dtype_casts_weights_but_not_packed_buffers(llama_checkpoint):
    model, path = llama_checkpoint
    loaded = ce.load_pretrained(path, dtype=torch.bfloat16)
    layer = loaded.get_submodule(model.cloq_config["targets"][0])
    assert layer.lora_A.dtype == torch.float32 and loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    ref = logits(model, IDS)
    rel = (logits(loaded, IDS).float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_tokenizer_files_are_saved_with_the_model(tmp_path):
    from transformers import AutoTokenizer

    from cloq_engine import data

    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    path = ce.save_pretrained(prepared("bert"), tmp_path / "ck", tokenizer=tok)
    assert os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    text = "Calibrated LoRA for quantized models."
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == tok(text)["input_ids"]


def test_config_records_the_quantization(llama_checkpoint):
    model, path = llama_checkpoint
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    q = cfg["quantization_config"]
    assert q["quant_method"] == "cloq" and q["targets"] == model.cloq_config["targets"]
    assert ce.QuantConfig.from_dict(q["quant"]) == ce.QuantConfig.from_dict(model.cloq_config["quant"])
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert model.config.quantization_config.to_dict()["targets"] == q["targets"]  # prepare_model attached it


def test_overwrite_replaces_the_directory_only_after_success(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "ck"
    first = prepared("llama", seed=1)
    ce.save_pretrained(first, target)
    (target / "notes.txt").write_text("mine")
    before = (target / "model.safetensors").read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ce.save_pretrained(prepared("llama", seed=2), target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    monkeypatch.undo()

    second = prepared("llama", seed=2)
    ce.save_pretrained(second, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["ck"]
    assert torch.equal(logits(ce.load_pretrained(target), IDS), logits(second, IDS))


def test_save_refuses_unprepared_models_and_file_targets(tmp_path):
    with pytest.raises(ValueError, match="cloq_config"):
        ce.save_pretrained(tiny_model("llama"), tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_directory"):
        ce.save_pretrained(prepared("llama"), tmp_path / "file")


def _rewrite_weights(path, edit):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _truncate(path):
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(data[: len(data) // 2])


def _bad_header(path):
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    open(file, "wb").write(b"\xff" * 8 + data[8:])


def _set_config(path, fn):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(file, "w") as f:
        json.dump(cfg, f)


LORA_A = "model.layers.0.self_attn.q_proj.lora_A"

CORRUPTIONS = [
    ("missing config", lambda p: os.remove(os.path.join(p, "config.json")), FileNotFoundError, r"config\.json"),
    ("missing weights", lambda p: os.remove(os.path.join(p, "model.safetensors")), FileNotFoundError,
     r"model\.safetensors"),
    ("config not json", lambda p: open(os.path.join(p, "config.json"), "w").write("{oops"), ValueError,
     r"config\.json: not valid JSON"),
    ("no quantization_config", lambda p: _set_config(p, lambda c: c.pop("quantization_config")), ValueError,
     r"config\.json.*quantization_config"),
    ("other quant_method", lambda p: _set_config(p, lambda c: c["quantization_config"].update(quant_method="gptq")),
     ValueError, r"quant_method"),
    ("bad bits", lambda p: _set_config(p, lambda c: c["quantization_config"]["quant"].update(bits=5)), ValueError,
     r"config\.json.*bits"),
    ("truncated weights", _truncate, ValueError, r"model\.safetensors: corrupt or truncated"),
    ("garbage header", _bad_header, ValueError, r"model\.safetensors: corrupt or truncated"),
    ("missing tensor", lambda p: _rewrite_weights(p, lambda t: t.pop(LORA_A)), ValueError,
     r"model\.safetensors: missing 1 tensor.*lora_A"),
    ("unexpected tensor", lambda p: _rewrite_weights(p, lambda t: t.update(extra=torch.zeros(2))), ValueError,
     r"model\.safetensors: 1 unexpected tensor.*extra"),
    ("shape mismatch", lambda p: _rewrite_weights(p, lambda t: t.update({LORA_A: torch.zeros(3, 64)})), ValueError,
     r"model\.safetensors: tensor .*lora_A.* has shape \(3, 64\); the model needs \(4, 64\)"),
    ("packed dtype", lambda p: _rewrite_weights(
        p, lambda t: t.update({"model.layers.0.self_attn.q_proj.qweight":
                               t["model.layers.0.self_attn.q_proj.qweight"].float()})), ValueError,
     r"packed tensor .*qweight.* dtype"),
]


@pytest.mark.parametrize("corrupt, error, match", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_broken_checkpoints_raise_errors_naming_file_and_problem(corrupt, error, match, llama_checkpoint, tmp_path):
    import shutil

    path = str(tmp_path / "ck")
    shutil.copytree(llama_checkpoint[1], path)
    corrupt(path)
    with pytest.raises(error, match=match):
        ce.load_pretrained(path)


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ce.load_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Integrity: every stored tensor has a recorded sha256, checked on load
# ---------------------------------------------------------------------------------------------
QWEIGHT = "model.layers.1.mlp.down_proj.qweight"


def flip_byte(path, tensor):
    """Flip one bit in the middle of ``tensor``'s bytes inside model.safetensors (header intact)."""
    import struct

    file = os.path.join(path, "model.safetensors")
    data = bytearray(open(file, "rb").read())
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + n])[tensor]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0x10
    open(file, "wb").write(bytes(data))


def test_checkpoint_records_format_version_and_a_checksum_of_every_tensor(llama_checkpoint):
    from safetensors import safe_open

    _, path = llama_checkpoint
    with open(os.path.join(path, "config.json")) as f:
        q = json.load(f)["quantization_config"]
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert set(q["checksums"]) == set(f.keys())
        assert q["checksums"][QWEIGHT] == persistence.tensor_checksum(f.get_tensor(QWEIGHT))
    assert q["format_version"] == persistence.FORMAT_VERSION


@pytest.mark.parametrize("loader", ["load_pretrained", "from_pretrained"])
def test_a_flipped_byte_in_a_qweight_is_refused_by_name(loader, llama_checkpoint, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    path = str(tmp_path / "ck")
    shutil.copytree(llama_checkpoint[1], path)
    flip_byte(path, QWEIGHT)
    load = ce.load_pretrained if loader == "load_pretrained" else AutoModelForCausalLM.from_pretrained
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{QWEIGHT}' fails its checksum"):
        load(path)


def test_checkpoint_from_a_newer_format_is_refused(llama_checkpoint, tmp_path):
    import shutil

    path = str(tmp_path / "ck")
    shutil.copytree(llama_checkpoint[1], path)
    _set_config(path, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(ValueError, match="format_version` is 99, newer than the 1"):
        ce.load_pretrained(path)


def test_transformers_resave_after_training_does_not_carry_stale_checksums(llama_checkpoint, tmp_path):
    """The LoRA factors change in training: a checkpoint that transformers (Trainer) writes must not
    keep the checksums of the loaded file."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint[1])
    with torch.no_grad():
        model.get_submodule(model.cloq_config["targets"][0]).lora_A.add_(1.0)
    model.save_pretrained(tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        assert "checksums" not in json.load(f)["quantization_config"]
    loaded = ce.load_pretrained(tmp_path / "hf")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


# ---------------------------------------------------------------------------------------------
# Start-up: `import cloq_engine` does not import transformers; from_pretrained still works
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_import_is_lazy_and_from_pretrained_still_finds_the_quantizer(llama_checkpoint):
    """(Importing transformers first registers at once: every in-process test here does that.)"""
    import subprocess
    import sys

    code = f"""
import sys
import cloq_engine
lazy = "transformers.quantizers.auto" not in sys.modules
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(llama_checkpoint[1])!r})
print(lazy, type(m.get_submodule({model_targets(llama_checkpoint)!r})).__name__)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["True", "QuantLoRALinear"]


def model_targets(checkpoint):
    return checkpoint[0].cloq_config["targets"][0]


LOADERS = {
    "load_pretrained": ce.load_pretrained,
    "from_pretrained": lambda path: __import__("transformers").AutoModelForCausalLM.from_pretrained(path),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_act_order_permutation_round_trips(loader, tmp_path):
    """A layer holding an input permutation (a GPTQ act-order import) saves and loads with it
    (transformers' loader dropped it as an unexpected tensor: the columns were read out of order)."""
    model = copy.deepcopy(prepared("llama"))
    layer = next(m for m in model.modules() if isinstance(m, QuantLoRALinear))
    layer.perm = torch.randperm(layer.in_features, generator=torch.Generator().manual_seed(0))
    path = ce.save_pretrained(model, tmp_path / "ck")
    loaded = LOADERS[loader](path)
    twin = next(m for m in loaded.modules() if isinstance(m, QuantLoRALinear))
    assert torch.equal(twin.perm, layer.perm)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


# ---------------------------------------------------------------------------------------------
# Incomplete checkpoints: refused by every loader, naming the first missing tensors
# ---------------------------------------------------------------------------------------------
ALL_LOADERS = {**LOADERS, "empty_model": ce.empty_model}


def dense_with_stale_record(path):
    """A dense model saved with a cloq `quantization_config`: what merging a PeftModel used to leave."""
    model = copy.deepcopy(prepared("llama"))
    ce.hf.attach_quantization_config(model)
    record = model.config.quantization_config
    dense = ce.merge_and_unload(model)
    dense.config.quantization_config = record
    dense.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("loader", sorted(ALL_LOADERS))
def test_a_checkpoint_without_packed_tensors_is_refused_by_every_loader(loader, tmp_path):
    """Issue 23: transformers' from_pretrained built the layers with uninitialised qweight/scales
    (non-finite logits), printing only its load report."""
    path = dense_with_stale_record(tmp_path / "dense")
    target = prepared("llama").cloq_config["targets"][0]
    with pytest.raises(ValueError, match=rf"missing 70 tensor\(s\) of the quantized layers.*'{target}.lora_A'"):
        ALL_LOADERS[loader](path)


@pytest.mark.parametrize("loader", sorted(ALL_LOADERS))
def test_a_checkpoint_missing_one_lora_tensor_and_no_checksums_is_refused(loader, llama_checkpoint, tmp_path):
    """A checkpoint written by transformers' save_pretrained records no checksums: the file check
    returned early and verified nothing."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(llama_checkpoint[1]).save_pretrained(tmp_path / "hf")
    target = model_targets(llama_checkpoint)
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(file)
    del state[f"{target}.lora_B"]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing 1 tensor\(s\) of the quantized layers.*'{target}.lora_B'"):
        ALL_LOADERS[loader](tmp_path / "hf")


def test_save_refuses_a_model_whose_targets_are_not_quantized_layers(tmp_path):
    model = copy.deepcopy(prepared("llama"))
    target = model.cloq_config["targets"][0]
    dense = ce.dequantized_base(model).get_submodule(target)
    parent, _, child = target.rpartition(".")
    setattr(model.get_submodule(parent), child, dense)
    with pytest.raises(ValueError, match=rf"not quantized cloq layers, e.g. \['{target} \(Linear\)'"):
        ce.save_pretrained(model, tmp_path / "ck")
    assert not os.path.exists(tmp_path / "ck")
