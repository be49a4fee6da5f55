"""Tensor-only, differentiable image preprocessing that matches the official PIL pipelines.

PIL resizes 8-bit images with an antialiased bicubic filter (a = -0.5), one axis at a time,
and clips each pass to [0, 255]. `F.interpolate(..., antialias=True)` uses the same filter,
so running it one axis at a time in PIL's order and clamping after each pass reproduces PIL
up to PIL's 8-bit rounding, which a differentiable path cannot have.
"""

from __future__ import annotations

import PIL
import torch
import torch.nn.functional as F
from torch import nn

# Pillow >= 13 resizes height first when the height shrinks by more than twice the width does.
_PIL_HEIGHT_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
    """Resize [B,C,H,W] to size (h, w) like PIL's BICUBIC: antialiased, one axis at a time in PIL's order, clipped per pass."""
    h, w = size
    in_h, in_w = images.shape[-2:]
    height_first = _PIL_HEIGHT_FIRST_RULE and in_h - h > 0 and in_h - h > 2 * (in_w - w)
    axes = ("h", "w") if height_first else ("w", "h")
    x = images
    for axis in axes:
        target = (h, x.shape[-1]) if axis == "h" else (x.shape[-2], w)
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0) if clamp else x
    return x


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shortest side becomes `size`; the long side is truncated (torchvision, HF)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the longest side becomes `size`; both sides rounded (HPS's ResizeMaxSize)."""
    scale = size / max(height, width)
    return round(height * scale), round(width * scale)


def center_crop(images: torch.Tensor, size: int, offset: str = "round") -> torch.Tensor:
    """Crop the central size x size window; offset 'round' (torchvision) or 'floor' (Hugging Face)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop needs an image of at least {size}x{size}, got {h}x{w}")
    if offset == "round":
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    elif offset == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        raise ValueError(f"offset must be 'round' or 'floor', got {offset!r}")
    return images[..., top : top + size, left : left + size]


def pad_to_square(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Pad [B,C,h,w] to size x size with `fill`; left/top get half the padding, rounded down."""
    h, w = images.shape[-2:]
    pad_h, pad_w = size - h, size - w
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"cannot pad a {h}x{w} image to {size}x{size}")
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


class Normalize(nn.Module):
    """Channel-wise (x - mean) / std in float32; the constants are buffers, so they follow the reward's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.constants = (tuple(mean), tuple(std))
        self.register_buffer("mean", torch.empty(1, len(mean), 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, len(std), 1, 1), persistent=False)
        self.reset()

    def reset(self) -> None:
        """Fill the buffers from the constants (after `to_empty` on a model built on the meta device)."""
        with torch.no_grad():
            for buffer, values in zip((self.mean, self.std), self.constants):
                buffer.copy_(torch.tensor(values).view_as(buffer))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean.float()) / self.std.float()


def resize_shortest_then_crop(images: torch.Tensor, size: int, offset: str) -> torch.Tensor:
    """CLIP-style preprocessing geometry: shortest side to `size` (bicubic), then center crop."""
    h, w = images.shape[-2:]
    return center_crop(resize_bicubic(images, shortest_side_size(h, w, size)), size, offset)


def resize_longest_then_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPS-style geometry: longest side to `size` (bicubic, sizes rounded), then pad to a square."""
    h, w = images.shape[-2:]
    return pad_to_square(resize_bicubic(images, longest_side_size(h, w, size)), size, fill)
