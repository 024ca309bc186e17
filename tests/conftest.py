"""Test set-up. TRITON_INTERPRET must be set before any Triton kernel module is imported, so that
kernel tests run on CPU tensors; ``pytest -m gpu`` leaves it unset so the GPU tests compile the
kernels for the real device (pytest_configure runs before collection imports any kernel)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    markexpr = config.getoption("markexpr", "") or ""
    if not ("gpu" in markexpr and "not gpu" not in markexpr):
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer) of the embedded real MiniLM, loaded once."""
    from cloq_engine import data

    return data.load_model()


@pytest.fixture(scope="session")
def minilm_inputs(minilm):
    """Real activations X (T, in) of every MiniLM nn.Linear on the embedded calibration text."""
    from cloq_engine import data

    model, tok = minilm
    torch.manual_seed(0)
    blocks = data.token_blocks(data.calibration_paragraphs(), tok, seq_len=128, num_samples=16)
    return data.capture_linear_inputs(model, blocks, max_tokens=2048)
