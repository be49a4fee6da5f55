"""CycleReward: parity with the authors' `cyclereward` package (run in the shared oracle environment), the key mapping
from the original checkpoint, gradients, and the errors a user can act on.

The oracle writes a random-weight CycleReward-Combo.pth with its own module (BLIP's "base" ViT and a 2-layer text
encoder through the med_config.json it reads, to keep the CPU test short; the release uses the "large" ViT, which
our module builds by default) and scores real photographs through its README usage; ours loads that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from benchmarks.checkpoints import MED_CONFIG, write_vocab
from rewards import CheckpointMismatchError, InputError, MissingFileError
from rewards import cyclereward as cr
from rewards import imagereward as ir
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, assert_gradient_matches_central_difference, photographs, run_oracle

BLIP_BASE_VIT = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)
SMALL_MED = {**MED_CONFIG, "num_hidden_layers": 2}
HEAD_STD = 3.0
PROMPTS = [
    "an astronaut in a white space suit, studio portrait",
    "A cup of coffee on a saucer, seen from above!",
    "a cat",
    "black-and-white photo of a cameraman with a tripod, standing on a lawn, highly detailed photograph, 35mm film, "
    "golden hour, sharp focus, trending on artstation, a long caption that runs on " + "and on " * 60,  # > 128 tokens
    "tiny astronaut",
    "coffee (portrait crop)",
]


def _images() -> list[np.ndarray]:
    """The parity photographs."""
    return photographs()


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cyclereward")
    write_vocab(work / ir.VOCAB_FILE, PROMPTS)
    (work / ir.CONFIG_FILE).write_text(json.dumps(SMALL_MED))
    pngs = []
    for i, arr in enumerate(_images()):
        pngs.append(work / f"image{i}.png")
        Image.fromarray(arr).save(pngs[-1])
    job = {"seed": 0, "vocab_dir": str(work), "vit": "base", "cache_dir": str(work), "med_config": SMALL_MED,
           "head_std": HEAD_STD, "images": [str(p) for p in pngs], "prompts": PROMPTS, "out": str(work / "out.pt")}
    (work / "job.json").write_text(json.dumps(job))
    run_oracle("run_cyclereward.py", work / "job.json", "CycleReward")
    out = torch.load(work / "out.pt", weights_only=True)
    return {**out, "checkpoint": work / "CycleReward-Combo.pth", "config": work / ir.CONFIG_FILE,
            "tokenizer": work / ir.VOCAB_FILE}


def _load(official: dict, **options) -> rewards.Reward:
    with mock.patch.dict(ir.VISION, BLIP_BASE_VIT):
        return rewards.load("cyclereward", checkpoint=official["checkpoint"], config=official["config"],
                            tokenizer=official["tokenizer"], **options)


@pytest.fixture(scope="module")
def reward(official) -> rewards.Reward:
    return _load(official)


@pytest.mark.slow
def test_scores_match_official(official, reward):
    with torch.no_grad():
        feats = torch.cat([reward.features(_tensor(a), [p]) for a, p in zip(_images(), PROMPTS)]).double()
        ours = torch.cat([reward.head_output(f.float()[None]) for f in feats]).double()
        reward.pil_8bit = False
        ours_float = torch.cat([reward(_tensor(a), [p]) for a, p in zip(_images()[:3], PROMPTS)]).double()
        reward.pil_8bit = True
    ref = official["scores"].double()
    spread = ref.std()
    cos = torch.nn.functional.cosine_similarity(feats, official["features"].double())
    result = {"std": spread.item(), "mean_over_std": ((ours - ref).abs().mean() / spread).item(),
              "max_over_std": ((ours - ref).abs().max() / spread).item(),
              "float_mean_over_std": ((ours_float - ref[:3]).abs().mean() / spread).item(),
              "feature_cos_min": cos.min().item()}
    print(result)
    assert result["std"] > 0.05, result
    assert result["mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, result
    assert result["float_mean_over_std"] < 0.05, result


@pytest.mark.slow
def test_gradients_reach_pixels(reward):
    x = torch.rand(1, 3, 150, 200, requires_grad=True)
    reward(x, ["a cat"]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert reward.needs_prompt and reward.input_size == 224 and not any(p.requires_grad for p in reward.parameters())


@pytest.mark.slow
def test_gradient_matches_finite_differences(official):
    """float64, float resize (`score`, before the protocol's float32 output): autograd against a central difference."""
    assert_gradient_matches_central_difference(_load(official, dtype=torch.float64, pil_8bit=False), (120, 160),
                                               ["a cat"])


@pytest.mark.slow
def test_safetensors_reupload_and_errors(official, reward, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(official["checkpoint"], weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / cr.WEIGHTS_FILE))
    x = _tensor(_images()[2])
    with torch.no_grad():
        a = reward(x, ["a cat"])
        b = _load({**official, "checkpoint": tmp_path})(x, ["a cat"])
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="one prompt per image"):
        reward(x)
    torch.save({**state, "blip.extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="blip.extra.weight"):
        _load({**official, "checkpoint": tmp_path / "bad.pth"})
    with pytest.raises(MissingFileError, match=cr.WEIGHTS_FILE):
        _load({**official, "checkpoint": tmp_path / "nowhere"})


def test_registered_variants():
    for name in ("cyclereward", "cyclereward-i2t", "cyclereward-t2i"):
        assert name in rewards.available() and rewards.needs_prompt(name)
