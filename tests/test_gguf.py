"""GGUF export checked by code nobody here wrote: gguf-py's reader and numpy dequantizers, and
transformers' GGUF loader (``from_pretrained(dir, gguf_file=...)``)."""
import functools
import os

import numpy as np
import pytest
import torch

import cloq_engine as ce
from cloq_engine.llamacpp import gguf_file
from cloq_engine.llamacpp.gguf_file import export_gguf, qk_permutation
from cloq_engine.nn import QuantLoRALinear

gguf = pytest.importorskip("gguf")

GRIDS = {"q4_k": (4, False), "q3_k": (3, True), "q2_k": (2, False), "q4_1": (4, False)}


def _tiny(arch="llama", seed=0, hidden=256):
    """A tiny causal LM whose widths are multiples of 256, so that the k-quant types are used
    (``hidden=288``: as SmolLM2's 576, only down_proj's rows fit a k-quant)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    torch.manual_seed(seed)
    config = cls(vocab_size=96, hidden_size=hidden, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config).eval()


def _calib(n=4, seq=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (1, seq), generator=g) for _ in range(n)]


def _prepared(arch="llama", grid="q4_k", method="gptq", use_rslora=False):
    bits, sym = GRIDS[grid] if grid else (4, False)
    model = _tiny(arch)
    ce.prepare_model(model, ce.QuantConfig(bits=bits, group_size=32, method=method, sym=sym, grid=grid),
                     ce.LoRAConfig(rank=4, alpha=8, init="cloq", use_rslora=use_rslora), calib=_calib())
    return model


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}


@functools.lru_cache(maxsize=None)
def _name_map(arch, n_blocks):
    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_blocks)


def _gguf_name(arch, hf, n_blocks=2):
    return _name_map(arch, n_blocks).get_name(hf + ".weight", try_suffixes=(".weight",))


def _unpermute(arch, name, rows, model):
    if arch != "llama":
        return None
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for key, n in heads.items():
        if f".{key}." in name:
            return torch.argsort(qk_permutation(rows, n)).numpy()
    return None


@pytest.fixture(scope="module")
def llama_exports(tmp_path_factory):
    out = {}
    for grid in GRIDS:
        model = _prepared("llama", grid)
        d = tmp_path_factory.mktemp(f"gguf-{grid}")
        types = export_gguf(model, str(d / "model.gguf"), adapter_file=str(d / "lora.gguf"), float_type="f32")
        out[grid] = (model, d, types)
    return out


@pytest.mark.parametrize("grid", list(GRIDS))
def test_gguf_py_dequantizes_every_exported_tensor_to_our_bits(llama_exports, grid):
    model, d, types = llama_exports[grid]
    reader = gguf.GGUFReader(str(d / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    expected = {"q4_k": "Q4_K", "q3_k": "Q3_K", "q2_k": "Q2_K", "q4_1": "Q4_1"}[grid]
    for hf, layer in _layers(model).items():
        name = _gguf_name("llama", hf)
        t = tensors[name]
        assert t.tensor_type.name == expected, name
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        inv = _unpermute("llama", name, theirs.shape[0], model)
        theirs = theirs if inv is None else theirs[inv]
        ours = layer.quantized_weight.dequantize().numpy()
        assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), name
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type.name == "F32"
    assert reader.fields[gguf_file.MARKER].contents().startswith("cloq-engine")


@pytest.mark.parametrize("grid", ["q4_k", "q2_k"])
def test_transformers_gguf_loader_gives_our_dequantized_logits(llama_exports, grid):
    from transformers import AutoModelForCausalLM

    model, d, _ = llama_exports[grid]
    theirs = AutoModelForCausalLM.from_pretrained(str(d), gguf_file="model.gguf", dtype=torch.float32).eval()
    ours = ce.dequantized_base(model).eval()
    x = _calib(1, 32)[0]
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, ours(x).logits, rtol=0, atol=1e-5)


def test_the_adapter_file_is_llama_cpp_s_lora_layout(llama_exports):
    model, d, _ = llama_exports["q4_k"]
    reader = gguf.GGUFReader(str(d / "lora.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: t for t in reader.tensors}
    for hf, layer in _layers(model).items():
        name = _gguf_name("llama", hf)
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        A, B = np.asarray(a.data), np.asarray(b.data)
        assert A.shape == tuple(layer.lora_A.shape) and B.shape == tuple(layer.lora_B.shape)
        assert alpha / A.shape[0] == pytest.approx(layer.scaling)  # llama.cpp's scale = alpha / rank
        inv = _unpermute("llama", name, B.shape[0], model)
        assert np.array_equal(A, layer.lora_A.detach().numpy())
        assert np.array_equal(B if inv is None else B[inv], layer.lora_B.detach().numpy())


def test_rslora_is_folded_into_alpha(tmp_path):
    model = _prepared("llama", "q4_1", method="rtn", use_rslora=True)
    export_gguf(model, str(tmp_path / "m.gguf"), adapter_file=str(tmp_path / "a.gguf"))
    alpha = gguf.GGUFReader(str(tmp_path / "a.gguf")).fields["adapter.lora.alpha"].contents()
    assert alpha / 4 == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r) = 8 / 2


def test_qwen2_with_biases_reads_back_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _prepared("qwen2", "q3_k")
    types = export_gguf(model, str(tmp_path / "m.gguf"), float_type="f32")
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.0.attn_q.weight"] == "Q3_K"
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    for hf, layer in _layers(model).items():
        t = tensors[_gguf_name("qwen2", hf)]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)  # qwen2 rows are not permuted
        assert np.array_equal(theirs.view(np.uint32), layer.quantized_weight.dequantize().numpy().view(np.uint32))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    x = _calib(1, 32)[0]
    with torch.no_grad():
        assert torch.allclose(theirs(x).logits, ce.dequantized_base(model).eval()(x).logits, rtol=0, atol=1e-5)


def test_default_float_type_is_the_converters_f16_and_our_own_grid_falls_back_to_q5_0(tmp_path):
    model = _prepared("llama", None, method="rtn")  # our grid: integer zeros -> Q5_0 at 4 bits
    types = export_gguf(model, str(tmp_path / "m.gguf"))
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert {t for n, t in types.items() if n.startswith("blk.") and "norm" not in n} == {"Q5_0"}


@pytest.mark.parametrize("fallback,bits,other", [("llama.cpp", 4, "Q4_0"), ("same-bits", 2, "Q4_0")])
def test_layers_no_k_quant_fits_take_llama_cpp_s_fallback_type_at_its_bits(tmp_path, fallback, bits, other):
    """hidden 288: q/k/v/o/gate/up have rows of 288 (no Q2_K), down_proj 512. With the default
    fallback those layers are 4-bit Q4_0 as llama-quantize writes them, stored so, saved and loaded
    at 4 bits; "same-bits" (records from before the field) keeps 2-bit codes in the same Q4_0 bytes."""
    model = _tiny(hidden=288)
    qc = ce.QuantConfig(bits=2, group_size=32, method="rtn", grid="q2_k", grid_fallback=fallback)
    ce.prepare_model(model, qc, ce.LoRAConfig(rank=4, init="zero"))
    layers = _layers(model)
    assert {n.rpartition(".")[2]: m.bits for n, m in layers.items()} == {
        "q_proj": bits, "k_proj": bits, "v_proj": bits, "o_proj": bits, "gate_proj": bits, "up_proj": bits,
        "down_proj": 2}
    ce.save_pretrained(model, str(tmp_path / "ckpt"))
    loaded = ce.load_pretrained(str(tmp_path / "ckpt"))
    for n, m in _layers(loaded).items():
        assert m.bits == layers[n].bits and torch.equal(m.qweight, layers[n].qweight), n
    types = export_gguf(loaded, str(tmp_path / "m.gguf"))
    assert types["blk.0.ffn_down.weight"] == "Q2_K" and types["blk.0.attn_q.weight"] == other
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for hf, layer in _layers(loaded).items():
        name = _gguf_name("llama", hf)
        theirs = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
        inv = _unpermute("llama", name, theirs.shape[0], loaded)
        theirs = theirs if inv is None else theirs[inv]
        assert np.array_equal(theirs.view(np.uint32), layer.quantized_weight.dequantize().numpy().view(np.uint32))


def test_a_layer_that_fits_no_ggml_type_is_refused_by_name_and_nothing_is_written(tmp_path):
    model = _prepared("llama", "q4_k", method="rtn")
    layer = model.model.layers[1].mlp.down_proj
    layer.zeros[0, 0] = 0.3  # no longer on any lattice: fractional zero, min not a float16 multiple
    target = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.down_proj'.*cannot be written exactly.*not Q4_K"):
        export_gguf(model, str(target))
    assert not target.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_act_order_permuted_and_nf4_layers_are_refused_with_the_reason(tmp_path):
    model = _prepared("llama", "q4_k", method="rtn")
    qw = model.model.layers[0].self_attn.v_proj
    qw.register_buffer("perm", torch.arange(qw.in_features - 1, -1, -1))
    with pytest.raises(ValueError, match="v_proj.*act-order permuted"):
        export_gguf(model, str(tmp_path / "m.gguf"))
    model = _tiny()
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=64, method="nf4"), ce.LoRAConfig(rank=4, init="zero"))
    with pytest.raises(ValueError, match="NF4 has no ggml block type"):
        export_gguf(model, str(tmp_path / "m.gguf"))


def test_never_replaces_a_file_it_did_not_write(tmp_path, llama_exports):
    model = llama_exports["q4_1"][0]
    foreign = tmp_path / "m.gguf"
    foreign.write_bytes(b"not ours")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        export_gguf(model, str(foreign))
    with pytest.raises(ValueError, match="not written by cloq export"):
        export_gguf(model, str(foreign), overwrite=True)
    assert foreign.read_bytes() == b"not ours"
    ours = tmp_path / "ours.gguf"
    export_gguf(model, str(ours))
    export_gguf(model, str(ours), overwrite=True)  # our own file: replaced
    assert gguf_file.written_by_us(str(ours))


def test_cli_export_gguf_writes_the_base_and_the_adapter(tmp_path, capsys):
    from cloq_engine import cli

    model = _prepared("llama", "q2_k", method="rtn")
    ckpt = tmp_path / "ckpt"
    ce.save_pretrained(model, str(ckpt))
    out, lora = tmp_path / "m.gguf", tmp_path / "a.gguf"
    assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(out), "--adapter", str(lora)]) == 0
    printed = capsys.readouterr().out
    assert "Q2_K" in printed and os.path.exists(lora)
    assert cli.main(["export", str(ckpt), "--format", "gguf", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "exists" in err and len(err.splitlines()) == 1
    assert cli.main(["export", str(ckpt), "--format", "gptq", "--adapter", str(lora)]) == 1


@pytest.mark.slow
def test_real_smollm2_exports_exactly_with_its_tokenizer(tmp_path):
    """The real causal LM: every tensor bitwise through gguf-py, the tokenizer through transformers."""
    from transformers import AutoTokenizer

    from cloq_engine import data
    from cloq_engine.models import resolve

    model, tok = data.load_model("smollm2")
    ce.prepare_model(model, ce.QuantConfig(bits=2, group_size=32, method="rtn", grid="q2_k"),
                     ce.LoRAConfig(rank=4, init="zero"))
    src = resolve("smollm2")  # its HF directory: tokenizer.json, tokenizer_config.json
    types = export_gguf(model, str(tmp_path / "m.gguf"), tokenizer=tok, tokenizer_dir=src)
    assert types["blk.0.ffn_down.weight"] == "Q2_K" and types["blk.0.attn_q.weight"] == "Q4_0"  # 576 % 256 != 0
    assert model.model.layers[0].self_attn.q_proj.bits == 4  # llama.cpp's fallback for Q2_K: 4-bit Q4_0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tensors = {t.name: t for t in reader.tensors}
    for hf, layer in _layers(model).items():
        name = _gguf_name("llama", hf, model.config.num_hidden_layers)
        t = tensors[name]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        inv = _unpermute("llama", name, theirs.shape[0], model)
        theirs = theirs if inv is None else theirs[inv]
        assert np.array_equal(theirs.view(np.uint32), layer.quantized_weight.dequantize().numpy().view(np.uint32))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "The quick brown fox: 12345 <|im_start|>user\nhi"
    assert theirs.encode(text) == tok.encode(text)


@pytest.mark.slow
def test_calibrated_merge_beats_the_naive_one_and_exports_without_an_adapter(tmp_path):
    """--merge: s·B·A folded in and re-quantized with GPTQ on the layer's grid, Grams captured again;
    its output error against W' = Q + s·B·A is below RTN's of the same W' (the naive merge), layers
    keep their widths (fallbacks included) and the export round-trips through gguf-py."""
    from cloq_engine.llamacpp import merge

    model = _tiny(hidden=288)
    ce.prepare_model(model, ce.QuantConfig(bits=2, group_size=32, method="gptq", grid="q2_k"),
                     ce.LoRAConfig(rank=4, alpha=8, init="cloq"), calib=_calib())
    before = {n: (m.bits, m.merged_weight(torch.float32)) for n, m in _layers(model).items()}
    rows = merge.calibrated_merge(model, _calib())
    assert len(rows) == len(before)
    s = merge.summarize(rows)
    assert s["merge_gptq"]["mean"] < s["merge_rtn"]["mean"]
    assert all(r["drop_adapter"] > 0 for r in rows)
    for n, m in _layers(model).items():
        assert m.bits == before[n][0] and not bool(m.lora_B.any())
    types = export_gguf(model, str(tmp_path / "m.gguf"))
    assert types["blk.0.ffn_down.weight"] == "Q2_K" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert "keep the adapter" in merge.table(rows)


def test_cli_merge_is_refused_with_an_adapter_or_another_format(tmp_path, capsys):
    from cloq_engine import cli

    model = _prepared("llama", "q2_k", method="rtn")
    ckpt = tmp_path / "ckpt"
    ce.save_pretrained(model, str(ckpt))
    assert cli.main(["export", str(ckpt), "--format", "gguf", "--merge", "--adapter", str(tmp_path / "a.gguf")]) == 1
    assert "no --adapter" in capsys.readouterr().err
    assert cli.main(["export", str(ckpt), "--format", "gptq", "--merge"]) == 1
    assert "--merge is for --format gguf" in capsys.readouterr().err
    assert not any(p.suffix == ".gguf" for p in tmp_path.iterdir())
