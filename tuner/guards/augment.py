"""Differentiable augmentations of the decoded images before the reward (kornia), from the guard's own generator.

A reward that sees each image through a random crop, flip, shift and a little noise is harder to exploit with
pixel-exact patterns (stripes, a colour field tuned to one crop). Every parameter is drawn from `Augment.generator`
(seeded by guards.augment_seed and saved in checkpoints with the run's other generators), image by image in this
order: crop (height, top, left), flip (one draw in [0, 1): < 0.5 flips), shift (dy, dx), noise (a [3, H, W] normal
tensor), so a batch and the same images one at a time (low-memory mode) see the same augmentations. Crops and shifts
are whole pixels; a crop keeps the aspect ratio and is resized back bilinearly, a shift repeats the border.
"""
from __future__ import annotations

import math

import torch
from kornia.geometry.transform import crop_and_resize, hflip, translate

OPS = ("crop", "flip", "shift", "noise")


class Augment:
    """A seeded, differentiable augmentation of images [B,3,H,W] in [0,1] (the ops named, applied in OPS order)."""

    def __init__(self, ops: list[str], *, crop: float = 0.8, shift: float = 0.1, noise: float = 0.03, seed: int = 0):
        unknown = sorted(set(ops) - set(OPS))
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; choose from {', '.join(OPS)}")
        self.ops, self.crop, self.shift, self.noise = set(ops), crop, shift, noise
        self.generator = torch.Generator().manual_seed(seed)

    def _int(self, low: int, high: int) -> int:
        """An integer in [low, high], inclusive."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def draw(self, height: int, width: int) -> dict:
        """One image's parameters, drawn in the documented order."""
        p = {}
        if "crop" in self.ops:
            h = self._int(math.ceil(self.crop * height), height)
            w = max(1, round(h * width / height))
            p["crop"] = (h, w, self._int(0, height - h), self._int(0, width - w))
        if "flip" in self.ops:
            p["flip"] = float(torch.rand((), generator=self.generator)) < 0.5
        if "shift" in self.ops:
            m = round(self.shift * min(height, width))
            p["shift"] = (self._int(-m, m), self._int(-m, m))
        if "noise" in self.ops:
            p["noise"] = self.noise * torch.randn(3, height, width, generator=self.generator, dtype=torch.float64)
        return p

    def apply(self, image: torch.Tensor, p: dict) -> torch.Tensor:
        """One image [1,3,H,W] with parameters `p`, differentiably."""
        height, width = image.shape[-2:]
        if "crop" in p:
            h, w, top, left = p["crop"]
            box = torch.tensor([[[left, top], [left + w - 1, top], [left + w - 1, top + h - 1], [left, top + h - 1]]],
                               dtype=image.dtype, device=image.device)
            image = crop_and_resize(image, box, (height, width), align_corners=True)
        if p.get("flip"):
            image = hflip(image)
        if "shift" in p:
            dy, dx = p["shift"]
            move = torch.tensor([[dx, dy]], dtype=image.dtype, device=image.device)
            image = translate(image, move, padding_mode="border", align_corners=True)
        if "noise" in p:
            image = image + p["noise"].to(image.device, image.dtype)
        return image + (image.clamp(0, 1) - image).detach()  # in range, gradient kept (as the decode does)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        return torch.cat([self.apply(images[i:i + 1], self.draw(height, width)) for i in range(images.shape[0])])
