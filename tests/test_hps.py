"""HPSv2 / HPSv2.1: parity with the official `hpsv2` package, loading from official-format files, errors, gradients.

The oracle is the installed `hpsv2` package (PyPI `hpsv2x`): its vendored open_clip ViT-H-14, its own PIL
transform (`light_augmentation=True`, as `hpsv2.img_score` builds it) and its own `score()` function, which
re-reads the checkpoint file we wrote. Both sides load the same random-weight `HPS_v2.1_compressed.pt`.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from benchmarks.checkpoints import HPS_FILE as FILE, random_clip_state_dict
from tests.parity import summarize
from rewards import CheckpointMismatchError, InputError, MissingFileError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

TARGET_COSINE = 0.9999
TARGET_REL_DIFF = 1e-3


# -- test data shared with tests/test_clip_score.py -------------------------------------------------------
def photographs() -> list[tuple[Image.Image, str]]:
    """skimage photographs: landscape, portrait, smaller and larger than 224, with prompts (one over 77 tokens)."""
    from skimage import data

    def rgb(array: np.ndarray) -> Image.Image:
        return Image.fromarray(array).convert("RGB")

    long_prompt = "a rocket " + ", ".join(["standing on the launch pad under a clear blue morning sky"] * 10)
    return [
        (rgb(data.coffee()), "a cup of coffee on a saucer"),  # 400x600 landscape
        (rgb(data.rocket()).resize((240, 160), Image.LANCZOS), long_prompt),  # smaller than 224
        (rgb(data.camera()[:, 150:350]), "a black and white photo of a man with a camera"),  # 512x200 portrait
    ]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [1,3,H,W] in [0,1], exactly as torchvision's ToTensor."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0


# -- the official path ------------------------------------------------------------------------------------
def _import_hpsv2():
    """Import the official package; its unused download progress bar needs `clint`, which we stand in for."""
    if "clint" not in sys.modules:
        try:
            import clint  # noqa: F401
        except ImportError:
            textui = types.ModuleType("clint.textui")
            textui.progress = types.SimpleNamespace()
            sys.modules["clint"] = types.ModuleType("clint")
            sys.modules["clint"].textui = textui
            sys.modules["clint.textui"] = textui
    import hpsv2.img_score as img_score
    from hpsv2.src import open_clip as hps_open_clip

    return img_score, hps_open_clip


def build_official():
    """The official ViT-H-14 and val transform, built on the meta device (its random init is never used: every
    weight comes from the checkpoint), then given CPU storage and its causal text mask."""
    _, hps_open_clip = _import_hpsv2()
    with torch.device("meta"):
        model, _, preprocess = hps_open_clip.create_model_and_transforms(
            "ViT-H-14", None, precision="fp32", device="meta", light_augmentation=True, output_dict=True
        )
    model.to_empty(device="cpu")
    model.attn_mask = torch.full((77, 77), float("-inf")).triu(1)
    return model, preprocess


def _official_scores(img_score, model, preprocess, samples, checkpoint: Path):
    """Score each sample with the official `score()`, capturing its normalised image and text features."""
    images, texts = [], []
    hook = model.visual.register_forward_hook(lambda m, i, out: images.append(out.detach()))
    encode_text = model.encode_text

    def capture_text(text, normalize=False):
        features = encode_text(text, normalize=normalize)
        texts.append(features.detach())
        return features

    model.encode_text = capture_text
    img_score.model_dict.update(model=model, preprocess_val=preprocess)
    try:
        scores = np.array([img_score.score(image, prompt, cp=str(checkpoint))[0] for image, prompt in samples])
    finally:
        img_score.model_dict.clear()
        hook.remove()
        del model.encode_text
    return scores, torch.nn.functional.normalize(torch.cat(images), dim=-1), torch.cat(texts)


def _our_scores(reward: rewards.Reward, samples, with_gradient: bool):
    """Score each sample through the reward; the last one with autograd on, to check the pixel gradient."""
    images, scores, gradient = [], [], {}
    hook = reward.model.visual.register_forward_hook(lambda m, i, out: images.append(out.detach()))
    for k, (image, prompt) in enumerate(samples):
        pixels = to_tensor(image)
        if with_gradient and k == len(samples) - 1:
            pixels.requires_grad_(True)
            score = reward(pixels, [prompt])
            score.sum().backward()
            finite, size = bool(torch.isfinite(pixels.grad).all()), pixels.grad.abs().mean().item()
            gradient = {"gradient_finite": finite, "gradient_abs_mean": size}
        else:
            with torch.no_grad():
                score = reward(pixels, [prompt])
        scores.append(score.item())
    hook.remove()
    return np.array(scores), torch.nn.functional.normalize(torch.cat(images), dim=-1), gradient


def _parity_run(workdir: Path, with_gradient: bool = False) -> tuple[dict, rewards.Reward]:
    img_score, _ = _import_hpsv2()
    torch.manual_seed(0)
    samples = photographs()
    official_model, preprocess = build_official()
    checkpoint = workdir / FILE
    torch.save({"state_dict": random_clip_state_dict(official_model, seed=0)}, checkpoint)
    official, official_image, official_text = _official_scores(img_score, official_model, preprocess, samples,
                                                               checkpoint)
    official_pixels = [preprocess(image)[None] for image, _ in samples]
    del official_model
    gc.collect()

    start = time.perf_counter()
    reward = rewards.load("hpsv2.1", checkpoint=workdir)  # a folder: the official file name is found inside
    load_seconds = time.perf_counter() - start
    ours, ours_image, gradient = _our_scores(reward, samples, with_gradient)
    ours_text = reward.text_features([p for _, p in samples])  # cached by the calls above
    with torch.no_grad():
        pixel_diff = max(
            (reward.preprocess(to_tensor(image)) - ref).abs().max().item()
            for (image, _), ref in zip(samples, official_pixels)
        )
    metrics = summarize(
        official,
        ours,
        (ours_image * official_image).sum(-1).numpy(),
        text_feature_cosine_min=float((ours_text * official_text).sum(-1).min()),
        preprocessed_pixel_max_abs_diff=pixel_diff,
        load_seconds=round(load_seconds, 1),  # reported, never asserted
        oracle="hpsv2.img_score.score (hpsv2x 1.2.0), fp32 CPU",
        **gradient,
    )
    return metrics, reward


def measure_parity() -> dict:
    """Build both full-size models from one random-weight official-format checkpoint; return the disagreement."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics, reward = _parity_run(Path(tmp))
        del reward
        gc.collect()
    return metrics


