"""Typical values of the weight-free rewards on skimage photographs: `python docs/lowlevel_values.py`.

Prints a markdown table (used in the symmetry and sharpness cards of docs/rewards.md): each photo as is,
mirror-symmetrised, blurred (Gaussian sigma 2 px) and with Gaussian noise (std 0.05), all at short side 512.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


def photo(name: str, short: int = 512) -> Image.Image:
    """An skimage photograph as RGB, resized so its short side is `short`."""
    array = getattr(data, name)()
    image = Image.fromarray(np.stack([array] * 3, -1) if array.ndim == 2 else array).convert("RGB")
    scale = short / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def variants(image: Image.Image) -> dict[str, np.ndarray]:
    """The photo, its mirror-symmetrised version, a blurred and a noisy version, as float HWC in [0, 1]."""
    x = np.asarray(image, dtype=np.float64) / 255.0
    half = x[:, : x.shape[1] // 2]
    noise = np.random.default_rng(0).normal(0.0, 0.05, x.shape)
    return {
        "original": x,
        "mirrored": np.concatenate([half, half[:, ::-1]], axis=1),
        "blur 2px": np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64) / 255.0,
        "noise 0.05": np.clip(x + noise, 0.0, 1.0),
    }


def main() -> None:
    """Score every photo variant with symmetry and sharpness and print a markdown table."""
    symmetry, sharpness = rewards.load("symmetry"), rewards.load("sharpness")
    print("| photo (short side 512) | variant | symmetry | sharpness |")
    print("|---|---|---|---|")
    for name in PHOTOS:
        image = photo(name)
        for variant, x in variants(image).items():
            t = torch.from_numpy(x).permute(2, 0, 1)[None].float()
            print(
                f"| {name} {image.width}x{image.height} | {variant} | "
                f"{symmetry(t).item():.4f} | {sharpness(t).item():.4f} |"
            )


if __name__ == "__main__":
    main()
