"""Aesthetic Shadow v2: parity with the authors' usage (transformers' image-classification pipeline on PIL images,
with the repo's ViT processor on the PIL backend), gradients, loading and errors, on a tiny ViT of the real layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from benchmarks.zoo2_files import write_shadow
from rewards import CheckpointMismatchError, InputError, MissingFileError
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, assert_gradient_matches_central_difference


def _arrays() -> list[np.ndarray]:
    from skimage import data

    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    return [data.astronaut(), data.coffee(), data.chelsea(), camera[:, 100:400], data.astronaut()[::4, ::3],
            data.rocket()]


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_shadow(tmp_path_factory.mktemp("shadow") / "aesthetic-shadow-v2", tiny=True)


def official_hq(folder, arrays: list[np.ndarray]) -> np.ndarray:
    """The model card's usage: pipeline("image-classification") on PIL images; the score of the 'hq' label."""
    from transformers import pipeline
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = json.loads((folder / "preprocessor_config.json").read_text())
    keep = ("size", "resample", "image_mean", "image_std", "do_resize", "do_rescale", "do_normalize", "rescale_factor")
    processor = ViTImageProcessorPil(**{k: v for k, v in config.items() if k in keep})
    classify = pipeline("image-classification", model=str(folder), image_processor=processor, device="cpu")
    out = []
    for a in arrays:
        labels = {r["label"]: r["score"] for r in classify(Image.fromarray(a), top_k=None)}
        out.append(labels["hq"])
    return np.array(out)


@pytest.fixture(scope="module")
def parity(folder) -> dict:
    arrays = _arrays()
    ref = official_hq(folder, arrays)
    reward = rewards.load("aesthetic-shadow", checkpoint=folder)
    with torch.no_grad():
        ours = np.array([reward(_tensor(a)).item() for a in arrays])
        reward.pil_8bit = False
        ours_float = np.array([reward(_tensor(a)).item() for a in arrays])
    diff = np.abs(ours - ref)
    result = {"official": ref, "std": float(ref.std()), "mean_over_std": float(diff.mean() / ref.std()),
              "float_mean_over_std": float(np.abs(ours_float - ref).mean() / ref.std())}
    print(result)
    return result


def test_scores_match_the_pipeline(parity):
    assert parity["std"] > 0.02, parity
    assert parity["mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, parity
    assert parity["float_mean_over_std"] < 0.05, parity  # float resize: PIL's 8-bit rounding only


def test_gradient_matches_finite_differences(folder):
    """float64, float resize (`score`, before the protocol's float32 output): autograd against a central difference."""
    reward = rewards.load("aesthetic-shadow", checkpoint=folder, dtype=torch.float64, pil_8bit=False)
    assert_gradient_matches_central_difference(reward, (90, 70), None, atol=1e-10)


def test_8bit_path_passes_a_gradient(folder):
    reward = rewards.load("aesthetic-shadow", checkpoint=folder)
    x = torch.rand(2, 3, 80, 120, requires_grad=True)
    reward(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not reward.needs_prompt and reward.input_size == 256


def test_errors(folder, tmp_path):
    reward = rewards.load("aesthetic-shadow", checkpoint=folder)
    with pytest.raises(InputError, match="divide by 255"):
        reward(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(MissingFileError, match="model.safetensors"):
        rewards.load("aesthetic-shadow", checkpoint=tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        (wrong / name).write_bytes((folder / name).read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(id2label={"0": "good", "1": "bad"}, label2id={"good": 0, "bad": 1})
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="no 'hq'"):
        rewards.load("aesthetic-shadow", checkpoint=wrong)
