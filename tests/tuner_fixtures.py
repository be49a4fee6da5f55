"""Shared helpers for the tuner tests: tiny float64 adapters, a toy reward and a naive autograd reference.

The reference is written independently of tuner.engine and of the adapters' denoiser calls: one straightforward
loop through the chain with autograd on, calling the UNet or transformer and the sampler update directly (the
flow-matching update and its x0 / re-noising formulas written out by hand), detaching where the plan says.
"""

from __future__ import annotations

import torch

from tuner.config import CONFIG_DIR
from tuner.methods import Plan
from tuner.pipelines import TINY_PIPELINES, adapter_from_pipeline

SIZE = 64  # image side; latents are 8x8
BASE = CONFIG_DIR / "shapes_symmetry.yaml"  # the run the tests build on, apart from the embedded default's changes
PROMPTS = ["a cat", "a red dog"]
FLOW_FAMILIES = ("sd3", "flux", "flux-schnell")


def tiny_adapter(family: str, scheduler: str = "auto", dtype=torch.float64, seed: int = 0):
    """A tiny random adapter ("sd15", "sdxl", "sd3", "flux" or "flux-schnell") on CPU."""
    return adapter_from_pipeline(TINY_PIPELINES[f"tiny-{family}"](seed), device="cpu", dtype=dtype,
                                 scheduler=scheduler)


def is_flow(adapter) -> bool:
    return adapter.family in ("sd3", "flux")


class ToyReward(torch.nn.Module):
    """A smooth, weight-free-to-train reward: a fixed random linear functional plus a quadratic term."""

    def __init__(self, batch: int = len(PROMPTS), dtype=torch.float64, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=dtype))

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return (images * self.w).mean((1, 2, 3)) + (images**2).mean((1, 2, 3))


def denoiser_grads(adapter) -> dict[str, torch.Tensor]:
    """Copies of the denoiser's parameter gradients (missing ones left out)."""
    return {n: p.grad.clone() for n, p in adapter.denoiser.named_parameters() if p.grad is not None}


def relative_error(got: dict, want: dict) -> float:
    """||got - want|| / ||want|| over all parameters (keys must match)."""
    assert got.keys() == want.keys(), f"{len(got)} vs {len(want)} parameters with gradients"
    num = sum(((got[k] - want[k]) ** 2).sum() for k in want).sqrt()
    den = sum((want[k] ** 2).sum() for k in want).sqrt()
    assert den > 0
    return float(num / den)


def _guided(adapter, x, t, cond, scale):
    """The guided model output, written out by hand (not adapter.denoise)."""
    if adapter.family == "sd3":
        return _guided_sd3(adapter, x, t, cond, scale)
    if adapter.family == "flux":
        return _flux_velocity(adapter, x, t, cond, scale)
    return _guided_unet(adapter, x, t, cond, scale)


def _guided_unet(adapter, x, t, cond, scale):
    """CFG with one batched UNet call."""
    sched, unet = adapter.scheduler, adapter.denoiser
    x_in = sched.scale_model_input(torch.cat([x, x]), t)
    kwargs = {}
    if cond.pooled is not None:
        ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=x.dtype).repeat(2 * x.shape[0], 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([cond.negative_pooled, cond.pooled]), "time_ids": ids}
    ctx = torch.cat([cond.negative_embeds, cond.prompt_embeds])
    uncond, text = unet(x_in, t, encoder_hidden_states=ctx, **kwargs).sample.chunk(2)
    return uncond + scale * (text - uncond)


def _guided_sd3(adapter, x, t, cond, scale):
    """SD3's CFG with one batched MMDiT call."""
    n = 2 * x.shape[0]
    uncond, text = adapter.denoiser(
        hidden_states=torch.cat([x, x]), timestep=t.expand(n), encoder_hidden_states=torch.cat(
            [cond.negative_embeds, cond.prompt_embeds]), pooled_projections=torch.cat([cond.negative_pooled, cond.pooled]),
    ).sample.chunk(2)
    return uncond + scale * (text - uncond)


def _flux_velocity(adapter, x, t, cond, scale):
    """FLUX.1: pack 2x2 latent patches into tokens (channel-major within a patch), one call, unpack."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(x.dtype)
    text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, dtype=x.dtype)
    config = adapter.denoiser.config
    guidance = torch.full((b,), scale, dtype=torch.float32) if config.guidance_embeds else None
    out = adapter.denoiser(hidden_states=tokens, timestep=t.expand(b).to(x.dtype) / 1000, guidance=guidance,
                           pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds, txt_ids=text_ids,
                           img_ids=image_ids).sample
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _x0_hat(sched, i: int, x, eps):
    """One-step x0 (epsilon prediction) from each scheduler's own noise parameterisation."""
    name = type(sched).__name__
    t = sched.timesteps[i]
    if name == "FlowMatchEulerDiscreteScheduler":  # x = (1 - s) * x0 + s * noise, v = noise - x0
        return x - sched.sigmas[i].double() * eps
    if name == "DDIMScheduler":
        a = sched.alphas_cumprod[t].double()
        return (x - (1 - a).sqrt() * eps) / a.sqrt()
    s = sched.sigmas[i].double()
    if name.startswith("Euler"):  # x = x0 + s * eps
        return x - s * eps
    return x * (1 + s * s).sqrt() - s * eps  # DPM-Solver: x = (x0 + s * eps) / sqrt(1 + s^2)


