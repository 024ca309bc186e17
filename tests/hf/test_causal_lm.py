"""What a real causal LM (SmolLM2-135M: Llama, GQA 9/3 heads, tied embeddings, a chat template)
exercises, on tiny Llamas built like it, and in a few ``slow`` tests on SmolLM2 itself."""
import json
import logging
import os

import pytest
import torch

import cloq_engine as ce
from cloq_engine import backends
from cloq_engine.cli import main
from cloq_engine.hf import streaming
from cloq_engine.nn import QuantLoRALinear
from tiny_models import tiny_calib

VOCAB, HIDDEN, KV = 128, 64, 32  # 4 heads of 16, 2 KV heads: k/v 64 -> 32, as SmolLM2's 576 -> 192
QC = ce.QuantConfig(bits=4, group_size=32, method="gptq")
LC = ce.LoRAConfig(rank=4, alpha=8, init="cloq")
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def tied_llama(seed: int = 0, vocab: int = VOCAB):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A saved tiny tied-embedding GQA Llama with the embedded tokenizer given a chat template, and a
    generation config of its own (sampling defaults no config would derive)."""
    from transformers import AutoTokenizer, GenerationConfig

    from cloq_engine import data

    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    tok.chat_template = CHAT
    model = tied_llama(vocab=len(tok))
    model.generation_config = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.3, top_p=0.9,
                                               bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("tied-llama") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


CLI_FAST = ["--bits", "4", "--group-size", "32", "--samples", "4", "--seq-len", "32", "--no-progress"]


# -- GQA -------------------------------------------------------------------------------------------
def test_gqa_q_k_v_share_one_gram_and_one_gptq_and_the_model_runs(monkeypatch):
    from cloq_engine.hf import builder as prep

    groups = []
    real = prep.quantize_and_init

    def spy(weights, qc, lc, H=None, names=None):
        groups.append([(n.rpartition(".")[2], tuple(W.shape)) for n, W in zip(names, weights)])
        return real(weights, qc, lc, H, names=names)

    monkeypatch.setattr(prep, "quantize_and_init", spy)
    model = tied_llama()
    ce.prepare_model(model, QC, LC, calib=tiny_calib(4))
    qkv = [("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (KV, HIDDEN)), ("v_proj", (KV, HIDDEN))]
    assert groups.count(qkv) == 2  # one H and one GPTQ for q/k/v of each block
    assert groups.count([("gate_proj", (128, HIDDEN)), ("up_proj", (128, HIDDEN))]) == 2
    k = model.model.layers[0].self_attn.k_proj
    assert isinstance(k, QuantLoRALinear) and (k.out_features, k.in_features) == (KV, HIDDEN)
    ids = tiny_calib(1, seed=5)[0]
    assert torch.isfinite(_logits(model, ids)).all()


# -- tied embeddings -------------------------------------------------------------------------------
def test_default_leaves_a_tied_head_tied_through_prepare_save_and_both_loaders(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tied_llama()
    ce.prepare_model(model, QC, LC, calib=tiny_calib(4))
    assert "lm_head" not in model.cloq_config["targets"] and _tied(model) and model.config.tie_word_embeddings
    path = ce.save_pretrained(model, tmp_path / "ck")
    ids = tiny_calib(1, seed=5)[0]
    for loaded in (ce.load_pretrained(path), AutoModelForCausalLM.from_pretrained(path)):
        assert _tied(loaded) and torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_targeting_a_tied_head_unties_it_with_a_warning_giving_the_bytes(tmp_path, caplog):
    """Before: the head was swapped but the config still declared the tie, so loading failed
    ("tied-tensor metadata names unknown tensors ['lm_head.weight']")."""
    from transformers import AutoModelForCausalLM

    model = tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    lc = ce.LoRAConfig(rank=4, alpha=8, init="cloq", target_modules=["q_proj", "lm_head"], exclude=())
    with caplog.at_level(logging.WARNING, logger="cloq_engine"):
        ce.prepare_model(model, QC, lc, calib=tiny_calib(4))
    # 4-bit g32 head 128x64: 8 x 128 int32 words + 2 x 128 fp16 scales and zeros; rank-4 LoRA in fp32
    packed, lora = 8 * 128 * 4 + 2 * 2 * 128 * 2, 4 * (64 + 128) * 4
    msg = next(r.getMessage() for r in caplog.records if "unties" in r.getMessage())
    assert "'lm_head'" in msg and "model.embed_tokens" in msg and "32.8 kB float32" in msg
    assert f"{(packed + lora) / 1e3:.1f} kB more" in msg and "tie_word_embeddings=False" in msg
    assert isinstance(model.lm_head, QuantLoRALinear) and not model.config.tie_word_embeddings
    assert "lm_head.weight" not in model.all_tied_weights_keys
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the input embedding is untouched
    path = ce.save_pretrained(model, tmp_path / "ck")
    assert json.load(open(os.path.join(path, "config.json")))["tie_word_embeddings"] is False
    ids = tiny_calib(1, seed=5)[0]
    for loaded in (ce.load_pretrained(path), AutoModelForCausalLM.from_pretrained(path)):
        assert isinstance(loaded.lm_head, QuantLoRALinear) and not _tied(loaded)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def _cli_prepare(src, out, *extra):
    assert main(["prepare", "--model", str(src), "--out", str(out), *CLI_FAST, *extra]) == 0


def test_resume_is_bitwise_the_in_memory_prepare_on_a_tied_gqa_llama(tied_dir, tmp_path):
    """`cloq prepare` and `cloq prepare --resume` (block by block from the shards) write the same
    tensors, and both keep the head tied (stored once)."""
    _cli_prepare(tied_dir, tmp_path / "mem")
    _cli_prepare(tied_dir, tmp_path / "res", "--resume")
    a, b = ce.load_pretrained(tmp_path / "mem"), ce.load_pretrained(tmp_path / "res")
    _same_state(a, b)
    assert _tied(a) and _tied(b) and a.cloq_config["targets"] == b.cloq_config["targets"]


def test_a_targeted_tied_head_streams_bitwise_as_in_memory(tied_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    lc = ce.LoRAConfig(rank=4, alpha=8, init="cloq", target_modules=["q_proj", "down_proj", "lm_head"], exclude=())
    calib = tiny_calib(4)
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32).eval()
    ce.prepare_model(model, QC, lc, calib=calib)
    ref = ce.save_pretrained(model, tmp_path / "ref")
    out = streaming.prepare_pretrained(tied_dir, tmp_path / "out", QC, lc, calib=calib)
    a, b = ce.load_pretrained(ref), ce.load_pretrained(out)
    _same_state(a, b)
    assert not b.config.tie_word_embeddings and isinstance(b.lm_head, QuantLoRALinear)


# -- chat template and generation config ------------------------------------------------------------
def _side_files(path):
    from transformers import AutoTokenizer

    gen = json.load(open(os.path.join(path, "generation_config.json")))
    tok = AutoTokenizer.from_pretrained(path)
    return {k: gen.get(k) for k in ("max_new_tokens", "temperature", "top_p", "do_sample")}, tok.chat_template


def test_chat_template_and_generation_config_survive_prepare_resume_finetune_and_exports(tied_dir, tmp_path):
    """Before: --resume, load_pretrained (so finetune and the merged export) wrote a generation
    config derived from config.json, and the GPTQ export none."""
    want = ({"max_new_tokens": 7, "temperature": 0.3, "top_p": 0.9, "do_sample": True}, CHAT)
    ck = tmp_path / "ck"
    _cli_prepare(tied_dir, ck)
    _cli_prepare(tied_dir, tmp_path / "resumed", "--resume")
    assert main(["finetune", str(ck), "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--eval-samples", "1",
                 "--out", str(tmp_path / "ft")]) == 0
    assert main(["export", str(ck), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 0
    assert main(["export", str(ck), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    for d in ("ck", "resumed", "ft", "gptq", "merged"):
        assert _side_files(tmp_path / d) == want, d
    loaded = ce.load_pretrained(ck)
    assert (loaded.generation_config.max_new_tokens, loaded.generation_config.temperature) == (7, 0.3)


# -- generate with a KV cache ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_generate_with_a_kv_cache_matches_full_forwards_on_every_backend(backend):
    """Greedy decoding with the cache (one token per forward after the prompt) scores each step as
    a full forward over the whole sequence does (triton: under TRITON_INTERPRET on CPU)."""
    if backend not in backends.available_backends():
        pytest.skip(f"{backend} backend unavailable")
    model = tied_llama()
    ce.prepare_model(model, QC, LC, calib=tiny_calib(4))
    prompt = tiny_calib(1, seq_len=6, seed=9)[0]
    backends.set_backend(backend)
    try:
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        full = _logits(model, out.sequences)
    finally:
        backends.set_backend(None)
    steps = torch.stack(out.logits, 1)[0]  # (new tokens, vocab)
    torch.testing.assert_close(steps, full[0, prompt.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[0, prompt.shape[1]:], full[0, prompt.shape[1] - 1:-1].argmax(-1))


# -- training --------------------------------------------------------------------------------------
def test_training_under_gradient_checkpointing_and_bf16_autocast_matches_plain_autocast():
    import copy

    ids = torch.cat(tiny_calib(2, seq_len=16, seed=7))
    model = tied_llama()
    ce.prepare_model(model, QC, LC, calib=tiny_calib(4))
    with torch.no_grad():  # a non-zero B for every layer, so that every factor gets a gradient
        for m in model.modules():
            if isinstance(m, QuantLoRALinear):
                m.lora_B.normal_(0, 0.05)
    ckpt = copy.deepcopy(model).train()
    model.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses = []
    for m in (model, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        losses.append(out.loss.detach())
    assert torch.equal(losses[0], losses[1]) and torch.isfinite(losses[0])
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads.values())
    for n, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-6)
    assert _tied(ckpt) and ckpt.lm_head.weight.grad is None  # the tied fp32 embedding stays frozen


# -- a layer narrower than the rank ----------------------------------------------------------------
def tiny_qwen2_moe():
    """A tiny Qwen2-MoE: its ``shared_expert_gate`` is an nn.Linear(hidden, 1)."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_a_layer_narrower_than_the_rank_gets_its_rank_clipped_with_a_warning(tmp_path, caplog):
    """Before: refused ("layer 'model.layers.0.mlp.shared_expert_gate': rank=4 exceeds
    min(in_features, out_features)=1")."""
    model = tiny_qwen2_moe()
    ids = tiny_calib(1, seed=5)[0]
    with caplog.at_level(logging.WARNING, logger="cloq_engine"):
        ce.prepare_model(model, QC, LC, calib=tiny_calib(4))
    msg = next(r.getMessage() for r in caplog.records if "narrower than the LoRA rank" in r.getMessage())
    assert "2 layer(s)" in msg and "'model.layers.0.mlp.shared_expert_gate' (1x64): rank 4 -> 1" in msg
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert isinstance(gate, QuantLoRALinear) and gate.rank == 1 and gate.scaling == 8.0
    assert model.model.layers[0].mlp.shared_expert.gate_proj.rank == 4
    rep = {r.name: r for r in model.cloq_report.layers}["model.layers.0.mlp.shared_expert_gate"]
    assert rep.err_init < 1e-6 < rep.err_quant  # rank 1 holds all of a one-row W - Q
    assert model.cloq_config["lora"]["rank_pattern"]["model.layers.1.mlp.shared_expert_gate"] == 1
    loaded = ce.load_pretrained(ce.save_pretrained(model, tmp_path / "ck"))
    assert loaded.model.layers[1].mlp.shared_expert_gate.rank == 1
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    ce.export_peft_adapter(model, tmp_path / "adapter")
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["rank_pattern"]["model.layers.0.mlp.shared_expert_gate"] == 1


