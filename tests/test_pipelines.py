"""Adapters over tiny random SD 1.5 / SDXL pipelines: encoding, guided eps, x0, decode, save/load."""

import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from tests.tuner_fixtures import PROMPTS, SIZE, tiny_adapter
from tuner.engine import check_scheduler
from tuner.pipelines.unet import SCHEDULERS as UNET_SCHEDULERS
from tuner.pipelines import (
    SCHEDULERS, Conditioning, SD15Adapter, SDXLAdapter, adapter_from_pipeline, load_adapter, tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tiny_pipelines_are_real_diffusers_pipelines():
    assert isinstance(tiny_sdxl_pipeline(), StableDiffusionXLPipeline)
    assert isinstance(tiny_sd15_pipeline(), StableDiffusionPipeline)
    a, b = tiny_sd15_pipeline(3), tiny_sd15_pipeline(3)
    for p, q in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(p, q)  # seeded


def test_pipeline_generates_images():
    """The stock diffusers sampling loop runs on the tiny SDXL pipeline at 64x64."""
    pipe = tiny_sdxl_pipeline()
    out = pipe("a cat", height=SIZE, width=SIZE, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("family,dim,pooled", [("sd15", 16, False), ("sdxl", 32, True)])
def test_encode_prompts(family, dim, pooled):
    adapter = tiny_adapter(family)
    assert isinstance(adapter, {"sd15": SD15Adapter, "sdxl": SDXLAdapter}[family])
    cond = adapter.encode_prompts(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 77, dim) and cond.negative_embeds.shape == (2, 77, dim)
    assert not cond.prompt_embeds.requires_grad
    assert (cond.pooled is not None) == pooled
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])
    if family == "sdxl":  # no negative prompt: zeros (force_zeros_for_empty_prompt)
        assert cond.negative_embeds.abs().max() == 0 and cond.negative_pooled.abs().max() == 0
        assert adapter.encode_prompts(PROMPTS, ["blurry", "ugly"]).negative_embeds.abs().max() > 0
    one = cond[1]
    assert len(one) == 1 and torch.equal(one.prompt_embeds[0], cond.prompt_embeds[1])
    assert cond.to(dtype=torch.float32).prompt_embeds.dtype == torch.float32
    with pytest.raises(ValueError, match="negative prompts"):
        adapter.encode_prompts(PROMPTS, ["x"])


def _two_pass(adapter, x, t, cond: Conditioning, scale):
    """CFG from two separate UNet calls (uncond, cond), no batching."""
    x_in = adapter.scheduler.scale_model_input(x, t)

    def call(ctx, pooled):
        kwargs = {}
        if pooled is not None:
            ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * x.shape[0], dtype=x.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
        return adapter.denoiser(x_in, t, encoder_hidden_states=ctx, **kwargs).sample

    uncond = call(cond.negative_embeds, cond.negative_pooled)
    text = call(cond.prompt_embeds, cond.pooled)
    return uncond + scale * (text - uncond), text


