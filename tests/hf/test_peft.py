"""PEFT interop: exported adapters load with PeftModel onto the dequantized base; our layer as a
PEFT custom module."""
import copy
import functools
import json
import os

import pytest
import torch

import cloq_engine as ce
from cloq_engine.nn import QuantLoRALinear
from tiny_models import ARCHS, prepared_tiny, tiny_calib, tiny_model

peft = pytest.importorskip("peft")

IDS = tiny_calib(1, seed=3)[0]


@functools.lru_cache(maxsize=None)
def prepared(arch, use_rslora=False, seed=1):
    """Cached: tests copy it before changing it."""
    return prepared_tiny(arch, use_rslora=use_rslora, seed=seed)


def logits(model, ids=IDS):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_exported_adapter_on_dequantized_base_matches_quantized_model(arch, tmp_path):
    from safetensors import safe_open

    model = prepared(arch)
    path = ce.export_peft_adapter(model, tmp_path / "adapter")
    base = ce.dequantized_base(model)
    with torch.no_grad():
        y_base = logits(base)
        peft_model = peft.PeftModel.from_pretrained(base, path)
        y_peft, y = logits(peft_model), logits(model)
    torch.testing.assert_close(y_peft, y, rtol=1e-5, atol=1e-5)
    assert (y_base - y).abs().max() > 1e-3  # the adapter is really applied
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["init_lora_weights"] is True
    assert cfg["target_modules"] == sorted(model.cloq_config["targets"]) and cfg["use_rslora"] is False
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    assert cfg["task_type"] == ("FEATURE_EXTRACTION" if arch == "bert" else "CAUSAL_LM")
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    name = model.cloq_config["targets"][0]
    assert f"base_model.model.{name}.lora_A.weight" in keys and f"base_model.model.{name}.lora_B.weight" in keys
    assert len(keys) == 2 * len(model.cloq_config["targets"])
    assert meta["cloq_init"] == "zero" and json.loads(meta["cloq_quant"])["bits"] == 4


def test_rslora_scaling_survives_export(tmp_path):
    model = prepared("llama", use_rslora=True)
    path = ce.export_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        y_peft = logits(peft.PeftModel.from_pretrained(ce.dequantized_base(model), path))
        torch.testing.assert_close(y_peft, logits(model), rtol=1e-5, atol=1e-5)


def test_exported_adapter_cannot_silently_be_loaded_onto_the_full_precision_model(tmp_path):
    """The adapter compensates W - Ŵ: a loader that follows base_model_name_or_path must fail,
    and the record says which base it belongs on."""
    from safetensors import safe_open

    model = copy.deepcopy(prepared("llama"))
    model.cloq_config["base_model"] = "/models/llama-fp16"
    model.cloq_config.pop("checkpoint", None)  # never saved: no base AutoPeftModel could load exactly
    path = ce.export_peft_adapter(model, tmp_path / "adapter")
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "cloq-dequantized-base-of:/models/llama-fp16"
    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["cloq_base_model"] == "/models/llama-fp16" and "dequantized_base" in meta["cloq_load_with"]
    with pytest.raises(Exception, match="cloq-dequantized-base-of"):
        peft.AutoPeftModelForCausalLM.from_pretrained(path)


def test_export_refuses_unprepared_model(tmp_path):
    with pytest.raises(ValueError, match="cloq_config"):
        ce.export_peft_adapter(tiny_model("opt"), tmp_path / "adapter")


def _suffixes(model):
    return sorted({n.rpartition(".")[2] for n in model.cloq_config["targets"]})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_custom_module_starts_from_calibrated_factors_and_trains_only_the_adapter(arch, tmp_path):
    model = copy.deepcopy(prepared(arch))
    with torch.no_grad():
        y = logits(model)
    cfg = ce.register_peft_custom_module(peft.LoraConfig(r=4, lora_alpha=16, target_modules=_suffixes(model)))
    peft_model = peft.get_peft_model(model, cfg)
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "PeftQuantLoRALinear"]
    assert len(wrapped) == len(model.cloq_config["targets"]) and all(m.absorbed_base_lora for m in wrapped)
    torch.testing.assert_close(logits(peft_model).detach(), y, rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n and "base_layer" not in n for n in trainable)
    logits(peft_model).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters()
               if p.requires_grad and "lora_B" in n)
    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == 2 * len(wrapped) and not any("base_layer" in k for k in saved)


def test_peft_custom_module_with_other_rank_keeps_calibrated_lora_in_base():
    model = copy.deepcopy(prepared("llama"))
    with torch.no_grad():
        y = logits(model)
    cfg = ce.register_peft_custom_module(peft.LoraConfig(r=2, lora_alpha=4, target_modules=_suffixes(model)))
    peft_model = peft.get_peft_model(model, cfg)
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "PeftQuantLoRALinear"]
    assert wrapped and not any(m.absorbed_base_lora for m in wrapped)
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model), y, rtol=1e-5, atol=1e-6)
        with peft_model.disable_adapter():
            torch.testing.assert_close(logits(peft_model), y, rtol=1e-5, atol=1e-6)


def test_register_peft_custom_module_needs_a_lora_config():
    with pytest.raises(ValueError, match="lora_config"):
        ce.register_peft_custom_module({"r": 4})


# -- PEFT as its users expect, after `import cloq_engine` ------------------------------------------
def _saved(arch, tmp_path):
    model = copy.deepcopy(prepared(arch))
    ce.save_pretrained(model, tmp_path / "ck")
    return model


