"""Export to the GPTQ layout + PEFT adapter, import of a GPTQ checkpoint with a calibrated init, and the CLI."""
import copy
import json

import pytest
import torch

import cloq_engine as ce
from cloq_engine import export, gptq_format
from cloq_engine.nn import QuantLoRALinear
from tiny_models import tiny_calib, tiny_llama_dir, tiny_model


def _prepared(arch="llama", bits=4, init="cloq"):
    model = tiny_model(arch)
    ce.prepare_model(model, ce.QuantConfig(bits=bits, group_size=32, method="gptq"),
                     ce.LoRAConfig(rank=4, alpha=8, init=init), calib=tiny_calib(4))
    return model


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_export_gptq_writes_the_base_bit_exactly_and_the_adapter(tmp_path, bits):
    model = _prepared(bits=bits)
    out = export.export_gptq(model, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    weights = gptq_format.load_gptq_weights(out)
    assert set(weights) == set(layers)
    for name, layer in layers.items():
        assert torch.equal(weights[name].dequantize(), layer.quantized_weight.dequantize()), name
    tensors = gptq_format.read_gptq_tensors(out)
    assert not any("lora_" in k for k in tensors)
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())
    qcfg = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert qcfg["bits"] == bits and qcfg["group_size"] == 32 and qcfg["checkpoint_format"] == "gptq_v2"
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    adapter = json.loads((tmp_path / "gptq" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == sorted(layers)


def test_export_rejects_nf4(tmp_path):
    model = tiny_model("llama")
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="nf4"), ce.LoRAConfig(rank=4, init="zero"))
    with pytest.raises(ValueError, match="NF4"):
        export.export_gptq(model, str(tmp_path / "x"))


