"""Tiny random Hugging Face models, one per supported architecture (no hub access)."""
import torch

VOCAB = 128


def _configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": (LlamaConfig, common),
        "mistral": (MistralConfig, common),
        "qwen2": (Qwen2Config, common),
        "opt": (OPTConfig, dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)),
        "gpt2": (GPT2Config, dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)),
        "bert": (BertConfig, dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)),
    }


ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2", "bert")


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModel, AutoModelForCausalLM

    cls, kwargs = _configs()[arch]
    torch.manual_seed(seed)
    config = cls(**kwargs)
    if arch == "bert":
        config.architectures = ["BertModel"]
        model = AutoModel.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def tiny_calib(num: int = 4, seq_len: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, seq_len), generator=g) for _ in range(num)]
