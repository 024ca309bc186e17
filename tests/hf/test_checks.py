"""prepare_model refuses bad input before any work, warns where its numbers cannot be trusted,
and leaves the caller's model as it was when it fails."""
import logging

import pytest
import torch

import cloq_engine as ce
from cloq_engine.hf import builder as builder_mod
from cloq_engine.nn import QuantLoRALinear
from tiny_models import VOCAB, tiny_calib, tiny_model

RTN = ce.QuantConfig(bits=4, group_size=32, method="rtn")
GPTQ = ce.QuantConfig(bits=4, group_size=32, method="gptq")
ZERO = ce.LoRAConfig(rank=4, init="zero")
CLOQ = ce.LoRAConfig(rank=4, init="cloq")


def state_of(model):
    return ({n: m for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_part_way_leaves_the_model_as_it_was(exc, monkeypatch):
    model = tiny_model("llama").train()
    model.model.layers[0].mlp.eval()  # a mixed train/eval state is kept too
    before = state_of(model)
    real, calls = builder_mod.build_layer, []

    def fail_on_fifth(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 5:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(builder_mod, "build_layer", fail_on_fifth)
    with pytest.raises(type(exc)):
        ce.prepare_model(model, GPTQ, CLOQ, calib=tiny_calib(8))
    after = state_of(model)
    assert after[0] == before[0] and after[1] == before[1] and after[2] == before[2]
    assert all(torch.equal(after[3][k], v) for k, v in before[3].items())
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())
    assert not hasattr(model, "cloq_config") and not hasattr(model.config, "quantization_config")
    ce.prepare_model(model, RTN, ZERO)  # and it can be prepared afterwards


def test_preparing_a_prepared_model_says_so():
    model = ce.prepare_model(tiny_model("llama"), RTN, ZERO)
    with pytest.raises(ValueError, match=r"already prepared \(14 QuantLoRALinear layers"):
        ce.prepare_model(model, RTN, ZERO)


def test_t5_encoder_whose_code_reads_layer_weight_is_prepared():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4)).eval()
    ids = tiny_calib(1, seed=3)[0]
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="gptq"), CLOQ, calib=tiny_calib(16))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert ((out - ref).norm() / ref.norm()) < 0.2
    layer = model.get_submodule(model.cloq_config["targets"][0])
    torch.testing.assert_close(layer.weight, layer.quantized_weight.dequantize())
    assert not layer.weight.requires_grad and "weight" not in dict(layer.named_parameters())


@pytest.mark.parametrize("calib, match", [
    ([torch.zeros(1, 0, dtype=torch.long)], r"calibration sample 0 is empty"),
    ([torch.ones(1, 8, dtype=torch.long), torch.full((1, 8), VOCAB)],
     rf"calibration sample 1 has token id {VOCAB} outside the model's vocabulary \(vocab_size={VOCAB}\)"),
    ([torch.full((1, 8), -1)], r"token id -1 outside"),
    ([torch.ones(1, 65, dtype=torch.long)], r"sample 0 has 65 tokens; the model's max_position_embeddings is 64"),
], ids=["empty", "id too large", "negative id", "too long"])
def test_bad_calibration_samples_are_named(calib, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        ce.prepare_model(model, GPTQ, CLOQ, calib=calib)
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())


def test_too_few_calibration_tokens_warns_with_the_numbers(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="cloq_engine"):
        ce.prepare_model(model, GPTQ, CLOQ, calib=tiny_calib(2, seq_len=16))
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "calibration has 32 tokens, fewer than in_features of 14 layer(s) (up to 128" in msg
    assert model.cloq_report.calib_tokens == 32 and len(model.cloq_report.underdetermined) == 14
    caplog.clear()
    ce.prepare_model(tiny_model("llama"), GPTQ, CLOQ, calib=tiny_calib(9, seq_len=16))
    assert "fewer than in_features" not in caplog.text


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2)).eval()


def test_moe_expert_weights_left_in_full_precision_are_named(caplog):
    excluded = ce.LoRAConfig(rank=4, init="zero", exclude=("lm_head", "experts"))
    with caplog.at_level(logging.WARNING, logger="cloq_engine"):
        model = ce.prepare_model(tiny_mixtral(), RTN, excluded)
    assert "stay in FULL PRECISION" in caplog.text and "model.layers.0.mlp.experts." in caplog.text
    assert "model.layers.0.mlp.experts.gate_up_proj" in model.cloq_report.full_precision
    assert not any("embed" in n or "norm" in n for n in model.cloq_report.full_precision)


def test_targeted_moe_experts_are_packed_and_only_the_router_stays_in_full_precision():
    model = ce.prepare_model(tiny_mixtral(), RTN, ZERO)
    assert model.cloq_report.full_precision == ["model.layers.0.mlp.gate.weight"]


def test_dense_model_has_no_full_precision_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cloq_engine"):
        model = ce.prepare_model(tiny_model("gpt2"), RTN, ZERO)
    assert "FULL PRECISION" not in caplog.text and model.cloq_report.full_precision == []


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_integer_input_raises_like_nn_linear(dtype):
    layer = ce.prepare_model(tiny_model("llama"), RTN, ZERO).model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match=f"needs a floating-point input; got {dtype}"):
        layer(torch.ones(2, 64, dtype=dtype))


def test_nan_and_inf_weights_are_refused_before_calibration_naming_every_bad_layer(monkeypatch):
    from cloq_engine import calib as calib_mod

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, :3] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[2, 1] = float("inf")

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the weights were checked")

    monkeypatch.setattr(calib_mod, "capture_block_inputs", no_calibration)
    with pytest.raises(ValueError) as e:
        ce.prepare_model(model, GPTQ, CLOQ, calib=tiny_calib(4))
    msg = str(e.value)
    assert "NaN or Inf weights in 2 tensor(s)" in msg
    assert "model.layers.0.self_attn.k_proj.weight (3 NaN)" in msg
    assert "model.layers.1.mlp.down_proj.weight (1 Inf)" in msg
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules())
