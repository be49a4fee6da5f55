"""The engine's gradient equals naive autograd through the whole chain, for every method, scheduler and model family
(SD 1.5, SDXL, and the flow-matching SD3 and FLUX.1).

Float64 tiny models; fixed plans so both sides use the same steps. The reference lives in
tests/tuner_fixtures.py and never calls tuner.engine.
"""

import contextlib

import pytest
import torch

from tests.tuner_fixtures import (
    PROMPTS, SIZE, ToyReward, naive_backward, relative_error, tiny_adapter, denoiser_grads,
)
from tuner.engine import reward_backward, sample, sample_each
from tuner.lora import add_lora
from tuner.methods import Plan

T = 6
GUIDANCE = 3.0
SEED = 5
TOL = 1e-10

# One fixed plan per method, shaped like the method's own plans (see tuner.methods).
PLANS = {
    "drtune": Plan(T, 4, True, (1, 3, 4), detach_input=True, grad_from=1),
    "drtune-no-stop-gradient": Plan(T, 4, True, (1, 3, 4), detach_input=False, grad_from=1),
    "refl": Plan(T, 3, True, (3,), detach_input=True, grad_from=3),
    "draft": Plan(T, T - 1, False, (3, 4, 5), detach_input=False, grad_from=3),
    "draft-lv": Plan(T, T - 1, False, (T - 1,), detach_input=False, grad_from=T - 1, renoise=2),
    "alignprop": Plan(T, T - 1, False, (1, 2, 3, 4, 5), detach_input=False, grad_from=1),
}


pytestmark = pytest.mark.usefixtures("single_thread")


def _compare(adapter, plan, eta=0.0):
    """(relative gradient error, engine loss, naive loss)."""
    cond = adapter.encode_prompts(PROMPTS)
    reward = ToyReward()
    adapter.denoiser.zero_grad(set_to_none=True)
    out = reward_backward(
        adapter, plan, cond, reward, PROMPTS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED), eta=eta,
    )
    got = denoiser_grads(adapter)
    adapter.denoiser.zero_grad(set_to_none=True)
    naive_loss = naive_backward(adapter, plan, cond, reward, seed=SEED, guidance_scale=GUIDANCE, eta=eta)
    return relative_error(got, denoiser_grads(adapter)), out.loss, naive_loss


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method", sorted(PLANS))
def test_every_method_exact(family, method):
    """DDIM for the UNet families; the flow-matching Euler sampler (and its x0 and re-noising) for SD3 and FLUX."""
    err, loss, naive_loss = _compare(tiny_adapter(family), PLANS[method])
    assert loss == pytest.approx(naive_loss, rel=1e-12)
    assert err < TOL


@pytest.mark.parametrize("method", ["drtune", "draft-lv"])
def test_exact_without_guidance_embedding(method):
    """FLUX.1-schnell: no guidance input, no dynamic shift."""
    err, _, _ = _compare(tiny_adapter("flux-schnell"), PLANS[method])
    assert err < TOL


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("scheduler,eta", [("ddim", 1.0), ("euler", 0.0), ("euler-ancestral", 0.0), ("dpm++", 0.0)])
def test_drtune_exact_with_each_scheduler(family, scheduler, eta):
    err, _, _ = _compare(tiny_adapter(family, scheduler), PLANS["drtune"], eta=eta)
    assert err < TOL


@pytest.mark.parametrize("method", ["draft", "alignprop", "drtune-no-stop-gradient"])
def test_history_scheduler_exact_through_denoiser_input(method):
    # DPM-Solver++ history entries depend on x_t directly and through the UNet input: both paths must be routed.
    err, _, _ = _compare(tiny_adapter("sd15", "dpm++"), PLANS[method])
    assert err < TOL


