"""Full-size SDXL (base 1.0) and SD 1.5 architectures with random weights: they cost exactly what trained ones cost.

The configurations are the published ones of stabilityai/stable-diffusion-xl-base-1.0 (unet, vae,
text_encoder, text_encoder_2) and of stable-diffusion-v1-5 (unet, vae, text_encoder: CLIP ViT-L/14), written out
so a benchmark needs no download.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner.pipelines import tiny_tokenizer

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE_SD15 = {**VAE, "sample_size": 512, "scaling_factor": 0.18215}
TEXT_SD15 = TEXT_1  # CLIP ViT-L/14's text tower, as SDXL's first encoder
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False,
                 set_alpha_to_one=False)


def _text(cls, **cfg):
    # The tiny byte-level tokenizer's 514 ids stand in for CLIP's 49408: the embedding table does not change the cost.
    return cls(CLIPTextConfig(vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                              pad_token_id=513, **cfg))


def sdxl_random_pipeline(force_upcast: bool = True) -> StableDiffusionXLPipeline:
    """SDXL base 1.0 at full size with random weights (fp32, CPU; move it where it runs).

    force_upcast=False gives the VAE config of madebyollin/sdxl-vae-fp16-fix (same architecture), which the
    adapters then run in half precision instead of fp32.
    """
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**{**VAE, "force_upcast": force_upcast}), text_encoder=_text(CLIPTextModel, **TEXT_1),
        text_encoder_2=_text(CLIPTextModelWithProjection, **TEXT_2), tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(), unet=UNet2DConditionModel(**UNET), scheduler=DDIMScheduler(**SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_random_pipeline() -> StableDiffusionPipeline:
    """Stable Diffusion 1.5 at full size with random weights (fp32, CPU; move it where it runs)."""
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE_SD15), text_encoder=_text(CLIPTextModel, **TEXT_SD15), tokenizer=tiny_tokenizer(),
        unet=UNet2DConditionModel(**UNET_SD15), scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (to show the architecture is full size)."""
    return sum(p.numel() for p in module.parameters())


def set_layout(adapter, memory_format: torch.memory_format) -> None:
    """Store the adapter's UNet and VAE weights in `memory_format` (torch.channels_last: NHWC convolutions)."""
    for model in (adapter.denoiser, adapter.vae):
        model.to(memory_format=memory_format)
