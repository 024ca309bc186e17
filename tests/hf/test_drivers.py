"""The three prepare drivers (in memory, streaming, from a GPTQ checkpoint) run one pipeline: the
same plan, the same guard, the same report and, for the same model, Q and calibration, the same
tensors bit for bit (docs/design.md §2)."""
import pytest
import torch

import cloq_engine as ce
from cloq_engine import export
from cloq_engine.hf import streaming
from cloq_engine.nn import QuantLoRALinear
from tiny_models import tiny_calib, tiny_model
from tiny_moe import tiny_moe, tiny_moe_calib

GPTQ2 = ce.QuantConfig(bits=2, group_size=32, method="gptq")
CLOQ = ce.LoRAConfig(rank=4, alpha=8, init="cloq")


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _rows(report):
    return [(r.name, r.shape, r.err_quant, r.err_init, r.bits_per_weight) for r in report.layers]


@pytest.mark.slow
def test_in_memory_streaming_and_from_gptq_prepare_the_same_tensors_and_report(tmp_path):
    """Before: the GPTQ import skipped the factor balancing cloq's default asks for (its A, B were
    another split of the same product) and left no report."""
    tiny_model("llama").save_pretrained(tmp_path / "src")
    memory = tiny_model("llama")
    ce.prepare_model(memory, GPTQ2, CLOQ, calib=tiny_calib(4))
    streamed, report = streaming.prepare_pretrained(tmp_path / "src", tmp_path / "stream", GPTQ2, CLOQ,
                                                    calib=tiny_calib(4), return_report=True)
    _same_state(memory, ce.load_pretrained(streamed))
    assert _rows(report) == _rows(memory.cloq_report)

    export.export_gptq(memory, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")  # v2: the zeros exactly
    imported = ce.prepare_from_gptq(tiny_model("llama"), str(tmp_path / "gptq"), CLOQ, calib=tiny_calib(4))
    _same_state(memory, imported)
    assert _rows(imported.cloq_report) == _rows(memory.cloq_report) and len(imported.cloq_report.layers) == 14
    assert imported.cloq_config["targets"] == memory.cloq_config["targets"]  # the model's order, as prepare's


@pytest.mark.slow
def test_an_uncalibrated_moe_prepares_the_same_in_memory_and_streamed(tmp_path):
    """The random A of a zero init is drawn in one order by both drivers (block by block: its linear
    layers, then its experts). Before: in memory drew every linear layer's first, so the two differed."""
    lora = ce.LoRAConfig(rank=4, alpha=8, init="zero")
    rtn = ce.QuantConfig(bits=4, group_size=32, method="rtn")
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "src")
    memory = tiny_moe("qwen3_moe")
    torch.manual_seed(0)
    ce.prepare_model(memory, rtn, lora)
    torch.manual_seed(0)
    out = streaming.prepare_pretrained(tmp_path / "src", tmp_path / "out", rtn, lora)
    _same_state(memory, ce.load_pretrained(out))


def test_every_driver_leaves_the_caller_model_as_it_was_when_it_fails(tmp_path, monkeypatch):
    """Before: a failure part-way through prepare_from_gptq left the model half replaced."""
    src = tiny_model("llama")
    ce.prepare_model(src, ce.QuantConfig(bits=4, group_size=32, method="rtn"), ce.LoRAConfig(rank=4, init="zero"))
    export.export_gptq(src, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
    real, calls = QuantLoRALinear.from_quantized.__func__, []

    def fail_in_block_1(cls, *args, **kwargs):  # block 0 (7 layers) is swapped in by then
        calls.append(args[0])
        if len(calls) == 9:
            raise RuntimeError("boom")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(QuantLoRALinear, "from_quantized", classmethod(fail_in_block_1))
    model = tiny_model("llama")
    before = {n: m for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        ce.prepare_from_gptq(model, str(tmp_path / "gptq"), CLOQ, calib=tiny_calib(4))
    assert {n: m for n, m in model.named_modules()} == before
    assert not any(isinstance(m, QuantLoRALinear) for m in model.modules()) and not hasattr(model, "cloq_config")


@pytest.mark.parametrize("driver", ["memory", "stream", "from_gptq"])
def test_every_driver_refuses_missing_calibration_by_the_registries(tmp_path, driver):
    """The needs-calibration rule is the quantizer's or the init's ``needs_H`` (one rule, every driver);
    an imported Q needs no calibration for itself."""
    if driver == "memory":
        run = lambda lc: ce.prepare_model(tiny_model("llama"), GPTQ2, lc)  # noqa: E731
    elif driver == "stream":
        tiny_model("llama").save_pretrained(tmp_path / "src")
        run = lambda lc: streaming.prepare_pretrained(tmp_path / "src", tmp_path / "o", GPTQ2, lc)  # noqa: E731
    else:
        src = tiny_model("llama")
        ce.prepare_model(src, ce.QuantConfig(bits=4, group_size=32, method="rtn"), ce.LoRAConfig(rank=4, init="zero"))
        export.export_gptq(src, str(tmp_path / "gptq"), checkpoint_format="gptq_v2")
        run = lambda lc: ce.prepare_from_gptq(tiny_model("llama"), str(tmp_path / "gptq"), lc)  # noqa: E731
    with pytest.raises(ValueError, match="init='cloq' needs calibration data"):
        run(CLOQ)
    if driver == "from_gptq":
        assert run(ce.LoRAConfig(rank=4, init="svd")).cloq_report.layers  # a kept Q needs none for svd
    else:
        with pytest.raises(ValueError, match="method='gptq' with init='svd' needs calibration data"):
            run(ce.LoRAConfig(rank=4, init="svd"))
