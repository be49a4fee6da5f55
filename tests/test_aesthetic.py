"""LAION aesthetic predictor v2: loading from local files in the original formats, errors, gradients, and parity
with the official recipe (OpenAI `clip` package model + its torchvision `preprocess` on PIL + the MLP head).

The oracle is OpenAI's `clip` package (`openai-clip`, in the test extra); its clip.py imports `pkg_resources`,
which recent setuptools dropped: shimmed below.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, summarize
from rewards import CheckpointMismatchError, MissingFileError
from benchmarks.checkpoints import HEAD_FILE, OfficialHead, random_openai_clip_state, write_head
from tests.test_pickscore import parity_images, to_tensor


def import_openai_clip():
    """OpenAI's `clip` package; its clip.py still imports pkg_resources only for `packaging`."""
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        import packaging.version

        shim = types.ModuleType("pkg_resources")
        shim.packaging = packaging
        sys.modules["pkg_resources"] = shim
    try:
        return importlib.import_module("clip")
    except ImportError as err:
        raise ImportError(
            "the aesthetic parity oracle needs OpenAI's clip package: pip install --no-deps openai-clip==1.0.1"
        ) from err


# -- the official path ---------------------------------------------------------------------------------
def official_scores(backbone: Path, head_file: Path, images: list[np.ndarray]) -> dict:
    """simple_inference.py: clip.load's model and preprocess, numpy L2 normalisation, the MLP in float32."""
    clip = import_openai_clip()
    model = clip.model.build_model(torch.load(backbone, map_location="cpu", weights_only=True)).float().eval()
    preprocess = clip.clip._transform(model.visual.input_resolution)
    head = OfficialHead().eval()
    head.load_state_dict(torch.load(head_file, map_location="cpu", weights_only=True))
    pixels = [preprocess(Image.fromarray(im))[None] for im in images]
    with torch.no_grad():
        emb = torch.cat([model.encode_image(p) for p in pixels]).numpy()
        normed = emb / np.linalg.norm(emb, 2, axis=-1, keepdims=True)
        scores = head(torch.from_numpy(normed).float()).squeeze(-1)
    del model
    gc.collect()
    return {"image": torch.from_numpy(emb), "scores": scores, "pixels": pixels}


