"""Training prepared models: HF Trainer, TRL SFTTrainer and accelerate in bf16 mixed precision,
gradient checkpointing, two-process DDP on CPU (gloo)."""
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
@pytest.mark.slow
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


def record_output_dtypes(model):
    """The output dtypes every QuantLoRALinear produced, recorded by forward hooks."""
    seen = set()
    for m in model.modules():
        if isinstance(m, QuantLoRALinear):
            m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    return seen


def prepared_with_tokenizer(path):
    """A prepared tiny Llama (random LoRA B) whose vocabulary is MiniLM's tokenizer, and that tokenizer
    (given an EOS token: BERT's has none, and SFTTrainer appends one to every text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_models import tiny_llama_dir

    directory = tiny_llama_dir(path)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.eos_token = tok.sep_token
    model = AutoModelForCausalLM.from_pretrained(directory)
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="rtn"),
                     ce.LoRAConfig(rank=4, alpha=8, init="zero"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLoRALinear):
                m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))
    return model, tok


def test_trainer_bf16_trains_lora_only_in_mixed_precision(tmp_path):
    """The README's recipe on CPU: TrainingArguments(bf16=True) runs the forward under CPU autocast."""
    from transformers import Trainer, TrainingArguments

    model = prepared("llama")
    dtypes = record_output_dtypes(model)
    before = snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), bf16=True, use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples())
    trainer.train()
    assert dtypes == {torch.bfloat16}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    lora_changed, other_changed = split_changes(model, before)
    assert sorted(lora_changed) == sorted(lora_names(model)) and other_changed == []
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)


