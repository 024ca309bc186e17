"""Real MiniLM layers (weights, activations, H = X^T X) shared by the quantizer tests."""
import pytest
import torch

QUERY = "encoder.layer.1.attention.self.query"  # 384 -> 384
INTERMEDIATE = "encoder.layer.4.intermediate.dense"  # 384 -> 1536
REAL_LAYERS = (QUERY, INTERMEDIATE)


def _calibrated_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W - Q)^T||_F^2 = tr((W - Q) H (W - Q)^T), in float64."""
    D = (W - Q).double()
    return float(((D @ H.double()) * D).sum())


@pytest.fixture(scope="session")
def calibrated_error():
    return _calibrated_error


@pytest.fixture(scope="session")
def real_layers(minilm, minilm_inputs):
    """name -> (W float32 (out, in), X float32 (T, in), H float64 (in, in)) for REAL_LAYERS."""
    model, _ = minilm
    modules = dict(model.named_modules())
    layers = {}
    for name in REAL_LAYERS:
        X = minilm_inputs[name]
        layers[name] = (modules[name].weight.detach().float().clone(), X, X.double().t() @ X.double())
    return layers
