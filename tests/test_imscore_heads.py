"""imscore's own rewards (rating heads on CLIP / SigLIP / DINOv2, Pick-a-Pic preference models): parity with imscore
itself (the oracle for heads imscore trained), gradients, loading from imscore's hub layout, and errors.

Tiny backbones of the real architectures; the files are written in imscore's layout (benchmarks.zoo2_files)
and imscore's own `from_pretrained` must read every tensor of them strictly before it serves as the oracle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import rewards
from benchmarks.zoo2_files import write_base, write_head_repo
from benchmarks.imscore_models import transformers_4_siglip_tower
from rewards import CheckpointMismatchError, InputError, MissingFileError
from rewards.imscore_heads import VARIANTS
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, assert_gradient_matches_central_difference

pytest.importorskip("imscore")

CASES = ("pickscore-siglip", "pickscore-clip", "imreward-overall_rating-clip", "imreward-fidelity_rating-siglip",
         "ava-rating-dinov2-sampled-True")
PROMPTS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a cat on a sofa", "a black and white photo",
           "a tiny astronaut", "coffee, portrait crop"]


def _images() -> list[torch.Tensor]:
    """8-bit photographs at several sizes and aspect ratios, as float tensors [1,3,H,W] in [0,1]."""
    from skimage import data

    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    arrays = [data.astronaut(), data.coffee(), data.chelsea(), camera[:, 100:400], data.astronaut()[::4, ::3],
              data.coffee()[:, 150:350]]
    return [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255 for a in arrays]


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("imscore_heads")
    bases = {family: write_base(root / f"base-{family}", family, tiny=True) for family in ("clip", "siglip", "dinov2")}
    return {name: write_head_repo(root / name, name, bases[VARIANTS[name].family], seed=i)
            for i, name in enumerate(CASES)}


def imscore_model(name: str, folder):
    """imscore's class for `name` from the repo folder. Its constructor loads the backbone from the base folder
    through transformers' own from_pretrained (which converts the hub's key names); its `from_pretrained` then
    loads the repo's tensors non-strictly, so the head's are checked here."""
    from imscore.aesthetic.model import CLIPAestheticScorer, Dinov2AestheticScorer, SiglipAestheticScorer
    from imscore.preference.model import CLIPPreferenceScorer, SiglipPreferenceScorer

    spec = VARIANTS[name]
    classes = {("clip", True): CLIPPreferenceScorer, ("siglip", True): SiglipPreferenceScorer,
               ("clip", False): CLIPAestheticScorer, ("siglip", False): SiglipAestheticScorer,
               ("dinov2", False): Dinov2AestheticScorer}
    with transformers_4_siglip_tower():
        model = classes[spec.family, spec.preference].from_pretrained(str(folder)).eval()
    own = model.state_dict()
    for key, value in load_file(str(folder / "model.safetensors")).items():
        if key.startswith("head."):
            assert torch.equal(own[key], value), key
    return model


@pytest.fixture(scope="module")
def parity(repos) -> dict:
    images, out = _images(), {}
    for name, folder in repos.items():
        official = imscore_model(name, folder)
        ours = rewards.load(name, checkpoint=folder)
        with torch.no_grad():
            ref = torch.cat([official.score(im, [p]).reshape(1) for im, p in zip(images, PROMPTS)]).double()
            got = torch.cat([ours(im, [p]) for im, p in zip(images, PROMPTS)]).double()
        out[name] = {"official": ref.numpy(), "ours": got.numpy(),
                     "mean_over_std": float((got - ref).abs().mean() / ref.std()), "std": float(ref.std())}
    print({k: (v["mean_over_std"], v["std"]) for k, v in out.items()})
    return out


@pytest.mark.parametrize("name", CASES)
def test_scores_match_imscore(parity, name):
    result = parity[name]
    assert result["std"] > 1e-3, f"random weights gave degenerate scores: {result}"
    assert result["mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, result


def test_every_imscore_head_is_registered():
    assert set(VARIANTS) <= set(rewards.available())
    assert len(VARIANTS) == 14
    for name, spec in VARIANTS.items():
        assert rewards.needs_prompt(name) == spec.preference


@pytest.mark.parametrize("name", ["pickscore-siglip", "imreward-overall_rating-clip", "ava-rating-dinov2-sampled-True"])
def test_gradient_matches_finite_differences(repos, name):
    """float64 (`score`, before the protocol's float32 output): the autograd pixel gradient against a central
    difference along a random direction."""
    reward = rewards.load(name, checkpoint=repos[name], dtype=torch.float64)
    grad = assert_gradient_matches_central_difference(reward, (70, 90), ["a cat"] if reward.needs_prompt else None)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_frozen_and_attributes(repos):
    reward = rewards.load("imreward-overall_rating-clip", checkpoint=repos["imreward-overall_rating-clip"])
    assert not reward.needs_prompt and reward.input_size == 224
    assert not any(p.requires_grad for p in reward.parameters())
    pref = rewards.load("pickscore-siglip", checkpoint=repos["pickscore-siglip"])
    assert pref.needs_prompt and pref.input_size == 64 and "logit_bias" in pref.scale_note


def test_transformers_5_key_layout_loads(repos, tmp_path):
    """imscore's hub files keep transformers 4's `vision_model.` level in the SigLIP image tower; a file saved under
    transformers 5 (no such level) loads to the same scores."""
    name = "imreward-fidelity_rating-siglip"
    state = load_file(str(repos[name] / "model.safetensors"))
    assert any(k.startswith("model.vision_model.") for k in state)
    state = {k.replace("model.vision_model.", "model.", 1): v for k, v in state.items()}
    folder = tmp_path / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((repos[name] / "config.json").read_text())
    x = _images()[2]
    with torch.no_grad():
        a = rewards.load(name, checkpoint=repos[name])(x)
        b = rewards.load(name, checkpoint=folder / "model.safetensors")(x)
    assert torch.equal(a, b)


def test_input_errors(repos):
    pref = rewards.load("pickscore-clip", checkpoint=repos["pickscore-clip"])
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(InputError, match="one prompt per image"):
        pref(x)
    with pytest.raises(InputError, match="2 prompts"):
        pref(x[:1], ["a", "b"])
    rating = rewards.load("ava-rating-dinov2-sampled-True", checkpoint=repos["ava-rating-dinov2-sampled-True"])
    with pytest.raises(InputError, match="divide by 255"):
        rating(x * 255)


def test_head_of_another_shape_is_named(repos, tmp_path):
    name = "imreward-overall_rating-clip"
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((repos[name] / "model.safetensors").read_bytes())
    config = json.loads((repos[name] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layers": 2}))
    with pytest.raises(CheckpointMismatchError, match="head"):
        rewards.load(name, checkpoint=folder)


def test_missing_files_say_where(repos, tmp_path):
    with pytest.raises(MissingFileError, match="model.safetensors"):
        rewards.load("pickscore-clip", checkpoint=tmp_path)
    with pytest.raises(MissingFileError, match="base file was not found.*config.json"):
        rewards.load("pickscore-clip", checkpoint=repos["pickscore-clip"], base=tmp_path)


def test_files_hold_the_hub_key_names(repos):
    """The DINOv2 file holds the names transformers writes (attention.attention.query), not the installed modules'
    (transformers 5: attention.q_proj); the reward fits them, as the parity test's scores show."""
    keys = load_file(str(repos["ava-rating-dinov2-sampled-True"] / "model.safetensors"))
    assert any(".attention.attention.query." in k for k in keys)


@pytest.mark.parametrize("size", [(224, 301), (384, 384), (97, 130), (600, 500)])
def test_matrix_resize_is_torchvision_bilinear(size):
    """The resize imscore's transform does (F.interpolate bilinear, antialiased), as matrix products, float64."""
    from rewards.preprocess import resize_bicubic

    x = torch.rand(2, 3, 300, 400, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(resize_bicubic(x, size, clamp=False, filter="bilinear"), ref, atol=1e-12, rtol=0)


def test_mixture_of_a_rating_and_a_preference_model(repos):
    """A mixture of imscore heads is a reward like any other: weighted sum, prompts passed, gradient to pixels."""
    names = ("imreward-overall_rating-clip", "pickscore-clip")
    mix = rewards.combine({names[0]: 2.0, names[1]: 0.5}, sources={n: {"checkpoint": repos[n]} for n in names})
    x = torch.rand(2, 3, 90, 120, requires_grad=True)
    prompts = ["a cat", "a dog"]
    total = mix(x, prompts)
    with torch.no_grad():
        parts = 2.0 * mix.part(names[0])(x) + 0.5 * mix.part(names[1])(x, prompts)
    assert mix.needs_prompt and torch.allclose(total, parts, atol=1e-5)
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