@pytest.mark.slow
def test_trl_sft_trainer_with_its_defaults_trains_in_bf16(tmp_path):
    """TRL's SFTTrainer on a text dataset with SFTConfig's defaults (bf16=True among them) on CPU."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = prepared_with_tokenizer(tmp_path / "base")
    dtypes = record_output_dtypes(model)
    before = snapshot(model)
    texts = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=2, per_device_train_batch_size=2,
                     logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
    assert args.bf16  # the default under test
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok)
    trainer.train()
    assert dtypes == {torch.bfloat16}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    lora_changed, other_changed = split_changes(model, before)
    assert sorted(lora_changed) == sorted(lora_names(model)) and other_changed == []


def test_accelerator_bf16_loss_and_gradients_follow_float32():
    """Accelerator(mixed_precision="bf16") wraps the forward in CPU autocast; its loss and LoRA
    gradients stay within bf16 rounding of the float32 ones on the same model and batch."""
    from accelerate import Accelerator

    ids = torch.cat(tiny_calib(2, seed=3))
    ref = prepared("llama").train()
    ref(input_ids=ids, labels=ids).loss.backward()
    model = copy.deepcopy(ref)
    model.zero_grad()
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    wrapped, opt = accelerator.prepare(model, opt)
    dtypes = record_output_dtypes(model)
    loss = wrapped(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    assert dtypes == {torch.bfloat16}
    loss_ref = ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss.float(), loss_ref, rtol=1e-2, atol=0)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            g = dict(model.named_parameters())[n].grad
            assert g.dtype == torch.float32, n
            err = (g - p.grad).norm() / p.grad.norm()
            assert err < 0.05, f"{n}: relative gradient error {err:.3g} under bf16"
    opt.step()


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


STEPS, WORLD = 3, 2


def _batches():
    return [torch.cat(tiny_calib(WORLD, seq_len=16, seed=11 + step)) for step in range(STEPS)]


def _train(model, opt, batches, rank=None):
    """Losses of the whole batch per step; with ``rank`` this process takes its row of each batch."""
    import torch.distributed as dist

    losses = []
    for ids in batches:
        if rank is not None:
            ids = ids[rank : rank + 1]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = loss.detach().clone()
        if rank is not None:  # equal token counts: the mean of the ranks' losses is the batch loss
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses


def _dist_worker(rank, engine, init_file, out_dir):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = prepared("llama").train()  # same seed on every rank: same start
        if engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        losses = _train(wrapped, opt, _batches(), rank)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        sharded = all(isinstance(p, DTensor) and p.placements[0].is_shard() for p in lora)
        state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
        torch.save({"losses": losses, "state": state, "lora_sharded": sharded},
                   os.path.join(out_dir, f"{engine}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bits(t):
    """The raw bits of a tensor, so that NaN payloads and -0.0 compare too."""
    return t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.slow
def test_two_processes_match_one_and_keep_packed_buffers_bit_exact(engine, tmp_path):
    """2 gloo processes, each on half of every batch, train like one process on the whole batch;
    the packed buffers come out bit-identical (never cast, never NaN-canonicalized)."""
    import torch.multiprocessing as mp

    start = prepared("llama")
    packed = [k for k in start.state_dict() if k.rsplit(".", 1)[-1] in ("qweight", "scales", "zeros")]
    start_state = {k: v.clone() for k, v in start.state_dict().items()}
    # packed words that read as NaN floats: a float cast or NaN canonicalization would change them
    assert any(start_state[k].view(torch.float32).isnan().any() for k in packed if k.endswith("qweight"))
    ref = copy.deepcopy(start).train()
    ref_losses = _train(ref, torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2), _batches())

    mp.spawn(_dist_worker, args=(engine, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"{engine}{r}.pt") for r in range(WORLD)]
    for out in outs:
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        for k in packed:
            assert torch.equal(_bits(out["state"][k]), _bits(start_state[k])), k
        for k, v in ref.state_dict().items():
            if ".lora_" in k:
                torch.testing.assert_close(out["state"][k], v, rtol=1e-4, atol=1e-5)
    if engine == "fsdp2":
        assert all(out["lora_sharded"] for out in outs)


# ---------------------------------------------------------------------------------------------
# LoRA factors stay float32 under every load dtype (issue 23), as PEFT keeps its adapters
# ---------------------------------------------------------------------------------------------
def _bf16_sources(kind, tmp_path):
    """A model whose dense weights are bf16/fp16, by each path a user takes to one."""
    from transformers import AutoModelForCausalLM

    model, tok = prepared_with_tokenizer(tmp_path / "base")
    if kind == "prepare_model(bf16 model)":
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
        ce.prepare_model(dense, ce.QuantConfig(bits=4, group_size=32, method="rtn"),
                         ce.LoRAConfig(rank=4, alpha=8, init="svd"))
        return dense, tok, torch.bfloat16
    path = ce.save_pretrained(model, tmp_path / "ck")
    dtype = torch.float16 if "float16" in kind and "bfloat16" not in kind else torch.bfloat16
    if kind.startswith("load_pretrained"):
        return ce.load_pretrained(path, dtype=dtype), tok, dtype
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tok, dtype


@pytest.mark.parametrize("kind", ["from_pretrained(dtype=bfloat16)", "from_pretrained(dtype=float16)",
                                  "load_pretrained(dtype=bfloat16)", "prepare_model(bf16 model)"])
def test_half_precision_models_keep_fp32_lora_factors_and_sft_updates_all_of_them(kind, tmp_path):
    """2 SFTTrainer steps (bf16=True, lr 2e-5) from a bf16 load left 19,144 of 32,768 bf16 LoRA
    elements unchanged: lr-sized steps round away on bf16 factors of size ~0.1."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok, dtype = _bf16_sources(kind, tmp_path)
    layer = next(m for m in model.modules() if isinstance(m, QuantLoRALinear))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == dtype and layer.weight.dtype == dtype
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    texts = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=2, per_device_train_batch_size=2,
                     learning_rate=2e-5, bf16=True, logging_steps=1, report_to=[], save_strategy="no",
                     disable_tqdm=True)
    SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tok).train()
    params = dict(model.named_parameters())
    unchanged = sum(int((params[n].detach() == t).sum()) for n, t in lora.items())
    assert unchanged == 0, f"{unchanged} of {sum(t.numel() for t in lora.values())} LoRA elements unchanged"


@pytest.mark.parametrize("lora_dtype, expected", [("base", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                                  (torch.float16, torch.float16)])
def test_low_precision_factors_when_asked_are_recorded_and_kept_on_load(lora_dtype, expected, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama").to(torch.bfloat16)
    ce.prepare_model(model, ce.QuantConfig(bits=4, group_size=32, method="rtn"),
                     ce.LoRAConfig(rank=4, init="zero", lora_dtype=lora_dtype))
    target = model.cloq_config["targets"][0]
    assert model.get_submodule(target).lora_A.dtype == expected
    path = ce.save_pretrained(model, tmp_path / "ck")
    for loaded in (ce.load_pretrained(path), AutoModelForCausalLM.from_pretrained(path)):
        assert loaded.get_submodule(target).lora_B.dtype == expected