def test_draft_lv_exact_with_euler():
    err, _, _ = _compare(tiny_adapter("sd15", "euler"), PLANS["draft-lv"])
    assert err < TOL


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_reference_tells_plans_apart(family):
    """The comparison can fail: the engine's gradient for one plan differs from the reference of another."""
    adapter = tiny_adapter(family)
    cond, reward = adapter.encode_prompts(PROMPTS), ToyReward()
    kwargs = dict(height=SIZE, width=SIZE, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED))
    reward_backward(adapter, PLANS["alignprop"], cond, reward, PROMPTS, **kwargs)
    got = denoiser_grads(adapter)
    adapter.denoiser.zero_grad(set_to_none=True)
    detached = Plan(T, T - 1, False, (1, 2, 3, 4, 5), detach_input=True, grad_from=1)
    naive_backward(adapter, detached, cond, reward, seed=SEED, guidance_scale=GUIDANCE)
    assert relative_error(got, denoiser_grads(adapter)) > 1e-3


# -- per-step gradient hook ----------------------------------------------------------------------------
class StepGrads:
    """A step_hook: parameter-gradient hooks collect what each backward adds; the step hook files it under step i."""

    def __init__(self, unet):
        self.pending, self.steps = {}, []
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, name=name: self._add(name, g))

    def _add(self, name, grad):
        self.pending[name] = self.pending.get(name, 0) + grad.detach().clone()

    def __call__(self, i: int) -> None:
        self.steps.append((i, self.pending))
        self.pending = {}


def _with_hook(adapter, plan, hook):
    adapter.denoiser.zero_grad(set_to_none=True)
    cond = adapter.encode_prompts(PROMPTS)
    reward_backward(adapter, plan, cond, ToyReward(), PROMPTS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), step_hook=hook)
    return cond


@pytest.mark.parametrize("method", ["drtune", "drtune-no-stop-gradient", "draft-lv"])
def test_step_hook_splits_the_gradient_by_trained_step(method):
    plan, adapter = PLANS[method], tiny_adapter("sd15", "ddim")
    hook = StepGrads(adapter.denoiser)
    _with_hook(adapter, plan, hook)
    assert [i for i, _ in hook.steps] == ([T - 1] * plan.renoise if plan.renoise else list(reversed(plan.trained)))
    total = {k: sum(g[k] for _, g in hook.steps) for k in hook.steps[0][1]}
    assert relative_error(total, denoiser_grads(adapter)) < 1e-12


def test_step_hook_contribution_is_that_steps_own_gradient():
    """With the stop-gradient, step i's share equals the whole gradient of the plan that trains step i alone."""
    plan, adapter = PLANS["drtune"], tiny_adapter("sd15", "ddim")
    hook = StepGrads(adapter.denoiser)
    cond = _with_hook(adapter, plan, hook)
    for i, got in hook.steps:
        adapter.denoiser.zero_grad(set_to_none=True)
        alone = Plan(T, plan.stop, True, (i,), detach_input=True, grad_from=i)
        naive_backward(adapter, alone, cond, ToyReward(), seed=SEED, guidance_scale=GUIDANCE)
        assert relative_error(got, denoiser_grads(adapter)) < TOL


# -- memory: one denoiser graph at a time ------------------------------------------------------------
class GraphCounter:
    """Counts denoiser forward passes whose saved tensors are still alive (= live autograd graphs of the denoiser)."""

    def __init__(self, unet):
        self.live, self.peak, self.calls = {}, 0, 0
        self._ctx = None
        unet.register_forward_pre_hook(self._enter)
        unet.register_forward_hook(self._exit)

    def _enter(self, module, args):
        if torch.is_grad_enabled():
            self.calls += 1
            call = self.calls
            self._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(call, t), lambda h: h.tensor)
            self._ctx.__enter__()

    def _exit(self, module, args, output):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def _pack(self, call, tensor):
        self.live[call] = self.live.get(call, 0) + 1
        self.peak = max(self.peak, len(self.live))
        return _Held(tensor, call, self)

    def release(self, call):
        self.live[call] -= 1
        if not self.live[call]:
            del self.live[call]


