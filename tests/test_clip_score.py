"""CLIP alignment reward: parity with open_clip's own model + PIL preprocess, tag options, errors, gradients.

The oracle is open_clip itself: `create_model_and_transforms(model, pretrained=<file we wrote>)` and its eval
transform on the PIL image. Both sides load one random-weight full-size ViT-B-32 checkpoint file.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from rewards import CheckpointMismatchError, InputError, MissingFileError, openclip
from rewards.clip_score import clip_geometry
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, summarize
from tests.test_hps import TARGET_COSINE, TARGET_REL_DIFF, photographs, random_clip_state_dict, to_tensor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ARCH = "ViT-B-32"
FILE = "open_clip_pytorch_model.bin"


def write_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random-weight ViT-B-32 in open_clip's hub file format (a plain fp32 state dict)."""
    state = random_clip_state_dict(openclip.build_model(ARCH), seed=seed)
    path = folder / FILE
    torch.save({k: v.float() for k, v in state.items()}, path)
    return path


def _official(checkpoint: Path, samples, model_name: str = ARCH):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        image = torch.cat([model.encode_image(preprocess(img)[None], normalize=True) for img, _ in samples])
        text = model.encode_text(tokenizer([p for _, p in samples]), normalize=True)
    return image, text


def _parity_run(workdir: Path) -> tuple[dict, rewards.Reward]:
    torch.manual_seed(0)
    samples = photographs()
    checkpoint = write_checkpoint(workdir)
    official_image, official_text = _official(checkpoint, samples)
    official = (official_image * official_text).sum(-1).numpy()
    gc.collect()

    reward = rewards.load("clip", model=ARCH, pretrained=None, checkpoint=workdir)
    captured = []
    hook = reward.model.visual.register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    with torch.no_grad():
        ours = np.array([reward(to_tensor(image), [prompt]).item() for image, prompt in samples])
    hook.remove()
    reward.pil_8bit = False
    with torch.no_grad():
        ours_float = np.array([reward(to_tensor(image), [prompt]).item() for image, prompt in samples])
    reward.pil_8bit = True
    ours_image = torch.nn.functional.normalize(torch.cat(captured), dim=-1)
    ours_text = reward.text_features([p for _, p in samples])
    cosines = (ours_image * official_image).sum(-1).numpy()
    metrics = summarize(
        official,
        ours,
        cosines,
        float_path=ours_float,
        text_feature_cosine_min=float((ours_text * official_text).sum(-1).min()),
        oracle=f"open_clip {__import__('open_clip').__version__} create_model_and_transforms + PIL eval transform, "
        f"{ARCH} fp32 CPU",
    )
    return metrics, reward


def measure_parity() -> dict:
    """Full-size ViT-B-32 from one random-weight checkpoint file, through open_clip and through this package."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics, reward = _parity_run(Path(tmp))
        del reward
    return metrics


# -- tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    metrics, reward = _parity_run(folder)
    print(f"\nparity {reward.name}: {metrics}")  # shown with pytest -s
    yield metrics, reward, folder
    del reward
    gc.collect()


def test_parity_with_open_clip(parity):
    m, _, _ = parity
    assert m["official_score_std"] > 0.005, f"random weights gave degenerate scores: {m}"
    assert m["image_feature_cosine_min"] >= TARGET_COSINE, m
    assert m["text_feature_cosine_min"] >= TARGET_COSINE, m
    assert m["score_rel_diff_mean"] < TARGET_REL_DIFF, m
    assert m["score_abs_diff_mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m
    assert m["float_path_score_rel_diff_mean"] < TARGET_REL_DIFF, m  # pil_8bit=False: within PIL's rounding


def test_attributes_and_gradient(parity):
    _, reward, _ = parity
    assert (reward.name, reward.needs_prompt, reward.input_size, reward.published_scale) == ("clip", True, 224, 100)
    assert not any(p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 100, 150, requires_grad=True)
    scores = reward(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_low_precision_model_and_inputs(parity):
    _, reward, folder = parity
    images = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        reference = reward(images, ["a cat", "a dog"])
        half = rewards.load("clip", model=ARCH, pretrained=None, checkpoint=folder, dtype=torch.bfloat16)
        scores = half(images.half(), ["a cat", "a dog"])
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, reference, atol=3e-2)


def test_prompt_errors(parity):
    _, reward, _ = parity
    with pytest.raises(InputError, match="needs one prompt per image"):
        reward(torch.rand(2, 3, 32, 32))
    with pytest.raises(InputError, match="got 3 prompts for 2 images"):
        reward(torch.rand(2, 3, 32, 32), ["a", "b", "c"])


def test_tag_sets_quick_gelu_and_preprocessing(parity):
    """An OpenAI tag means QuickGELU: our model must equal open_clip's '-quickgelu' model on the same weights."""
    _, _, folder = parity
    samples = photographs()[2:3]  # the 512x200 portrait: shortest-side resize and crop
    reward = rewards.load("clip", model=ARCH, pretrained="openai", checkpoint=folder / FILE)
    official_image, _ = _official(folder / FILE, samples, model_name=ARCH + "-quickgelu")
    with torch.no_grad():
        ours = torch.cat([openclip.image_features(reward.model, reward.preprocess(to_tensor(i))) for i, _ in samples])
    assert (ours * official_image).sum(-1).min() >= TARGET_COSINE
    assert "QuickGELU" in {type(m).__name__ for m in reward.model.modules()}


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("pil_8bit", [True, False])
def test_geometry_matches_open_clip_pil_transform(resize_mode, interpolation, pil_8bit):
    """The 8-bit path gives open_clip's PIL pixels exactly (fill colour too); the float path is within PIL's rounding."""
    from open_clip.transform import image_transform

    transform = image_transform(224, is_train=False, mean=(0, 0, 0), std=(1, 1, 1), resize_mode=resize_mode,
                                interpolation=interpolation, fill_color=37)
    for image, _ in photographs():
        ours = clip_geometry(to_tensor(image), 224, resize_mode, interpolation, fill=37 / 255, pil_8bit=pil_8bit)[0]
        official = transform(image)
        assert ours.shape == official.shape
        diff = (ours - official).abs()
        where = (resize_mode, interpolation, image.size)
        if pil_8bit:
            assert diff.max() < 1e-6, where
        else:
            assert diff.max() < 3.5 / 255 and diff.mean() < 0.5 / 255, where


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        rewards.load("clip", model=ARCH, pretrained="no-such-tag")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(MissingFileError) as err:
        rewards.load("clip", model=ARCH, pretrained=None, checkpoint=tmp_path / "weights.bin")
    assert str(tmp_path / "weights.bin") in str(err.value) and "checkpoint=" in str(err.value)


def test_missing_pretrained_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingFileError) as err:
        rewards.load("clip", model=ARCH, pretrained="openai")
    assert "timm/vit_base_patch32_clip_224.openai" in str(err.value) and "checkpoint=" in str(err.value)


def test_checkpoint_that_does_not_fit(tmp_path):
    state = {"module.visual.proj": torch.zeros(3, 3), "module.bogus": torch.zeros(1)}  # a DDP-style file
    torch.save({"state_dict": state}, tmp_path / FILE)
    with pytest.raises(CheckpointMismatchError) as err:
        rewards.load("clip", model=ARCH, pretrained=None, checkpoint=tmp_path)
    message = str(err.value)
    assert "bogus" in message and "visual.proj" in message and "missing" in message


def test_needs_weights_source():
    with pytest.raises(ValueError, match="pretrained="):
        rewards.load("clip", model=ARCH, pretrained=None)
