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
    pil_coefficients,
    pil_fixed_point,
    pil_pass_order,
    quantize_8bit,
    resize_bicubic,
    resize_longest_then_pad,
    resize_pil_8bit,
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


# -- the 8-bit path: PIL's own arithmetic -------------------------------------------------------------------
def _photographs() -> list[np.ndarray]:
    """Four real photographs, uint8 HxWx3: 512x512, 400x600, 300x451, 427x640."""
    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def _cases() -> list[tuple[np.ndarray, tuple[int, int]]]:
    """(uint8 photo crop, output (h, w)): the rewards' shortest-side resizes, down- and up-scaling, odd sizes,
    extreme aspect ratios, passes of one axis only, the height-first rule, plus random crops and sizes."""
    photos = _photographs()
    astronaut, coffee, chelsea, rocket = photos
    cases = [(p, shortest_side_size(*p.shape[:2], 224)) for p in photos]
    cases += [
        (astronaut[:301, :299], (97, 131)),  # odd sizes, both axes shrink
        (coffee[:120, :160], (224, 298)),  # upscaling
        (chelsea[:31, :17], (224, 123)),  # strong upscaling
        (rocket[:1, :1], (5, 7)),
        (astronaut[:, :7], (300, 5)),  # tall strip, height grows, width shrinks
        (coffee[:3, :], (224, 900)),  # wide strip, 3 rows to 224
        (chelsea[:, :2], (224, 1)),  # extreme aspect ratio, down to one column
        (rocket[:4, :], (9, 1000)),
        (astronaut[:, :100], (60, 90)),  # height shrinks > 2x the width: Pillow >= 13 goes height first
        (coffee[:, 200:260], (41, 60)),  # height-only pass
        (chelsea[:150, :], (150, 77)),  # width-only pass
        (astronaut[:224, :224], (224, 224)),  # no pass at all
    ]
    rng = np.random.default_rng(0)
    for i in range(24):
        photo = photos[i % 4]
        h, w = (int(rng.integers(1, s + 1)) for s in photo.shape[:2])
        cases.append((photo[:h, :w], (int(rng.integers(1, 500)), int(rng.integers(1, 500)))))
    return cases


def _pil_resize(photo: np.ndarray, size: tuple[int, int], filter: str) -> np.ndarray:
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[filter]
    return np.asarray(Image.fromarray(np.ascontiguousarray(photo)).resize(size[::-1], resample)).astype(np.int64)


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    """[1,3,h,w] float32 on the 8-bit grid -> int64 HxWx3 levels (asserting it is on the grid)."""
    levels = images[0].permute(1, 2, 0).double() * 255.0
    assert images.dtype == torch.float32 and (levels - levels.round()).abs().max() < 1e-4, "off the 8-bit grid"
    return levels.round().long().numpy()


def _equality_with_pil(filter: str, resize=resize_pil_8bit) -> tuple[int, int, int]:
    """(values equal to PIL's, values compared, largest difference in levels) over all cases."""
    equal = total = worst = 0
    for photo, size in _cases():
        ours = _as_uint8(resize(to_tensor(photo).float(), size, filter))
        diff = np.abs(ours - _pil_resize(photo, size, filter))
        equal, total, worst = equal + int((diff == 0).sum()), total + diff.size, max(worst, int(diff.max()))
    return equal, total, worst


@pytest.mark.parametrize("filter", ["bicubic", "bilinear"])
def test_resize_pil_8bit_equals_pil(filter):
    equal, total, worst = _equality_with_pil(filter)
    print(f"\n{filter}: {equal}/{total} values equal to PIL's ({equal / total:.6%}), largest difference {worst}")
    assert equal / total >= 0.999 and worst <= 1, (equal, total, worst)


def test_resize_pil_8bit_needs_pils_pass_order(monkeypatch):
    """The equality test can fail: with the other pass order, the height-first case differs from PIL."""
    import rewards.preprocess as pp

    photo, size = _photographs()[0][:, :100], (60, 90)
    assert pp.pil_pass_order(photo.shape[:2], size) == (("h", "w") if pp._PIL_HEIGHT_FIRST_RULE else ("w", "h"))
    pil = _pil_resize(photo, size, "bicubic")
    assert np.array_equal(_as_uint8(resize_pil_8bit(to_tensor(photo), size)), pil)
    flipped = pp.pil_pass_order(photo.shape[:2], size)[::-1]
    monkeypatch.setattr(pp, "pil_pass_order", lambda *_: flipped)
    assert not np.array_equal(_as_uint8(resize_pil_8bit(to_tensor(photo), size)), pil)


