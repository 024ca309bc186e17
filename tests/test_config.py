"""QuantConfig / LoRAConfig: every bad field raises a ValueError naming it; good ones round-trip."""
import math

import pytest

from cloq_engine.config import InitMethod, LoRAConfig, QuantConfig, QuantMethod

BAD_QUANT_FIELDS = [
    ("bits", 1), ("bits", 5), ("bits", 8), ("bits", 4.0), ("bits", "4"), ("bits", True),
    ("group_size", 0), ("group_size", 16), ("group_size", 256), ("group_size", -2), ("group_size", 128.0),
    ("group_size", True),
    ("method", "awq"), ("method", ""), ("method", None),
    ("damp", -0.01), ("damp", 1.0), ("damp", math.nan), ("damp", math.inf), ("damp", "0.01"),
    ("block_size", 0), ("block_size", -128), ("block_size", 1.5), ("block_size", True),
    ("sym", "yes"), ("sym", 1), ("act_order", None), ("act_order", 0), ("mse_clip", "false"),
]

BAD_LORA_FIELDS = [
    ("rank", 0), ("rank", -4), ("rank", 1.5), ("rank", True), ("rank", "16"),
    ("alpha", 0), ("alpha", -1), ("alpha", math.nan), ("alpha", math.inf), ("alpha", True), ("alpha", "16"),
    ("dropout", -0.1), ("dropout", 1.0), ("dropout", math.nan), ("dropout", "0.1"),
    ("init", "pissa"), ("init", None),
    ("target_modules", None), ("target_modules", 5), ("target_modules", ["q_proj", 3]),
    ("exclude", None), ("exclude", [None]),
    ("use_rslora", "no"), ("use_rslora", 1),
    ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 8.0}), ("rank_pattern", ["q_proj"]),
    ("rank_pattern", {"(": 8}),
    ("init_solver", "lanczos"), ("init_power_iters", -1), ("init_power_iters", 2.5),
    ("init_damp", -1e-6), ("init_damp", math.nan), ("init_iters", 0), ("init_iters", True),
    ("requant_rounds", -1), ("requant_rounds", 1.0), ("requant_tol", 1.0), ("requant_tol", "0"),
    ("lora_dtype", "fp32"), ("lora_dtype", None), ("lora_dtype", "int8"),
]


@pytest.mark.parametrize("field,value", BAD_QUANT_FIELDS)
def test_quant_config_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        QuantConfig(**{field: value})


@pytest.mark.parametrize("field,value", BAD_LORA_FIELDS)
def test_lora_config_bad_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        LoRAConfig(**{field: value})


@pytest.mark.parametrize("bits", [2, 3])
def test_nf4_needs_four_bits(bits):
    with pytest.raises(ValueError, match="`bits`.*nf4"):
        QuantConfig(bits=bits, method="nf4")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=2, group_size=32, method="rtn", sym=True, mse_clip=True),
        dict(bits=3, group_size=-1, method=QuantMethod.GPTQ, damp=0.0, act_order=True, block_size=7),
        dict(bits=4, group_size=64, method="NF4"),
    ],
)
def test_quant_config_dict_round_trip(kwargs):
    config = QuantConfig(**kwargs)
    d = config.to_dict()
    assert isinstance(d["method"], str)
    assert QuantConfig.from_dict(d) == config
    assert QuantConfig.from_dict({**d, "unknown_key": 1}) == config


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank=1, alpha=0.5, init="zero", target_modules=["q_proj", "v_proj"], exclude="lm_head"),
        dict(rank=64, alpha=16, dropout=0.1, init=InitMethod.QUAILORA, target_modules=r".*mlp.*", use_rslora=True),
        dict(rank=8, rank_pattern={"q_proj": 16, r"layers\.0\..*": 4}, init_solver="krylov", init_power_iters=3,
             init_damp=1e-4, init_iters=7, requant_rounds=2, requant_tol=0.01),
    ],
)
def test_lora_config_dict_round_trip(kwargs):
    config = LoRAConfig(**kwargs)
    assert LoRAConfig.from_dict(config.to_dict()) == config
    assert isinstance(config.exclude, tuple)


@pytest.mark.parametrize("rank,alpha,rslora,expected", [(16, 16, False, 1.0), (8, 32, False, 4.0), (16, 16, True, 4.0)])
def test_lora_scaling(rank, alpha, rslora, expected):
    assert LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora).scaling == pytest.approx(expected)


def test_enum_fields_accept_plain_strings_case_insensitively():
    assert QuantConfig(method="GPTQ").method is QuantMethod.GPTQ
    assert LoRAConfig(init="CLoQ").init is InitMethod.CLOQ


def test_requant_rounds_need_a_calibrated_init():
    with pytest.raises(ValueError, match="`requant_rounds`"):
        LoRAConfig(init="loftq", requant_rounds=2)
    assert LoRAConfig(init="quailora", requant_rounds=2).requant_rounds == 2


def test_rank_for_follows_peft_rank_pattern_matching():
    lc = LoRAConfig(rank=8, alpha=16, rank_pattern={"q_proj": 16, r"layers\.1\.mlp\..*": 4})
    assert lc.rank_for("model.layers.0.self_attn.q_proj") == 16
    assert lc.rank_for("model.layers.1.mlp.up_proj") == 4
    assert lc.rank_for("model.layers.0.self_attn.k_proj") == 8
    assert lc.rank_for("model.layers.0.self_attn.xq_proj") == 8  # a suffix match needs the dot
    assert lc.scaling_for_rank(16) == 1.0 and lc.scaling == 2.0


def test_lora_dtype_defaults_to_auto_and_takes_a_torch_dtype_by_name():
    import torch

    assert LoRAConfig().lora_dtype == "auto"
    assert LoRAConfig(lora_dtype=torch.bfloat16).lora_dtype == "bfloat16"
    assert LoRAConfig.from_dict(LoRAConfig(lora_dtype="base").to_dict()).lora_dtype == "base"
