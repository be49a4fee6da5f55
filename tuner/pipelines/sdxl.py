"""SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled embeddings and time ids."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline

from .base import HALF, Conditioning, check_lengths
from .unet import UNetAdapter


class SDXLAdapter(UNetAdapter):
    """SDXL: two text encoders (penultimate hidden states concatenated), pooled embeds and time ids."""

    family = "sdxl"
    pipeline_class = StableDiffusionXLPipeline

    @staticmethod
    def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
        # The SDXL base VAE overflows in fp16; a fp16-fix VAE says so with force_upcast=False.
        return torch.float32 if dtype in HALF and getattr(vae.config, "force_upcast", True) else dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode with both frozen text encoders; no negatives -> zeros if the pipeline forces them."""
        if negative_prompts is not None:
            check_lengths(prompts, negative_prompts)
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            list(prompts),
            device=self._text_device(),
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=list(negative_prompts) if negative_prompts is not None else None,
        )
        return Conditioning(pos, neg, pooled, neg_pooled).to(self.device)

    def _added_kwargs(self, cond: Conditioning, x: torch.Tensor, cfg: bool) -> dict:
        if cond.pooled is None:
            raise ValueError("SDXL conditioning lacks pooled embeddings: build it with SDXLAdapter.encode_prompts")
        ids = cond.add_time_ids
        if ids is None:
            h, w = (s * self.vae_scale_factor for s in x.shape[-2:])
            ids = torch.tensor([[h, w, 0, 0, h, w]], device=x.device)  # original size, crop top-left, target size
        ids = ids.to(x.device, self.dtype).expand(x.shape[0], -1)
        pooled = cond.pooled
        if cfg:
            ids = torch.cat([ids, ids])
            pooled = torch.cat([cond.negative_pooled, pooled])
        return {"text_embeds": pooled.to(self.dtype), "time_ids": ids}