class _Held:
    def __init__(self, tensor, call, counter):
        self.tensor, self.call, self.counter = tensor, call, counter

    def __del__(self):
        self.counter.release(self.call)


def _peak_graphs(plan, engine: bool, family: str = "sd15") -> int:
    adapter = tiny_adapter(family)
    counter = GraphCounter(adapter.denoiser)
    cond, reward = adapter.encode_prompts(PROMPTS), ToyReward()
    if engine:
        reward_backward(adapter, plan, cond, reward, PROMPTS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(SEED))
    else:
        naive_backward(adapter, plan, cond, reward, seed=SEED, guidance_scale=GUIDANCE)
    assert counter.calls == len(plan.trained)
    assert not counter.live, "a UNet graph outlived reward_backward"
    return counter.peak


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("method", ["drtune", "alignprop"])
def test_engine_holds_one_denoiser_graph_at_a_time(method, family):
    plan = PLANS[method]
    assert len(plan.trained) >= 3
    assert _peak_graphs(plan, False, family) == len(plan.trained)  # the counter sees naive autograd's graphs pile up
    assert _peak_graphs(plan, True, family) == 1


# -- DDP: one all-reduce per call --------------------------------------------------------------------
class CountingNoSync:
    """A stand-in for DDP's no_sync that records whether we are inside it."""

    def __init__(self):
        self.inside, self.entered = False, 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


@pytest.mark.parametrize("method", ["drtune", "draft-lv", "refl"])
def test_no_sync_wraps_all_but_the_last_unet_backward(method):
    plan = PLANS[method]
    adapter = tiny_adapter("sd15", "ddim")
    no_sync, forwards, backwards = CountingNoSync(), [], []
    adapter.denoiser.register_forward_pre_hook(
        lambda m, a: forwards.append(no_sync.inside) if torch.is_grad_enabled() else None
    )
    weight = next(adapter.denoiser.parameters())
    weight.register_hook(lambda g: backwards.append(no_sync.inside))
    cond = adapter.encode_prompts(PROMPTS)
    reward_backward(adapter, plan, cond, ToyReward(), PROMPTS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), no_sync=no_sync)
    n = plan.renoise or len(plan.trained)
    assert backwards == [True] * (n - 1) + [False]
    assert forwards == [True] * (n - 1) + [False]
    assert no_sync.entered >= n - 1


# -- sampling ----------------------------------------------------------------------------------------
def test_sample_matches_the_training_chain():
    """sample() draws the same chain as a whole-chain plan: same images for the same generator."""
    adapter = tiny_adapter("sdxl", "euler-ancestral")
    cond = adapter.encode_prompts(PROMPTS)
    images = sample(adapter, cond, height=SIZE, width=SIZE, num_steps=T, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED))
    out = reward_backward(adapter, PLANS["draft"], cond, ToyReward(), PROMPTS, height=SIZE, width=SIZE,
                          guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED))
    assert images.shape == (2, 3, SIZE, SIZE)
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, out.images, rtol=0, atol=1e-12)
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (2,)
    assert out.loss == pytest.approx(-float(ToyReward()(out.images, PROMPTS).mean()), rel=1e-6)


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("euler", 0.0), ("dpm++", 0.0), ("ddim", 0.7),
                                          ("euler-ancestral", 0.0)])
def test_sample_each_gives_each_prompt_its_own_images(scheduler, eta):
    """Batched evaluation: image i equals sample() of prompt i alone with generator i, at any batch size."""
    adapter = tiny_adapter("sd15", scheduler)
    prompts = PROMPTS + ["a third prompt", "and a fourth"] + PROMPTS[:1]
    cond = adapter.encode_prompts(prompts)
    kw = dict(height=SIZE, width=SIZE, num_steps=T, guidance_scale=GUIDANCE, eta=eta)
    alone = torch.cat([sample(adapter, cond[i:i + 1], generator=torch.Generator().manual_seed(SEED + i), **kw)
                       for i in range(len(prompts))])
    batched = sample_each(adapter, cond, generators=[torch.Generator().manual_seed(SEED + i)
                                                     for i in range(len(prompts))], batch_size=2, **kw)
    assert adapter.steps_draw_noise(eta) == (scheduler == "euler-ancestral" or eta != 0.0)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-12)
    assert not torch.allclose(batched[0], batched[-1])  # same prompt, other seed: other image
    with pytest.raises(ValueError, match="one generator per prompt"):
        sample_each(adapter, cond, generators=[torch.Generator()], batch_size=2, **kw)


