"""The guards against reward hacking (tuner.guards, tuner.mix): each checked against an independent computation on
tiny float64 models of a UNet family (SD 1.5) and a flow family (FLUX.1, SD3)."""
import pytest
import torch

from tests.tuner_fixtures import (
    PROMPTS, SIZE, ToyReward, _guided, denoiser_grads, naive_backward, relative_error, tiny_adapter,
)
from tuner.engine import reward_backward
from tuner.guards.penalty import BasePenalty
from tuner.lora import add_lora
from tuner.methods import Plan

T, GUIDANCE, SEED, TOL = 6, 3.0, 5, 1e-10
PLANS = {
    "drtune": Plan(T, 4, True, (1, 3, 4), detach_input=True, grad_from=1),
    "draft": Plan(T, T - 1, False, (3, 4, 5), detach_input=False, grad_from=3),
    "draft-lv": Plan(T, T - 1, False, (T - 1,), detach_input=False, grad_from=T - 1, renoise=2),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def perturbed_lora_adapter(family: str):
    """A tiny float64 adapter whose LoRA is away from zero (so the tuned and base models differ)."""
    adapter = tiny_adapter(family)
    params = add_lora(adapter.denoiser, rank=2, alpha=2.0, target_modules=list(adapter.lora_targets))
    g = torch.Generator().manual_seed(11)
    for p in params:  # float64 like the model (add_lora keeps LoRA weights fp32 for mixed precision)
        p.data = 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64)
    return adapter


# -- 1. KL-style penalty toward the base model --------------------------------------------------------------------
@pytest.mark.parametrize("family,method", [("sd15", "drtune"), ("sd15", "draft"), ("sd15", "draft-lv"),
                                           ("flux", "drtune"), ("flux", "draft"), ("sd3", "drtune")])
def test_penalty_gradient_equals_autograd_at_a_perturbed_lora(family, method):
    adapter, plan, weight = perturbed_lora_adapter(family), PLANS[method], 3.0
    cond = adapter.encode_prompts(PROMPTS)
    penalty = BasePenalty(weight)
    out = reward_backward(adapter, plan, cond, ToyReward(), PROMPTS, height=SIZE, width=SIZE,
                          guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), step_term=penalty)
    got, value = denoiser_grads(adapter), penalty.pop()
    adapter.denoiser.zero_grad(set_to_none=True)

    seen = []

    def term(x_in, t, eps):  # written out: base = the same network with its LoRA off, a constant target
        adapter.denoiser.disable_adapters()
        with torch.no_grad():
            base = _guided(adapter, x_in.detach(), t, cond, GUIDANCE)
        adapter.denoiser.enable_adapters()
        seen.append(float(((eps - base) ** 2).mean().detach()))
        return weight * ((eps - base) ** 2).mean()

    naive_backward(adapter, plan, cond, ToyReward(), seed=SEED, guidance_scale=GUIDANCE, trained_term=term)
    want = denoiser_grads(adapter)
    assert value > 1e-6 and value == pytest.approx(sum(seen), rel=1e-9)  # the tuned model is away from the base
    assert relative_error(got, want) < TOL
    adapter.denoiser.zero_grad(set_to_none=True)  # the penalty alone moves the gradient: not a no-op
    reward_backward(adapter, plan, cond, ToyReward(), PROMPTS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED))
    assert relative_error(denoiser_grads(adapter), want) > 1e-3


def test_penalty_of_a_full_finetune_uses_a_frozen_copy():
    adapter = tiny_adapter("sd15")
    penalty = BasePenalty.for_denoiser(1.0, adapter.denoiser, full_finetune=True)
    adapter.denoiser.requires_grad_(True)
    with torch.no_grad():
        for p in adapter.denoiser.parameters():
            p.add_(0.01)
    cond = adapter.encode_prompts(PROMPTS)
    adapter.set_timesteps(T, SIZE, SIZE)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, dtype=torch.float64)
    t = adapter.scheduler.timesteps[2]
    out = adapter.denoise(x, t, cond, GUIDANCE)
    value = penalty(adapter, x, t, out, cond, GUIDANCE)
    assert adapter.denoiser is not penalty.base and not any(p.requires_grad for p in penalty.base.parameters())
    with torch.no_grad():
        for p in adapter.denoiser.parameters():
            p.sub_(0.01)
        base = adapter.denoise(x, t, cond, GUIDANCE)
    assert float(value.detach()) == pytest.approx(float(((out - base) ** 2).mean().detach()), rel=1e-9) and value > 0
