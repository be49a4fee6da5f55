"""Pipeline adapters: one small object per model family that the trajectory engine drives.

An adapter exposes exactly what reward fine-tuning needs from a diffusers pipeline: prompt
encoding (frozen), initial noise, the guided denoiser output, a one-step x0 prediction and a
differentiable decode. Everything else (engine, methods) is model-family agnostic.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D, Upsample2D
from diffusers.utils.torch_utils import randn_tensor

from .memory import checkpointed

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
# Options that make a scheduler class into the named sampler (beyond the pipeline's own config).
# DDIM's class default clips x0 to [-1, 1]; latent-space models (every SD checkpoint) set it off.
_SCHEDULER_DEFAULTS: dict[str, dict] = {"ddim": {"clip_sample": False}, "dpm++": {"algorithm_type": "dpmsolver++"}}
# Schedulers whose latents live in "sigma space" (x = x0 + sigma * eps, input scaled by scale_model_input).
_SIGMA_SPACE = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)
_HALF = (torch.float16, torch.bfloat16)
# Low-memory mode: the blocks whose activations a trained UNet call / a decode with gradients recomputes in backward.
UNET_BLOCKS = (ResnetBlock2D, BasicTransformerBlock)
VAE_BLOCKS = (ResnetBlock2D, Attention, Upsample2D)
# train.compile: the repeated blocks compiled one by one (Adapter.compile).
COMPILED_BLOCKS = (BasicTransformerBlock, ResnetBlock2D)


@dataclass
class Conditioning:
    """Frozen text conditioning of a batch: positive/negative embeddings (+ SDXL pooled embeddings)."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None  # SDXL; None = derived from the latent size at call time

    def to(self, device=None, dtype=None) -> "Conditioning":
        """Move every tensor (a new object; the original is unchanged)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device=device, dtype=dtype) if torch.is_tensor(v) else v for k, v in moved.items()}
        return Conditioning(**moved)

    def __getitem__(self, index) -> "Conditioning":
        """Slice the batch dimension (an int keeps it); add_time_ids too unless it is one shared row."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        batch = len(self)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            shared = f.name == "add_time_ids" and v is not None and v.shape[0] != batch
            out[f.name] = v if v is None or shared else v[index]
        return replace(self, **out)

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


