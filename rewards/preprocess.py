"""Tensor-only, differentiable image preprocessing that matches the official PIL pipelines.

PIL resizes 8-bit images with an antialiased bicubic filter (a = -0.5), one axis at a time,
and clips each pass to [0, 255]. Two paths reproduce it:

- the float path (`resize_bicubic`): PIL's filter weights in floating point (the filter of
  `F.interpolate(..., antialias=True)`), applied as one matrix product per axis in PIL's order and
  clamped after each pass; it differs from PIL only by PIL's rounding to 8 bits;
- the 8-bit path (`quantize_8bit`, `resize_pil_8bit`): the image is rounded to 8 bits and each pass
  uses PIL's fixed-point coefficients and its rounding, so the values equal PIL's; every rounding is
  straight-through, so the gradient is the float path's.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from torch import nn

# Pillow >= 13 resizes height first when the height shrinks by more than twice the width does.
_PIL_HEIGHT_FIRST_RULE = int(PIL.__version__.split(".")[0]) >= 13

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pil_pass_order(in_size: tuple[int, int], out_size: tuple[int, int]) -> tuple[str, str]:
    """The order of PIL's two resize passes, ("w", "h") or ("h", "w"), for the installed Pillow."""
    (in_h, in_w), (h, w) = in_size, out_size
    height_first = _PIL_HEIGHT_FIRST_RULE and in_h - h > 0 and in_h - h > 2 * (in_w - w)
    return ("h", "w") if height_first else ("w", "h")


def resize_bicubic(images: torch.Tensor, size: tuple[int, int], clamp: bool = True,
                   filter: str = "bicubic") -> torch.Tensor:
    """Resize [B,C,H,W] to size (h, w) like PIL's BICUBIC (or BILINEAR): antialiased, one axis at a time in PIL's
    order, clipped per pass."""
    h, w = size
    x = images
    for axis in pil_pass_order(tuple(images.shape[-2:]), size):
        target = h if axis == "h" else w
        if x.shape[-2 if axis == "h" else -1] != target:
            x = resample(x, axis, target, filter)
            x = x.clamp(0.0, 1.0) if clamp else x
    return x


def resample(x: torch.Tensor, axis: str, size: int, filter: str = "bicubic") -> torch.Tensor:
    """One antialiased pass along 'h' or 'w' as a product with PIL's float weights (the filter of
    F.interpolate(..., antialias=True)); forward and backward are matrix products, far faster on a GPU than
    interpolate's antialiased backward kernel."""
    n = x.shape[-1 if axis == "w" else -2]
    matrix = _float_matrix(n, size, filter, x.device, x.dtype)
    return x @ matrix.T if axis == "w" else (x.transpose(-1, -2) @ matrix.T).transpose(-1, -2)


@lru_cache(maxsize=64)
def _float_matrix(in_size: int, out_size: int, filter: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(pil_coefficients(in_size, out_size, filter)).to(device=device, dtype=dtype)


# -- PIL's 8-bit resampling -------------------------------------------------------------------------------
# Facts from Pillow's libImaging/Resample.c: the filters and their supports, the coefficient bounds, weights
# normalised to sum 1 and then stored in fixed point with 22 fraction bits (32 bits - 8 for the result - 2 for
# overflow) rounded half away from zero, sums started at half a unit (round half up), shifted right and
# clipped to [0, 255]; the intermediate image between the two passes is 8-bit.
PIL_PRECISION_BITS = 22
_PIL_ONE = float(1 << PIL_PRECISION_BITS)


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5) in PIL's operation order, so the doubles match Pillow's bit for bit."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _pil_bilinear(x: np.ndarray) -> np.ndarray:
    """PIL's bilinear (triangle) kernel."""
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


PIL_FILTERS = {"bicubic": (_pil_bicubic, 2.0), "bilinear": (_pil_bilinear, 1.0)}