def test_reward_errors_are_explained():
    adapter = tiny_adapter("sd15", "ddim")
    cond = adapter.encode_prompts(PROMPTS)
    plan = Plan(2, 1, False, (1,), detach_input=False, grad_from=1)
    kwargs = dict(height=SIZE, width=SIZE, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="without a gradient path"):
        reward_backward(adapter, plan, cond, lambda images, p: images.detach().mean((1, 2, 3)), PROMPTS, **kwargs)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        reward_backward(adapter, plan, cond, lambda images, p: images.mean(), PROMPTS, **kwargs)
    with pytest.raises(ValueError, match="3 prompts"):
        reward_backward(adapter, plan, cond, ToyReward(), PROMPTS + ["x"], **kwargs)


@pytest.mark.parametrize("method", ["drtune", "draft", "draft-lv"])
def test_exact_with_the_lora_folded_into_gradient_free_calls(method):
    """Sampling runs with the LoRA folded into the base weights; the naive reference runs it unfolded."""
    adapter = tiny_adapter("sd15", "ddim")
    add_lora(adapter.denoiser, rank=2, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    adapter.denoiser.double()
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))  # a trained LoRA (B starts at 0)
    base = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters() if "base_layer" in n}
    assert adapter.fold_lora and base
    err, loss, naive_loss = _compare(adapter, PLANS[method])
    assert loss == pytest.approx(naive_loss, rel=1e-12)
    assert err < TOL
    assert all(torch.equal(p, base[n]) for n, p in adapter.denoiser.named_parameters() if n in base)


def test_gradient_free_calls_of_a_bf16_model_run_without_autocast():
    """Under bf16 autocast the sampling calls run the bf16 model plainly; outside them autocast is back on,
    and a plain call equals the same call made outside autocast."""
    adapter = tiny_adapter("sdxl", "ddim", dtype=torch.bfloat16)
    add_lora(adapter.denoiser, rank=2, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    cond = adapter.encode_prompts(["a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = adapter.scheduler.timesteps[0]
    seen = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with adapter.frozen_calls():
            seen.append(torch.is_autocast_enabled("cpu"))
            inside = adapter.denoise(x, t, cond, 3.0)
        seen.append(torch.is_autocast_enabled("cpu"))
    with torch.no_grad(), adapter.frozen_calls():
        plain = adapter.denoise(x, t, cond, 3.0)
    assert seen == [False, True]
    assert torch.equal(inside, plain)
    adapter.plain_half = False
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), adapter.frozen_calls():
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("vae_dtype, plain_half, expected", [
    (torch.bfloat16, True, False), (torch.bfloat16, False, True), (torch.float32, True, True)])
def test_half_vae_decodes_without_autocast(vae_dtype, plain_half, expected):
    """A half-precision VAE decodes in its own dtype with autocast off (forward and checkpoint recompute alike), as
    diffusers' pipelines run it; an fp32 (upcast) VAE keeps the step's autocast, and plain_half=False restores it."""
    adapter = tiny_adapter("sdxl", "ddim", dtype=torch.bfloat16)
    adapter.vae.to(vae_dtype)
    adapter.plain_half = plain_half
    seen = []
    adapter.vae.decoder.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapter.decode(latents).sum().backward()  # checkpointed: the decoder runs twice
    assert seen == [expected, expected] and latents.grad.abs().sum() > 0
