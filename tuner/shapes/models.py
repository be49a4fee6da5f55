"""Architectures of the shipped shapes model: a small Stable-Diffusion pipeline and a small open_clip CLIP.

Everything is explicit configuration of stock classes (diffusers, transformers, open_clip), so the saved
folders load with stock code: `StableDiffusionPipeline.from_pretrained(pipeline_dir)` and
`open_clip.create_model_and_transforms("local-dir:" + clip_dir)`. Sizes (parameters): UNet 4.1 M, VAE 0.95 M,
text encoder 0.5 M (float32 safetensors, 22 MB); CLIP 1.3 M (float16, 2.7 MB).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tuner.pipelines import tiny_tokenizer
from tuner.shapes.data import SIZE, vocabulary

LATENT_SIZE = SIZE // 4  # the VAE downsamples by 4: 64x64 images, 16x16x4 latents
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False,
)
UNET = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 96, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=3, norm_num_groups=16,  # diffusers' attention_head_dim = heads
)
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu")
# Stable Diffusion 1.x's noise schedule and DDIM settings.
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False,
                 set_alpha_to_one=False)
CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "width": 128, "heads": 4, "layers": 2, "hf_tokenizer_name": "local-dir"},
}
CLIP_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                   "resize_mode": "shortest", "size": SIZE}


def tokenizer(max_length: int = 77):
    """The word-level CLIP tokenizer of the shapes captions (every caption word one token; other text by bytes)."""
    return tiny_tokenizer(max_length=max_length, words=vocabulary())


def save_tokenizer(tok, folder: str | Path) -> None:
    """tok.save_pretrained, plus vocab.json and merges.txt: transformers 4's slow CLIPTokenizer reads only those."""
    tok.save_pretrained(str(folder))
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (Path(folder) / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def vae():
    """A fresh AutoencoderKL (downsampling by 4); its scaling_factor is set after training."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE)


def unet():
    """A fresh UNet2DConditionModel for 16x16x4 latents, cross-attending to 128-wide text states."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET)


def text_encoder(tok):
    """A fresh CLIP text encoder over `tok`'s vocabulary (SD 1.x uses its last hidden state)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, **TEXT)
    return CLIPTextModel(config)


def scheduler(kind: str = "ddim"):
    """The training (DDPM) or sampling (DDIM) scheduler with SD 1.x's schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler(**SCHEDULER)
    return DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "set_alpha_to_one"})


def clip_model(vocab_size: int):
    """A fresh open_clip CLIP of the CLIP config with a text vocabulary of `vocab_size` tokens."""
    import open_clip

    cfg = json.loads(json.dumps(CLIP))
    cfg["text_cfg"]["vocab_size"] = vocab_size
    return open_clip.CLIP(**cfg)


def save_clip(model: torch.nn.Module, tok, folder: str | Path) -> Path:
    """Write an open_clip folder: open_clip_config.json, float16 open_clip_model.safetensors, tokenizer files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(CLIP))
    cfg["text_cfg"]["vocab_size"] = len(tok)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": CLIP_PREPROCESS},
                                                             indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    save_tokenizer(tok, folder)
    return folder