def _noised(sched, i: int, x0, noise):
    """x at step i's noise level from x0 (DRaFT-LV's re-noising)."""
    name = type(sched).__name__
    t = sched.timesteps[i]
    if name == "FlowMatchEulerDiscreteScheduler":
        s = sched.sigmas[i].double()
        return (1 - s) * x0 + s * noise
    if name == "DDIMScheduler":
        a = sched.alphas_cumprod[t].double()
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
    if name.startswith("Euler"):
        return x0 + sched.sigmas[i].double() * noise
    raise NotImplementedError(name)


def _decode(adapter, latents):
    vae = adapter.vae
    shift = vae.config.shift_factor or 0.0  # SD3 / FLUX latents are shifted as well as scaled
    y = vae.decode(latents / vae.config.scaling_factor + shift).sample / 2 + 0.5
    return y + (y.clamp(0, 1) - y).detach()  # straight-through clamp


def naive_backward(adapter, plan: Plan, cond, reward, *, seed: int, guidance_scale: float, eta: float = 0.0,
                   trained_term=None) -> float:
    """Autograd through the whole chain, keeping every graph; accumulates into the denoiser's .grad.

    `trained_term(x_in, t, eps)`, if given, is a scalar added to the loss at each trained call (1/n of it at each
    of DRaFT-LV's n calls).

    Uses the engine's documented draw order from the generator: one seed per step, the initial latents,
    then the DRaFT-LV re-noising noises.
    """
    sched, T = adapter.scheduler, plan.num_steps
    g = torch.Generator().manual_seed(seed)
    flow = is_flow(adapter)
    adapter.set_timesteps(T, SIZE, SIZE)  # the family's schedule (the stock-pipeline tests check it)
    seeds = torch.randint(0, 2**62, (T,), generator=g).tolist()
    channels = adapter.vae.config.latent_channels
    x = torch.randn(len(cond), channels, SIZE // 8, SIZE // 8, generator=g, dtype=torch.float64)
    x = x if flow else x * sched.init_noise_sigma

    def step(i, eps, x):
        if flow:  # Euler along the straight path: dx/dsigma = v
            return x + (sched.sigmas[i + 1] - sched.sigmas[i]).double() * eps
        kwargs = {"eta": eta} if type(sched).__name__ == "DDIMScheduler" else {}
        noise_gen = torch.Generator().manual_seed(seeds[i])
        return sched.step(eps, sched.timesteps[i], x, generator=noise_gen, **kwargs).prev_sample

    terms = 0.0
    for i in range(plan.stop + 1):
        t = sched.timesteps[i]
        on = i >= plan.grad_from and not plan.renoise
        x = x if on else x.detach()
        with torch.set_grad_enabled(on):
            if on and i in plan.trained:
                x_in = x.detach() if plan.detach_input else x
                eps = _guided(adapter, x_in, t, cond, guidance_scale)
                terms = terms + (trained_term(x_in, t, eps) if trained_term is not None else 0.0)
            else:
                with torch.no_grad():
                    eps = _guided(adapter, x, t, cond, guidance_scale)
            if plan.predict_x0 and i == plan.stop:
                x = _x0_hat(sched, i, x, eps)
                break
            x = step(i, eps, x)
    if not plan.renoise:
        loss = -reward(_decode(adapter, x), PROMPTS).mean() + terms
    else:
        last, x0, loss = T - 1, x.detach(), 0.0
        adapter.set_timesteps(T, SIZE, SIZE)  # fresh scheduler state for the re-done last step
        for _ in range(plan.renoise):
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            x_t = _noised(sched, last, x0, noise)
            if hasattr(sched, "_step_index"):
                sched._step_index = last
            eps = _guided(adapter, x_t, sched.timesteps[last], cond, guidance_scale)
            if trained_term is not None:
                loss = loss + trained_term(x_t, sched.timesteps[last], eps) / plan.renoise
            out = step(last, eps, x_t)
            loss = loss - reward(_decode(adapter, out), PROMPTS).mean() / plan.renoise
    loss.backward()
    return float(loss.detach())
