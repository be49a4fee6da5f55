"""Tiny random pipelines of every supported family, for tests and smoke runs (64x64 images, no downloads).

Each is a stock diffusers pipeline of the real architecture at a toy width: SD 1.5 and SDXL (UNet, DDIM), SD3
(MMDiT with RMS q/k norms and one dual-attention layer, as SD3.5; CLIP-L, CLIP-G and T5) and FLUX.1 (double and
single stream blocks, guidance embedding or none, CLIP-L and T5). Tokenizers are byte-level, built from files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _word_merges(words: list[str], symbols: dict[int, str]) -> list[tuple[str, str]]:
    """BPE merges that turn each word (with CLIP's "</w>" end mark) into one token, in an order where the merges
    made for earlier words never split a later one: each word is first run through the merges so far."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = [symbols[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        while len(parts) > 1:  # apply the existing merges, lowest rank first, as BPE does
            best = min(range(len(parts) - 1), key=lambda i: ranks.get((parts[i], parts[i + 1]), len(ranks)))
            if (parts[best], parts[best + 1]) not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        while len(parts) > 1:  # then join what is left, left to right, with new merges
            ranks[(parts[0], parts[1])] = len(ranks)
            merges.append((parts[0], parts[1]))
            parts[:2] = [parts[0] + parts[1]]
    return merges


def tiny_tokenizer(max_length: int = 77, words: tuple[str, ...] | list[str] = ()):
    """A CLIP BPE tokenizer over single bytes (514 tokens) plus one token per word of `words`, loaded from files.

    Without words it has no merges (every character is a token): enough for random test pipelines. With a
    closed vocabulary (the shipped shapes model's captions) every known word is one token and any other text
    still tokenizes, byte by byte.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    keep = [ord(s) for s in symbols if ord(s) < 256]  # bytes that stand for themselves; the rest map to 256 + n
    by_byte = {b: chr(b) if b in keep else chr(256 + [x for x in range(256) if x not in keep].index(b)) for b in range(256)}
    merges = _word_merges(list(words), by_byte)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        Path(vocab_file).write_text(json.dumps(vocab))
        Path(merges_file).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=max_length)


def _tiny_text_encoder(with_projection: bool, hidden: int = 16, projection: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()



def tiny_t5_tokenizer(max_length: int = 512):
    """A byte-level tokenizer with T5's special tokens (pad 0, end of sequence 1 appended, unk 2), from a
    tokenizer.json written here: what the SD3 and FLUX pipelines ask of their T5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials + _byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        tok.save(path)
        return PreTrainedTokenizerFast(tokenizer_file=path, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       model_max_length=max_length)


def _tiny_t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=259, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _tiny_vae(latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    # Four levels like the real VAEs, so vae_scale_factor is 8.
    extra = {} if shift_factor is None else {"shift_factor": shift_factor, "scaling_factor": 1.5,
                                             "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, **extra,
    )


def _tiny_unet(cross_dim: int, sdxl: bool) -> UNet2DConditionModel:
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4,  # pooled (text_encoder_2 projection) + 6 time ids
        )
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4), norm_num_groups=4, **extra,
    )


def _tiny_scheduler() -> DDIMScheduler:
    # The beta schedule and spacing of the real checkpoints (SD 1.5 and SDXL share them).
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False,
        set_alpha_to_one=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-weight SDXL pipeline small enough for CPU tests (64x64 images, 8x8 latents)."""
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(False),
        text_encoder_2=_tiny_text_encoder(True),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=_tiny_unet(cross_dim=32, sdxl=True),
        scheduler=_tiny_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD 1.x pipeline small enough for CPU tests (64x64 images, 8x8 latents)."""
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(False),
        tokenizer=tiny_tokenizer(),
        unet=_tiny_unet(cross_dim=16, sdxl=False),
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True) -> StableDiffusion3Pipeline:
    """A random-weight SD3.5-style pipeline (64x64 images, 8x8x16 latents, 16 tokens); `t5=False` leaves T5 out."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_tiny_vae(latent_channels=16, shift_factor=0.0609),
        text_encoder=_tiny_text_encoder(True), tokenizer=tiny_tokenizer(),
        text_encoder_2=_tiny_text_encoder(True), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_tiny_t5() if t5 else None, tokenizer_3=tiny_t5_tokenizer() if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A random-weight FLUX.1-style pipeline (64x64 images, 16 packed tokens of 4 x 16 channels); dev-like with the
    guidance embedding, schnell-like (no guidance, no dynamic shift) with `guidance_embeds=False`."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    if guidance_embeds:  # FLUX.1-dev's scheduler: the shift grows with the number of image tokens
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_tiny_vae(latent_channels=16, shift_factor=0.1159),
        text_encoder=_tiny_text_encoder(False), tokenizer=tiny_tokenizer(),
        text_encoder_2=_tiny_t5(), tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_PIPELINES = {
    "tiny-sd15": tiny_sd15_pipeline, "tiny-sdxl": tiny_sdxl_pipeline, "tiny-sd3": tiny_sd3_pipeline,
    "tiny-flux": tiny_flux_pipeline, "tiny-flux-schnell": lambda seed=0: tiny_flux_pipeline(seed, guidance_embeds=False),
}
