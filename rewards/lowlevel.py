"""Weight-free low-level rewards built on kornia: left-right symmetry and sharpness, both in [0, 1].

symmetry(x)  = 1 - mean_{c,h,w} |x - hflip(x)|
    1 for an image equal to its mirror image, falling linearly with the mean absolute left-right
    difference; 0 only if every pixel is the opposite extreme of its mirror pixel.

sharpness(x) = 2 * sqrt(mean_{h,w} L(g)^2),  g = gray(resize_shortest(x, size)),  L = kornia 3x3 Laplacian / 16
    The RMS of the normalised Laplacian of the luminance, divided by its largest possible value (1/2),
    so it lies in [0, 1]. Resizing to a fixed shortest side first makes scores of one scene comparable
    across image sizes (a Laplacian per pixel otherwise shrinks as resolution grows).
"""

from __future__ import annotations

import kornia
import torch

from .base import Reward
from .preprocess import resize_bicubic, shortest_side_size


def symmetry_score(images: torch.Tensor) -> torch.Tensor:
    """1 - mean |x - hflip(x)| per image; images [B,3,H,W] in [0,1]."""
    return 1.0 - (images - kornia.geometry.transform.hflip(images)).abs().mean(dim=(1, 2, 3))


def sharpness_score(images: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Normalised RMS Laplacian of the luminance at shortest side `size`, in [0, 1]."""
    h, w = images.shape[-2:]
    gray = kornia.color.rgb_to_grayscale(resize_bicubic(images, shortest_side_size(h, w, size)))
    lap = kornia.filters.laplacian(gray, kernel_size=3, border_type="reflect", normalized=True)
    return 2.0 * lap.pow(2).mean(dim=(1, 2, 3)).add(1e-12).sqrt()


class Symmetry(Reward):
    """Left-right mirror symmetry of the image (see module docstring for the formula)."""

    name = "symmetry"
    scale_note = "in [0, 1]; 1 = mirror-symmetric (project-defined, no official implementation)"

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return symmetry_score(images.float())


class Sharpness(Reward):
    """High-frequency detail measured by the Laplacian (see module docstring for the formula)."""

    name = "sharpness"
    scale_note = "in [0, 1]; normalised RMS Laplacian at shortest side 256 (project-defined)"

    def __init__(self, size: int = 256) -> None:
        super().__init__()
        self.size = size
        self.input_size = size

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return sharpness_score(images.float(), self.size)


def load_symmetry(*, device: torch.device, dtype: torch.dtype) -> Symmetry:
    """Build the symmetry reward (no files)."""
    return Symmetry().to(device)


def load_sharpness(*, device: torch.device, dtype: torch.dtype, size: int = 256) -> Sharpness:
    """Build the sharpness reward (no files); `size` is the shortest side it measures at."""
    return Sharpness(size).to(device)