class Adapter:
    """Base adapter; subclasses say how prompts are encoded and what extra UNet inputs exist."""

    fold_lora: bool = True  # gradient-free calls run with the LoRA folded into the base weights (tuner.lora.folded)
    # Frozen half-precision work runs in its own dtype with autocast off: the gradient-free UNet calls (autocast's
    # casts and fp32 norms cost a third of a call at batch 1, docs/benchmarks.md, Tuning step) and the VAE decode
    # (under autocast its GroupNorms would run and keep their activations for backward in fp32).
    plain_half: bool = True
    # train.memory=low: UNet calls and decodes with gradients checkpoint block by block; the engine decodes and
    # scores one image at a time. Gradient-free calls are unchanged.
    low_memory: bool = False
    # train.fp8_sampling: gradient-free calls run the UNet's transformer linears in fp8 (tuner.fp8).
    fp8: bool = False

    def __init__(self, pipe, *, device, dtype: torch.dtype, scheduler: str = "ddim", **scheduler_kwargs):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        # Latents stay in float32 for half models: the schedulers compute their updates in float32 anyway.
        self.latent_dtype = torch.float32 if dtype in _HALF else dtype
        self.unet = _move(pipe.unet, self.device, dtype)
        self.vae = _move(pipe.vae, self.device, self._vae_dtype(pipe.vae, dtype))
        self.scheduler = make_scheduler(scheduler, pipe.scheduler.config, **scheduler_kwargs)
        pipe.scheduler = self.scheduler
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(pipe, name, None)
            if enc is not None:
                _move(enc, self.device, dtype).requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        self.latent_channels = self.unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @staticmethod
    def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
        return dtype

    # -- conditioning -------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        raise NotImplementedError

    def _added_kwargs(self, cond: Conditioning, x: torch.Tensor, cfg: bool) -> dict:
        return {}

    @contextlib.contextmanager
    def frozen_calls(self) -> Iterator[None]:
        """Context for a stretch of gradient-free UNet calls: the LoRA folded in (`fold_lora`), and autocast off
        for a half-precision model (`plain_half`), and the transformer linears in fp8 (`fp8`)."""
        from tuner.fp8 import fp8_linears
        from tuner.lora import folded

        with contextlib.ExitStack() as stack:
            if self.fold_lora:
                stack.enter_context(folded(self.unet))
            if self.fp8:
                stack.enter_context(fp8_linears(self.unet))  # quantizes the folded weights
            if self.plain_half and self.dtype in _HALF:
                stack.enter_context(torch.autocast(self.device.type, enabled=False))
            yield

    def compile(self, **options) -> None:
        """torch.compile each repeated block of the UNet (transformer and ResNet blocks) and of the VAE decoder
        (regional compilation: blocks of one shape share their compiled code, so compiling takes minutes, not the
        whole model's much longer compile); `options` go to torch.compile."""
        from .memory import outermost

        limits = torch._dynamo.config
        name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"
        # one compiled graph per block shape, grad mode and fp8 or not: more than dynamo's default of 8
        setattr(limits, name, max(getattr(limits, name), 64))
        unet = getattr(self.unet, "module", self.unet)  # DDP
        for root in (unet, getattr(self.vae, "decoder", self.vae)):
            for block in outermost(root, COMPILED_BLOCKS):
                block.compile(**options)

    def _recorded_call(self):
        """Context of one UNet call: in low-memory mode, a call that records gradients keeps only each block's
        inputs and recomputes the block in backward."""
        if self.low_memory and torch.is_grad_enabled():
            return checkpointed(self.unet, UNET_BLOCKS)
        return contextlib.nullcontext()

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2")) if e is not None]

    def _text_device(self) -> torch.device:
        """Where the text encoders are (the adapter's device unless offloaded)."""
        return next(self._text_encoders()[0].parameters()).device

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (low-memory mode, once the prompts are encoded); encode_prompts
        still works after, on the CPU."""
        for encoder in self._text_encoders():
            encoder.to("cpu")

    # -- sampling pieces ----------------------------------------------------------------------
    def initial_latents(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents for an image of height x width, scaled by the scheduler's init_noise_sigma."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE scale factor), got {height}x{width}")
        shape = (batch, self.latent_channels, height // f, width // f)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)
        return noise * self.scheduler.init_noise_sigma

    def eps(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Denoiser output at (x_t, t) with classifier-free guidance (scale <= 1: conditional pass only)."""
        cfg = guidance_scale > 1.0
        if cfg and cond.negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative embeddings: encode_prompts gave none")
        x_in = torch.cat([x_t, x_t]) if cfg else x_t
        x_in = self.scheduler.scale_model_input(x_in, t)
        ctx = torch.cat([cond.negative_embeds, cond.prompt_embeds]) if cfg else cond.prompt_embeds
        with self._recorded_call():
            out = self.unet(
                x_in.to(self.dtype),
                t,
                encoder_hidden_states=ctx.to(self.dtype),
                added_cond_kwargs=self._added_kwargs(cond, x_t, cfg),
                return_dict=False,
            )[0].to(x_t.dtype)
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """One-step x0 from (x_t, model output) with the scheduler's noise level at t."""
        alpha, sigma, scale = self._noise_level(t)
        kind = self.scheduler.config.prediction_type
        x = x_t * scale  # into variance-preserving coordinates
        if kind == "epsilon":
            return (x - sigma * eps) / alpha
        if kind == "v_prediction":
            return alpha * x - sigma * eps
        if kind == "sample":
            return eps
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction and sample are supported)")

    def _noise_level(self, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, input scale) so that scale * x_t = alpha_t * x0 + sigma_t * noise."""
        sched = self.scheduler
        one = torch.ones((), dtype=torch.float64)
        if isinstance(sched, _SIGMA_SPACE) or isinstance(sched, DPMSolverMultistepScheduler):
            s = sched.sigmas[sched.index_for_timestep(t)].to(torch.float64)
            alpha = (s * s + 1).rsqrt()
            scale = alpha if isinstance(sched, _SIGMA_SPACE) else one
            return alpha, s * alpha, scale
        abar = sched.alphas_cumprod[int(t)].to(torch.float64)
        return abar.sqrt(), (1 - abar).sqrt(), one

    def decode(self, latents: torch.Tensor, checkpoint: bool = True) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1]: value clamped, gradient passed straight through the clamp.

        The straight-through clamp keeps a reward's gradient alive on out-of-range pixels (a plain clamp
        would zero it); VAE activations are recomputed in backward when `checkpoint` is on: the whole decode at
        once, or in low-memory mode block by block (so backward holds one block's activations, not all).
        """
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        recorded = checkpoint and torch.is_grad_enabled() and z.requires_grad
        if recorded and self.low_memory:
            with checkpointed(getattr(self.vae, "decoder", self.vae), VAE_BLOCKS):
                x = self._vae_decode(z)
        elif recorded:
            x = _checkpoint(self._vae_decode, z)
        else:
            x = self._vae_decode(z)
        x = x.to(torch.promote_types(x.dtype, torch.float32)) / 2 + 0.5
        return x + (x.clamp(0, 1) - x).detach()

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        plain = self.plain_half and self.vae.dtype in _HALF  # inside, so a checkpoint's recompute runs the same way
        with torch.autocast(self.device.type, enabled=False) if plain else contextlib.nullcontext():
            return self.vae.decode(z, return_dict=False)[0]


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device; cast only if needed (diffusers warns on every dtype cast, even a no-op one)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


