"""Real MiniLM layers (weights, activations, H = X^T X) shared by the quantizer tests."""
import functools

import pytest
import torch


def _calibrated_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W - Q)^T||_F^2 = tr((W - Q) H (W - Q)^T), in float64."""
    D = (W - Q).double()
    return float(((D @ H.double()) * D).sum())


@pytest.fixture(scope="session")
def calibrated_error():
    return _calibrated_error


@pytest.fixture(scope="session")
def real_layer(minilm, minilm_inputs):
    """name -> (W float32 (out, in), X float32 (T, in), H float64 (in, in)) of a MiniLM nn.Linear.

    Callers must not modify the returned tensors in place (they are cached)."""
    model, _ = minilm
    modules = dict(model.named_modules())

    @functools.lru_cache(maxsize=None)
    def load(name):
        X = minilm_inputs[name]
        return modules[name].weight.detach().float().clone(), X, X.double().t() @ X.double()

    return load
