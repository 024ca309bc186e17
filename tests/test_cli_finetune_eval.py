"""`cloq finetune` scores on --data's held-out half with --eval-samples blocks, `cloq eval` names a
fine-tuned checkpoint as such, and the GPTQ export says rightly which zero points v1 cannot store."""
import json
import logging

import pytest

from cloq_engine import commands, data
from cloq_engine.cli import main

PARAS = [f"Paragraph {i} of the user's own text, about gardens, rivers and the weather in spring. " * 4
         for i in range(12)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_models import tiny_llama_dir

    d = tmp_path_factory.mktemp("ft")
    src = tiny_llama_dir(d / "src")
    assert main(["prepare", "--model", src, "--out", str(d / "ck"), "--bits", "4", "--group-size", "32",
                 "--quantizer", "rtn", "--init", "zero", "--seq-len", "32", "--no-progress"]) == 0
    return d / "ck"


def test_finetune_trains_on_datas_even_paragraphs_and_scores_its_odd_ones(checkpoint, tmp_path, monkeypatch):
    """Before: --eval-samples did not exist, and the score was on 128 blocks of the embedded text
    whatever --data was."""
    import cloq_engine.finetune as ft

    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(PARAS) + "\n")
    seen = {}
    real_eval, real_ft = commands.Evaluator.__init__, ft.finetune

    def evaluator(self, base, tok, paragraphs, samples, *a, **kw):
        seen["scored"], seen["samples"] = list(paragraphs), samples
        real_eval(self, base, tok, paragraphs, samples, *a, **kw)

    def finetune(model, teacher, tok, paragraphs, **kw):
        seen["trained"] = list(paragraphs)
        return real_ft(model, teacher, tok, paragraphs, **kw)

    monkeypatch.setattr(commands.Evaluator, "__init__", evaluator)
    monkeypatch.setattr(ft, "finetune", finetune)
    out = tmp_path / "tuned"
    assert main(["finetune", str(checkpoint), "--data", str(text), "--eval-samples", "2", "--steps", "1",
                 "--batch-size", "1", "--seq-len", "32", "--out", str(out)]) == 0
    clean = data.read_text_file(str(text))
    assert seen == {"scored": clean[1::2], "samples": 2, "trained": clean[0::2]}


def test_finetune_refuses_data_with_nothing_to_hold_out_before_any_work(checkpoint, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text(PARAS[0] + "\n")
    assert main(["finetune", str(checkpoint), "--data", str(one), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"--data {one}: its 1 paragraph(s) leave none to hold out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_eval_names_a_fine_tuned_checkpoint_as_such(checkpoint, tmp_path, capsys):
    """Before: a fine-tuned checkpoint read "4-bit rtn, init=zero", as its init alone."""
    out = tmp_path / "tuned"
    assert main(["finetune", str(checkpoint), "--steps", "2", "--batch-size", "1", "--seq-len", "32",
                 "--eval-samples", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--samples", "1", "--json"]) == 0
    stdout = capsys.readouterr().out
    assert "4-bit rtn, init=zero, fine-tuned 2 steps" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["model"] == "4-bit rtn, init=zero, fine-tuned 2 steps"
    again = tmp_path / "again"  # a second run adds its steps
    assert main(["finetune", str(out), "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--eval-samples", "1",
                 "--out", str(again)]) == 0
    capsys.readouterr()
    assert main(["eval", str(again), "--samples", "1"]) == 0
    assert "fine-tuned 3 steps" in capsys.readouterr().out
    assert main(["eval", str(checkpoint), "--samples", "1"]) == 0
    assert "fine-tuned" not in capsys.readouterr().out


def test_gptq_export_warning_names_the_zero_points_v1_cannot_store(tmp_path, caplog):
    """Before: it spoke of zero points of "0 or 2^bits+1" (ours lie in [0, 2^bits - 1]; v1 stores
    zero - 1, so only a zero of 0, or a fractional one, misfits)."""
    import cloq_engine as ce
    from cloq_engine import export, gptq_format
    from tiny_models import prepared_tiny

    model = prepared_tiny("llama", quant=ce.QuantConfig(bits=2, group_size=32, method="rtn"))
    layer = model.model.layers[1].mlp.up_proj
    layer.zeros[0, 0] = 0  # an asymmetric group whose minimum is its code 0
    assert gptq_format.fits_v1(model.model.layers[0].mlp.up_proj.quantized_weight)
    with caplog.at_level(logging.WARNING, logger="cloq_engine"):
        assert export.resolve_checkpoint_format(model) == "gptq_v2"
    msg = caplog.records[-1].getMessage()
    assert "2^bits+1" not in msg and "a zero point of 0 (or a fractional one)" in msg and "[1, 4]" in msg
    assert msg.startswith("1 layer(s) (first: model.layers.1.mlp.up_proj)")
