"""fp8 sampling calls (tuner.fp8, train.fp8_sampling): what is quantized, how, and that it leaves the model as it was.

The oracle of the fp8 matmul is float64 arithmetic on the e4m3 values torch's own cast produces, so the test checks
the kernel call (operand layout, which scale goes with which side) independently of `torch._scaled_mm`.
"""
from __future__ import annotations

import pytest
import torch

from tests.tuner_fixtures import BASE, PROMPTS, SIZE, ToyReward, tiny_adapter, denoiser_grads
from tuner import fp8
from tuner.config import ConfigError, load_config
from tuner.engine import reward_backward, sample
from tuner.lora import add_lora
from tuner.methods import get_method

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quantize_rows_maps_each_row_max_to_448():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 5)[:, None]
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    torch.testing.assert_close(scale, x.abs().amax(1, keepdim=True) / 448)
    back = q.double() * scale.double()
    assert back.abs().amax(1).sub(x.abs().amax(1).double()).abs().max() < 1e-6 * x.abs().max()
    # e4m3 keeps 3 mantissa bits: round-to-nearest errs by at most 2^-4 of the value (normal range)
    normal = x.abs() > scale * 2**-6
    assert ((back - x.double()).abs() <= 2**-4 * x.double().abs() + 1e-12)[normal].all()


def test_fp8_linear_is_the_scaled_product_of_the_e4m3_operands():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(48, 32).to(torch.bfloat16)
    x = torch.randn(3, 7, 48, generator=g).to(torch.bfloat16)
    layer = fp8.Fp8Linear(linear)
    y = layer(x)
    assert y.shape == (3, 7, 32) and y.dtype == torch.bfloat16
    qx, sx = fp8.quantize_rows(x.reshape(-1, 48))
    qw, sw = fp8.quantize_rows(linear.weight)
    want = (qx.double() * sx.double()) @ (qw.double() * sw.double()).T + linear.bias.double()
    torch.testing.assert_close(y.reshape(-1, 32).double(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
    exact = linear(x).double().reshape(-1, 32)
    assert (y.reshape(-1, 32).double() - exact).norm() / exact.norm() < 0.1  # and near the bf16 layer


def _lora_adapter(dtype=torch.float32):
    adapter = tiny_adapter("sdxl", dtype=dtype)
    params = add_lora(adapter.denoiser, rank=16, alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(p.shape)))
    return adapter, params


def test_fp8_linears_swaps_the_transformer_linears_and_puts_them_back():
    adapter, _ = _lora_adapter()
    unet = adapter.denoiser
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    kinds_before = [type(m) for m in unet.modules()]
    picked = {f"{id(p)}.{a}" for p, a, _ in fp8.targets(unet)}
    assert any(".attn2.to_k" in n for n, m in unet.named_modules() if type(m) is torch.nn.Linear)
    with fp8.fp8_linears(unet) as count:
        inside = [n for n, m in unet.named_modules() if isinstance(m, fp8.Fp8Linear)]
        assert count == len(inside) == len(picked) > 0
        assert not any(n.removesuffix(".base_layer").endswith((".attn2.to_k", ".attn2.to_v")) for n in inside)
        assert not any(".lora_" in n for n in inside)  # rank 16 would fit the fp8 kernels: left out by name
        assert any("ff.net.2" in n for n in inside) and any("attn1.to_q" in n for n in inside)
        assert not any("time_embedding" in n or "add_embedding" in n for n in inside)
    assert [type(m) for m in unet.modules()] == kinds_before
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_frozen_calls_sample_with_fp8_close_to_the_plain_model():
    adapter, _ = _lora_adapter()
    cond = adapter.encode_prompts(PROMPTS)
    make = lambda: sample(adapter, cond, height=SIZE, width=SIZE, num_steps=6, guidance_scale=3.0,  # noqa: E731
                          generator=torch.Generator().manual_seed(0))
    plain = make()
    adapter.fp8 = True
    quantized = make()
    error = float((quantized - plain).norm() / plain.norm())
    assert 0 < error < 0.05, error


def test_fp8_sampling_leaves_the_trained_calls_alone():
    """A plan whose every visited step is trained recomputes every UNet call with gradients: fp8 changes only the
    frozen forward pass, so the gradient stays close to the plain one (and the LoRA gets one)."""
    grads = {}
    for use_fp8 in (False, True):
        adapter, params = _lora_adapter()
        adapter.fp8 = use_fp8
        cond = adapter.encode_prompts(PROMPTS)
        plan = get_method("drtune", num_trained=2, early_stop_range=1).plan(6, torch.Generator().manual_seed(0))
        reward_backward(adapter, plan, cond, ToyReward(dtype=torch.float32), PROMPTS, height=SIZE, width=SIZE,
                        guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        grads[use_fp8] = torch.cat([g.flatten() for g in denoiser_grads(adapter).values()])
    cosine = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert cosine > 0.99 and grads[True].norm() > 0


def test_fp8_sampling_refused_on_a_gpu_without_fp8(monkeypatch):
    from tuner import train

    monkeypatch.setattr(fp8, "supported", lambda device: False)
    cfg = load_config(BASE, ["model=tiny-sdxl", "train.fp8_sampling=true"])
    with pytest.raises(ConfigError, match="fp8_sampling=true needs fp8 matmuls"):
        train.build_adapter(cfg, torch.device("cpu"), torch.float32)
