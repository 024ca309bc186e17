"""Training prepared models: HF Trainer, gradient checkpointing, two-process DDP on CPU (gloo)."""
import copy
import os

import pytest
import torch

import cloq_engine as ce
from cloq_engine.nn import QuantLoRALinear
from tiny_models import prepared_tiny, tiny_calib, tiny_model


def prepared(arch="llama", seed=1):
    return prepared_tiny(arch, seed=seed)


def examples(num=8, seq_len=16):
    return [{"input_ids": ids[0], "labels": ids[0]} for ids in tiny_calib(num, seq_len=seq_len, seed=5)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def split_changes(model, before):
    """(names of LoRA tensors that changed, names of other tensors that changed)."""
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    return [k for k in changed if ".lora_" in k], [k for k in changed if ".lora_" not in k]


def lora_names(model):
    return [k for k in model.state_dict() if ".lora_" in k]


@pytest.mark.parametrize("source, checkpointing", [("prepare_model", False), ("from_pretrained", False),
                                                   ("prepare_model", True)])
def test_trainer_updates_only_lora_factors(source, checkpointing, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = prepared("llama")
    if source == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(ce.save_pretrained(model, tmp_path / "ck"))
    before = snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=checkpointing)
    trainer = Trainer(model=model, args=args, train_dataset=examples())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    lora_changed, other_changed = split_changes(model, before)
    assert sorted(lora_changed) == sorted(lora_names(model))
    assert other_changed == []  # packed buffers, embeddings, norms, biases untouched


def enable_checkpointing(model, use_reentrant):
    """transformers >= 5.x names it activation checkpointing; older versions gradient checkpointing."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(use_reentrant):
    ids = torch.cat(tiny_calib(2, seed=7))
    ref = prepared("llama").train()
    ckpt = copy.deepcopy(ref)
    enable_checkpointing(ckpt, use_reentrant)
    calls = {}
    for tag, m in (("ref", ref), ("ckpt", ckpt)):
        layer = m.get_submodule(m.cloq_config["targets"][0])
        layer.register_forward_hook(lambda *_, tag=tag: calls.__setitem__(tag, calls.get(tag, 0) + 1))
        m(input_ids=ids, labels=ids).loss.backward()
    assert calls == {"ref": 1, "ckpt": 2}  # the checkpointed block ran again in backward
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)


def _ddp_worker(rank, world_size, init_file, out_dir, steps):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = prepared("llama").train()  # same seed on every rank: same start
        ddp = DDP(model)
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        data = tiny_calib(steps * world_size, seq_len=16, seed=11)
        for step in range(steps):
            ids = data[step * world_size + rank]  # each rank sees different data
            loss = ddp(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_end_with_identical_lora_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), 2), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    start = prepared("llama").state_dict()
    names = [k for k in r0 if ".lora_" in k]
    assert names and all(torch.equal(r0[k], r1[k]) for k in names)
    assert all(not torch.equal(r0[k], start[k]) for k in names)
    assert all(torch.equal(r0[k], start[k]) for k in r0 if ".lora_" not in k)
