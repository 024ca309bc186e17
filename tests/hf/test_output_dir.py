"""Output directories: a user's files are never replaced, swaps leave no window without a
checkpoint, and what an interrupted save left is recovered on the next run."""
import functools
import os
import stat

import pytest
import torch

import cloq_engine as ce
from cloq_engine.hf import output_dir
from tiny_models import prepared_tiny, tiny_calib


@functools.lru_cache(maxsize=None)
def prepared(seed=1):
    return prepared_tiny("llama", seed=seed)


IDS = tiny_calib(1, seed=3)[0]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def user_dir(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def test_non_empty_directory_that_is_not_a_checkpoint_is_refused_even_with_overwrite(tmp_path):
    target = user_dir(tmp_path / "work")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is not empty and is not a cloq checkpoint"):
            ce.save_pretrained(prepared(), target, overwrite=overwrite)
    assert os.listdir(target) == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["work"]


def test_previous_checkpoint_is_replaced_only_with_overwrite(tmp_path):
    target = tmp_path / "ck"
    ce.save_pretrained(prepared(1), target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds a cloq checkpoint: pass overwrite=True"):
        ce.save_pretrained(prepared(2), target, overwrite=False)
    assert (target / "model.safetensors").read_bytes() == before
    ce.save_pretrained(prepared(2), target, overwrite=True)
    assert torch.equal(logits(ce.load_pretrained(target)), logits(prepared(2)))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "ck").mkdir()
    ce.save_pretrained(prepared(), tmp_path / "ck", overwrite=False)
    assert (tmp_path / "ck" / "model.safetensors").is_file()


@pytest.mark.parametrize("out", [".", "", "..", "sub/.."])
def test_working_directory_is_never_replaced(out, tmp_path, monkeypatch):
    work = user_dir(tmp_path / "work")
    (work / "sub").mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="working directory|empty"):
        ce.save_pretrained(prepared(), out)
    assert sorted(os.listdir(work)) == ["notes.txt", "sub"]


@pytest.mark.parametrize("out", ["src", "src/quantized", ""], ids=["is", "inside", "contains"])
def test_output_that_is_inside_or_contains_the_source_model_is_refused(out, tmp_path):
    src = user_dir(tmp_path / "src")
    model = prepared()
    model.cloq_config["base_model"] = str(src)
    try:
        with pytest.raises(ValueError, match="is, holds or lies inside the input"):
            ce.save_pretrained(model, tmp_path / out)
    finally:
        model.cloq_config.pop("base_model")
    assert os.listdir(src) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["src"]


def test_unwritable_parent_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        output_dir.check_output_dir(tmp_path / "file" / "ck")
    if os.access("/sys", os.W_OK) and not os.path.exists("/sys/class"):
        pytest.skip("no read-only directory to try")
    with pytest.raises(ValueError, match="cannot create anything in '/sys'"):
        output_dir.check_output_dir("/sys/cloq-test/ck")


