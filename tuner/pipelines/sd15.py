"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state as the UNet's context."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline

from .base import Conditioning, check_lengths
from .unet import UNetAdapter


class SD15Adapter(UNetAdapter):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, last hidden state as context."""

    family = "sd15"
    pipeline_class = StableDiffusionPipeline

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode prompts and negatives ("" when not given) with the frozen text encoder."""
        negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        check_lengths(prompts, negative)
        pos, neg = self.pipe.encode_prompt(
            list(prompts), self._text_device(), 1, True, negative_prompt=list(negative)
        )
        return Conditioning(pos, neg).to(self.device)