def test_resize_pil_8bit_clips_between_passes_like_pil():
    """A checkerboard overshoots in both passes: PIL clips and rounds the intermediate 8-bit image."""
    board = (np.indices((40, 40)).sum(0) // 4 % 2 * 255).astype(np.uint8)
    rgb = np.stack([board, 255 - board, board], -1)
    for size in [(17, 23), (23, 17), (90, 70)]:
        ours = _as_uint8(resize_pil_8bit(to_tensor(rgb), size))
        np.testing.assert_array_equal(ours, _pil_resize(rgb, size, "bicubic"), err_msg=str(size))


def test_pil_fixed_point_coefficients_are_exact_sums():
    """Per output pixel PIL's 22-bit weights sum to 2**22 up to their rounding, and stay within the kernel's support."""
    for n_in, n_out in [(512, 224), (17, 224), (451, 336), (7, 5), (1, 9)]:
        weights = pil_coefficients(n_in, n_out)
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-12)
        fixed = pil_fixed_point(weights)
        assert np.array_equal(fixed, np.round(fixed)) and np.abs(fixed).max() < 2**24
        assert np.abs(fixed.sum(1) - 2**22).max() <= (weights != 0).sum(1).max()
        support = 2.0 * max(n_in / n_out, 1.0)
        rows, cols = np.nonzero(weights)
        assert (np.abs(cols + 0.5 - (rows + 0.5) * n_in / n_out) <= support + 1).all()
    with pytest.raises(ValueError, match="bicubic, bilinear"):
        pil_coefficients(10, 5, "lanczos")


def test_shortest_side_pipelines_equal_official_pil_pipelines():
    """PIL image -> torchvision Resize + CenterCrop (aesthetic, ImageReward) and the Hugging Face PIL CLIP processor
    (PickScore, floored offsets): the 8-bit pipeline gives the same uint8 crops."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                               do_rescale=False, do_normalize=False)
    tv = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    for photo in _photographs() + [_photographs()[3][:301, :401], _photographs()[1][:150, :100]]:
        x = to_tensor(photo)
        official_tv = np.asarray(tv(Image.fromarray(photo))).astype(np.int64)
        np.testing.assert_array_equal(_as_uint8(resize_shortest_then_crop(x, 224, "round", pil_8bit=True)), official_tv)
        official_hf = hf(images=Image.fromarray(photo), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours_hf = _as_uint8(resize_shortest_then_crop(x, 224, "floor", pil_8bit=True))
        np.testing.assert_array_equal(ours_hf, np.asarray(official_hf).astype(np.int64))


def test_quantize_8bit_rounds_like_saving_an_image():
    """Float images become what tuner.logging.to_pil saves: clamp, x 255, round half to even; grid values stay."""
    from tuner.logging import to_pil

    levels = torch.arange(600.0).reshape(20, 30)
    x = torch.stack([
        torch.rand(20, 30) * 1.04 - 0.02,  # random, a little outside [0, 1] as decoders give
        levels % 256 / 255,  # every 8-bit value
        (levels % 255 + 0.5) / 255,  # half-way between two levels
    ])
    assert np.array_equal(_as_uint8(quantize_8bit(x[None])), np.asarray(to_pil(x)).astype(np.int64))
    grid = (torch.arange(256.0).reshape(16, 16) / 255).expand(1, 3, 16, 16)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        rounded = _as_uint8(quantize_8bit(grid.to(dtype)))  # float32, on the grid
        if dtype != torch.bfloat16:  # bfloat16 cannot hold k / 255 for most k
            assert np.array_equal(rounded[..., 0], np.arange(256).reshape(16, 16))


def test_8bit_gradients_are_the_float_paths():
    """Straight-through rounding: the backward is the float path's (resize_bicubic, clamped per pass), finite."""
    x = torch.rand(2, 3, 37, 53) * 0.8 + 0.1
    for size in [(20, 31), (64, 90), (50, 23), (37, 53)]:
        weights = torch.randn(2, 3, *size)
        ours = x.clone().requires_grad_(True)
        (resize_pil_8bit(ours, size) * weights).sum().backward()
        ref = x.clone().requires_grad_(True)
        (resize_bicubic(ref, size) * weights).sum().backward()
        assert torch.isfinite(ours.grad).all() and ours.grad.dtype == torch.float32
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5 * ref.grad.abs().max().item(), rtol=0)
    ramp = torch.linspace(-0.02, 1.02, 48, dtype=torch.float64).expand(1, 3, 5, 48).clone().requires_grad_(True)
    quantize_8bit(ramp).sum().backward()
    torch.testing.assert_close(ramp.grad, torch.ones_like(ramp))  # straight through, also where it clamps


def test_8bit_pipeline_gradients_reach_pixels():
    x = (torch.rand(2, 3, 30, 41) * 0.8 + 0.1).requires_grad_(True)
    pixels = resize_shortest_then_crop(x, 16, "floor", pil_8bit=True)
    Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(pixels).square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


@pytest.mark.parametrize("filter", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size, out", [((1024, 1024), (224, 224)), ((97, 131), (224, 301)), ((300, 50), (64, 11))])
def test_float_resize_as_matrix_products_equals_torch_antialiased_interpolate(size, out, filter):
    """The float path's per-axis matrix products are F.interpolate's antialiased filter (float64, one axis at a time)."""
    x = torch.rand(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = resize_bicubic(x, out, clamp=False, filter=filter)
    want = x
    for axis in pil_pass_order(size, out):
        target = (out[0], want.shape[-1]) if axis == "h" else (want.shape[-2], out[1])
        want = torch.nn.functional.interpolate(want, size=target, mode=filter, antialias=True, align_corners=False)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