def write_files(folder: Path, seed: int = 0) -> dict:
    """The two files the predictor needs: a full-size ViT-L/14 state dict and the MLP head."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone = folder / "ViT-L-14.pt"
    torch.save(random_openai_clip_state(seed), backbone)
    gc.collect()
    return {"backbone": backbone, "head": write_head(folder / HEAD_FILE, seed), "root": folder}


# -- parity measurement (imported by docs/parity.py) -----------------------------------------------------
def measure_parity(files: dict | None = None) -> dict:
    """Full-size ViT-L/14 with random weights: ours (rewards.load from the files) vs the official recipe."""
    if files is None:
        with tempfile.TemporaryDirectory() as tmp:
            return measure_parity(write_files(Path(tmp)))
    images, _ = parity_images()
    ref = official_scores(files["backbone"], files["head"], images)
    reward = rewards.load("aesthetic", checkpoint=files["head"], backbone=files["backbone"])
    with torch.no_grad():
        ours_pixels = [reward.preprocess(to_tensor(im)) for im in images]
        ours_img = torch.cat([reward.image_features(to_tensor(im)) for im in images])
        ours = torch.cat([reward(to_tensor(im)) for im in images])
        reward.pil_8bit = False
        ours_float = torch.cat([reward(to_tensor(im)) for im in images])
    del reward
    gc.collect()
    cos = torch.nn.functional.cosine_similarity(ours_img, ref["image"], dim=-1)
    pixel_err = max((a - b).abs().max().item() for a, b in zip(ours_pixels, ref["pixels"]))
    return summarize(
        ref["scores"].double().numpy(), ours.double().numpy(), cos.double().numpy(),
        float_path=ours_float.double().numpy(), reward="aesthetic",
        official_scores=[round(v, 4) for v in ref["scores"].tolist()], ours_scores=[round(v, 4) for v in ours.tolist()],
        pixel_max_abs_diff=pixel_err,  # normalised pixels (units of std), after resize + crop (8-bit path)
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return write_files(tmp_path_factory.mktemp("aesthetic"), seed=0)


@pytest.fixture(scope="module")
def parity(files) -> dict:
    result = measure_parity(files)
    print(result)  # shown with pytest -s; docs/parity.py prints the same
    return result


@pytest.mark.slow
def test_parity_image_features_match_official(parity):
    assert parity["image_feature_cosine_min"] >= 0.9999, parity


@pytest.mark.slow
def test_parity_scores_match_official(parity):
    assert parity["official_score_std"] > 0.2, f"random weights gave degenerate scores: {parity}"
    assert parity["pixel_max_abs_diff"] < 1e-5, parity  # OpenAI's preprocess pixels, to float32 rounding
    assert parity["score_abs_diff_mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, parity
    assert parity["score_rel_diff_mean"] < 1e-5, parity
    assert parity["float_path_score_rel_diff_mean"] < 1e-3, parity  # pil_8bit=False: within PIL's rounding
    assert parity["float_path_score_abs_diff_max_over_std"] < 2e-2, parity


# -- loading, errors, gradients (the same full-size files) --------------------------------------------
@pytest.fixture(scope="module")
def reward(files):
    return rewards.load("aesthetic", checkpoint=files["head"], backbone=files["backbone"])


def test_attributes_and_frozen(reward):
    assert reward.name == "aesthetic" and not reward.needs_prompt and reward.input_size == 224
    assert not any(p.requires_grad for p in reward.parameters())


def test_gradients_reach_pixels_and_prompts_are_ignored(reward):
    images = torch.rand(1, 3, 150, 200, requires_grad=True)
    scores = reward(images, ["ignored"])
    assert scores.dtype == torch.float32 and scores.shape == (1,)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_head_is_the_affine_map_of_the_normalised_embedding(reward, files):
    images = torch.rand(2, 3, 224, 224)
    state = torch.load(files["head"], weights_only=True)
    with torch.no_grad():
        emb = reward.image_features(images).double()
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # eval: dropouts are identities, and there are no activations
            x = x @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
        torch.testing.assert_close(reward(images).double(), x.squeeze(-1), atol=1e-4, rtol=0)


def test_backbone_dtype_follows_load_and_head_stays_float32(files, reward):
    # float64 exercises the same casts as bfloat16 at a fraction of the CPU time (no bf16 matmul units here)
    wide = rewards.load("aesthetic", checkpoint=files["head"], backbone=files["backbone"], dtype=torch.float64)
    assert wide.visual.conv1.weight.dtype == torch.float64 and wide.head.layers[0].weight.dtype == torch.float32
    images = torch.rand(1, 3, 224, 224)
    scores = wide(images)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reward(images), atol=1e-3, rtol=0)


def test_mismatched_head_names_keys(files):
    state = torch.load(files["head"], weights_only=True)
    state["layers.8.weight"] = torch.zeros(1, 1)
    del state["layers.7.bias"]
    bad = files["root"] / "bad_head.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointMismatchError, match="layers.7.bias") as err:
        rewards.load("aesthetic", checkpoint=bad, backbone=files["backbone"])
    assert "layers.8.weight" in str(err.value)


def test_mismatched_backbone_names_keys(files):
    bad = files["root"] / "vit_b16.bin"  # e.g. a ViT-B/16 file: other patch size, most keys absent
    torch.save({"visual.conv1.weight": torch.zeros(768, 3, 16, 16), "visual.extra": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointMismatchError, match=r"conv1.weight: checkpoint \(768, 3, 16, 16\)") as err:
        rewards.load("aesthetic", checkpoint=files["head"], backbone=bad)
    assert "missing keys" in str(err.value) and "extra" in str(err.value)


def test_backbone_folder_in_open_clip_layout(files, reward):
    folder = files["root"] / "timm_openai"
    folder.mkdir()
    (folder / "open_clip_pytorch_model.bin").symlink_to(files["backbone"])
    same = rewards.load("aesthetic", checkpoint=files["head"], backbone=folder)
    for (name, ours), (_, ref) in zip(same.state_dict().items(), reward.state_dict().items()):
        assert torch.equal(ours, ref), name


def test_missing_files_say_where_and_how(files, tmp_path):
    with pytest.raises(MissingFileError, match=HEAD_FILE.replace("+", r"\+")) as err:
        rewards.load("aesthetic", checkpoint=tmp_path, backbone=files["backbone"])
    assert str(tmp_path) in str(err.value) and "checkpoint=" in str(err.value)
    with pytest.raises(MissingFileError, match="open_clip_pytorch_model.bin") as err:
        rewards.load("aesthetic", checkpoint=files["head"], backbone=tmp_path)
    assert "backbone=" in str(err.value)
