"""Full-size SDXL (base 1.0) architecture with random weights: costs exactly what the trained model costs.

The configurations are the published ones of stabilityai/stable-diffusion-xl-base-1.0 (unet, vae,
text_encoder, text_encoder_2), written out so a benchmark needs no download.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
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
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False,
                 set_alpha_to_one=False)


def _text(cls, **cfg):
    # The tiny byte-level tokenizer's 514 ids stand in for CLIP's 49408: the embedding table does not change the cost.
    return cls(CLIPTextConfig(vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                              pad_token_id=513, **cfg))


def sdxl_random_pipeline() -> StableDiffusionXLPipeline:
    """SDXL base 1.0 at full size with random weights (fp32, CPU; move it where it runs)."""
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=_text(CLIPTextModel, **TEXT_1),
        text_encoder_2=_text(CLIPTextModelWithProjection, **TEXT_2), tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(), unet=UNet2DConditionModel(**UNET), scheduler=DDIMScheduler(**SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (to show the architecture is full size)."""
    return sum(p.numel() for p in module.parameters())
