"""The flow-matching families (SD3 / SD3.5, FLUX.1) against the stock diffusers pipelines: the same samples, the same
schedule, a LoRA that stock `load_lora_weights` reproduces, and clear refusals."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tests.tuner_fixtures import PROMPTS, SIZE, tiny_adapter
from tuner.engine import _step_seeds, sample
from tuner.lora import LORA_WEIGHTS, add_lora, save_lora
from tuner.pipelines import (
    FluxAdapter, SD3Adapter, adapter_from_pipeline, load_adapter, tiny_flux_pipeline, tiny_sd3_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")
T = 4
BUILD = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "flux-schnell": lambda: tiny_flux_pipeline(
    guidance_embeds=False)}
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "flux-schnell": 0.0}


def _stock_latents(adapter, seed: int) -> torch.Tensor:
    """The initial latents of `sample(..., generator=seed)`, in the layout the stock pipeline's `latents=` takes."""
    g = torch.Generator().manual_seed(seed)
    _step_seeds(T, g)  # the chain's first draw
    x = adapter.initial_latents(len(PROMPTS), SIZE, SIZE, g)
    if isinstance(adapter, FluxAdapter):
        return FluxPipeline._pack_latents(x, *x.shape)
    return x


def _stock_images(pipe, latents, family: str) -> torch.Tensor:
    return pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=T, latents=latents,
                guidance_scale=GUIDANCE[family], output_type="pt").images


def _ours(adapter, family: str, seed: int) -> torch.Tensor:
    cond = adapter.encode_prompts(PROMPTS)
    return sample(adapter, cond, height=SIZE, width=SIZE, num_steps=T, guidance_scale=GUIDANCE[family],
                  generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(BUILD))
def test_samples_equal_the_stock_pipeline(family):
    pipe = BUILD[family]()
    adapter = adapter_from_pipeline(pipe, device="cpu", dtype=torch.float32)
    ours = _ours(adapter, family, seed=3)
    stock = _stock_images(pipe, _stock_latents(adapter, 3), family)
    assert ours.shape == (2, 3, SIZE, SIZE) and ours.std() > 1e-3
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, _ours(adapter, family, seed=4), atol=1e-3)  # another seed, another image


@pytest.mark.parametrize("size", [256, 512, 1024])
def test_flux_schedule_shifts_with_the_resolution(size):
    """FLUX.1-dev's sigmas: 1 .. 1/T, shifted by mu, which grows linearly with the image tokens from 0.5 at 256
    tokens to 1.15 at 4096: sigma' = e^mu / (e^mu + 1/sigma - 1)."""
    flux = tiny_adapter("flux", dtype=torch.float32)
    flux.set_timesteps(T, size, size)
    tokens = (size // 16) ** 2
    mu = torch.tensor(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256), dtype=torch.float64)
    plain = torch.linspace(1, 1 / T, T, dtype=torch.float64)
    want = mu.exp() / (mu.exp() + 1 / plain - 1)
    torch.testing.assert_close(flux.scheduler.sigmas[:-1].double(), want, rtol=1e-6, atol=1e-6)
    assert flux.scheduler.sigmas[-1] == 0
    schnell = tiny_adapter("flux-schnell", dtype=torch.float32)  # no dynamic shift, shift 1: the plain grid
    schnell.set_timesteps(T, size, size)
    torch.testing.assert_close(schnell.scheduler.sigmas[:-1].double(), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_predict_x0_inverts_the_flow_interpolation(family):
    adapter = tiny_adapter(family)
    adapter.set_timesteps(T, SIZE, SIZE)
    x0, noise = torch.randn(2, 2, 16, 8, 8, dtype=torch.float64)
    for i in (0, 2, T - 1):
        t = adapter.scheduler.timesteps[i]
        x_t = adapter.add_noise(x0, noise, t)
        s = adapter.scheduler.sigmas[i].double()
        torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
        torch.testing.assert_close(adapter.predict_x0(x_t, noise - x0, t), x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_saved_lora_reproduces_the_tuned_samples_in_the_stock_pipeline(tmp_path, family):
    """Image and text streams both carry the LoRA; stock load_lora_weights gives back the tuner's own samples."""
    pipe = BUILD[family]()
    pipe.save_pretrained(tmp_path / "base")
    adapter = adapter_from_pipeline(pipe, device="cpu", dtype=torch.float32)
    params = add_lora(adapter.denoiser, rank=4, alpha=2.0, target_modules=list(adapter.lora_targets))
    names = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    for target in adapter.lora_targets:  # every projection of both streams was hit
        assert any(f".{target}.lora_A" in n for n in names), target
    with torch.no_grad():  # a "tuned" LoRA: both factors non-zero, so alpha/rank scaling matters
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tuned = _ours(adapter, family, seed=5)
    path = save_lora(adapter.denoiser, tmp_path / "lora", adapter.pipeline_class)
    assert path.name == LORA_WEIGHTS

    fresh = adapter.pipeline_class.from_pretrained(tmp_path / "base")
    fresh.set_progress_bar_config(disable=True)
    base = _stock_images(fresh, _stock_latents(adapter, 5), family)
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = _stock_images(fresh, _stock_latents(adapter, 5), family)
    assert (tuned - base).abs().max() > 1e-2  # the LoRA changes the samples
    torch.testing.assert_close(loaded, tuned, rtol=0, atol=2e-5)


def test_load_adapter_reads_flow_folders_and_leaves_t5_out(tmp_path):
    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    tiny_flux_pipeline().save_pretrained(tmp_path / "flux")
    sd3 = load_adapter(str(tmp_path / "sd3"), device="cpu", dtype=torch.float32, t5=False)
    assert isinstance(sd3, SD3Adapter) and sd3.pipe.text_encoder_3 is None
    cond = sd3.encode_prompts(PROMPTS)  # T5's part of the context is zeros
    assert cond.prompt_embeds[:, 77:].abs().max() == 0 and cond.prompt_embeds[:, :77].abs().max() > 0
    flux = load_adapter(str(tmp_path / "flux"), device="cpu", dtype=torch.float32)
    assert isinstance(flux, FluxAdapter) and flux.scheduler.config.use_dynamic_shifting
    with pytest.raises(ValueError, match="SD3 pipelines only"):
        load_adapter(str(tmp_path / "flux"), device="cpu", dtype=torch.float32, t5=False)


def test_flow_adapters_refuse_what_they_cannot_do():
    flux = tiny_adapter("flux", dtype=torch.float32)
    with pytest.raises(ValueError, match="no negative prompt"):
        flux.encode_prompts(PROMPTS, ["blurry", "dark"])
    with pytest.raises(ValueError, match="multiples of 16"):
        flux.initial_latents(1, 72, 64, torch.Generator())
    with pytest.raises(ValueError, match="unknown scheduler 'ddim' for a flow-matching model"):
        adapter_from_pipeline(tiny_flux_pipeline(), device="cpu", dtype=torch.float32, scheduler="ddim")
    with pytest.raises(ValueError, match="unknown scheduler 'flow-euler' for a UNet model"):
        tiny_adapter("sd15", scheduler="flow-euler")
    with pytest.raises(ValueError, match="eta"):
        sample(flux, flux.encode_prompts(PROMPTS), height=SIZE, width=SIZE, num_steps=T, guidance_scale=3.5,
               generator=torch.Generator(), eta=0.5)
