"""calib.py: batching, every block's own call arguments, Gram groups in execution order."""
import torch

from cloq_engine import calib
from tiny_models import tiny_calib, tiny_model


def _gemma2():
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                       sliding_window=4)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_batches_group_equal_shapes_up_to_batch_size():
    samples = tiny_calib(5, seq_len=8) + tiny_calib(1, seq_len=6)
    batches = calib.batch_samples(samples, 2, "cpu")
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (2, 8), (1, 8), (1, 6)]
    torch.testing.assert_close(batches[1]["input_ids"], torch.cat(samples[2:4]), rtol=0, atol=0)


def test_each_block_gets_its_own_call_arguments():
    """Gemma 2 alternates sliding-window and full attention: block 1 must not get block 0's mask."""
    model = _gemma2()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, (a, k)), with_kwargs=True)
             for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    inputs = calib.capture_block_inputs(model, model.model.layers, calib.batch_samples([ids], 8, "cpu"))
    masks = [inputs.calls[i][0].kwargs["attention_mask"] for i in range(2)]
    assert not torch.equal(masks[0], masks[1])
    for i in range(2):
        assert torch.equal(masks[i], seen[i][1]["attention_mask"])
    # advancing block 0 gives exactly the hidden states the model feeds block 1
    inputs.advance(0)
    assert torch.equal(inputs.hidden[0], seen[1][0][0])


def test_block_grams_groups_shared_inputs_in_execution_order():
    model = tiny_model("llama")
    block = model.model.layers[0]
    names = ["mlp.down_proj", "self_attn.o_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.k_proj",
             "mlp.gate_proj", "self_attn.v_proj"]
    inputs = calib.capture_block_inputs(model, model.model.layers, calib.batch_samples(tiny_calib(3), 8, "cpu"))
    for true_sequential in (True, False):
        groups = list(calib.block_grams(block, names, inputs.batches(0), true_sequential))
        assert [sorted(g) for g in groups] == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                               ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                               ["mlp.down_proj"]]
        assert groups[0]["self_attn.q_proj"] is groups[0]["self_attn.v_proj"]


def test_true_sequential_gram_sees_the_swapped_layers():
    """Without swaps both modes give the same H; after q/k/v are replaced, o_proj's H changes."""
    model = tiny_model("llama")
    block = model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    inputs = calib.capture_block_inputs(model, model.model.layers, calib.batch_samples(tiny_calib(3), 8, "cpu"))
    one_pass = list(calib.block_grams(block, names, inputs.batches(0), true_sequential=False))
    plain = list(calib.block_grams(block, names, inputs.batches(0), true_sequential=True))
    torch.testing.assert_close(plain[1]["self_attn.o_proj"], one_pass[1]["self_attn.o_proj"])
    swapped = []
    for grams in calib.block_grams(block, names, inputs.batches(0), true_sequential=True):
        swapped.append(grams)
        if "self_attn.q_proj" in grams:
            with torch.no_grad():
                block.self_attn.v_proj.weight.mul_(0.5)  # stands in for quantizing v_proj
    torch.testing.assert_close(swapped[1]["self_attn.o_proj"], 0.25 * one_pass[1]["self_attn.o_proj"])