def test_checkpoint_has_normal_permissions(tmp_path):
    path = ce.save_pretrained(prepared(), tmp_path / "ck")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(os.path.join(path, "model.safetensors")).st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_keeps_a_checkpoint_and_leaves_nothing_behind(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    target = tmp_path / "ck"
    ce.save_pretrained(prepared(1), target)
    seen = []
    real_rmtree = output_dir.shutil.rmtree

    def rmtree(path, **kw):  # when the old copy is removed, the new one is already in place
        seen.append(output_dir.is_cloq_checkpoint(str(target)))
        real_rmtree(path, **kw)

    monkeypatch.setattr(output_dir.shutil, "rmtree", rmtree)
    ce.save_pretrained(prepared(2), target, overwrite=True)
    assert seen == [True] and sorted(os.listdir(tmp_path)) == ["ck"]
    assert torch.equal(logits(ce.load_pretrained(target)), logits(prepared(2)))


def _killed_between_renames(tmp_path):
    """What a kill between the two renames of the fallback swap leaves: the old checkpoint moved
    aside, the new one complete in its staging directory (marked by a writer that is gone)."""
    target = tmp_path / "ck"
    ce.save_pretrained(prepared(1), target)
    os.rename(target, tmp_path / ".ck.old-0123abcd")
    ce.save_pretrained(prepared(2), tmp_path / "new")
    os.rename(tmp_path / "new", tmp_path / ".ck.tmp-4567ef01")
    (tmp_path / ".ck.tmp-4567ef01" / output_dir.MARKER).write_text("999999999")
    return target


def test_load_after_a_kill_mid_swap_restores_the_previous_checkpoint(tmp_path):
    target = _killed_between_renames(tmp_path)
    assert torch.equal(logits(ce.load_pretrained(target)), logits(prepared(1)))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_next_save_after_a_kill_mid_swap_cleans_leftovers(tmp_path):
    target = _killed_between_renames(tmp_path)
    (tmp_path / ".other.tmp-0123abcd").mkdir()  # not ours to judge: another target's name
    with pytest.raises(ValueError, match="pass overwrite=True"):  # the restored checkpoint is protected
        ce.save_pretrained(prepared(2), target, overwrite=False)
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0123abcd", "ck"]
    assert torch.equal(logits(ce.load_pretrained(target)), logits(prepared(1)))


def test_staging_directory_of_a_live_writer_is_kept(tmp_path):
    live = tmp_path / ".ck.tmp-89abcdef"
    live.mkdir()
    (live / output_dir.MARKER).write_text(str(os.getppid()))  # a running process
    ce.save_pretrained(prepared(), tmp_path / "ck")
    assert live.is_dir()


def test_interrupted_save_leaves_the_target_untouched(tmp_path, monkeypatch):
    import safetensors.torch

    target = user_dir(tmp_path / "fresh")
    os.remove(target / "notes.txt")

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ce.save_pretrained(prepared(), target)
    assert sorted(os.listdir(tmp_path)) == ["fresh"] and os.listdir(target) == []


# -- re-saving keeps what the writer did not write; no silent loss on a full disk ------------------
def _checkpoint_with_side_files(tmp_path):
    from transformers import AutoTokenizer

    from cloq_engine import data

    target = tmp_path / "ck"
    ce.save_pretrained(prepared(1), target, tokenizer=AutoTokenizer.from_pretrained(data.minilm_path()))
    (target / "notes.txt").write_text("mine")
    (target / "adapter").mkdir()
    (target / "adapter" / "README.md").write_text("my adapter notes")
    return target


def test_resave_of_a_loaded_checkpoint_needs_overwrite_and_keeps_tokenizer_and_user_files(tmp_path):
    target = _checkpoint_with_side_files(tmp_path)
    (target / "model-00001-of-00002.safetensors").write_bytes(b"old shard")  # superseded weights
    files = sorted(p.name for p in target.rglob("*"))
    model = ce.load_pretrained(target)
    with pytest.raises(ValueError, match="holds a cloq checkpoint: pass overwrite=True"):
        ce.save_pretrained(model, target)
    assert sorted(p.name for p in target.rglob("*")) == files
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.add_(1.0)
    ce.save_pretrained(model, target, overwrite=True)
    kept = sorted(p.name for p in target.rglob("*"))
    assert kept == sorted(set(files) - {"model-00001-of-00002.safetensors"})
    assert "tokenizer_config.json" in kept and (target / "notes.txt").read_text() == "mine"
    assert (target / "adapter" / "README.md").read_text() == "my adapter notes"
    assert torch.equal(logits(ce.load_pretrained(target)), logits(model))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_full_disk_is_refused_before_writing_with_one_line_naming_path_and_bytes(tmp_path, monkeypatch):
    import collections

    target = _checkpoint_with_side_files(tmp_path)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output_dir.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(output_dir.NoSpaceError) as e:
        ce.save_pretrained(prepared(2), target, overwrite=True)
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "needs" in msg and "4096 bytes" in msg
    assert isinstance(e.value, OSError)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_running_out_of_space_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    target = _checkpoint_with_side_files(tmp_path)
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(output_dir.NoSpaceError, match="no space left on device while writing .*nothing was replaced"):
        ce.save_pretrained(prepared(2), target, overwrite=True)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_adapter_export_refuses_a_previous_adapter_unless_told_and_keeps_other_files(tmp_path):
    target = tmp_path / "adapter"
    ce.export_peft_adapter(prepared(1), target)
    (target / "README.md").write_text("notes")
    with pytest.raises(ValueError, match="holds a cloq PEFT adapter: pass overwrite=True"):
        ce.export_peft_adapter(prepared(2), target)
    ce.export_peft_adapter(prepared(2), target, overwrite=True)
    assert (target / "README.md").read_text() == "notes" and (target / "adapter_model.safetensors").is_file()
