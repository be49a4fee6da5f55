"""Full-size Stable Diffusion 1.5 architecture with random weights: costs exactly what the trained model costs.

The configurations are the published ones of SD 1.5 (unet, vae, text_encoder: CLIP ViT-L/14's text tower),
written out so a benchmark needs no download. The scheduler is DDIM with SD 1.5's betas (benchmarks.sdxl's,
which SDXL shares); the tokenizer is the byte-level stand-in of tuner.pipelines.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from benchmarks.sdxl import SCHEDULER
from tuner.pipelines import tiny_tokenizer

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, sample_size=512, scaling_factor=0.18215,
)
# The tiny byte-level tokenizer's 514 ids stand in for CLIP's 49408: the embedding table does not change the cost.
TEXT = dict(vocab_size=514, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, bos_token_id=512,
            eos_token_id=513, pad_token_id=513)


def sd15_random_pipeline() -> StableDiffusionPipeline:
    """SD 1.5 at full size with random weights (fp32, on the current default device)."""
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)), tokenizer=tiny_tokenizer(),
        unet=UNet2DConditionModel(**UNET), scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
