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


def prepared_tiny(arch: str, quant=None, use_rslora: bool = False, seed: int = 1):
    """A tiny model prepared with RTN (4-bit unless ``quant``) + zero init, then given a random
    LoRA B, so that the LoRA branch matters and every factor gets a gradient from the first step."""
    import cloq_engine as ce
    from cloq_engine.nn import QuantLoRALinear

    model = tiny_model(arch)
    quant = quant or ce.QuantConfig(bits=4, group_size=32, method="rtn")
    ce.prepare_model(model, quant, ce.LoRAConfig(rank=4, alpha=8, init="zero", use_rslora=use_rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLoRALinear):
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    return model


def tiny_llama_dir(path) -> str:
    """A saved tiny causal LM directory that the CLI can prepare: 2-block Llama with MiniLM's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from cloq_engine import data

    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
