"""The trajectory engine: executes any method's Plan with flat memory and the exact chain gradient.

1. Sample the chain under no_grad, keeping the latents, guided model outputs and scheduler state of the steps the
   backward sweep will visit (from the first trained step to the stop step).
2. Decode x0, score it and backpropagate reward -> VAE -> x0 once, giving the adjoint of x0.
3. Sweep the visited steps from last to first: restore the scheduler state, recompute the model output with grad
   on trained steps (reuse the saved one elsewhere), rebuild the sampler update and backpropagate the
   adjoint that arrived from later steps. Only one denoiser graph is alive at any time.

Multistep schedulers (DPM-Solver++) keep earlier model outputs as history; on recompute those entries are
fed back as leaves and their adjoints are routed to the step that produced them, so the gradient is exactly
that of autograd through the whole chain with the plan's detaches.

Low-memory mode (adapter.low_memory, train.memory=low) changes how, not what: trained denoiser calls and the decode
recompute their activations block by block in backward, and step 2 runs one image at a time (scores are per image,
so the adjoints are the same).

Extra loss terms (guards, tuner/guards/penalty.py) join at the trained calls: `step_term(adapter, x, t, out, cond,
guidance)` returns a scalar that depends on that call's output, and the sweep backpropagates it together with the
sampler update, so it rides on the one denoiser graph already alive.

Randomness comes only from the caller's generator, drawn in this order: one seed per step (torch.randint,
seeding the step's ancestral / DDIM-eta noise, so a rebuilt step sees the same noise), the initial latents,
then one noise tensor per DRaFT-LV re-noising.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .methods import Plan
from .pipelines import SCHEDULERS, Adapter, Conditioning

# Schedulers whose gradients the tests prove exact (tests/test_engine_exact.py), each with the families it serves.
SUPPORTED_SCHEDULERS = tuple(SCHEDULERS.values())


@dataclass
class StepOutput:
    """What one reward_backward call reports (all detached)."""

    rewards: torch.Tensor  # [B] float32, reward of the backpropagated images
    images: torch.Tensor  # [B,3,H,W], the decoded x0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # per-part rewards of a mixture
    loss: float = 0.0


@dataclass
class _Saved:
    """What the backward sweep needs of one sampling step."""

    x: torch.Tensor  # latent entering the step
    model_output: torch.Tensor  # guided denoiser output (detached): epsilon, or a flow velocity
    state: dict  # scheduler attributes before the step (lists copied)


def check_scheduler(adapter: Adapter, eta: float = 0.0) -> None:
    """Refuse samplers whose engine gradient is not proven exact, and eta where it has no meaning."""
    adapter.check_sampler(eta)


def _snapshot(scheduler) -> dict:
    """Shallow copy of the scheduler's attributes; lists (multistep history) are copied so steps can't mutate them."""
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(scheduler).items()}


def _history(scheduler) -> list[torch.Tensor]:
    """Tensors the scheduler keeps in list attributes between steps (DPM-Solver++ model outputs)."""
    return [t for v in vars(scheduler).values() if isinstance(v, list) for t in v if torch.is_tensor(t)]


def _step_seeds(num_steps: int, generator: torch.Generator) -> list[int]:
    """One seed per step, so ancestral / eta noise is the same when a step is rebuilt (a chain's first draw)."""
    return torch.randint(0, 2**62, (num_steps,), generator=generator, device=generator.device).tolist()


class _Chain:
    """The scheduler side of one trajectory: per-step noise seeds, states and history producers."""

    def __init__(self, adapter: Adapter, num_steps: int, generator: torch.Generator, eta: float, height: int,
                 width: int):
        self.adapter, self.scheduler, self.eta, self.size = adapter, adapter.scheduler, eta, (height, width)
        adapter.set_timesteps(num_steps, height, width)
        self.timesteps = self.scheduler.timesteps
        self.seeds = _step_seeds(num_steps, generator)
        self.noise_device = generator.device
        self.producer: dict[int, tuple[torch.Tensor, int]] = {}  # id(history tensor) -> (tensor, step made)
        self.made: dict[int, list[int]] = {}  # step -> ids of the history tensors it made, in order

    def reset(self) -> None:
        """Leave the scheduler freshly set (drops history leaves and the references they hold)."""
        self.adapter.set_timesteps(len(self.timesteps), *self.size)
        self.producer.clear()

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(self.noise_device).manual_seed(self.seeds[i])
        return self.adapter.step(i, self.timesteps[i], x, model_output, generator=generator, eta=self.eta)

    def record(self, i: int) -> None:
        """Remember the history tensors step i created (strong refs keep their ids unique)."""
        new = [t for t in _history(self.scheduler) if id(t) not in self.producer]
        for t in new:
            self.producer[id(t)] = (t, i)
        self.made[i] = [id(t) for t in new]

    def restore(self, state: dict, first: int) -> list[tuple[torch.Tensor, int]]:
        """Put the scheduler back to `state`; history made by steps >= first becomes fresh leaves.

        Returns (leaf, id of the original tensor) pairs, so leaf gradients can be routed to their producer.
        """
        leaves, restored = [], {}
        for key, value in state.items():
            if isinstance(value, list):
                value = [self._leaf(t, first, leaves) if torch.is_tensor(t) else t for t in value]
            restored[key] = value
        vars(self.scheduler).update(restored)
        return leaves

    def _leaf(self, t: torch.Tensor, first: int, leaves: list) -> torch.Tensor:
        _, step = self.producer.get(id(t), (None, -1))
        if step < first:
            return t
        leaf = t.detach().requires_grad_(True)
        leaves.append((leaf, id(t)))
        return leaf


def _sample(chain: _Chain, plan: Plan, cond: Conditioning, x: torch.Tensor, guidance_scale: float, first: int):
    """Run the chain to the plan's stop under no_grad; returns x0 and the saved steps >= first."""
    adapter, saved = chain.adapter, {}
    with torch.no_grad(), adapter.frozen_calls():
        for i in range(plan.stop + 1):
            state = _snapshot(chain.scheduler)
            t = chain.timesteps[i]
            out = adapter.denoise(x, t, cond, guidance_scale)
            if i >= first:
                saved[i] = _Saved(x, out, state)
            if plan.predict_x0 and i == plan.stop:
                return adapter.predict_x0(x, out, t), saved
            x = chain.step(i, x, out)
            chain.record(i)
    return x, saved


def _score(adapter: Adapter, latents: torch.Tensor, reward_fn, prompts, loss_scale: float, weight: float = 1.0):
    """Decode and score; returns (loss, rewards, images, parts) with the loss still attached."""
    images = adapter.decode(latents)
    rewards = reward_fn(images, prompts)
    if not torch.is_tensor(rewards) or rewards.ndim != 1 or rewards.shape[0] != latents.shape[0]:
        got = tuple(rewards.shape) if torch.is_tensor(rewards) else type(rewards).__name__
        raise ValueError(f"reward_fn must return a tensor of shape [{latents.shape[0]}], got {got}")
    if not rewards.requires_grad:
        raise ValueError("reward_fn returned scores without a gradient path to the images; use a differentiable reward")
    loss = -loss_scale * weight * rewards.to(torch.promote_types(rewards.dtype, torch.float32)).mean()
    parts = {k: v.detach().float() for k, v in getattr(reward_fn, "last_parts", {}).items()}
    return loss, rewards.detach().float(), images.detach(), parts


def _score_backward(adapter: Adapter, x0: torch.Tensor, reward_fn, prompts, loss_scale: float, weight: float = 1.0):
    """Decode, score and backpropagate to x0; returns (adjoint of x0, loss, rewards, images, parts).

    In low-memory mode one image at a time: scores are per image, so the chunks' losses and adjoints add up to
    the batch's, and only one image's VAE and reward graphs are alive at once.
    """
    n = x0.shape[0]
    size = 1 if adapter.low_memory else n
    adjoints, loss, rewards, images, parts = [], 0.0, [], [], {}
    for start in range(0, n, size):
        latent = x0[start:start + size].detach().requires_grad_(True)
        share = weight * (latent.shape[0] / n)
        chunk_loss, got, decoded, chunk_parts = _score(
            adapter, latent, reward_fn, prompts[start:start + size], loss_scale, share
        )
        adjoints.append(torch.autograd.grad(chunk_loss, latent)[0])
        loss += float(chunk_loss.detach())
        rewards.append(got)
        images.append(decoded)
        for key, value in chunk_parts.items():
            parts.setdefault(key, []).append(value)
    parts = {key: torch.cat(values) for key, values in parts.items()}
    return torch.cat(adjoints), loss, torch.cat(rewards), torch.cat(images), parts


def _trained_call(adapter: Adapter, x: torch.Tensor, t, cond, guidance_scale: float, step_term, scale: float):
    """A trained step's denoiser call with grad, and the step term (times `scale`) added to the loss at it, if any."""
    out = adapter.denoise(x, t, cond, guidance_scale)
    terms = [] if step_term is None else [scale * step_term(adapter, x, t, out, cond, guidance_scale)]
    return out, terms


def _sweep(chain: _Chain, plan: Plan, saved: dict[int, _Saved], adj_x0: torch.Tensor, cond, guidance_scale, no_sync,
           step_hook=None, step_term=None, term_scale: float = 1.0):
    """Backpropagate the x0 adjoint through steps stop..first, one denoiser graph at a time."""
    adapter, first, trained = chain.adapter, plan.trained[0], set(plan.trained)
    adj_x, adj_hist = adj_x0, {}  # adj_hist: id(original history tensor) -> adjoint
    for i in range(plan.stop, first - 1, -1):
        s, t, last = saved.pop(i), chain.timesteps[i], i == first  # a visited step's latents are freed as we go
        with contextlib.nullcontext() if last else no_sync(), torch.enable_grad():
            # At the first trained step nothing upstream needs an adjoint: no input or history leaves.
            leaves = chain.restore(s.state, plan.num_steps if last else first)
            x = s.x.detach().requires_grad_(not last)
            out, terms = s.model_output, []
            if i in trained:
                x_in = x.detach() if plan.detach_input else x
                out, terms = _trained_call(adapter, x_in, t, cond, guidance_scale, step_term, term_scale)
            if plan.predict_x0 and i == plan.stop:
                outputs, grads = [adapter.predict_x0(x, out, t)], [adj_x]
            else:
                before = {id(h) for h in _history(chain.scheduler)}
                outputs, grads = [chain.step(i, x, out)], [adj_x]
                produced = [h for h in _history(chain.scheduler) if id(h) not in before]
                for h, original in zip(produced, chain.made.get(i, [])):
                    if original in adj_hist:
                        outputs.append(h)
                        grads.append(adj_hist.pop(original))
            outputs, grads = outputs + terms, grads + [torch.ones_like(v) for v in terms]
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
        if step_hook is not None and i in trained:
            step_hook(i)
        if last:
            break
        adj_x = x.grad if x.grad is not None else torch.zeros_like(x)
        for leaf, original in leaves:
            if leaf.grad is not None:
                adj_hist[original] = adj_hist[original] + leaf.grad if original in adj_hist else leaf.grad


def reward_backward(
    adapter: Adapter,
    plan: Plan,
    cond: Conditioning,
    reward_fn: Callable,
    prompts: list[str],
    *,
    height: int,
    width: int,
    guidance_scale: float,
    generator: torch.Generator,
    loss_scale: float = 1.0,
    no_sync=contextlib.nullcontext,
    eta: float = 0.0,
    step_hook: Callable[[int], None] | None = None,
    step_term: Callable | None = None,
) -> StepOutput:
    """Sample one batch, score it and accumulate d(-loss_scale * mean reward)/d(params) into param.grad.

    Every backward but the last runs inside `no_sync()` (denoiser forward included), so DDP reduces once.
    Deterministic given `generator`. The caller zeroes grads and steps the optimizer.
    `step_hook(i)`, if given, is called right after the backward through trained step i's denoiser call (one
    backward per trained step, last step first; n for DRaFT-LV): parameter-gradient hooks that fire in between
    see exactly that step's contribution (tuner studies measure per-step gradient norms with it).
    `step_term(adapter, x, t, model_output, cond, guidance_scale)`, if given, is a scalar added to the loss at each
    trained call (times loss_scale; DRaFT-LV's n calls each count 1/n), e.g. the KL-style penalty of tuner.guards.
    """
    check_scheduler(adapter, eta)
    if len(prompts) != len(cond):
        raise ValueError(f"got {len(prompts)} prompts for a conditioning batch of {len(cond)}")
    chain = _Chain(adapter, plan.num_steps, generator, eta, height, width)
    x = adapter.initial_latents(len(prompts), height, width, generator)
    if plan.renoise:
        return _renoise_backward(
            chain, plan, cond, reward_fn, prompts, x, guidance_scale, generator, loss_scale, no_sync, step_hook,
            step_term)
    x0, saved = _sample(chain, plan, cond, x, guidance_scale, plan.trained[0])
    with no_sync():
        adj_x0, loss, rewards, images, parts = _score_backward(adapter, x0, reward_fn, prompts, loss_scale)
    _sweep(chain, plan, saved, adj_x0, cond, guidance_scale, no_sync, step_hook, step_term, loss_scale)
    chain.reset()
    return StepOutput(rewards, images, parts, loss)


def _renoise_backward(chain, plan, cond, reward_fn, prompts, x, guidance_scale, generator, loss_scale, no_sync,
                      step_hook=None, step_term=None):
    """DRaFT-LV: re-noise the final latent n times to the last step's level and backprop through that step."""
    adapter, last = chain.adapter, plan.num_steps - 1
    x0, saved = _sample(chain, plan, cond, x, guidance_scale, last)
    t = chain.timesteps[last]
    total, rewards, parts, images = 0.0, 0.0, {}, None
    for r in range(plan.renoise):
        # As in reward_backward: VAE + reward backward first, then the denoiser graph alone, so one graph is alive.
        chain.restore(saved[last].state, plan.num_steps)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = adapter.add_noise(x0, noise, t)
        with torch.no_grad(), adapter.frozen_calls():
            latent = chain.step(last, x_t, adapter.denoise(x_t, t, cond, guidance_scale))
        with no_sync():
            adj, loss, got, images, parts = _score_backward(
                adapter, latent, reward_fn, prompts, loss_scale, 1.0 / plan.renoise
            )
        ctx = contextlib.nullcontext() if r == plan.renoise - 1 else no_sync()
        with ctx, torch.enable_grad():
            chain.restore(saved[last].state, plan.num_steps)
            out, terms = _trained_call(adapter, x_t, t, cond, guidance_scale, step_term, loss_scale / plan.renoise)
            latent = chain.step(last, x_t, out)
            torch.autograd.backward([latent, *terms], [adj.to(latent.dtype), *(torch.ones_like(v) for v in terms)])
        if step_hook is not None:
            step_hook(last)
        total, rewards = total + loss, rewards + got / plan.renoise
    chain.reset()
    return StepOutput(rewards, images, parts, total)


@torch.no_grad()
def sample(
    adapter: Adapter,
    cond: Conditioning,
    *,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    generator: torch.Generator,
    eta: float = 0.0,
) -> torch.Tensor:
    """Images in [0,1] from a full chain, no gradients (galleries, evaluation); same noise as training."""
    check_scheduler(adapter, eta)
    chain = _Chain(adapter, num_steps, generator, eta, height, width)
    x = adapter.initial_latents(len(cond), height, width, generator)
    return _run(adapter, chain, cond, x, guidance_scale)


def _run(adapter: Adapter, chain: _Chain, cond: Conditioning, x: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    with adapter.frozen_calls():
        for i, t in enumerate(chain.timesteps):
            x = chain.step(i, x, adapter.denoise(x, t, cond, guidance_scale))
    return adapter.decode(x, checkpoint=False)


@torch.no_grad()
def sample_each(
    adapter: Adapter,
    cond: Conditioning,
    *,
    generators: list[torch.Generator],
    batch_size: int,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
) -> torch.Tensor:
    """Image i as `sample` makes it from cond[i] alone with generators[i], batch_size images per chain.

    Evaluation seeds each prompt on its own so its images do not depend on the batch; batching those chains saves
    most of the kernel launches of small models. Chains whose steps draw noise run one image at a time.
    """
    if len(generators) != len(cond):
        raise ValueError(f"sample_each needs one generator per prompt: {len(generators)} for {len(cond)} prompts")
    check_scheduler(adapter, eta)
    if adapter.steps_draw_noise(eta):
        batch_size = 1
    images = []
    for start in range(0, len(cond), batch_size):
        gens = generators[start:start + batch_size]
        if len(gens) == 1:
            images.append(sample(adapter, cond[start:start + 1], height=height, width=width, num_steps=num_steps,
                                 guidance_scale=guidance_scale, generator=gens[0], eta=eta))
            continue
        x = []
        for gen in gens:  # each generator drawn as sample() draws it: the chain's step seeds, then the latents
            _step_seeds(num_steps, gen)
            x.append(adapter.initial_latents(1, height, width, gen))
        chain = _Chain(adapter, num_steps, torch.Generator(gens[0].device), eta, height, width)  # seeds go unused
        images.append(_run(adapter, chain, cond[start:start + len(gens)], torch.cat(x), guidance_scale))
    return torch.cat(images)


__all__ = ["StepOutput", "reward_backward", "sample", "sample_each", "check_scheduler",
           "SUPPORTED_SCHEDULERS"]
