"""What every model family's adapter shares: frozen text conditioning, devices and precision, the frozen-call
context, block-wise compiling and recompute, and the differentiable VAE decode.

The trajectory engine drives an adapter through a few calls, the same for every family:

    adapter.set_timesteps(T, height, width)              the family's sampling schedule
    x = adapter.initial_latents(B, height, width, gen)   the latent the chain starts from
    out = adapter.denoise(x, t, cond, guidance)          the guided model output (epsilon, or flow velocity)
    x = adapter.step(i, t, x, out, generator=, eta=)     one sampler update
    x0 = adapter.predict_x0(x, out, t)                   the one-step x0 prediction (early stop)
    x = adapter.add_noise(x0, noise, t)                  x0 back at the noise level of t (DRaFT-LV)
    images = adapter.decode(x0)                          [B,3,H,W] in [0,1], differentiable

`adapter.denoiser` is the trained network: the UNet of SD 1.5 / SDXL, the transformer of SD3 / FLUX.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D, Upsample2D

from ..lora import UNET_TARGETS
from ..memory import checkpointed, outermost

HALF = (torch.float16, torch.bfloat16)
# Low-memory mode: the VAE decoder's blocks that a decode with gradients recomputes in backward.
VAE_BLOCKS = (ResnetBlock2D, Attention, Upsample2D)
# train.compile: the VAE decoder's repeated blocks, compiled one by one (the denoiser's are each family's own).
VAE_COMPILED_BLOCKS = (ResnetBlock2D,)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Conditioning:
    """Frozen text conditioning of a batch: positive/negative embeddings, pooled embeddings where the family has them
    (SDXL, SD3, FLUX), and SDXL's time ids."""

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
    """Base adapter; each family says how prompts are encoded, how its denoiser is called and how its sampler steps."""

    family: str = "base"
    fold_lora: bool = True  # gradient-free calls run with the LoRA folded into the base weights (tuner.lora.folded)
    # Frozen half-precision work runs in its own dtype with autocast off: the gradient-free denoiser calls (autocast's
    # casts and fp32 norms cost a third of a call at batch 1, docs/benchmarks.md, Tuning step) and the VAE decode
    # (under autocast its GroupNorms would run and keep their activations for backward in fp32).
    plain_half: bool = True
    # train.memory=low: denoiser calls and decodes with gradients checkpoint block by block; the engine decodes and
    # scores one image at a time. Gradient-free calls are unchanged.
    low_memory: bool = False
    # train.fp8_sampling: gradient-free calls run the denoiser's transformer linears in fp8 (tuner.fp8).
    fp8: bool = False
    # Whether prompts are encoded once per prompt set and the text encoders then leave the GPU, in every memory mode
    # (the flow families: T5-XXL alone holds 4.7B parameters).
    cache_prompts: bool = False
    # The denoiser's blocks recomputed in low-memory mode and compiled one by one by train.compile.
    denoiser_blocks: tuple[type, ...] = ()
    # LoRA targets when lora.target_modules is left unset: the denoiser's attention projections.
    lora_targets: tuple[str, ...] = UNET_TARGETS
    pipeline_class: type | None = None  # the stock diffusers pipeline that loads this family's LoRA

    def __init__(self, pipe, *, device, dtype: torch.dtype, scheduler: str = "auto", park_denoiser: bool = False,
                 **scheduler_kwargs):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        # Latents stay in float32 for half models: the schedulers compute their updates in float32 anyway.
        self.latent_dtype = torch.float32 if dtype in HALF else dtype
        # park_denoiser: on the CPU until place_denoiser(), so that the text encoders encode the prompts alone on
        # the device (low-memory mode: T5-XXL beside FLUX.1-dev's transformer fills a 32 GiB card).
        self._parked = park_denoiser
        self.denoiser = move(self.denoiser_of(pipe), torch.device("cpu") if park_denoiser else self.device, dtype)
        self.vae = move(pipe.vae, self.device, self._vae_dtype(pipe.vae, dtype))
        self.scheduler = self.make_scheduler(scheduler, pipe.scheduler.config, **scheduler_kwargs)
        pipe.scheduler = self.scheduler
        for encoder in self._text_encoders():
            move(encoder, self.device, dtype).requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- what each family defines ---------------------------------------------------------------
    @staticmethod
    def denoiser_of(pipe) -> torch.nn.Module:
        """The pipeline's trained network (its UNet or transformer)."""
        raise NotImplementedError

    def make_scheduler(self, name: str, config, **kwargs):
        """The named sampler ("auto": the family's default) built from the pipeline's scheduler config."""
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str], negative_prompts: list[str] | None = None) -> Conditioning:
        raise NotImplementedError

    def set_timesteps(self, num_steps: int, height: int, width: int) -> None:
        """Set the scheduler to the family's schedule of `num_steps` steps for images of height x width."""
        self.scheduler.set_timesteps(num_steps, device=self.device)

    def initial_latents(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """The guided model output at (x_t, t), in x_t's dtype."""
        raise NotImplementedError

    def step(self, i: int, t, x: torch.Tensor, model_output: torch.Tensor, *, generator: torch.Generator,
             eta: float = 0.0) -> torch.Tensor:
        """Sampler update of step i (timestep t) from x with the guided model output; noise from `generator`."""
        raise NotImplementedError

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def check_sampler(self, eta: float = 0.0) -> None:
        """Refuse a scheduler whose engine gradient is not proven exact, and eta where it has no meaning."""
        raise NotImplementedError

    def steps_draw_noise(self, eta: float = 0.0) -> bool:
        """Whether a chain's steps draw noise of their own (not only its initial latents do)."""
        raise NotImplementedError

    @staticmethod
    def _vae_dtype(vae, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def _unpatchify(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the VAE takes them (identity unless a family keeps its own layout)."""
        return latents

    # -- frozen calls, compile, low-memory recompute ---------------------------------------------
    @contextlib.contextmanager
    def frozen_calls(self) -> Iterator[None]:
        """Context for a stretch of gradient-free denoiser calls: the LoRA folded in (`fold_lora`), the transformer
        linears in fp8 (`fp8`), and autocast off for a half-precision model (`plain_half`)."""
        from tuner.fp8 import fp8_linears
        from tuner.lora import folded

        with contextlib.ExitStack() as stack:
            if self.fold_lora:
                stack.enter_context(folded(self.denoiser))
            if self.fp8:
                stack.enter_context(fp8_linears(self.denoiser))  # quantizes the folded weights
            if self.plain_half and self.dtype in HALF:
                stack.enter_context(torch.autocast(self.device.type, enabled=False))
            yield

    def compile(self, **options) -> None:
        """torch.compile each repeated block of the denoiser and of the VAE decoder (regional compilation: blocks of
        one shape share their compiled code, so compiling takes minutes, not the whole model's much longer compile);
        `options` go to torch.compile."""
        limits = torch._dynamo.config
        name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"
        # one compiled graph per block shape, grad mode and fp8 or not: more than dynamo's default of 8
        setattr(limits, name, max(getattr(limits, name), 64))
        denoiser = getattr(self.denoiser, "module", self.denoiser)  # DDP
        for root, kinds in ((denoiser, self.denoiser_blocks), (getattr(self.vae, "decoder", self.vae),
                                                                VAE_COMPILED_BLOCKS)):
            for block in outermost(root, kinds):
                block.compile(**options)

    def _recorded_call(self):
        """Context of one denoiser call: in low-memory mode, a call that records gradients keeps only each block's
        inputs and recomputes the block in backward."""
        if self.low_memory and torch.is_grad_enabled():
            return checkpointed(self.denoiser, self.denoiser_blocks)
        return contextlib.nullcontext()

    # -- text encoders -------------------------------------------------------------------------------
    def _text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (getattr(self.pipe, n, None) for n in TEXT_ENCODERS) if e is not None]

    def _text_device(self) -> torch.device:
        """Where the text encoders are (the adapter's device unless offloaded)."""
        return next(self._text_encoders()[0].parameters()).device

    def place_denoiser(self) -> None:
        """Move a denoiser parked on the CPU at construction to the device (a no-op otherwise)."""
        if self._parked:
            self.denoiser.to(self.device)
            self._parked = False

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (once the prompts are encoded); encode_prompts still works after, on the
        CPU."""
        for encoder in self._text_encoders():
            encoder.to("cpu")

    # -- decoding ------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, checkpoint: bool = True) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1]: value clamped, gradient passed straight through the clamp.

        The straight-through clamp keeps a reward's gradient alive on out-of-range pixels (a plain clamp
        would zero it); VAE activations are recomputed in backward when `checkpoint` is on: the whole decode at
        once, or in low-memory mode block by block (so backward holds one block's activations, not all).
        """
        z = self._unpatchify(latents).to(self.vae.dtype) / self.vae.config.scaling_factor
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
        plain = self.plain_half and self.vae.dtype in HALF  # inside, so a checkpoint's recompute runs the same way
        with torch.autocast(self.device.type, enabled=False) if plain else contextlib.nullcontext():
            return self.vae.decode(z, return_dict=False)[0]


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to device; cast only if needed (diffusers warns on every dtype cast, even a no-op one, and on casting a
    model that lists no module to keep in float32)."""
    from diffusers.utils import logging

    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            module.to(dtype=dtype)
        finally:
            logging.set_verbosity(level)
    return module


def check_lengths(prompts: list[str], negative: list[str]) -> None:
    """One negative prompt per prompt, or a clear error."""
    if len(negative) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negative)} negative prompts; give one per prompt")


def _checkpoint(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)
