"""Test-wide settings: no network for model files, deterministic CPU math."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests build every model file locally; a hub call is a bug
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["DRTUNE_AUTO_BATCH_MEMO"] = ""  # train.batch_size=auto remembers nothing unless a test asks it to

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One intra-op thread: bitwise-stable reductions, and faster than two for tiny models on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
