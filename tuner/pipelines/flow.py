"""The flow-matching families (SD3 / SD3.5, FLUX.1): a transformer predicting the velocity v of the straight path
x_sigma = (1 - sigma) * x0 + sigma * noise, sampled with FlowMatchEulerDiscreteScheduler.

Along that path x0 = x_t - sigma_t * v (the early stop's one-step prediction), a re-noised latent is
(1 - sigma) * x0 + sigma * noise (DRaFT-LV), and an Euler step is x + (sigma_next - sigma) * v. The step is written
here in the latents' own dtype rather than taken from `scheduler.step`, which rounds its input to float32: in float32
both are the same operations (diffusers' pipelines sample exactly as the engine does), and float64 tests stay exact.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from .base import Adapter

SCHEDULERS: dict[str, type] = {"flow-euler": FlowMatchEulerDiscreteScheduler}
DEFAULT_SCHEDULER = "flow-euler"
FLOW_LORA_TARGETS = (  # attention projections of the image stream, then of the text stream
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


def make_scheduler(name: str, config, **kwargs) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler sampler from the pipeline's scheduler config (its shift and dynamic shifting)."""
    name = DEFAULT_SCHEDULER if name == "auto" else name
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r} for a flow-matching model; choose one of {sorted(SCHEDULERS)} "
                         "or auto")
    return SCHEDULERS[name].from_config(config, **kwargs)


def disable_cudnn_attention(device: torch.device) -> None:
    """Keep scaled-dot-product attention off cuDNN on CUDA: the backward of its kernel failed at FLUX's shapes
    on torch 2.11 / CUDA 13 ("mha_graph.execute ... is_good()"), and trained calls must not depend on it."""
    if device.type == "cuda" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


class FlowAdapter(Adapter):
    """What SD3 and FLUX share: the flow-matching schedule, Euler step, x0 prediction and re-noising."""

    cache_prompts = True
    lora_targets = FLOW_LORA_TARGETS
    patch_size = 2  # latent pixels per token side (both families patchify 2x2)

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        self.latent_channels = self.vae.config.latent_channels
        disable_cudnn_attention(self.device)

    @staticmethod
    def denoiser_of(pipe) -> torch.nn.Module:
        return pipe.transformer

    def make_scheduler(self, name: str, config, **kwargs):
        return make_scheduler(name, config, **kwargs)

    def _schedule(self, num_steps: int, height: int, width: int) -> dict:
        """set_timesteps' arguments as the family's stock pipeline gives them."""
        return {"num_inference_steps": num_steps}

    def set_timesteps(self, num_steps: int, height: int, width: int) -> None:
        self.scheduler.set_timesteps(device=self.device, **self._schedule(num_steps, height, width))

    def image_tokens(self, height: int, width: int) -> int:
        """Transformer tokens of an image of height x width (the resolution-dependent shift depends on them)."""
        side = self.vae_scale_factor * self.patch_size
        return (height // side) * (width // side)

    def initial_latents(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents [B, C, H/8, W/8] (drawn as the stock pipelines draw them)."""
        side = self.vae_scale_factor * self.patch_size
        if height % side or width % side:
            raise ValueError(f"height and width must be multiples of {side} (VAE scale factor x patch size), got "
                             f"{height}x{width}")
        f = self.vae_scale_factor
        shape = (batch, self.latent_channels, height // f, width // f)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.latent_dtype)

    def _sigma(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sigmas[i].to(like.device, like.dtype)

    def step(self, i: int, t, x: torch.Tensor, model_output: torch.Tensor, *, generator: torch.Generator,
             eta: float = 0.0) -> torch.Tensor:
        """Euler step from sigma_i to sigma_{i+1}."""
        dt = self.scheduler.sigmas[i + 1] - self.scheduler.sigmas[i]
        return x + dt.to(x.device, x.dtype) * model_output

    def _index(self, t) -> int:
        return self.scheduler.index_for_timestep(t)

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
        """x0 = x_t - sigma_t * v."""
        return x_t - self._sigma(self._index(t), x_t) * model_output

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """(1 - sigma_t) * x0 + sigma_t * noise: the point of the straight path at t."""
        sigma = self._sigma(self._index(t), x0)
        return (1 - sigma) * x0 + sigma * noise

    def check_sampler(self, eta: float = 0.0) -> None:
        sched = self.scheduler
        if not isinstance(sched, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"the trajectory engine drives flow-matching models with FlowMatchEulerDiscreteScheduler "
                             f"only (scheduler='flow-euler'), got {type(sched).__name__}")
        if sched.config.get("stochastic_sampling", False):
            raise ValueError("FlowMatchEulerDiscreteScheduler with stochastic_sampling=True is not supported: the "
                             "engine's flow step is the deterministic Euler update")
        if eta != 0.0:
            raise ValueError(f"eta={eta} applies to DDIM only; flow-matching Euler sampling takes no eta")

    def steps_draw_noise(self, eta: float = 0.0) -> bool:
        return False
