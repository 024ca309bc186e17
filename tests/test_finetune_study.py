"""The fine-tuning study's pieces (tasks, training loop, variants) and ``cloq bench finetune``
end to end at tiny settings. Mechanics only: no quality outcome is asserted."""
import json

import pytest
import torch

from benchmarks import finetune as bench_finetune
from cloq_engine import data
from cloq_engine.eval import classification_scores
from cloq_engine.research.tasks import Split, Task, TaskSettings, make_task
from cloq_engine.research.training import TrainSettings, _schedule, train_lora

TINY = TaskSettings(max_len=24, eval_samples=12, curve_samples=4, lm_seq_len=16, lm_blocks=20, eval_batch=8)


def _tiny_dir(path, arch: str) -> str:
    """A saved tiny random model with MiniLM's tokenizer: BERT (encoder tasks) or Llama (lm)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig, LlamaConfig

    tok = AutoTokenizer.from_pretrained(data.minilm_path())
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if arch == "bert":
        cfg = BertConfig(**common)
        cfg.architectures = ["BertModel"]
        model = AutoModel.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(num_key_value_heads=2, **common))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _tiny_dir(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny_dir(tmp_path_factory.mktemp("llama"), "llama")


def test_topic_split_keeps_topics_with_enough_paragraphs_in_both_halves():
    ts = data.topic_split(min_per_half=10)
    assert len(ts.train_texts) == len(ts.train_labels) and len(ts.heldout_texts) == len(ts.heldout_labels)
    for labels in (ts.train_labels, ts.heldout_labels):
        counts = torch.bincount(torch.tensor(labels), minlength=len(ts.names))
        assert int(counts.min()) >= 10
    assert not set(ts.train_texts) & set(ts.heldout_texts)
    assert set(ts.train_texts) <= set(data.calibration_paragraphs())  # the training half is the calibration half
    assert len(data.topic_split(min_per_half=20).names) < len(ts.names)


def test_heldout_half_holds_no_copy_of_calibration_text():
    # pydoc's topics repeat passages; a copy in both halves would score seen text as held-out
    held, calib = data.heldout_paragraphs(), set(data.calibration_paragraphs())
    assert held and not calib & set(held)


def test_classification_scores_by_hand():
    pred, labels = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])
    s = classification_scores(pred, labels, num_classes=4)
    assert s["accuracy"] == pytest.approx(0.5)
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp0 fn2 -> 0.5; class 2: tp0 fp1 -> 0; class 3 absent: left out
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)


def test_schedule_warms_up_then_decays_to_zero():
    f = _schedule(10, 0.2)
    assert [round(f(s), 3) for s in (0, 1, 2, 9, 10)] == [0.5, 1.0, 1.0, 0.125, 0.0]


@pytest.mark.slow
def test_tasks_split_disjointly_and_order_batches_by_seed(tiny_bert):
    base, tok = data.load_model(tiny_bert)
    halves = {"recovery": len(data.calibration_paragraphs()), "topics": len(data.topic_split().train_texts)}
    for name, n in halves.items():
        task = make_task(name, base, tok, TINY)
        # every fifth example of the training half is validation, the rest trains; held-out is the other half
        assert len(task.val) == n // 5 and len(task.train) + len(task.val) == n
        assert len(task.heldout) == 12 and len(task.curve) == 4
        a = task.batch_order(task.train, 30, 8, seed=3)
        assert a == task.batch_order(task.train, 30, 8, seed=3) != task.batch_order(task.train, 30, 8, seed=4)
        epoch = [i for b in a[: len(task.train) // 8] for i in b]
        assert len(epoch) == len(set(epoch))  # one epoch sees each example at most once
    with pytest.raises(ValueError, match="does not apply to an encoder"):
        make_task("lm", base, tok, TINY)


@pytest.mark.slow
def test_train_lora_moves_only_the_lora_factors_and_the_head(tiny_bert):
    import copy

    import cloq_engine as ce

    base, tok = data.load_model(tiny_bert)
    task = make_task("topics", base, tok, TINY)
    model = ce.prepare_model(copy.deepcopy(base), ce.QuantConfig(bits=4, group_size=32, method="rtn"),
                             ce.LoRAConfig(rank=4, init="zero"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = task.make_head(64, seed=0)
    head0 = head.weight.detach().clone()
    res = train_lora(model, task, TrainSettings(steps=3, batch_size=4, lr=1e-2, curve_points=3), head=head)
    assert len(res["losses"]) == 3 and not res["diverged"] and [p[0] for p in res["curve"]] == [1, 2, 3]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed) and not torch.equal(head.weight, head0)


def test_train_lora_flags_a_diverged_run():
    class Boom(Task):
        name = "boom"

        def __init__(self):
            self.train, self.pad_id = Split([torch.tensor([1, 2, 3])] * 4), 0

        def loss(self, model, head, batch):
            return model.weight.sum() * float("nan")

    lin = torch.nn.Linear(2, 2)
    res = train_lora(lin, Boom(), TrainSettings(steps=5, batch_size=2))
    assert res["diverged"] and len(res["losses"]) == 1


def _run(tmp_path, model_dir, extra=()):
    argv = ["--model", model_dir, "--bits", "2", "--inits", "zero", "cloq", "--seeds", "2", "--steps", "2",
            "--batch-size", "4", "--lr-grid", "1e-3", "3e-3", "--samples", "4", "--seq-len", "16",
            "--max-len", "24", "--eval-samples", "12", "--curve-samples", "4", "--workers", "1", "--no-progress",
            "--out", str(tmp_path / "study"), *extra]
    return bench_finetune.main(argv)


@pytest.mark.slow
def test_bench_finetune_encoder_end_to_end_and_resume(tmp_path, tiny_bert, capsys):
    assert _run(tmp_path, tiny_bert) == 0
    out = capsys.readouterr().out
    assert "## recovery" in out and "## topics" in out and "chosen learning rates" in out
    res = json.loads((tmp_path / "study" / "results.json").read_text())
    assert set(res["chosen_lr"]) == {"recovery", "topics"}
    assert all(lr in (1e-3, 3e-3) for r in res["chosen_lr"].values() for lr in r.values())
    rows = {(r["bits"], r["init"]) for r in res["summary"]["recovery"]}
    assert rows == {(2, "zero"), (2, "cloq"), (3, "zero"), (None, "full-precision")}  # + both references
    runs = [r for r in res["runs"] if r["id"].startswith("run/")]
    assert len(runs) == 2 * 4 * 2  # 2 tasks x (2 inits + 3-bit zero + full precision) x 2 seeds
    assert all(len(r["losses"]) == 2 and r["curve"] for r in runs)
    search = [r for r in res["runs"] if r["id"].startswith("search/")]
    assert {r["job"]["split"] for r in search} == {"val"} and len(search) == 2 * 3 * 2
    assert (tmp_path / "study" / "finetune.png").stat().st_size > 0
    # a zero init draws its A from the seed; the same seed gives the same run
    z = {r["job"]["seed"]: r["losses"] for r in runs if r["job"]["variant"] == "zero" and r["job"]["task"] == "recovery"
         and r["job"]["bits"] == 2}
    assert z[0] != z[1]
    lines = (tmp_path / "study" / "runs.jsonl").read_text().count("\n")
    assert _run(tmp_path, tiny_bert) == 0  # resumes: nothing runs again
    assert (tmp_path / "study" / "runs.jsonl").read_text().count("\n") == lines
    with pytest.raises(SystemExit, match="other settings"):
        _run(tmp_path, tiny_bert, ["--rank", "4"])


@pytest.mark.slow
def test_bench_finetune_causal_lm_scores_perplexity(tmp_path, tiny_llama, capsys):
    assert _run(tmp_path, tiny_llama, ["--no-reference", "--lr", "1e-3"]) == 0
    res = json.loads((tmp_path / "study" / "results.json").read_text())
    assert list(res["summary"]) == ["lm"]
    rows = res["summary"]["lm"]
    assert [(r["bits"], r["init"]) for r in rows] == [(2, "zero"), (2, "cloq")]
    assert all(r["perplexity"][0] > 1 for r in rows)
    # the lm task scores a second domain (standard-library code) and the topic multiple choice on held-out
    assert all(r["code_perplexity"][0] > 1 and 0 <= r["topic_accuracy"][0] <= 1 for r in rows)
    assert "## lm" in capsys.readouterr().out


def test_bench_finetune_at_init_prepares_and_scores_only(tmp_path, tiny_llama, capsys):
    assert _run(tmp_path, tiny_llama, ["--no-reference", "--at-init"]) == 0
    res = json.loads((tmp_path / "study" / "at_init.json").read_text())
    assert res["commit"]  # which code produced the table
    assert [(r["bits"], r["init"]) for r in res["rows"]] == [(2, "zero"), (2, "cloq")]
    assert all(r["lm:perplexity"] > 1 and r["lm:code_perplexity"] > 1 for r in res["rows"])
    runs = (tmp_path / "study" / "runs.jsonl").read_text().splitlines()
    assert all(json.loads(line)["id"].startswith("prepare/") for line in runs)
    assert "## at init" in capsys.readouterr().out


def test_topic_choices_hold_the_answer_among_four_distinct_titles():
    from cloq_engine.research.tasks import MC_CHOICES, CausalLMTask

    tok = __import__("transformers").AutoTokenizer.from_pretrained(data.minilm_path())
    task = CausalLMTask.__new__(CausalLMTask)
    task.tokenizer = tok
    items = task._choices()
    assert len(items) == CausalLMTask.mc_items
    assert all(len(opts) == MC_CHOICES and len({tuple(o) for o in opts}) == MC_CHOICES and 0 <= ans < MC_CHOICES
               for _, opts, ans in items)
    assert len({ans for _, _, ans in items}) == MC_CHOICES  # the right answer is not always in one place


def test_quick_mode_settings_and_an_explicit_option_wins():
    bench = bench_finetune
    a = bench.parse_args(["--quick"])
    assert (a.bits, a.inits, a.seeds, a.steps) == ([2], ["zero", "cloq"], 2, 8)
    assert bench.parse_args(["--quick", "--steps", "5"]).steps == 5
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0"])
