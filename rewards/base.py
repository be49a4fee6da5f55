"""The reward protocol: a frozen module mapping images in [0, 1] (and prompts) to one float32 score per image."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .errors import InputError

RANGE_MARGIN = 1e-2  # decoders overshoot [0, 1] slightly; more than this is a wrong range (e.g. [-1, 1] or [0, 255])


class Reward(nn.Module):
    """Base class: validates inputs, caches text features per prompt, returns float32 [B] scores.

    Subclasses set the class attributes and implement `score` (and `encode_text` if they need prompts).
    """

    name: str = "reward"
    needs_prompt: bool = False
    input_size: int | None = None  # native square side the model sees, None for size-free rewards
    published_scale: float = 1.0  # multiply a score by this to get the number papers print
    scale_note: str = ""  # how the official implementation reports the score
    check_values: bool = True  # range/NaN check costs one host sync per call; a trainer may turn it off
    text_cache_size: int = 4096

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # tracks device for parameter-free rewards
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- protocol -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Score `images` (float [B,3,H,W] in [0,1]) for `prompts` (B strings; ignored if prompt-free)."""
        self._check_images(images)
        prompts = self._check_prompts(prompts, images.shape[0])
        return self.score(images, prompts).float()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """Score validated images; implemented by each reward."""
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Encode distinct prompts to features [N, D]; implemented by prompt rewards."""
        raise NotImplementedError

    # -- text features, cached per prompt ------------------------------------------------------
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Features for each prompt, encoding only prompts not seen before; the cache never holds a graph."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with torch.no_grad():
                encoded = self.encode_text(missing).detach()
            for prompt, feature in zip(missing, encoded):
                self._text_cache[prompt] = feature
        for prompt in dict.fromkeys(prompts):
            self._text_cache.move_to_end(prompt)
        feats = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return feats

    def clear_text_cache(self) -> None:
        """Forget cached text features (done automatically when the module changes device or dtype)."""
        self._text_cache.clear()

    def _apply(self, fn, recurse: bool = True):
        self.clear_text_cache()
        return super()._apply(fn, recurse)

    # -- validation -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Device of the reward's parameters or buffers (CPU for parameter-free rewards)."""
        return self._anchor.device

    def _check_images(self, images: torch.Tensor) -> None:
        where = f"{self.name}: images"
        if not isinstance(images, torch.Tensor):
            raise InputError(f"{where} must be a torch.Tensor [B,3,H,W] in [0,1], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            hint = " (add a batch dimension with images[None])" if images.ndim == 3 else ""
            raise InputError(f"{where} must have shape [B,3,H,W], got {list(images.shape)}{hint}")
        if not images.is_floating_point():
            raise InputError(
                f"{where} must be a float tensor in [0,1], got {images.dtype} (convert with images.float() / 255)"
            )
        if images.shape[0] == 0:
            raise InputError(f"{where}: the batch is empty")
        if min(images.shape[-2:]) < 1:
            raise InputError(f"{where}: height and width must be positive, got {list(images.shape[-2:])}")
        own = self.device
        if images.device.type != own.type or (own.index is not None and images.device != own):
            raise InputError(f"{where} are on {images.device} but the reward is on {own}; move one of them")
        if self.check_values:
            self._check_values(images, where)

    @staticmethod
    def _check_values(images: torch.Tensor, where: str) -> None:
        with torch.no_grad():
            flat = images.detach().float()
            stats = torch.stack([(~torch.isfinite(flat)).any().float(), flat.amin(), flat.amax()]).tolist()
        if stats[0]:
            raise InputError(f"{where} contain NaN or Inf values")
        if stats[1] < -RANGE_MARGIN or stats[2] > 1 + RANGE_MARGIN:
            hint = " (looks like [-1,1]: use (x + 1) / 2)" if stats[1] < -0.5 else ""
            hint = " (looks like [0,255]: divide by 255)" if stats[2] > 2 else hint
            raise InputError(f"{where} must lie in [0,1], got values in [{stats[1]:.4g}, {stats[2]:.4g}]{hint}")

    def _check_prompts(self, prompts: Sequence[str] | None, batch: int) -> list[str] | None:
        if not self.needs_prompt:
            return list(prompts) if prompts is not None and not isinstance(prompts, str) else None
        if prompts is None:
            raise InputError(f"{self.name} needs one prompt per image: pass prompts=[...] of length {batch}")
        if isinstance(prompts, str):
            raise InputError(f"{self.name}: prompts must be a list of {batch} strings, got a single string")
        prompts = list(prompts)
        if len(prompts) != batch:
            raise InputError(f"{self.name}: got {len(prompts)} prompts for {batch} images; pass one prompt per image")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise InputError(f"{self.name}: prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")
        return prompts

    def extra_repr(self) -> str:
        return f"name={self.name!r}, needs_prompt={self.needs_prompt}, input_size={self.input_size}"