def pil_coefficients(in_size: int, out_size: int, filter: str = "bicubic") -> np.ndarray:
    """PIL's normalised float weights [out_size, in_size] for resizing one axis from in_size to out_size."""
    if filter not in PIL_FILTERS:
        raise ValueError(f"unsupported PIL filter {filter!r}; use one of {', '.join(PIL_FILTERS)}")
    kernel, support = PIL_FILTERS[filter]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the kernel (antialiasing)
    support = support * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates
    stop = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    index = first[:, None] + np.arange(taps)
    valid = index < stop[:, None]
    weights = np.where(valid, kernel((index - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.cumsum(weights, axis=1)[:, -1:]  # summed left to right, as PIL does
    weights = np.divide(weights, total, out=weights, where=total != 0)
    matrix = np.zeros((out_size, in_size))
    rows = np.broadcast_to(np.arange(out_size)[:, None], index.shape)
    matrix[rows[valid], index[valid]] = weights[valid]
    return matrix


def pil_fixed_point(weights: np.ndarray) -> np.ndarray:
    """PIL's 8-bit coefficients: weights * 2**22 rounded half away from zero (integers, as float64)."""
    scaled = weights * _PIL_ONE
    return np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled))


@lru_cache(maxsize=64)
def _pil_matrix(in_size: int, out_size: int, filter: str, device: torch.device) -> torch.Tensor:
    """PIL's fixed-point weights [out, in] (integers / 2**22) in float64 on `device`.

    Levels times them sum exactly in float64 (integers below 2**40, scaled by a power of two), as in Pillow's int32.
    """
    weights = pil_fixed_point(pil_coefficients(in_size, out_size, filter)) / _PIL_ONE
    return torch.from_numpy(weights).to(device)


class _Quantize(torch.autograd.Function):
    """Forward: 8-bit levels round(clamp(x, 0, 1) * 255) in float64; backward: that of 255 * x (straight-through)."""

    @staticmethod
    def forward(ctx, images: torch.Tensor) -> torch.Tensor:
        ctx.dtype = images.dtype
        # as tuner.logging.to_pil saves images; clamp(x * 255, 0, 255) == clamp(x, 0, 1) * 255 in float32
        return images.float().mul(255.0).clamp_(0.0, 255.0).round_().double()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return (grad * 255.0).to(ctx.dtype)


class _RoundAndClip(torch.autograd.Function):
    """Forward: clip(floor(v + 0.5), 0, 255), PIL's 8-bit result of a fixed-point sum v; backward: that of
    clamp(v, 0, 255), the float path's per-pass clip (the rounding is straight-through)."""

    @staticmethod
    def forward(ctx, sums: torch.Tensor) -> torch.Tensor:
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((sums >= 0.0) & (sums <= 255.0))
        return sums.add(0.5).floor_().clamp_(0.0, 255.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round images in [0, 1] to the 8-bit grid (k / 255, float32) as saving them would; straight-through gradient."""
    return _Quantize.apply(images).float() / 255.0


def _pil_pass(levels: torch.Tensor, axis: str, size: int, filter: str) -> torch.Tensor:
    """One 8-bit PIL pass along axis 'h' or 'w' over float64 levels: exact fixed-point sums, rounded, clipped."""
    n = levels.shape[-1 if axis == "w" else -2]
    if n == size:
        return levels
    matrix = _pil_matrix(n, size, filter, levels.device)
    sums = levels @ matrix.T if axis == "w" else (levels.transpose(-1, -2) @ matrix.T).transpose(-1, -2)
    return _RoundAndClip.apply(sums)


def resize_pil_8bit(images: torch.Tensor, size: tuple[int, int], filter: str = "bicubic") -> torch.Tensor:
    """Resize [B,C,H,W] in [0,1] to (h, w) exactly as PIL resizes its 8-bit version; float32 on the 8-bit grid.

    The gradient is the float path's (`resize_bicubic`): roundings are straight-through, clips are clamps.
    """
    levels = _Quantize.apply(images)
    for axis in pil_pass_order(tuple(images.shape[-2:]), size):
        levels = _pil_pass(levels, axis, size[0] if axis == "h" else size[1], filter)
    return levels.float() / 255.0


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the shortest side becomes `size`; the long side is truncated (torchvision, HF)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) when the longest side becomes `size`; both sides rounded (HPS's ResizeMaxSize)."""
    scale = size / max(height, width)
    return round(height * scale), round(width * scale)


def center_crop(images: torch.Tensor, size: int | tuple[int, int], offset: str = "round") -> torch.Tensor:
    """Crop the central size x size (or (height, width)) window; offset 'round' (torchvision) or 'floor' (Hugging
    Face)."""
    h, w = images.shape[-2:]
    ch, cw = (size, size) if isinstance(size, int) else size
    if h < ch or w < cw:
        raise ValueError(f"center_crop needs an image of at least {ch}x{cw}, got {h}x{w}")
    if offset == "round":
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    elif offset == "floor":
        top, left = (h - ch) // 2, (w - cw) // 2
    else:
        raise ValueError(f"offset must be 'round' or 'floor', got {offset!r}")
    return images[..., top : top + ch, left : left + cw]


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


def resize_shortest_then_crop(images: torch.Tensor, size: int, offset: str, pil_8bit: bool = False) -> torch.Tensor:
    """CLIP-style preprocessing geometry: shortest side to `size` (bicubic), then center crop.

    With `pil_8bit`, the image is rounded to 8 bits and resized with PIL's 8-bit arithmetic (`resize_pil_8bit`).
    """
    h, w = images.shape[-2:]
    resize = resize_pil_8bit if pil_8bit else resize_bicubic
    return center_crop(resize(images, shortest_side_size(h, w, size)), size, offset)


def resize_longest_then_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPS-style geometry: longest side to `size` (bicubic, sizes rounded), then pad to a square."""
    h, w = images.shape[-2:]
    return pad_to_square(resize_bicubic(images, longest_side_size(h, w, size)), size, fill)
