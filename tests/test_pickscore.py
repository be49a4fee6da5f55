"""PickScore: loading from local files in the official layout, input errors, gradients, and parity with
the official path (transformers `CLIPModel` + the PIL `CLIPImageProcessorPil`, as in the PickScore README)."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import rewards
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, summarize
from rewards import CheckpointMismatchError, InputError, MissingFileError
from benchmarks.checkpoints import PICKSCORE_CONFIG as FULL_CONFIG, PICKSCORE_SMALL as SMALL_CONFIG
from benchmarks.checkpoints import write_clip_tokenizer, write_pickscore as write_checkpoint

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


# -- the official path ---------------------------------------------------------------------------------
def official_processor():
    """The LAION repo's preprocessor_config.json values, on transformers' PIL ("slow") CLIP processor."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
        do_center_crop=True, do_normalize=True, do_rescale=True, rescale_factor=1 / 255,
        image_mean=OPENAI_MEAN, image_std=OPENAI_STD,
    )


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns a ModelOutput


def official_scores(folder: Path, tokenizer_dir: Path, images: list[np.ndarray], prompts: list[str]) -> dict:
    """PickScore README: processor -> get_image/text_features -> normalise -> logit_scale.exp() * dot."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    processor = official_processor()
    pixels = [processor(images=Image.fromarray(im), return_tensors="pt")["pixel_values"] for im in images]
    with torch.no_grad():
        img = _pooled(model.get_image_features(pixel_values=torch.cat(pixels)))
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = _pooled(model.get_text_features(**tokens))
        img_n, txt_n = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (img_n * txt_n).sum(-1)
    del model
    gc.collect()
    return {"image": img, "scores": scores, "pixels": pixels}


# -- test images -----------------------------------------------------------------------------------------
def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def parity_images() -> tuple[list[np.ndarray], list[str]]:
    """skimage photographs at several sizes and aspect ratios (square, portrait, landscape, < 224, > 224)."""
    from skimage import data

    camera = np.repeat(data.camera()[..., None], 3, axis=-1)
    images = [
        data.astronaut(),  # 512x512
        _resized(data.astronaut(), 180, 150),  # portrait, smaller than 224
        data.coffee(),  # 400x600 landscape
        data.rocket(),  # 427x640: odd crop margin, where floor and round offsets differ
        _resized(camera, 1000, 761),  # large portrait, grey
    ]
    prompts = [
        "an astronaut in a white suit next to a flag",
        "a small portrait of a woman in a space suit",
        "a cup of coffee on a saucer, top view",
        "a rocket on the launch pad at dusk",
        "a black and white photo of a man with a camera",
    ]
    return images, prompts


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0


# -- parity measurement (imported by docs/parity.py) -----------------------------------------------------
def measure_parity() -> dict:
    """Full-size CLIP-H with random weights: ours (rewards.load from the files) vs the official path."""
    images, prompts = parity_images()
    with tempfile.TemporaryDirectory() as tmp:
        # pytorch_model.bin (also in the PickScore_v1 repo): torch.save streams it, safetensors would copy 4 GB
        folder = write_checkpoint(Path(tmp) / "PickScore_v1", FULL_CONFIG, seed=0, fmt="bin")
        tok_dir = write_clip_tokenizer(Path(tmp) / "processor")
        gc.collect()
        ref = official_scores(folder, tok_dir, images, prompts)
        reward = rewards.load("pickscore", checkpoint=folder, tokenizer=tok_dir)
        with torch.no_grad():
            ours_pixels = [reward.preprocess(to_tensor(im)) for im in images]
            ours_img = torch.cat([reward.image_features(to_tensor(im)) for im in images])
            ours = torch.cat([reward(to_tensor(im), [p]) for im, p in zip(images, prompts)])
            reward.pil_8bit = False
            ours_float = torch.cat([reward(to_tensor(im), [p]) for im, p in zip(images, prompts)])
        del reward
        gc.collect()
    cos = torch.nn.functional.cosine_similarity(ours_img, ref["image"], dim=-1)
    pixel_err = max((a - b).abs().max().item() for a, b in zip(ours_pixels, ref["pixels"]))
    return summarize(
        ref["scores"].double().numpy(), ours.double().numpy(), cos.double().numpy(),
        float_path=ours_float.double().numpy(), reward="pickscore",
        official_scores=[round(v, 4) for v in ref["scores"].tolist()], ours_scores=[round(v, 4) for v in ours.tolist()],
        pixel_max_abs_diff=pixel_err,  # normalised pixels (units of std), after resize + crop (8-bit path)
    )


@pytest.fixture(scope="module")
def parity() -> dict:
    result = measure_parity()
    print(result)  # shown with pytest -s; docs/parity.py prints the same
    return result


@pytest.mark.slow
def test_parity_image_features_match_official(parity):
    assert parity["image_feature_cosine_min"] >= 0.9999, parity


@pytest.mark.slow
def test_parity_scores_match_official(parity):
    assert parity["official_score_std"] > 0.5, f"random weights gave degenerate scores: {parity}"
    assert parity["pixel_max_abs_diff"] < 1e-5, parity  # the official processor's pixels, to float32 rounding
    assert parity["score_abs_diff_mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, parity
    assert parity["score_rel_diff_mean"] < 1e-5, parity
    assert parity["float_path_score_rel_diff_mean"] < 1e-3, parity  # pil_8bit=False: within PIL's rounding
    assert parity["float_path_score_abs_diff_max_over_std"] < 2e-2, parity


# -- small model: loading, errors, gradients ---------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pickscore")
    return {
        "checkpoint": write_checkpoint(root / "PickScore_v1", SMALL_CONFIG, seed=1),
        "tokenizer": write_clip_tokenizer(root / "processor"),
        "root": root,
    }


@pytest.fixture(scope="module")
def small(files):
    return rewards.load("pickscore", checkpoint=files["checkpoint"], tokenizer=files["tokenizer"])


def test_attributes_and_frozen(small):
    assert small.name == "pickscore" and small.needs_prompt and small.input_size == 224
    assert small.model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    assert not any(p.requires_grad for p in small.parameters())


def test_gradients_reach_pixels(small):
    images = torch.rand(2, 3, 250, 333, requires_grad=True)
    scores = small(images, ["a cat", "a dog"])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_small_model_matches_official_path(small, files):
    images, prompts = parity_images()
    ref = official_scores(files["checkpoint"], files["tokenizer"], images[:3], prompts[:3])
    with torch.no_grad():
        ours = torch.cat([small(to_tensor(im), [p]) for im, p in zip(images[:3], prompts[:3])])
    torch.testing.assert_close(ours, ref["scores"], atol=2e-2, rtol=0)


def test_pytorch_model_bin_and_bfloat16(files):
    folder = write_checkpoint(files["root"] / "bin", SMALL_CONFIG, seed=1, fmt="bin")
    reward = rewards.load("pickscore", checkpoint=folder, tokenizer=files["tokenizer"], dtype=torch.bfloat16)
    images = torch.rand(1, 3, 224, 224)
    scores = reward(images, ["a cat"])
    ref = rewards.load("pickscore", checkpoint=files["checkpoint"], tokenizer=files["tokenizer"])(images, ["a cat"])
    assert reward.model.logit_scale.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, atol=0, rtol=3e-2)  # bfloat16 keeps ~3 significant digits


def test_checkpoint_with_saved_position_ids_loads(files):
    """PickScore_v1's files come from transformers < 4.31, which saved the position_ids aranges too."""
    folder = write_checkpoint(files["root"] / "old", SMALL_CONFIG, seed=1)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    save_file(state, str(folder / "model.safetensors"))
    reward = rewards.load("pickscore", checkpoint=folder, tokenizer=files["tokenizer"])
    assert torch.equal(reward.model.vision_model.embeddings.position_ids, torch.arange(257)[None])


