"""Tensor-only, differentiable image preprocessing that matches the official PIL pipelines.

PIL resizes 8-bit images with an antialiased bicubic filter (a = -0.5), horizontal pass
first, and clips each pass to [0, 255]. `F.interpolate(..., antialias=True)` uses the same
filter, so running it one axis at a time and clamping after each pass reproduces PIL up to
PIL's 8-bit rounding, which a differentiable path cannot have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], clamp: bool = True) -> torch.Tensor:
    """Resize [B,C,H,W] to size (h, w) like PIL's BICUBIC: antialiased, width first, clipped per pass."""
    h, w = size
    x = images
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0) if clamp else x
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
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


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Channel-wise (x - mean) / std."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def resize_shortest_then_crop(images: torch.Tensor, size: int, offset: str) -> torch.Tensor:
    """CLIP-style preprocessing geometry: shortest side to `size` (bicubic), then center crop."""
    h, w = images.shape[-2:]
    return center_crop(resize_bicubic(images, shortest_side_size(h, w, size)), size, offset)


def resize_longest_then_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPS-style geometry: longest side to `size` (bicubic, sizes rounded), then pad to a square."""
    h, w = images.shape[-2:]
    return pad_to_square(resize_bicubic(images, longest_side_size(h, w, size)), size, fill)
