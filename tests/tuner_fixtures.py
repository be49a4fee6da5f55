"""Shared helpers for the tuner tests: tiny float64 adapters, a toy reward and a naive autograd reference.

The reference is written independently of tuner.engine: one straightforward loop through the chain with
autograd on, calling the UNet and the scheduler directly and detaching where the plan says.
"""

from __future__ import annotations

import torch

from tuner.methods import Plan
from tuner.pipelines import adapter_from_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

SIZE = 64  # image side; latents are 8x8
PROMPTS = ["a cat", "a red dog"]


def tiny_adapter(family: str, scheduler: str = "ddim", dtype=torch.float64, seed: int = 0):
    """A tiny random adapter ("sd15" or "sdxl") on CPU."""
    build = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}[family]
    return adapter_from_pipeline(build(seed), device="cpu", dtype=dtype, scheduler=scheduler)


class ToyReward(torch.nn.Module):
    """A smooth, weight-free-to-train reward: a fixed random linear functional plus a quadratic term."""

    def __init__(self, batch: int = len(PROMPTS), dtype=torch.float64, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=dtype))

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return (images * self.w).mean((1, 2, 3)) + (images**2).mean((1, 2, 3))


def unet_grads(adapter) -> dict[str, torch.Tensor]:
    """Copies of the UNet's parameter gradients (missing ones left out)."""
    return {n: p.grad.clone() for n, p in adapter.unet.named_parameters() if p.grad is not None}


def relative_error(got: dict, want: dict) -> float:
    """||got - want|| / ||want|| over all parameters (keys must match)."""
    assert got.keys() == want.keys(), f"{len(got)} vs {len(want)} parameters with gradients"
    num = sum(((got[k] - want[k]) ** 2).sum() for k in want).sqrt()
    den = sum((want[k] ** 2).sum() for k in want).sqrt()
    assert den > 0
    return float(num / den)


def _guided(adapter, x, t, cond, scale):
    """CFG with one batched UNet call, written out by hand (not adapter.eps)."""
    sched, unet = adapter.scheduler, adapter.unet
    x_in = sched.scale_model_input(torch.cat([x, x]), t)
    kwargs = {}
    if cond.pooled is not None:
        ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=x.dtype).repeat(2 * x.shape[0], 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.cat([cond.negative_pooled, cond.pooled]), "time_ids": ids}
    ctx = torch.cat([cond.negative_embeds, cond.prompt_embeds])
    uncond, text = unet(x_in, t, encoder_hidden_states=ctx, **kwargs).sample.chunk(2)
    return uncond + scale * (text - uncond)


def _x0_hat(sched, i: int, x, eps):
    """One-step x0 (epsilon prediction) from each scheduler's own noise parameterisation."""
    name = type(sched).__name__
    t = sched.timesteps[i]
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
    if name == "DDIMScheduler":
        a = sched.alphas_cumprod[t].double()
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
    if name.startswith("Euler"):
        return x0 + sched.sigmas[i].double() * noise
    raise NotImplementedError(name)


def _decode(adapter, latents):
    vae = adapter.vae
    y = vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5
    return y + (y.clamp(0, 1) - y).detach()  # straight-through clamp


def naive_backward(adapter, plan: Plan, cond, reward, *, seed: int, guidance_scale: float, eta: float = 0.0) -> float:
    """Autograd through the whole chain, keeping every graph; accumulates into the UNet's .grad.

    Uses the engine's documented draw order from the generator: one seed per step, the initial latents,
    then the DRaFT-LV re-noising noises.
    """
    sched, T = adapter.scheduler, plan.num_steps
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(T)
    seeds = torch.randint(0, 2**62, (T,), generator=g).tolist()
    x = torch.randn(len(cond), 4, SIZE // 8, SIZE // 8, generator=g, dtype=torch.float64) * sched.init_noise_sigma

    def step(i, eps, x):
        kwargs = {"eta": eta} if type(sched).__name__ == "DDIMScheduler" else {}
        noise_gen = torch.Generator().manual_seed(seeds[i])
        return sched.step(eps, sched.timesteps[i], x, generator=noise_gen, **kwargs).prev_sample

    for i in range(plan.stop + 1):
        t = sched.timesteps[i]
        on = i >= plan.grad_from and not plan.renoise
        x = x if on else x.detach()
        with torch.set_grad_enabled(on):
            if on and i in plan.trained:
                eps = _guided(adapter, x.detach() if plan.detach_input else x, t, cond, guidance_scale)
            else:
                with torch.no_grad():
                    eps = _guided(adapter, x, t, cond, guidance_scale)
            if plan.predict_x0 and i == plan.stop:
                x = _x0_hat(sched, i, x, eps)
                break
            x = step(i, eps, x)
    if not plan.renoise:
        loss = -reward(_decode(adapter, x), PROMPTS).mean()
    else:
        last, x0, loss = T - 1, x.detach(), 0.0
        sched.set_timesteps(T)  # fresh scheduler state for the re-done last step
        for _ in range(plan.renoise):
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            x_t = _noised(sched, last, x0, noise)
            if hasattr(sched, "_step_index"):
                sched._step_index = last
            out = step(last, _guided(adapter, x_t, sched.timesteps[last], cond, guidance_scale), x_t)
            loss = loss - reward(_decode(adapter, out), PROMPTS).mean() / plan.renoise
    loss.backward()
    return float(loss.detach())
