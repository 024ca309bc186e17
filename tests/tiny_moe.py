"""Tiny random mixture-of-experts models built from transformers configs (no hub access).

Experts are fused 3-D parameters in transformers 5: Qwen3-MoE, Mixtral and OLMoE store
``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I]; gpt-oss stores them transposed
([E, H, 2I] / [E, I, H]) with biases and interleaved gate/up columns.
"""
import torch

VOCAB = 128
HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 8, 2


def _configs():
    from transformers import GptOssConfig, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=TOP_K)
    return {
        "qwen3_moe": (Qwen3MoeConfig, dict(common, moe_intermediate_size=INTER, intermediate_size=128,
                                            num_experts=EXPERTS, head_dim=16, norm_topk_prob=True)),
        "mixtral": (MixtralConfig, dict(common, intermediate_size=INTER, num_local_experts=EXPERTS)),
        "olmoe": (OlmoeConfig, dict(common, intermediate_size=INTER, num_experts=EXPERTS)),
        "gpt_oss": (GptOssConfig, dict(common, intermediate_size=INTER, num_local_experts=EXPERTS, head_dim=16,
                                       sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    }


MOE_ARCHS = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")


def tiny_moe(arch: str, seed: int = 0):
    """A 2-block causal LM with 8 experts (top-2), random weights, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    cls, kwargs = _configs()[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**kwargs))
    with torch.no_grad():  # gpt-oss initialises its expert biases to zero and the router to zero: randomize
        for name, p in model.named_parameters():
            if p.dim() == 3 or "router" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.08)
            elif name.endswith("_bias"):
                p.normal_(0, 0.02)
    return model.eval()


def tiny_moe_calib(num: int = 8, seq_len: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, seq_len), generator=g) for _ in range(num)]
