"""llama.cpp's tools as driven from Python: what their output says, where they are (or what to run
when they are not), and our side of ``llama-perplexity``'s estimate."""
import math

import pytest
import torch

from cloq_engine.llamacpp import tools

PPL_OUT = """perplexity: tokenizing the input ..
perplexity: calculating perplexity over 8 chunks, n_ctx=256, batch_size=256, n_seq=1
[1]17.1234,[2]18.0000,
Final estimate: PPL = 17.6660 +/- 0.51234
"""
EVAL_OUT = """llama_perf_context_print:        load time =     120.33 ms
llama_perf_context_print: prompt eval time =      40.10 ms /     9 tokens (    4.46 ms per token,   224.44 tokens per second)
llama_perf_context_print:        eval time =     880.00 ms /    63 runs   (   13.97 ms per token,    71.59 tokens per second)
"""


def test_the_tools_output_is_read():
    assert tools.parse_perplexity(PPL_OUT) == {"ppl": 17.666, "ppl_err": 0.51234, "chunks": 8, "n_ctx": 256}
    speed = tools.parse_eval_speed(EVAL_OUT)
    assert speed["gen_tok_s"] == 71.59 and speed["gen_tokens"] == 63 and speed["prompt_tok_s"] == 224.44
    assert tools.parse_token_ids("main: loading\n[1, 504, 28]\n") == [1, 504, 28]
    for fn, text in ((tools.parse_perplexity, "failed to load model"), (tools.parse_eval_speed, ""),
                     (tools.parse_token_ids, "nothing")):
        with pytest.raises(tools.ToolError):
            fn(text)


def test_missing_tools_name_the_build_step(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACPP_BIN", str(tmp_path))
    with pytest.raises(tools.ToolError, match=r"llama-perplexity.*benchmarks/build_llamacpp.sh"):
        tools.find_tools()
    for name in tools.TOOLS:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    assert tools.find_tools()["llama-quantize"] == str(tmp_path / "llama-quantize")


def test_a_failing_tool_reports_its_exit_and_output():
    with pytest.raises(tools.ToolError, match=r"exited 3:\nboom"):
        tools.run(["sh", "-c", "echo boom; exit 3"])


def test_chunked_perplexity_scores_the_second_half_of_each_chunk_after_bos():
    """As llama-perplexity: chunk i's first id becomes BOS, positions n_ctx/2 + 1 .. n_ctx - 1 are
    scored. Checked against transformers' own label-shifted loss with the first half masked."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64)).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 50, (200,), generator=g).tolist()
    out = tools.chunked_perplexity(model, tokens, n_ctx=32, chunks=3, bos_id=1)
    assert out["tokens"] == 3 * 15 and out["chunks"] == 3
    nll = 0.0
    with torch.no_grad():
        for i in range(3):
            ids = torch.tensor([[1] + tokens[i * 32 + 1:(i + 1) * 32]])
            labels = ids.clone()
            labels[0, :17] = -100  # HF shifts: label j is predicted at j - 1; 16 .. 30 predict 17 .. 31
            nll += float(model(input_ids=ids, labels=labels).loss) * 15
    assert out["ppl"] == pytest.approx(math.exp(nll / 45), rel=1e-5)
    with pytest.raises(ValueError, match="at least 64"):
        tools.chunked_perplexity(model, tokens[:60], n_ctx=32, chunks=3, bos_id=None)
