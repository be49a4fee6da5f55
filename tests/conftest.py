"""Test-wide settings: no network for model files, deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build every model file locally; a hub call is a bug
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield
