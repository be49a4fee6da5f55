"""Differentiable preprocessing against the libraries the official pipelines use (PIL, torchvision, HF, hpsv2)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from skimage import data
from transformers.image_transforms import center_crop as hf_center_crop
from transformers.image_transforms import get_resize_output_image_size

from rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    longest_side_size,
    Normalize,
    pad_to_square,
    resize_bicubic,
    resize_longest_then_pad,
    resize_shortest_then_crop,
    shortest_side_size,
)

SIZES = [(1, 1), (1, 7), (5, 3), (50, 77), (77, 50), (224, 224), (223, 225), (99, 301), (301, 99), (333, 500),
         (500, 333), (640, 480), (480, 640), (769, 1024), (1024, 769), (1080, 1920), (1999, 13), (13, 1999)]
SIZES += [tuple(int(v) for v in np.random.default_rng(0).integers(1, 2100, 2)) for _ in range(60)]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float64 [1,3,H,W] in [0,1]."""
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].double() / 255.0


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((160, 120)))  # small, non-square, real content


@pytest.fixture(scope="module")
def hps_resize_max_size():
    """hpsv2's ResizeMaxSize, imported from its file alone (the hpsv2 package imports network tools at import time)."""
    root = Path(importlib.util.find_spec("hpsv2").submodule_search_locations[0]) / "src" / "open_clip"
    package = types.ModuleType("_hpsv2_open_clip")
    package.__path__ = [str(root)]
    sys.modules.setdefault("_hpsv2_open_clip", package)
    return importlib.import_module("_hpsv2_open_clip.transform").ResizeMaxSize


# -- resize ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(60, 80), (37, 53), (240, 320), (90, 400), (200, 61)])
def test_resize_matches_pil_float_images(photo, size):
    x = to_tensor(photo)
    ours = resize_bicubic(x, size, clamp=False)
    for c in range(3):
        channel = Image.fromarray(photo[..., c].astype(np.float32) / 255.0, mode="F")
        pil = np.asarray(channel.resize(size[::-1], Image.BICUBIC), dtype=np.float64)
        np.testing.assert_allclose(ours[0, c].numpy(), pil, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(60, 80), (37, 53), (240, 320), (300, 100), (200, 61)])
def test_resize_matches_pil_8bit_rgb(photo, size):
    pil = np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BICUBIC), dtype=np.float64)
    ours = resize_bicubic(to_tensor(photo), size)[0].permute(1, 2, 0).numpy() * 255.0
    error = np.abs(ours - pil)
    assert error.max() <= 1.6  # PIL rounds to 8 bits after each pass; we do not
    assert error.mean() < 0.35


@pytest.mark.parametrize("size", [(90, 400), (40, 150)])
def test_resize_pass_order_matches_pillow_when_height_shrinks_most(photo, size):
    """CORE BUG (rewards/preprocess.py, resize_bicubic): Pillow >= 13 runs the VERTICAL pass first when
    (in_h - out_h) > 0 and (in_h - out_h) > 2 * (in_w - out_w) (Pillow PR #9549, Resample.c); resize_bicubic
    always goes width first, so its per-pass clipping differs from PIL there (errors up to ~6/255 on photos)."""
    pil = np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BICUBIC), dtype=np.float64)
    ours = resize_bicubic(to_tensor(photo), size)[0].permute(1, 2, 0).numpy() * 255.0
    error = np.abs(ours - pil).max()
    assert error <= 1.6, f"max |ours - PIL| = {error:.2f} / 255 (PIL {PIL.__version__})"