def test_prepare_from_gptq_keeps_q_and_calibrates_the_adapter_against_the_original(tmp_path):
    src = _prepared(bits=2, init="zero")
    export.export_gptq(src, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
    want = {n: m.quantized_weight.dequantize() for n, m in src.named_modules() if isinstance(m, QuantLoRALinear)}
    original = tiny_model("llama")
    ref = copy.deepcopy(original)
    export.prepare_from_gptq(original, str(tmp_path / "gptq"), ce.LoRAConfig(rank=4, alpha=8, init="cloq"),
                             calib=tiny_calib(4))
    layers = {n: m for n, m in original.named_modules() if isinstance(m, QuantLoRALinear)}
    assert set(layers) == set(want)
    for name, layer in layers.items():
        assert torch.equal(layer.quantized_weight.dequantize(), want[name])
    ids = tiny_calib(2, seed=5)[1]
    y_ref = ref(input_ids=ids).logits
    y_imp = original(input_ids=ids).logits
    y_zero = src(input_ids=ids).logits  # the same Q with a zero adapter
    assert (y_imp - y_ref).norm() < (y_zero - y_ref).norm()


def test_prepare_from_gptq_refuses_the_checkpoint_of_another_model_saying_by_how_much(tmp_path):
    """Same architecture and names, other weights: before, it was imported ("kept the Q of 14 layers")."""
    export.export_gptq(_prepared(init="zero"), str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match=r"does not fit the model's weights in 14 of 14 layers, worst .*"
                                         r"\|\|W - Q\|\| / \|\|W\|\| = 1\.\d+ where 4-bit g32 rounding of W itself gives "
                                         r"0\.\d+ \(limit 0\.\d+\)"):
        export.prepare_from_gptq(tiny_model("llama", seed=7), str(tmp_path / "gptq"), ce.LoRAConfig(rank=4, init="zero"))


def test_prepare_from_gptq_refuses_a_checkpoint_leaving_out_targeted_layers(tmp_path):
    src = tiny_model("llama")
    ce.prepare_model(src, ce.QuantConfig(bits=4, group_size=32, method="rtn"),
                     ce.LoRAConfig(rank=4, init="zero", exclude=("lm_head", "o_proj")))
    export.export_gptq(src, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match="quantizes 12 of the 14 layers the LoRA config targets; 2 are missing, "
                                         "e.g. \\['model.layers.0.self_attn.o_proj'"):
        export.prepare_from_gptq(tiny_model("llama"), str(tmp_path / "gptq"), ce.LoRAConfig(rank=4, init="zero"))


def test_prepare_from_gptq_rejects_a_model_without_the_layers(tmp_path):
    src = _prepared(init="zero")
    export.export_gptq(src, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match="original"):
        export.prepare_from_gptq(tiny_model("bert"), str(tmp_path / "gptq"), ce.LoRAConfig(rank=4, init="zero"))


@pytest.mark.parametrize("fmt", ["gptq", "merged"])
def test_export_refuses_a_directory_holding_other_files_and_keeps_them(tmp_path, fmt):
    model = _prepared(bits=4)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    run = (lambda: export.export_gptq(model, str(out), checkpoint_format="gptq_v2")) if fmt == "gptq" \
        else (lambda: export.export_merged(model, str(out)))
    with pytest.raises(ValueError, match="not empty|not a cloq"):
        run()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("sym", [True, False])
def test_export_auto_format_writes_v1_when_the_zeros_fit_it_and_v2_otherwise(tmp_path, sym):
    model = tiny_model("llama")
    with torch.no_grad():  # an all-positive layer: its asymmetric groups have min >= 0, so zero 0
        model.model.layers[0].mlp.up_proj.weight.abs_()
    ce.prepare_model(model, ce.QuantConfig(bits=2, group_size=32, method="rtn", sym=sym),
                     ce.LoRAConfig(rank=4, init="zero"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    fits = all(gptq_format.fits_v1(m.quantized_weight) for m in layers.values())
    assert fits == sym  # symmetric zeros sit at 2^(bits-1)
    out = export.export_gptq(model, str(tmp_path / "gptq"))
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["checkpoint_format"] == \
        ("gptq" if sym else "gptq_v2")
    weights = gptq_format.load_gptq_weights(out)
    for name, layer in layers.items():
        assert torch.equal(weights[name].dequantize(), layer.quantized_weight.dequantize()), name
    if not sym:
        with pytest.raises(ValueError, match="gptq_v2"):
            export.export_gptq(model, str(tmp_path / "v1"), checkpoint_format="gptq")


@pytest.mark.slow
def test_cli_prepare_export_and_prepare_from_gptq_end_to_end(tmp_path, capsys):
    """`cloq prepare` -> `cloq export --format gptq` -> `cloq prepare --from-gptq` on a model directory:
    the imported checkpoint keeps the exported Q bit for bit and gets a calibrated (non-zero) adapter."""
    from transformers import AutoModelForCausalLM

    from cloq_engine import cli

    tiny_llama_dir(tmp_path / "m")
    small = ["--bits", "2", "--group-size", "32", "--rank", "4", "--samples", "4", "--seq-len", "32", "--no-progress"]
    assert cli.main(["prepare", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "ck"), "--sym",
                     "--act-order", *small]) == 0
    assert cli.main(["export", str(tmp_path / "ck"), "--format", "gptq", "--out", str(tmp_path / "gq")]) == 0
    (tmp_path / "gq" / "notes.txt").write_text("mine")
    assert cli.main(["export", str(tmp_path / "ck"), "--format", "gptq", "--out", str(tmp_path / "gq")]) == 1
    assert "holds a cloq export: pass --overwrite to replace it" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "ck"), "--format", "gptq", "--out", str(tmp_path / "gq"),
                     "--overwrite"]) == 0
    assert (tmp_path / "gq" / "notes.txt").read_text() == "mine"
    # --from-gptq keeps the checkpoint's Q: a --bits that contradicts it is an error, not ignored
    assert cli.main(["prepare", "--from-gptq", str(tmp_path / "gq"), "--model", str(tmp_path / "m"),
                     "--out", str(tmp_path / "re"), *small[2:], "--bits", "4"]) == 1
    err = capsys.readouterr().err
    assert "--bits 4 conflicts with the --from-gptq checkpoint (2-bit, group size 32, sym)" in err
    assert not (tmp_path / "re").exists()
    qcfg = json.loads((tmp_path / "gq" / "quantize_config.json").read_text())
    assert qcfg["checkpoint_format"] == "gptq" and qcfg["sym"]  # symmetric: v1 fits
    assert (tmp_path / "gq" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "gq" / "tokenizer_config.json").is_file()
    assert cli.main(["prepare", "--from-gptq", str(tmp_path / "gq"), "--model", str(tmp_path / "m"),
                     "--out", str(tmp_path / "re"), *small]) == 0
    printed = capsys.readouterr().out  # the per-layer table every prepare prints (before: one line)
    assert "kept the Q of 14 GPTQ layers" in printed and "err +cloq" in printed and "14 layers, 2-bit gptq" in printed
    exported = gptq_format.load_gptq_weights(str(tmp_path / "gq"))
    model = ce.load_pretrained(tmp_path / "re")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    assert set(layers) == set(exported) and len(layers) == 14
    for name, layer in layers.items():
        assert torch.equal(layer.quantized_weight.dequantize(), exported[name].dequantize()), name
    assert any(float(m.lora_B.detach().abs().sum()) > 0 for m in layers.values())
    assert cli.main(["export", str(tmp_path / "re"), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


def test_an_exported_checkpoint_loads_in_transformers_with_gptqmodel(tmp_path):
    """The independent loader: transformers' GPTQ integration (GPTQModel's kernels) reads the export
    and computes what our dequantized base computes. Skipped where gptqmodel is not installed (it
    needs torch >= 2.14 today; this machine pins 2.13)."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="gptq", sym=True),
                     ce.LoRAConfig(rank=4, init="zero"), calib=tiny_calib(4))
    export.export_gptq(model, str(tmp_path / "gptq"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gptq"), device_map="cpu", dtype=torch.float16)
    ids = tiny_calib(1, seed=3)[0]
    want = ce.dequantized_base(model, dtype=torch.float32)(input_ids=ids).logits
    got = loaded(input_ids=ids).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
