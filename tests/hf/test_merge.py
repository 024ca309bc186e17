"""merge_and_unload and dequantized_base: dense models with the quantized model's outputs."""
import copy
import functools

import pytest
import torch
from torch import nn

import cloq_engine as ce
from cloq_engine.nn import QuantLoRALinear
from tiny_models import ARCHS, prepared_tiny, tiny_calib, tiny_model

IDS = tiny_calib(1, seed=3)[0]


@functools.lru_cache(maxsize=None)
def prepared(arch, seed=1):
    """3-bit tiny model with a random LoRA B (cached: tests copy it before changing it)."""
    return prepared_tiny(arch, quant=ce.QuantConfig(bits=3, group_size=32, method="rtn"), seed=seed)


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_matches_quantized_model_with_plain_layers(arch):
    model = copy.deepcopy(prepared(arch))
    targets = list(model.cloq_config["targets"])
    expected = {n: model.get_submodule(n).merged_weight() for n in targets}
    y = logits(model)
    merged = ce.merge_and_unload(model)
    assert merged is model
    torch.testing.assert_close(logits(merged), y, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, QuantLoRALinear) for m in merged.modules())
    kind = "Conv1D" if arch == "gpt2" else "Linear"
    for n in targets:
        layer = merged.get_submodule(n)
        assert type(layer).__name__ == kind
        w = layer.weight.t() if kind == "Conv1D" else layer.weight
        torch.testing.assert_close(w, expected[n], rtol=0, atol=0)
    assert not hasattr(merged, "cloq_config") and not hasattr(merged.config, "quantization_config")


def test_merge_to_bfloat16_casts_the_dense_weights():
    merged = ce.merge_and_unload(copy.deepcopy(prepared("llama")), dtype=torch.bfloat16)
    layer = merged.get_submodule(prepared("llama").cloq_config["targets"][0])
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_saves_and_reloads_as_a_plain_transformers_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = ce.merge_and_unload(copy.deepcopy(prepared(arch)))
    merged.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert getattr(reloaded.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(reloaded), logits(merged), rtol=0, atol=0)


def test_dequantized_base_leaves_the_model_alone_and_drops_lora():
    model = prepared("opt")
    name = model.cloq_config["targets"][0]
    base = ce.dequantized_base(model)
    assert isinstance(model.get_submodule(name), QuantLoRALinear)
    layer = base.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    torch.testing.assert_close(layer.weight, model.get_submodule(name).quantized_weight.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, model.get_submodule(name).bias, rtol=0, atol=0)


def test_merge_refuses_models_without_quantized_layers_and_bad_dtype():
    with pytest.raises(ValueError, match="no QuantLoRALinear"):
        ce.merge_and_unload(tiny_model("llama"))
    with pytest.raises(ValueError, match="dtype"):
        ce.merge_and_unload(copy.deepcopy(prepared("llama")), dtype=torch.int8)


def test_a_bf16_model_merges_into_bf16_layers_though_its_lora_factors_are_fp32():
    """As PEFT merges: into the base weight's dtype (the factors' float32 would double the size)."""
    model = tiny_model("llama").to(torch.bfloat16)
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="rtn"), ce.LoRAConfig(rank=4, init="zero"))
    name = model.cloq_config["targets"][0]
    assert model.get_submodule(name).lora_A.dtype == torch.float32
    merged = ce.merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_base_dtype_follows_a_cast_of_the_model():
    model = copy.deepcopy(prepared("llama"))
    layer = model.get_submodule(model.cloq_config["targets"][0])
    assert layer.base_dtype == layer.weight.dtype == torch.float32
    model.half()
    assert layer.base_dtype == layer.weight.dtype == layer.lora_A.dtype == torch.float16  # an explicit cast casts all


def test_transformers_dequantize_gives_the_merged_dense_model(tmp_path):
    """`model.dequantize()` on a from_pretrained cloq model raised NotImplementedError."""
    from transformers import AutoModelForCausalLM

    model = prepared("llama")
    loaded = AutoModelForCausalLM.from_pretrained(ce.save_pretrained(model, tmp_path / "ck"))
    dense = loaded.dequantize()
    assert not any(isinstance(m, QuantLoRALinear) for m in dense.modules())
    assert getattr(dense.config, "quantization_config", None) is None and not getattr(dense, "is_quantized", False)
    torch.testing.assert_close(logits(dense), logits(model), rtol=1e-5, atol=1e-5)
