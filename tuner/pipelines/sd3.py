"""Stable Diffusion 3 / 3.5: an MMDiT transformer on 16-channel latents, three text encoders (CLIP-L, CLIP-G and the
optional T5-XXL) and classifier-free guidance."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention import JointTransformerBlock
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from .base import Conditioning, check_lengths
from .flow import FlowAdapter

MAX_SEQUENCE_LENGTH = 256  # T5 tokens, the stock pipeline's default


class SD3Adapter(FlowAdapter):
    """SD3 / SD3.5 (Medium, Large): CFG over a batched MMDiT call; T5 may be absent (its embeddings are then zeros)."""

    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_blocks = (JointTransformerBlock,)

    @property
    def patch_size(self) -> int:
        return self.denoiser.config.patch_size

    def _schedule(self, num_steps: int, height: int, width: int) -> dict:
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {"num_inference_steps": num_steps}
        mu = calculate_shift(self.image_tokens(height, width), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.16))
        return {"num_inference_steps": num_steps, "mu": mu}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode prompts and negatives ("" when not given) with the three frozen text encoders."""
        negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        check_lengths(prompts, negative)
        pos, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            list(prompts), None, None, device=self._text_device(), num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=list(negative), max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return Conditioning(pos, neg, pooled, neg_pooled).to(self.device)

    def denoise(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Velocity at (x_t, t) with classifier-free guidance (scale <= 1: conditional pass only)."""
        cfg = guidance_scale > 1.0
        if cfg and cond.negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative embeddings: encode_prompts gave none")
        x_in = torch.cat([x_t, x_t]) if cfg else x_t
        ctx = torch.cat([cond.negative_embeds, cond.prompt_embeds]) if cfg else cond.prompt_embeds
        pooled = torch.cat([cond.negative_pooled, cond.pooled]) if cfg else cond.pooled
        with self._recorded_call():
            out = self.denoiser(
                hidden_states=x_in.to(self.dtype), timestep=t.expand(x_in.shape[0]),
                encoder_hidden_states=ctx.to(self.dtype), pooled_projections=pooled.to(self.dtype), return_dict=False,
            )[0].to(x_t.dtype)
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)