def test_weights_file_with_config_beside_it(files):
    reward = rewards.load(
        "pickscore", checkpoint=files["checkpoint"] / "model.safetensors", tokenizer=files["tokenizer"] / "vocab.json"
    )
    assert reward.model.config.vision_config.hidden_size == SMALL_CONFIG["vision_config"]["hidden_size"]


def test_text_is_encoded_once_per_prompt(small, monkeypatch):
    calls = []
    original = small.encode_text
    monkeypatch.setattr(small, "encode_text", lambda prompts: calls.append(list(prompts)) or original(prompts))
    small.clear_text_cache()
    images = torch.rand(3, 3, 224, 224)
    small(images, ["x", "y", "x"])
    small(images, ["y", "x", "x"])
    assert calls == [["x", "y"]]


def test_prompt_errors(small):
    images = torch.rand(2, 3, 224, 224)
    with pytest.raises(InputError, match="needs one prompt per image"):
        small(images)
    with pytest.raises(InputError, match="got 1 prompts for 2 images"):
        small(images, ["only one"])


def test_mismatched_checkpoint_names_keys(files):
    folder = files["root"] / "bad"
    write_checkpoint(folder, SMALL_CONFIG, seed=1)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    state["visual_projection.bias"] = torch.zeros(32)
    del state["text_projection.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="text_projection.weight") as err:
        rewards.load("pickscore", checkpoint=folder, tokenizer=files["tokenizer"])
    assert "visual_projection.bias" in str(err.value)


def test_missing_files_say_where_and_how(files, tmp_path):
    with pytest.raises(MissingFileError, match="model.safetensors") as err:
        rewards.load("pickscore", checkpoint=tmp_path, tokenizer=files["tokenizer"])
    assert str(tmp_path) in str(err.value) and "checkpoint=" in str(err.value)
    with pytest.raises(MissingFileError, match="vocab.json") as err:
        rewards.load("pickscore", checkpoint=files["checkpoint"], tokenizer=tmp_path)
    assert "tokenizer=" in str(err.value)


def test_off_grid_images_score_their_8bit_rounding(small, files):
    """By default a float image scores exactly what its 8-bit rounding scores (what the official processor is
    given); pil_8bit=False scores the floats themselves, which differ by that rounding only."""
    from rewards.preprocess import quantize_8bit

    x, prompts = torch.rand(2, 3, 250, 333), ["a cat", "a dog"]
    with torch.no_grad():
        default, rounded = small(x, prompts), small(quantize_8bit(x), prompts)
        floats = rewards.load("pickscore", checkpoint=files["checkpoint"], tokenizer=files["tokenizer"], pil_8bit=False)
        float_scores = floats(x, prompts)
    assert small.pil_8bit and not floats.pil_8bit
    assert torch.equal(default, rounded)
    assert not torch.equal(default, float_scores)
    torch.testing.assert_close(default, float_scores, atol=0.05, rtol=0)


def test_8bit_gradients_match_the_float_path(small, files):
    """Straight-through rounding: the gradient of the default path is the float path's (on an 8-bit image)."""
    floats = rewards.load("pickscore", checkpoint=files["checkpoint"], tokenizer=files["tokenizer"], pil_8bit=False)
    images, _ = parity_images()
    x = to_tensor(images[3])  # rocket 427x640: downscaling, odd crop margin
    grads = []
    for reward in (small, floats):
        pixels = x.clone().requires_grad_(True)
        reward(pixels, ["a rocket"]).sum().backward()
        grads.append(pixels.grad)
    assert torch.isfinite(grads[0]).all()
    cosine = torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert cosine > 0.9995, cosine
