"""Architectures of the shipped shapes models: a small Stable-Diffusion pipeline, a small open_clip CLIP, and a small
SD3-style flow-matching pipeline built from both.

Everything is explicit configuration of stock classes (diffusers, transformers, open_clip), so the saved
folders load with stock code: `StableDiffusionPipeline.from_pretrained(pipeline_dir)`,
`open_clip.create_model_and_transforms("local-dir:" + clip_dir)` and
`StableDiffusion3Pipeline.from_pretrained(flow_dir)`. Sizes (parameters): UNet 4.1 M, VAE 0.95 M, text encoder
0.5 M (float32 safetensors, 22 MB); CLIP 1.3 M (float16, 2.7 MB); flow transformer 4.1 M plus the VAE and two
0.5 M text encoders (float32, 24 MB).
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
# shapes-flow: an SD3 MMDiT (SD3.5's RMS q/k norms) on the shapes VAE's 16x16x4 latents, one token per latent
# pixel (patch 1: 256 image tokens); width 128 (4 heads of 32), 7 joint blocks: 4.1 M parameters.
FLOW_TRANSFORMER = dict(
    sample_size=LATENT_SIZE, patch_size=1, in_channels=4, out_channels=4, num_layers=7, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, pos_embed_max_size=LATENT_SIZE,
    qk_norm="rms_norm",
)  # joint_attention_dim: the two text encoders' widths side by side; pooled: their two 64-wide projections
FLOW_TOKENS = 32  # caption tokens of both text encoders: the CLIP's context (captions take at most 17)
T5_TOKENS = 256  # zero embeddings StableDiffusion3Pipeline appends when T5 is absent (its max_sequence_length)
FLOW_PROJECTION = 64  # text_encoder's new projection, as wide as the CLIP's embedding
# Rectified flow sampled with Euler; no shift: 64x64 images have 1/16 of the latent size SD3 shifts by 3 for.
FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)
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


# ------------------------------------------------------------------------------------------------ shapes-flow
def flow_transformer(layers: int = FLOW_TRANSFORMER["num_layers"],
                     heads: int = FLOW_TRANSFORMER["num_attention_heads"]):
    """A fresh SD3Transformer2DModel of FLOW_TRANSFORMER, or narrower / shallower (tests train a tiny one)."""
    from diffusers import SD3Transformer2DModel

    width = heads * FLOW_TRANSFORMER["attention_head_dim"]
    return SD3Transformer2DModel(**{**FLOW_TRANSFORMER, "num_layers": layers, "num_attention_heads": heads,
                                    "caption_projection_dim": width})


def flow_scheduler():
    """The flow-matching Euler scheduler of shapes-flow (SD3's, unshifted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)


def _text_config(tok, positions: int, projection: int, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, projection_dim=projection,
                          **{**TEXT, "max_position_embeddings": positions, **overrides})


def flow_text_encoder(sd_text_encoder, tok):
    """SD3's text_encoder: shapes-sd's text encoder as a CLIPTextModelWithProjection over FLOW_TOKENS positions,
    with a new (random) projection for the pooled embedding."""
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(_text_config(tok, FLOW_TOKENS, FLOW_PROJECTION))
    state = getattr(sd_text_encoder, "text_model", sd_text_encoder).state_dict()
    key = "embeddings.position_embedding.weight"
    state[key] = state[key][:FLOW_TOKENS]
    model.text_model.load_state_dict(state)
    return model


def _open_clip_text_state(clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip text-tower weights under transformers' CLIPTextModelWithProjection names."""
    state = {
        "text_model.embeddings.token_embedding.weight": clip["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": clip["positional_embedding"],
        "text_model.final_layer_norm.weight": clip["ln_final.weight"],
        "text_model.final_layer_norm.bias": clip["ln_final.bias"],
        "text_projection.weight": clip["text_projection"].T,  # open_clip: x @ P; a Linear: x @ W.T
    }
    for i in range(CLIP["text_cfg"]["layers"]):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), clip[src + f"attn.in_proj_{kind}"].chunk(3)):
                state[dst + f"self_attn.{name}.{kind}"] = part
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                state[dst + f"{b}.{kind}"] = clip[src + f"{a}.{kind}"]
    return state


def clip_text_encoder(clip_dir: str | Path, tok):
    """SD3's text_encoder_2: the shapes CLIP's text tower (causal, pooled at the end token, projected to its
    64-wide embedding) as a transformers CLIPTextModelWithProjection, in float32."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    text = CLIP["text_cfg"]
    config = _text_config(tok, text["context_length"], CLIP["embed_dim"], hidden_size=text["width"],
                          num_attention_heads=text["heads"], num_hidden_layers=text["layers"],
                          intermediate_size=4 * text["width"])
    model = CLIPTextModelWithProjection(config)
    clip = load_file(str(Path(clip_dir) / "open_clip_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in _open_clip_text_state(clip).items()})
    return model


def flow_prompt_embeds(text_encoder, text_encoder_2, tokens: torch.Tensor, joint_dim: int,
                       t5_tokens: int = T5_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """What StableDiffusion3Pipeline.encode_prompt makes of caption tokens [B, FLOW_TOKENS] with T5 absent: both
    encoders' penultimate hidden states side by side (zero-padded to joint_dim), then t5_tokens zero tokens;
    and their two projected pooled embeddings side by side. Gradients reach text_encoder only."""
    one = text_encoder(tokens, output_hidden_states=True)
    with torch.no_grad():
        two = text_encoder_2(tokens, output_hidden_states=True)
    clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2].to(one.hidden_states[-2].dtype)], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros(len(tokens), t5_tokens, joint_dim)
    pooled = torch.cat([one.text_embeds, two.text_embeds.to(one.text_embeds.dtype)], dim=-1)
    return torch.cat([clip, zeros], dim=1), pooled
