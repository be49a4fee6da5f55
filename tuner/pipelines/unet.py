"""The UNet families (SD 1.x/2.x, SDXL): an epsilon (or v) predicting UNet, classifier-free guidance, and the
DDPM-family samplers (DDIM, Euler, Euler ancestral, DPM-Solver++)."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils.torch_utils import randn_tensor

from .base import Adapter, Conditioning

SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
DEFAULT_SCHEDULER = "ddim"
# Options that make a scheduler class into the named sampler (beyond the pipeline's own config).
# DDIM's class default clips x0 to [-1, 1]; latent-space models (every SD checkpoint) set it off.
_SCHEDULER_DEFAULTS: dict[str, dict] = {"ddim": {"clip_sample": False}, "dpm++": {"algorithm_type": "dpmsolver++"}}
# Schedulers whose latents live in "sigma space" (x = x0 + sigma * eps, input scaled by scale_model_input).
_SIGMA_SPACE = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)
# Low-memory mode recomputes these blocks of a trained UNet call; train.compile compiles them one by one.
UNET_BLOCKS = (ResnetBlock2D, BasicTransformerBlock)


def make_scheduler(name: str, config, **kwargs):
    """A scheduler of the named kind ("auto": DDIM), built from a pipeline's scheduler config plus overrides."""
    name = DEFAULT_SCHEDULER if name == "auto" else name
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r} for a UNet model; choose one of {sorted(SCHEDULERS)} or auto")
    options = {**_SCHEDULER_DEFAULTS.get(name, {}), **kwargs}
    return SCHEDULERS[name].from_config(config, **options)


class UNetAdapter(Adapter):
    """What SD 1.x/2.x and SDXL share: the UNet call with CFG and the DDPM-family sampler updates."""

    denoiser_blocks = UNET_BLOCKS

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        self.latent_channels = self.denoiser.config.in_channels

    @staticmethod
    def denoiser_of(pipe) -> torch.nn.Module:
        return pipe.unet

    def make_scheduler(self, name: str, config, **kwargs):
        return make_scheduler(name, config, **kwargs)

    def _added_kwargs(self, cond: Conditioning, x: torch.Tensor, cfg: bool) -> dict:
        return {}

    def initial_latents(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents for an image of height x width, scaled by the scheduler's init_noise_sigma."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE scale factor), got {height}x{width}")
        shape = (batch, self.latent_channels, height // f, width // f)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)
        return noise * self.scheduler.init_noise_sigma

    def denoise(self, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """Noise prediction at (x_t, t) with classifier-free guidance (scale <= 1: conditional pass only)."""
        cfg = guidance_scale > 1.0
        if cfg and cond.negative_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative embeddings: encode_prompts gave none")
        x_in = torch.cat([x_t, x_t]) if cfg else x_t
        x_in = self.scheduler.scale_model_input(x_in, t)
        ctx = torch.cat([cond.negative_embeds, cond.prompt_embeds]) if cfg else cond.prompt_embeds
        with self._recorded_call():
            out = self.denoiser(
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

    def step(self, i: int, t, x: torch.Tensor, model_output: torch.Tensor, *, generator: torch.Generator,
             eta: float = 0.0) -> torch.Tensor:
        kwargs = {"generator": generator}
        if isinstance(self.scheduler, DDIMScheduler):
            kwargs["eta"] = eta
        return self.scheduler.step(model_output, t, x, return_dict=False, **kwargs)[0]

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
        """One-step x0 from (x_t, model output) with the scheduler's noise level at t."""
        alpha, sigma, scale = self._noise_level(t)
        kind = self.scheduler.config.prediction_type
        x = x_t * scale  # into variance-preserving coordinates
        if kind == "epsilon":
            return (x - sigma * model_output) / alpha
        if kind == "v_prediction":
            return alpha * x - sigma * model_output
        if kind == "sample":
            return model_output
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction and sample are supported)")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x0 noised to the level of t as the scheduler defines it."""
        return self.scheduler.add_noise(x0, noise, t.reshape(1))

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

    def check_sampler(self, eta: float = 0.0) -> None:
        if not isinstance(self.scheduler, tuple(SCHEDULERS.values())):
            raise ValueError(
                f"the trajectory engine does not support {type(self.scheduler).__name__}: its gradient is only proven "
                f"exact for {', '.join(c.__name__ for c in SCHEDULERS.values())}. Pick one with scheduler="
                f"{' | '.join(repr(n) for n in SCHEDULERS)}."
            )
        if eta != 0.0 and not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(f"eta={eta} applies to DDIM only; {type(self.scheduler).__name__} takes no eta")

    def steps_draw_noise(self, eta: float = 0.0) -> bool:
        if isinstance(self.scheduler, DDIMScheduler):
            return eta != 0.0
        if isinstance(self.scheduler, DPMSolverMultistepScheduler):
            return "sde" in self.scheduler.config.algorithm_type
        return not isinstance(self.scheduler, EulerDiscreteScheduler)