# -- tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    metrics, reward = _parity_run(tmp_path_factory.mktemp("hps"), with_gradient=True)
    print(f"\nparity {reward.name}: {metrics}")  # shown with pytest -s
    yield metrics, reward
    del reward
    gc.collect()


@pytest.mark.slow
def test_parity_with_official_hpsv2(parity):
    m, _ = parity
    assert m["official_score_std"] > 0.003, f"random weights gave degenerate scores: {m}"  # diffs are ~1e-8
    assert 0.15 < m["official_score_mean"] < 0.6, m  # the shared direction of random_clip_state_dict is in place
    assert m["image_feature_cosine_min"] >= TARGET_COSINE, m
    assert m["text_feature_cosine_min"] >= TARGET_COSINE, m
    assert m["score_rel_diff_mean"] < TARGET_REL_DIFF, m
    assert m["score_abs_diff_max_over_std"] < 1e-2, m
    assert m["preprocessed_pixel_max_abs_diff"] < 1e-4, m  # the official transform runs on float tensors too


@pytest.mark.slow
def test_reward_attributes_and_gradient(parity):
    m, reward = parity
    assert (reward.name, reward.needs_prompt, reward.input_size, reward.published_scale) == ("hpsv2.1", True, 224, 100)
    assert not any(p.requires_grad for p in reward.parameters())
    assert m["gradient_finite"] and m["gradient_abs_mean"] > 0


@pytest.mark.slow
def test_prompt_errors(parity):
    _, reward = parity
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(InputError, match="needs one prompt per image"):
        reward(images)
    with pytest.raises(InputError, match="got 1 prompts for 2 images"):
        reward(images, ["only one"])


@pytest.mark.slow
def test_text_features_cached_per_prompt(parity):
    _, reward = parity
    reward.clear_text_cache()
    seen = []

    def encode(prompts: list[str]) -> torch.Tensor:  # stands in for the text tower: only the caching is tested
        seen.append(list(prompts))
        return torch.randn(len(prompts), 1024)

    reward.encode_text = encode  # an instance attribute, removed below (monkeypatch would leave a reference cycle)
    try:
        first = reward.text_features(["a", "b", "a"])
        second = reward.text_features(["b", "c"])
    finally:
        del reward.encode_text
        reward.clear_text_cache()
    assert seen == [["a", "b"], ["c"]]
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], first[2])


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(MissingFileError) as err:
        rewards.load("hpsv2", checkpoint=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "HPS_v2_compressed.pt") in message and "checkpoint=" in message


def test_missing_from_hub_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingFileError) as err:
        rewards.load("hpsv2.1")
    message = str(err.value)
    assert "xswu/HPSv2" in message and FILE in message and "checkpoint=" in message


def test_checkpoint_that_does_not_fit(tmp_path):
    state = {"visual.conv1.weight": torch.zeros(2, 3, 14, 14), "visual.extra": torch.zeros(1)}
    torch.save({"state_dict": state}, tmp_path / FILE)
    with pytest.raises(CheckpointMismatchError) as err:
        rewards.load("hpsv2.1", checkpoint=tmp_path / FILE)
    message = str(err.value)
    assert "visual.extra" in message and "visual.conv1.weight" in message and "missing" in message
