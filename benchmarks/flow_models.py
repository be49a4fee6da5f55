"""Full-size FLUX.1-dev and Stable Diffusion 3.5 Medium with random weights: they cost exactly what trained ones cost.

The configurations are the published ones of black-forest-labs/FLUX.1-dev (transformer, vae, scheduler, CLIP-L,
T5-XXL) and stabilityai/stable-diffusion-3.5-medium (transformer, vae, scheduler, CLIP-L, CLIP-G, T5-XXL), written
out so a benchmark needs no download. Tokenizers are the tiny byte-level ones (their vocabularies do not change any
cost the benchmarks measure); the embedding tables keep their real sizes.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tuner.pipelines import tiny_t5_tokenizer, tiny_tokenizer

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
VAE_16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
FLUX_VAE = {**VAE_16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SD35_VAE = {**VAE_16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _clip(cls, **cfg):
    return cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                              pad_token_id=513, **cfg))


def flux_dev_random_pipeline() -> FluxPipeline:
    """FLUX.1-dev at full size with random weights, built where torch's default device is (build it on the GPU)."""
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(**FLUX_DEV), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=AutoencoderKL(**FLUX_VAE), text_encoder=_clip(CLIPTextModel, **CLIP_L), tokenizer=tiny_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)), tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd35_medium_random_pipeline(t5: bool = True) -> StableDiffusion3Pipeline:
    """SD3.5 Medium at full size with random weights, built where torch's default device is."""
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35_MEDIUM), scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        vae=AutoencoderKL(**SD35_VAE), text_encoder=_clip(CLIPTextModelWithProjection, **CLIP_L),
        tokenizer=tiny_tokenizer(), text_encoder_2=_clip(CLIPTextModelWithProjection, **CLIP_G),
        tokenizer_2=tiny_tokenizer(), text_encoder_3=T5EncoderModel(T5Config(**T5_XXL)) if t5 else None,
        tokenizer_3=tiny_t5_tokenizer() if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_pipeline(model: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """"flux" or "sd35" at full size, built directly on `device` in `dtype` (seconds on a GPU, no host copy)."""
    build = {"flux": flux_dev_random_pipeline, "sd35": sd35_medium_random_pipeline}[model]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)