# -- the real SmolLM2 ------------------------------------------------------------------------------
TWO_BLOCKS = r"model\.layers\.[01]\..*"


@pytest.mark.slow
def test_smollm2_two_blocks_gqa_tied_generate_train_save_load_and_resume(tmp_path):
    """SmolLM2-135M itself, its first two blocks prepared (2-bit RTN + CLoQ on 4 x 64 calibration
    tokens; the other 28 blocks run as they are): k/v 576 -> 192 with q/k/v on one H, the head
    kept tied, cached greedy decoding as full forwards, a bf16-autocast checkpointed backward,
    save/load, and the block-by-block path bitwise the same."""
    from cloq_engine import data, models

    model, tok = data.load_model("smollm2")
    qc = ce.QuantConfig(bits=2, group_size=64, method="rtn")
    lc = ce.LoRAConfig(rank=8, alpha=8, init="cloq", target_modules=TWO_BLOCKS)
    calib = data.token_blocks(data.calibration_paragraphs(), tok, 64, 4)
    ce.prepare_model(model, qc, lc, calib=calib)
    attn = model.model.layers[0].self_attn
    assert (attn.k_proj.out_features, attn.v_proj.out_features, attn.q_proj.out_features) == (192, 192, 576)
    assert len(model.cloq_config["targets"]) == 14 and _tied(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a list?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = _logits(model, out.sequences)[0, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], full, rtol=1e-3, atol=1e-3)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=calib[0], labels=calib[0]).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(attn.k_proj.lora_A.grad).all()
    model.gradient_checkpointing_disable()
    model.eval()
    path = ce.save_pretrained(model, tmp_path / "mem", tokenizer=tok)
    loaded = ce.load_pretrained(path)
    assert _tied(loaded) and torch.equal(_logits(loaded, calib[1]), _logits(model, calib[1]))
    streamed = streaming.prepare_pretrained(models.resolve("smollm2"), tmp_path / "res", qc, lc, calib=calib,
                                            dtype=torch.float32, tokenizer=tok)
    _same_state(loaded, ce.load_pretrained(streamed))
