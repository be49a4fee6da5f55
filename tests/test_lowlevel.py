"""Weight-free rewards: symmetry and sharpness against numpy/scipy computations of their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage import data

import rewards

LAPLACIAN = np.array([[1, 1, 1], [1, -8, 1], [1, 1, 1]], dtype=np.float64) / 16.0
BT601 = np.array([0.299, 0.587, 0.114])


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 [1,3,H,W] in [0,1]."""
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 255.0


def symmetry_oracle(image: np.ndarray) -> float:
    """1 - mean |x - mirror(x)| of a float HWC image."""
    return float(1.0 - np.abs(image - image[:, ::-1]).mean())


def sharpness_oracle(image: np.ndarray) -> float:
    """2 * RMS of the 3x3 Laplacian / 16 of the BT.601 luminance, mirrored borders (no resize: short side 256)."""
    gray = image @ BT601
    return float(2.0 * np.sqrt(np.mean(ndimage.convolve(gray, LAPLACIAN, mode="mirror") ** 2)))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The astronaut at 256x320 (short side 256, so sharpness measures it without resizing)."""
    return np.asarray(Image.fromarray(data.astronaut()).resize((320, 256), Image.BICUBIC))


@pytest.fixture(scope="module")
def symmetry():
    return rewards.load("symmetry")


@pytest.fixture(scope="module")
def sharpness():
    return rewards.load("sharpness")


# -- symmetry -----------------------------------------------------------------------------------------
def test_symmetry_is_one_for_a_mirror_symmetric_image(symmetry, photo):
    half = photo[:, :160]
    mirrored = np.concatenate([half, half[:, ::-1]], axis=1)
    assert symmetry(to_tensor(mirrored)).item() == pytest.approx(1.0, abs=1e-6)


def test_symmetry_falls_monotonically_with_asymmetry(symmetry, photo):
    """x(t) = t*p + (1-t)*mirror(p): symmetric at t=1/2, its asymmetry grows linearly with |2t - 1|."""
    p = photo.astype(np.float64) / 255.0
    ts = np.linspace(0.5, 1.0, 6)
    blends = np.stack([t * p + (1 - t) * p[:, ::-1] for t in ts])
    scores = symmetry(torch.from_numpy(blends).permute(0, 3, 1, 2).float()).numpy()
    oracle = np.array([symmetry_oracle(b) for b in blends])
    np.testing.assert_allclose(scores, oracle, atol=1e-6)
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(scores) < 0)
    np.testing.assert_allclose(1 - scores, (1 - scores[-1]) * np.abs(2 * ts - 1), atol=1e-6)  # linear in |2t-1|


def test_symmetry_bounds(symmetry):
    left = torch.zeros(1, 3, 4, 6)
    left[..., :3] = 1.0  # every pixel is the opposite extreme of its mirror pixel
    assert symmetry(left).item() == pytest.approx(0.0, abs=1e-7)
    noise = torch.rand(8, 3, 17, 23)
    scores = symmetry(noise)
    assert ((scores >= 0) & (scores <= 1)).all()


# -- sharpness ----------------------------------------------------------------------------------------
def test_sharpness_matches_the_formula(sharpness, photo):
    noisy = np.clip(photo / 255.0 + np.random.default_rng(0).normal(0, 0.05, photo.shape), 0, 1)
    images = np.stack([photo / 255.0, noisy])
    ours = sharpness(torch.from_numpy(images).permute(0, 3, 1, 2).float()).numpy()
    np.testing.assert_allclose(ours, [sharpness_oracle(i) for i in images], rtol=1e-4)


def test_sharpness_falls_with_blur_and_rises_with_noise(sharpness, photo):
    p = photo / 255.0
    blurred = [ndimage.gaussian_filter(p, sigma=(s, s, 0)) for s in (0.5, 1.0, 2.0, 4.0)]
    noisy = np.clip(p + np.random.default_rng(1).normal(0, 0.05, p.shape), 0, 1)
    batch = torch.from_numpy(np.stack([noisy, p, *blurred])).permute(0, 3, 1, 2).float()
    scores = sharpness(batch).numpy()
    assert np.all(np.diff(scores) < 0), scores  # noise > original > sigma 0.5 > 1 > 2 > 4


@pytest.mark.parametrize("short", [512, 1024])
def test_sharpness_is_comparable_across_sizes(sharpness, short):
    base = Image.fromarray(data.astronaut())  # 512 x 512
    reference = sharpness(to_tensor(np.asarray(base.resize((256, 256), Image.BICUBIC)))).item()
    other = sharpness(to_tensor(np.asarray(base.resize((short, short), Image.BICUBIC)))).item()
    assert other == pytest.approx(reference, rel=0.03)


def test_sharpness_bounds(sharpness):
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert sharpness(flat).item() < 1e-5
    dot = torch.zeros(1, 3, 256, 256)
    dot[..., ::2, ::2] = 1.0  # isolated bright pixels: about the largest Laplacian energy an image can have
    extremes = sharpness(torch.cat([dot, torch.rand(3, 3, 256, 256)]))
    assert ((extremes > 0) & (extremes <= 1)).all()
    assert extremes[0] == pytest.approx(sharpness_oracle(dot[0].permute(1, 2, 0).double().numpy()), rel=1e-5)


def test_sharpness_size_option():
    small = rewards.load("sharpness", size=128)
    assert small.input_size == 128
    image = torch.rand(1, 3, 128, 192)
    oracle = sharpness_oracle(image[0].permute(1, 2, 0).double().numpy())
    assert small(image).item() == pytest.approx(oracle, rel=1e-4)


# -- gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["symmetry", "sharpness"])
def test_gradients_are_finite_and_non_zero(name, photo):
    reward = rewards.load(name)
    x = to_tensor(photo).repeat(2, 1, 1, 1)
    x[1] = x[1].flip(-2)
    x.requires_grad_(True)
    reward(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()


def test_sharpness_gradient_of_a_flat_image_is_finite(sharpness):
    x = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)
    sharpness(x).sum().backward()
    assert torch.isfinite(x.grad).all()
