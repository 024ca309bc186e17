"""Rank allocation: the greedy budget split, the planner on a tiny model, and per-layer ranks that save and load."""
import pytest
import torch

import cloq_engine as ce
from cloq_engine.init.rank_alloc import allocate_ranks, whitened_spectrum
from cloq_engine.nn import QuantLoRALinear
from tiny_models import tiny_calib, tiny_model


def _best_split_by_brute_force(gains, costs, budget, min_rank):
    names = list(gains)
    best = (-1.0, None)

    def rec(i, left, ranks, value):
        nonlocal best
        if i == len(names):
            if value > best[0]:
                best = (value, dict(ranks))
            return
        n = names[i]
        for r in range(min_rank, len(gains[n]) + 1):
            cost = r * costs[n]
            if cost > left:
                break
            ranks[n] = r
            rec(i + 1, left - cost, ranks, value + float(gains[n][:r].sum()))

    rec(0, budget, {}, 0.0)
    return best


def test_allocate_ranks_matches_brute_force_when_costs_are_equal():
    g = torch.Generator().manual_seed(0)
    gains = {n: torch.rand(6, generator=g, dtype=torch.float64).sort(descending=True).values * s
             for n, s in (("a", 1.0), ("b", 3.0), ("c", 0.3))}
    costs = {"a": 10, "b": 10, "c": 10}
    ranks = allocate_ranks(gains, costs, budget=90, min_rank=1)
    value = sum(float(gains[n][:r].sum()) for n, r in ranks.items())
    assert sum(r * costs[n] for n, r in ranks.items()) <= 90
    assert value == pytest.approx(_best_split_by_brute_force(gains, costs, 90, 1)[0])
    assert ranks["b"] >= ranks["a"] >= ranks["c"] >= 1


def test_allocate_ranks_respects_costs_caps_and_rejects_a_too_small_budget():
    gains = {"wide": torch.tensor([1.0, 0.9, 0.8]), "narrow": torch.tensor([0.5, 0.4, 0.3])}
    costs = {"wide": 100, "narrow": 10}  # per parameter, narrow's ranks pay 5x more
    ranks = allocate_ranks(gains, costs, budget=130, min_rank=0)
    assert ranks == {"narrow": 3, "wide": 1}
    assert allocate_ranks(gains, costs, budget=10**6, min_rank=0, max_rank={"wide": 2, "narrow": 1}) == \
        {"wide": 2, "narrow": 1}
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(gains, costs, budget=50, min_rank=1)


def test_whitened_spectrum_is_the_squared_singular_values_of_R_L():
    g = torch.Generator().manual_seed(1)
    R = torch.randn(20, 30, generator=g, dtype=torch.float64)
    X = torch.randn(100, 30, generator=g, dtype=torch.float64)
    H = X.T @ X
    L = torch.linalg.cholesky(H + 1e-6 * H.diagonal().mean() * torch.eye(30, dtype=H.dtype))
    torch.testing.assert_close(whitened_spectrum(R, H, 5), torch.linalg.svdvals(R @ L)[:5] ** 2)


def test_planned_ranks_keep_the_budget_and_a_model_with_them_saves_and_loads(tmp_path):
    from cloq_engine.rank_plan import plan_ranks

    qc = ce.QuantConfig(bits=2, group_size=32, method="gptq")
    lc = ce.LoRAConfig(rank=4, alpha=8)
    model = tiny_model("llama")
    ranks = plan_ranks(model, qc, lc, tiny_calib(4))
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n in ranks}
    assert sum(r * sum(shapes[n]) for n, r in ranks.items()) <= sum(4 * sum(s) for s in shapes.values())
    assert len(set(ranks.values())) > 1
    ce.prepare_model(model, qc, ce.LoRAConfig(rank=4, alpha=8, rank_pattern=ranks), calib=tiny_calib(4))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoRALinear)}
    assert {n: m.rank for n, m in layers.items()} == ranks
    for r in model.cloq_report.layers:  # each layer's error after init uses its own scaling alpha / r_i
        assert r.err_init <= r.err_quant * (1 + 1e-4), (r.name, ranks[r.name], r.err_quant, r.err_init)
    ce.save_pretrained(model, str(tmp_path / "m"))
    loaded = ce.load_pretrained(str(tmp_path / "m"))
    for n, m in loaded.named_modules():
        if isinstance(m, QuantLoRALinear):
            assert m.rank == ranks[n] and torch.equal(m.lora_A, layers[n].lora_A)
    ce.export_peft_adapter(model, str(tmp_path / "adapter"))
    import json

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == ranks