@pytest.mark.parametrize("arch, auto", [("llama", "AutoPeftModelForCausalLM"), ("bert", "AutoPeftModelForFeatureExtraction")])
def test_exported_adapter_names_its_checkpoint_and_autopeftmodel_loads_it_exactly(arch, auto, tmp_path):
    """Before: base_model_name_or_path = "cloq-dequantized-base-of:/path" and AutoPeftModel failed."""
    model = _saved(arch, tmp_path)
    path = ce.export_peft_adapter(model, tmp_path / "adapter")
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "ck")
    with torch.no_grad():
        loaded = getattr(peft, auto).from_pretrained(path)
        torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    wrapped = [m for m in loaded.modules() if type(m).__name__ == "PeftQuantLoRALinear"]
    assert len(wrapped) == len(model.cloq_config["targets"])


def test_a_peft_trained_adapter_reloads_with_plain_peftmodel_from_pretrained(tmp_path):
    """Before: reloading needed register_peft_custom_module on the loaded config again."""
    model = _saved("llama", tmp_path)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=16, target_modules=_suffixes(model)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.05)
        want = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "trained")
    reloaded = peft.PeftModel.from_pretrained(ce.load_pretrained(tmp_path / "ck"), tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded), want, rtol=1e-5, atol=1e-5)


def test_all_linear_targets_our_layers_but_not_the_output_embedding():
    model = copy.deepcopy(prepared("llama"))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if type(m).__name__ == "PeftQuantLoRALinear"}
    assert wrapped == set(model.cloq_config["targets"]) and "lm_head" not in wrapped


def test_after_prepare_model_for_kbit_training_one_line_makes_the_model_trainable_again():
    """PEFT's helper freezes every parameter (it expects get_peft_model to add adapters next)."""
    model = copy.deepcopy(prepared("llama"))
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not any(p.requires_grad for p in model.parameters())
    ce.mark_trainable(model)  # the README's one-liner: our LoRA factors train again
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(model.cloq_config["targets"]) and all("lora_" in n for n in trainable)
    logits(model).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # or PEFT's own flow: get_peft_model adds trainable adapters over our layers
    other = peft.prepare_model_for_kbit_training(copy.deepcopy(prepared("llama")), use_gradient_checkpointing=False)
    peft_model = peft.get_peft_model(other, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert sum(p.requires_grad for p in peft_model.parameters()) == 2 * len(model.cloq_config["targets"])


def test_adapter_with_its_dequantized_base_loads_with_plain_transformers(tmp_path):
    model = copy.deepcopy(prepared("llama"))
    path = ce.export_peft_adapter(model, tmp_path / "adapter", base="dequantized")
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.join(path, "base")
    with torch.no_grad():
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(path)
        assert not any(type(m).__name__ == "PeftQuantLoRALinear" for m in loaded.modules())  # a dense base
        torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_adapter_on_the_original_model_is_named_with_a_warning(tmp_path, caplog):
    model = copy.deepcopy(prepared("llama"))
    model.cloq_config["base_model"] = str(tmp_path / "original")
    path = ce.export_peft_adapter(model, tmp_path / "adapter", base="original")
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "original")
    assert "adds the quantization error back" in caplog.text


def test_empty_model_works_with_accelerate_init_empty_weights_and_load_checkpoint_and_dispatch(tmp_path):
    """Before: only the internal persistence.parse_record + swap_in_empty_layers built a skeleton."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    model = _saved("llama", tmp_path)
    with init_empty_weights():
        empty = ce.empty_model(tmp_path / "ck")
    assert all(t.device.type == "meta" for t in empty.parameters())
    loaded = load_checkpoint_and_dispatch(empty, str(tmp_path / "ck"), device_map={"": "cpu"})
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def state_of(model):
    """Every tensor (by name) and every module type: what a refused call must leave as it was."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()])


def assert_unchanged(model, before):
    tensors, modules = state_of(model)
    assert modules == before[1]
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)


def peft_over_cloq(targets):
    model = copy.deepcopy(prepared("llama"))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, r=8))
    with torch.no_grad():  # adapters that change the output, so that a merge would show
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_()
    return peft_model


def test_cloq_merge_and_unload_refuses_a_peft_model_before_changing_it():
    """Issue 23: it replaced every quantized layer, then raised on `delattr(PeftModel, "cloq_config")`."""
    peft_model = peft_over_cloq(["q_proj", "v_proj"])
    before = state_of(peft_model)
    for call in (ce.merge_and_unload, ce.dequantized_base):
        with pytest.raises(ValueError, match="needs the cloq model itself; got a PeftModel"):
            call(peft_model)
        assert_unchanged(peft_model, before)
    inner = peft_model.base_model.model  # the cloq model with PEFT's layers inside it
    with pytest.raises(ValueError, match="holds PEFT adapter layers"):
        ce.merge_and_unload(inner)
    assert_unchanged(peft_model, before)
    assert "quantization_config" in inner.config.to_dict() and inner.cloq_config
    dense = ce.merge_and_unload(peft_model.unload())  # the route the message names: PEFT's adapters dropped
    assert not any(isinstance(m, QuantLoRALinear) for m in dense.modules())


@pytest.mark.parametrize("method", ["merge_and_unload", "merge_adapter"])
def test_peft_merge_refuses_adapters_on_cloq_layers_before_merging_any(method):
    """An embedding adapter comes first in module order: PEFT merged and unloaded it, then raised on ours."""
    peft_model = peft_over_cloq(["embed_tokens", "q_proj"])
    before = state_of(peft_model)
    with pytest.raises(ValueError, match="nothing was merged"):
        getattr(peft_model, method)()
    assert_unchanged(peft_model, before)
