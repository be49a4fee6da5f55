"""FLUX.1 (dev, schnell): a transformer on 2x2-packed 16-channel latents, CLIP-L (pooled) and T5-XXL text encoders;
dev is guidance-distilled (the guidance scale enters as an embedding, one call per step, no CFG), schnell takes no
guidance and samples in a few steps."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import Conditioning
from .flow import FlowAdapter

MAX_SEQUENCE_LENGTH = 512  # T5 tokens, the stock pipeline's default


class FluxAdapter(FlowAdapter):
    """FLUX.1: latents stay [B,C,H/8,W/8] for the engine and are packed into tokens only around the transformer."""

    family = "flux"
    pipeline_class = FluxPipeline
    denoiser_blocks = (FluxTransformerBlock, FluxSingleTransformerBlock)

    def _schedule(self, num_steps: int, height: int, width: int) -> dict:
        """The stock pipeline's sigmas (1 down to 1/T) and its resolution-dependent shift mu."""
        config = self.scheduler.config
        mu = calculate_shift(self.image_tokens(height, width), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        if sigmas is None:
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": sigmas, "mu": mu}

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (FLUX.1-dev) or none (FLUX.1-schnell)."""
        return bool(getattr(self.denoiser, "module", self.denoiser).config.guidance_embeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode with CLIP-L (pooled) and T5; FLUX.1 is guidance-distilled, so negative prompts have no place."""
        if negative_prompts is not None and any(negative_prompts):
            raise ValueError("FLUX.1 takes no negative prompt (its guidance is an embedding, not CFG); set "
                             "sampling.negative_prompt to an empty string")
        embeds, pooled, _ = self.pipe.encode_prompt(
            list(prompts), None, device=self._text_device(), num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return Conditioning(embeds, pooled=pooled).to(self.device)

    def denoise(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Velocity at (x_t, t): one call with the guidance scale as an embedding (dev), or none (schnell)."""
        batch, channels, h, w = x_t.shape
        tokens = FluxPipeline._pack_latents(x_t.to(self.dtype), batch, channels, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, x_t.device, self.dtype)
        text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=self.dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=x_t.device, dtype=torch.float32)
        with self._recorded_call():
            out = self.denoiser(
                hidden_states=tokens, timestep=t.expand(batch).to(self.dtype) / 1000, guidance=guidance,
                pooled_projections=cond.pooled.to(self.dtype), encoder_hidden_states=cond.prompt_embeds.to(self.dtype),
                txt_ids=text_ids, img_ids=image_ids, return_dict=False,
            )[0]
        f = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * f, w * f, f).to(x_t.dtype)
