"""LoRAConfig(balance=True): the same s·B·A, split with equal singular values in weight space."""
import torch

import cloq_engine as ce
from cloq_engine.layer_factory import balance_factors


def _layer(init, balance, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * 0.1)
    X = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = ce.GramAccumulator(64).add(X).H
    qc = ce.QuantConfig(bits=2, group_size=32, method="gptq")
    return ce.QuantLoRALinear.from_linear(lin, qc, ce.LoRAConfig(rank=8, alpha=16, init=init, balance=balance), H=H)


def test_balanced_cloq_has_the_same_product_and_equal_factor_spectra():
    plain, bal = _layer("cloq", False), _layer("cloq", True)
    assert torch.equal(plain.qweight, bal.qweight)
    torch.testing.assert_close(bal.delta_weight(), plain.delta_weight(), rtol=1e-4, atol=1e-6)
    sa = torch.linalg.svdvals(bal.lora_A.detach().double())
    sb = torch.linalg.svdvals(bal.lora_B.detach().double())
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-9)
    # CLoQ's own split is balanced in the whitened space, not in weight space
    assert not torch.allclose(torch.linalg.svdvals(plain.lora_A.detach().double()),
                              torch.linalg.svdvals(plain.lora_B.detach().double()), rtol=1e-2)


def test_balance_leaves_a_zero_init_alone():
    A, B = torch.randn(4, 16), torch.zeros(8, 4)
    A2, B2 = balance_factors(A, B, ce.LoRAConfig(rank=4, balance=True), 4)
    assert A2 is A and B2 is B


def test_balance_is_saved_with_the_config():
    lc = ce.LoRAConfig(rank=4, balance=True)
    assert ce.LoRAConfig.from_dict(lc.to_dict()).balance is True
    assert ce.LoRAConfig.from_dict({"rank": 4}).balance is False  # checkpoints from before the field


def test_calibrated_inits_are_balanced_by_default_and_others_are_not():
    assert ce.LoRAConfig(init="cloq").balances() and ce.LoRAConfig(init="quailora").balances()
    assert not ce.LoRAConfig(init="loftq").balances() and not ce.LoRAConfig(init="svd").balances()
    assert not ce.LoRAConfig(init="cloq", balance=False).balances()
    assert ce.LoRAConfig(init="loftq", balance=True).balances()
    assert ce.LoRAConfig.from_dict(ce.LoRAConfig().to_dict()).balance is None
    default, published = _layer("cloq", None), _layer("cloq", False)
    balanced = _layer("cloq", True)
    torch.testing.assert_close(default.lora_A, balanced.lora_A)
    assert not torch.allclose(default.lora_A, published.lora_A)


def test_the_cloq_study_variant_is_the_published_split():
    from cloq_engine.research.variants import resolve_variant

    qc = ce.QuantConfig(bits=2, group_size=32, method="rtn")
    assert resolve_variant("cloq", ce.LoRAConfig(), qc)[1].balances() is False
    assert resolve_variant("cloq+balanced", ce.LoRAConfig(), qc)[1].balances() is True
    assert resolve_variant("quailora", ce.LoRAConfig(), qc)[1].balances() is True