@pytest.mark.parametrize("family,scheduler", [("sd15", "ddim"), ("sdxl", "euler")])
def test_eps_with_cfg_matches_two_passes(family, scheduler):
    adapter = tiny_adapter(family, scheduler)
    cond = adapter.encode_prompts(PROMPTS, ["blurry", "dark"])
    adapter.scheduler.set_timesteps(4)
    t = adapter.scheduler.timesteps[1]
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    guided, text = _two_pass(adapter, x, t, cond, 4.5)
    torch.testing.assert_close(adapter.denoise(x, t, cond, 4.5), guided, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapter.denoise(x, t, cond, 1.0), text, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheduler", sorted(UNET_SCHEDULERS))
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_predict_x0_inverts_the_forward_noising(scheduler, prediction):
    """x_t = add_noise(x0, n, t); the model output that is exactly right must give back x0."""
    adapter = adapter_from_pipeline(tiny_sd15_pipeline(), device="cpu", dtype=torch.float64, scheduler=scheduler,
                                    prediction_type=prediction)
    sched = adapter.scheduler
    sched.set_timesteps(10)
    x0, noise = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    for t in sched.timesteps[[0, 4, 9]]:
        x_t = sched.add_noise(x0, noise, t.reshape(1))
        abar = sched.alphas_cumprod[int(t)].double()
        if scheduler in ("euler", "euler-ancestral", "dpm++"):  # these use their own (interpolated) sigma grid
            s = sched.sigmas[sched.index_for_timestep(t)].double()
            abar = 1 / (1 + s * s)
        v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
        out = noise if prediction == "epsilon" else v
        torch.testing.assert_close(adapter.predict_x0(x_t, out, t), x0, rtol=1e-9, atol=1e-9)


def test_decode_range_shape_and_straight_through_gradient():
    adapter = tiny_adapter("sd15")
    z = (3 * torch.randn(2, 4, 8, 8, dtype=torch.float64)).requires_grad_(True)
    images = adapter.decode(z)
    assert images.shape == (2, 3, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
    w = torch.randn_like(images)
    (grad,) = torch.autograd.grad((images * w).sum(), z)
    raw = adapter.vae.decode(z / adapter.vae.config.scaling_factor).sample / 2 + 0.5
    assert ((raw < 0) | (raw > 1)).any()  # the test would notice a clamp that kills gradients
    (want,) = torch.autograd.grad((raw * w).sum(), z)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapter.decode(z.detach(), checkpoint=False), images.detach(), rtol=0, atol=1e-12)


def test_initial_latents():
    adapter = tiny_adapter("sdxl", "euler")
    adapter.scheduler.set_timesteps(5)
    x = adapter.initial_latents(3, SIZE, 2 * SIZE, torch.Generator().manual_seed(0))
    assert x.shape == (3, 4, 8, 16) and x.dtype == torch.float64
    want = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(x, want * adapter.scheduler.init_noise_sigma)
    with pytest.raises(ValueError, match="multiples of 8"):
        adapter.initial_latents(1, 60, 64, torch.Generator())


def test_half_precision_keeps_sdxl_vae_in_float32():
    xl = adapter_from_pipeline(tiny_sdxl_pipeline(), device="cpu", dtype=torch.bfloat16)
    assert xl.vae.dtype == torch.float32 and xl.denoiser.dtype == torch.bfloat16
    assert xl.latent_dtype == torch.float32
    sd = adapter_from_pipeline(tiny_sd15_pipeline(), device="cpu", dtype=torch.bfloat16)
    assert sd.vae.dtype == torch.bfloat16


def test_unet_is_looked_up_at_call_time():
    adapter = tiny_adapter("sd15")
    cond = adapter.encode_prompts(PROMPTS)
    adapter.scheduler.set_timesteps(2)
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    adapter.denoiser = Wrapper(adapter.denoiser)
    adapter.denoise(torch.zeros(2, 4, 8, 8, dtype=torch.float64), adapter.scheduler.timesteps[0], cond, 2.0)
    assert calls == [1]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_save_and_load_round_trip(family, tmp_path):
    pipe = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}[family](7)
    pipe.save_pretrained(tmp_path)
    a = adapter_from_pipeline(pipe, device="cpu", dtype=torch.float64, scheduler="dpm++")
    b = load_adapter(str(tmp_path), device="cpu", dtype=torch.float64, scheduler="dpm++")
    assert type(b) is type(a)
    assert b.scheduler.config.algorithm_type == "dpmsolver++"
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    b.scheduler.set_timesteps(3)
    a.scheduler.set_timesteps(3)
    t = a.scheduler.timesteps[0]
    torch.testing.assert_close(b.denoise(x, t, b.encode_prompts(PROMPTS), 3.0), a.denoise(x, t, a.encode_prompts(PROMPTS), 3.0),
                               rtol=1e-10, atol=1e-12)


def test_load_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_adapter(str(tmp_path), device="cpu", dtype=torch.float32)
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        load_adapter(str(tmp_path), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        adapter_from_pipeline(tiny_sd15_pipeline(), device="cpu", dtype=torch.float32, scheduler="heun")


def test_engine_refuses_unproven_schedulers():
    adapter = tiny_adapter("sd15")
    config = adapter.scheduler.config
    adapter.scheduler = SCHEDULERS["euler"].from_config(config)
    with pytest.raises(ValueError, match="eta"):
        check_scheduler(adapter, eta=0.5)
    adapter.scheduler = PNDMScheduler.from_config(config)
    with pytest.raises(ValueError, match="PNDMScheduler"):
        check_scheduler(adapter)
