"""Checkpoints never run code, broken files fail with errors naming them, and missing files say how to provide them."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rewards import CheckpointMismatchError, CorruptCheckpointError, MissingFileError, UnsafeCheckpointError
from rewards.checkpoint import load_state_dict_strict, read_checkpoint
from rewards.hub import resolve_file


class Payload:
    """Unpickling this object creates the marker file: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def state_dict() -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(4, 3), "bias": torch.randn(4)}


# -- code execution ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state_dict(), "extra": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*evil.pt.*never run code"):
        read_checkpoint(path, reward="hpsv2")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the oracle: an unsafe load really runs the payload
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_raw_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"w": Payload(marker)}))
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        read_checkpoint(path, reward="aesthetic")
    assert not marker.exists()


# -- broken files -----------------------------------------------------------------------------------------
def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "ImageReward.pt"
    torch.save(state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    expected = r"could not read checkpoint .*ImageReward\.pt \(300 bytes\).*again"
    with pytest.raises(CorruptCheckpointError, match=expected):
        read_checkpoint(path, reward="imagereward")


def test_empty_checkpoint(tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    path.touch()
    with pytest.raises(CorruptCheckpointError, match=r"HPS_v2\.1_compressed\.pt is empty"):
        read_checkpoint(path, reward="hpsv2.1")


def test_not_a_checkpoint(tmp_path):
    """CORE BUG (rewards/checkpoint.py, read_checkpoint): every weights_only UnpicklingError whose text contains
    'weights_only' is reported as UnsafeCheckpointError, so a garbage file ('Unsupported operand 60') is called
    unsafe. Only 'Unsupported global' means unsafe; anything else is corrupt."""
    path = tmp_path / "model.pt"
    path.write_text("<html>404 Not Found</html>")  # what a failed download often leaves behind
    with pytest.raises(CorruptCheckpointError, match="model.pt"):
        read_checkpoint(path, reward="clip")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_file(state_dict(), str(path))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2] if damage == "truncate" else b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        read_checkpoint(path, reward="pickscore")


def test_checkpoint_holding_a_bare_tensor(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CorruptCheckpointError, match="holds a Tensor, expected a dict"):
        read_checkpoint(path, reward="aesthetic")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_good_checkpoints_round_trip(tmp_path, suffix):
    sd = state_dict()
    path = tmp_path / f"model{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    loaded = read_checkpoint(path, reward="x")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


# -- strict loading ---------------------------------------------------------------------------------------
def test_strict_loading_names_missing_unexpected_and_misshaped_keys():
    module = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = module.state_dict()
    sd.pop("1.bias")
    sd["2.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(module, sd, reward="aesthetic", source="head.pth")
    message = str(info.value)
    assert "aesthetic: head.pth does not fit" in message
    assert "1 missing keys (1.bias)" in message
    assert "1 unexpected keys (2.weight)" in message
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in message
    assert torch.count_nonzero(module[0].weight == 0) == 0  # nothing was loaded


def test_strict_loading_shortens_long_key_lists_and_loads_good_ones():
    module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(CheckpointMismatchError, match=r"20 missing keys \(0\.bias, .*\.\.\. and 12 more\)"):
        load_state_dict_strict(module, {}, reward="x", source="y")
    good = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    load_state_dict_strict(module, good, reward="x", source="y")
    assert all(torch.all(p == 0.5) for p in module.parameters())


# -- resolving files --------------------------------------------------------------------------------------
def test_local_file_and_folder_are_resolved(tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    path.touch()
    kwargs = dict(reward="hpsv2.1", role="checkpoint", repo_id="xswu/HPSv2", filename="HPS_v2.1_compressed.pt")
    assert resolve_file(path, **kwargs) == path
    assert resolve_file(str(tmp_path), **kwargs) == path


def test_missing_local_file_says_where_and_how(tmp_path):
    repo, name = "yuvalkirstain/PickScore_v1", "model.safetensors"
    kwargs = dict(reward="pickscore", role="checkpoint", repo_id=repo, filename=name)
    with pytest.raises(MissingFileError) as info:
        resolve_file(tmp_path / "nope.safetensors", **kwargs)
    assert str(tmp_path / "nope.safetensors") in str(info.value)
    assert "checkpoint='/path/to/model.safetensors'" in str(info.value)
    with pytest.raises(MissingFileError, match=str(tmp_path / "model.safetensors")):
        resolve_file(tmp_path, **kwargs)  # a folder without the file: the path looked at is the file in it
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin error
        resolve_file(tmp_path / "nope", **kwargs)


def test_hub_miss_offline_with_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(MissingFileError) as info:
        resolve_file(None, reward="hpsv2.1", role="checkpoint", repo_id="xswu/HPSv2", filename="HPS_v2.1_compressed.pt")
    message = str(info.value)
    for expected in (
        "'HPS_v2.1_compressed.pt'",
        "'xswu/HPSv2'",
        str(cache),
        "HF_HUB_OFFLINE=1",
        "hf download xswu/HPSv2 HPS_v2.1_compressed.pt",
        "checkpoint='/path/to/HPS_v2.1_compressed.pt'",
    ):
        assert expected in message, (expected, message)
    assert not any(cache.rglob("*.pt"))