def test_clamping_per_pass_matches_pil_on_hard_edges():
    """On a checkerboard bicubic overshoots: PIL clips after each pass, and so must we."""
    board = (np.indices((40, 40)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    rgb = np.stack([board, 255 - board, board], -1)
    pil = np.asarray(Image.fromarray(rgb).resize((23, 17), Image.BICUBIC), dtype=np.float64)
    clamped = resize_bicubic(to_tensor(rgb), (17, 23))[0].permute(1, 2, 0).numpy() * 255
    unclamped = resize_bicubic(to_tensor(rgb), (17, 23), clamp=False)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(clamped - pil).max() <= 1.6
    assert np.abs(unclamped - pil).max() > 5  # the check above can fail: clamping makes the difference


# -- size rules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [224, 256])
def test_shortest_side_size_matches_torchvision_and_hf(target):
    for h, w in SIZES:
        tv = TF.resize(Image.new("L", (w, h)), target, interpolation=T.InterpolationMode.NEAREST).size[::-1]
        hf = get_resize_output_image_size(
            np.empty((h, w, 3), np.uint8), target, default_to_square=False, input_data_format="channels_last"
        )
        assert shortest_side_size(h, w, target) == tuple(tv) == tuple(hf), (h, w)


def test_longest_side_size_and_padding_match_hps(hps_resize_max_size):
    """A white image through HPS's ResizeMaxSize shows where the content lands; ours must put it in the same box."""
    transform = hps_resize_max_size(224)
    for h, w in SIZES[:30]:
        official = np.asarray(transform(Image.new("RGB", (w, h), (255, 255, 255))))[..., 0] > 0
        if max(h, w) == 224:  # ResizeMaxSize returns the image untouched when no resize is needed
            assert official.shape == (h, w)
            continue
        assert longest_side_size(h, w, 224) == (official.any(1).sum(), official.any(0).sum()), (h, w)
        ours = resize_longest_then_pad(torch.ones(1, 1, h, w), 224)[0, 0].numpy() > 0.5
        np.testing.assert_array_equal(ours, official, err_msg=str((h, w)))


def test_pad_to_square_matches_torchvision_pad():
    """torchvision's center_crop pads a too-small image with zeros, floor(d/2) before and the rest after, like HPS."""
    x = torch.rand(2, 3, 5, 8)
    for size in (8, 9, 12, 13):
        torch.testing.assert_close(pad_to_square(x, size), TF.center_crop(x, [size, size]))
        filled = pad_to_square(x, size, fill=0.25)
        torch.testing.assert_close(filled, TF.center_crop(x - 0.25, [size, size]) + 0.25)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_to_square(x, 7)


# -- crops ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h, w, size", [(225, 300, 224), (227, 227, 224), (224, 231, 224), (9, 12, 4), (10, 7, 3)])
def test_center_crop_offsets_match_torchvision_and_hf(h, w, size):
    x = torch.arange(3 * h * w, dtype=torch.float64).reshape(1, 3, h, w)
    torch.testing.assert_close(center_crop(x, size, offset="round"), TF.center_crop(x, [size, size]))
    hf = hf_center_crop(x[0].numpy(), (size, size), input_data_format="channels_first")
    torch.testing.assert_close(center_crop(x, size, offset="floor")[0], torch.from_numpy(np.ascontiguousarray(hf)))


def test_center_crop_rejects_small_images_and_bad_offsets():
    with pytest.raises(ValueError, match="at least 224x224"):
        center_crop(torch.rand(1, 3, 100, 300), 224)
    with pytest.raises(ValueError, match="'round' or 'floor'"):
        center_crop(torch.rand(1, 3, 300, 300), 224, offset="ceil")


def test_resize_shortest_then_crop_matches_pil_then_torchvision(photo):
    pil = TF.center_crop(TF.resize(Image.fromarray(photo), 64, interpolation=T.InterpolationMode.BICUBIC), 64)
    ours = resize_shortest_then_crop(to_tensor(photo), 64, offset="round")[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(ours - np.asarray(pil, dtype=np.float64)).max() <= 1.6


def test_normalize_matches_torchvision():
    x = torch.rand(2, 3, 7, 9)
    expected = T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(x)
    torch.testing.assert_close(Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(x), expected)
    torch.testing.assert_close(Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(x.double()), expected)  # float32 out


def test_normalize_constants_survive_meta_build():
    with torch.device("meta"):
        norm = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    norm.to_empty(device="cpu")
    norm.reset()
    assert norm.mean.flatten().tolist() == list(torch.tensor(OPENAI_CLIP_MEAN).tolist())
    assert norm.std.flatten().tolist() == list(torch.tensor(OPENAI_CLIP_STD).tolist())


# -- gradients ---------------------------------------------------------------------------------------------
def test_resize_gradient_is_exact():
    x = torch.rand(1, 1, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize_bicubic(t, (5, 11), clamp=False), (x,))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: resize_shortest_then_crop(x, 16, offset="floor"),
        lambda x: resize_longest_then_pad(x, 16),
        lambda x: Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(resize_bicubic(x, (20, 12))),
    ],
)
def test_pipelines_pass_gradients_to_pixels(fn):
    x = (torch.rand(2, 3, 30, 41) * 0.8 + 0.1).requires_grad_(True)
    fn(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
