"""The saved LoRA loads into a stock diffusers pipeline and reproduces the tuned UNet exactly."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from tuner.lora import LORA_WEIGHTS, add_lora, folded, save_lora, trainable_state
from tuner.pipelines import tiny_sd15_pipeline, tiny_sdxl_pipeline


pytestmark = pytest.mark.usefixtures("single_thread")


def _unet_inputs(unet, sdxl: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    kwargs = {}
    if sdxl:
        text_embeds = torch.randn(2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g)
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    return (x, torch.tensor([500, 20]), ctx), kwargs


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_saved_lora_loads_into_stock_pipeline(tmp_path, family):
    make, cls = (tiny_sdxl_pipeline, StableDiffusionXLPipeline) if family == "sdxl" else (tiny_sd15_pipeline, StableDiffusionPipeline)
    pipe = make(seed=0)
    pipe.save_pretrained(tmp_path / "base")
    unet = pipe.unet
    params = add_lora(unet, rank=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if "lora" not in n)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "tuned" LoRA: both factors non-zero, so alpha/rank scaling matters
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    args, kwargs = _unet_inputs(unet, family == "sdxl")
    with torch.no_grad():
        tuned = unet(*args, **kwargs).sample
        unet.disable_adapters()
        base = unet(*args, **kwargs).sample
        unet.enable_adapters()
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changes the output

    path = save_lora(unet, tmp_path / "lora", cls)
    assert path.name == LORA_WEIGHTS and path.is_file()

    fresh = cls.from_pretrained(tmp_path / "base")
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        loaded = fresh.unet(*args, **kwargs).sample
    torch.testing.assert_close(loaded, tuned, rtol=0, atol=1e-6)


def test_trainable_state_lists_only_lora(tmp_path):
    unet = tiny_sd15_pipeline(seed=0).unet
    add_lora(unet, rank=2, alpha=2.0, target_modules=["to_q"])
    names = list(trainable_state(unet))
    assert names and all("lora_" in n and "to_q" in n for n in names)


def test_unknown_target_module_is_explained():
    unet = tiny_sd15_pipeline(seed=0).unet
    with pytest.raises(ValueError, match="lora.target_modules"):
        add_lora(unet, rank=2, alpha=2.0, target_modules=["no_such_module"])


def test_folded_lora_computes_the_same_unet_and_restores_the_base_weights_bitwise():
    unet = tiny_sd15_pipeline().unet.double()
    add_lora(unet, rank=2, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.double()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    args, kwargs = _unet_inputs(unet, sdxl=False)
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = unet(*args, **kwargs).sample
        plain = unet(*args, **kwargs, cross_attention_kwargs={"scale": 0.0}).sample
        with folded(unet):
            got = unet(*args, **kwargs).sample
            assert not all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if n in base)
        after = unet(*args, **kwargs).sample
    assert not torch.allclose(want, plain)  # the LoRA does change the output
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert torch.equal(after, want)
    assert all(torch.equal(p, base[n]) for n, p in unet.named_parameters() if n in base)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