def _checkpoint(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


class SD15Adapter(Adapter):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder, last hidden state as context."""

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode prompts and negatives ("" when not given) with the frozen text encoder."""
        negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        _check_lengths(prompts, negative)
        pos, neg = self.pipe.encode_prompt(
            list(prompts), self._text_device(), 1, True, negative_prompt=list(negative)
        )
        return Conditioning(pos, neg).to(self.device)


class SDXLAdapter(Adapter):
    """SDXL: two text encoders (penultimate hidden states concatenated), pooled embeds and time ids."""

    @staticmethod
    def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
        # The SDXL base VAE overflows in fp16; a fp16-fix VAE says so with force_upcast=False.
        return torch.float32 if dtype in _HALF and getattr(vae.config, "force_upcast", True) else dtype

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        """Encode with both frozen text encoders; no negatives -> zeros if the pipeline forces them."""
        if negative_prompts is not None:
            _check_lengths(prompts, negative_prompts)
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


def _check_lengths(prompts: list[str], negative: list[str]) -> None:
    if len(negative) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negative)} negative prompts; give one per prompt")


def make_scheduler(name: str, config, **kwargs):
    """A scheduler of the named kind, built from a pipeline's scheduler config plus overrides."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    options = {**_SCHEDULER_DEFAULTS.get(name, {}), **kwargs}
    return SCHEDULERS[name].from_config(config, **options)


def adapter_from_pipeline(pipe, *, device, dtype, scheduler: str = "ddim", **scheduler_kwargs) -> Adapter:
    """Wrap a loaded diffusers pipeline (SDXL or SD 1.x) in its adapter; moves it to device/dtype."""
    if isinstance(pipe, StableDiffusionXLPipeline) or getattr(pipe, "text_encoder_2", None) is not None:
        cls = SDXLAdapter
    elif isinstance(pipe, StableDiffusionPipeline):
        cls = SD15Adapter
    else:
        raise ValueError(
            f"unsupported pipeline {type(pipe).__name__}: the tuner supports StableDiffusionXLPipeline and "
            "StableDiffusionPipeline (SD 1.x/2.x)"
        )
    return cls(pipe, device=device, dtype=dtype, scheduler=scheduler, **scheduler_kwargs)


def _pipeline_class(model: str) -> type:
    """Read model_index.json (local dir or hub repo) to tell SDXL from SD 1.x."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{model} is a directory without model_index.json: give a diffusers pipeline folder "
                "(as written by pipe.save_pretrained) or a Hugging Face repo id"
            )
    else:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(model, "model_index.json"))
    name = json.loads(index.read_text()).get("_class_name", "")
    if "XL" in name:
        return StableDiffusionXLPipeline
    if name.startswith("StableDiffusion"):
        return StableDiffusionPipeline
    raise ValueError(f"{index}: pipeline class {name!r} is not supported (SDXL and SD 1.x/2.x are)")


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype keyword: `dtype` where diffusers has deprecated `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def load_adapter(
    model: str, *, device, dtype, vae: str | None = None, scheduler: str = "ddim", **scheduler_kwargs
) -> Adapter:
    """Load a pipeline (hub id or local dir), optionally swap its VAE, and wrap it in an adapter."""
    cls = _pipeline_class(model)
    extra = {}
    if vae is not None:
        extra["vae"] = AutoencoderKL.from_pretrained(vae, **_dtype_kwarg(dtype))
    if cls is StableDiffusionPipeline:
        extra.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(model, **_dtype_kwarg(dtype), **extra)
    return adapter_from_pipeline(pipe, device=device, dtype=dtype, scheduler=scheduler, **scheduler_kwargs)


# -- tiny random pipelines for tests and smoke runs (no downloads) ---------------------------------
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


def _tiny_vae() -> AutoencoderKL:
    # Four levels like the real VAEs, so vae_scale_factor is 8.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64,
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


__all__ = [
    "SCHEDULERS", "Conditioning", "Adapter", "SD15Adapter", "SDXLAdapter", "make_scheduler",
    "adapter_from_pipeline", "load_adapter", "tiny_sdxl_pipeline", "tiny_sd15_pipeline", "tiny_tokenizer",
]
