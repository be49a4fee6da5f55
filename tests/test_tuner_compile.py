"""train.compile (Adapter.compile): compiled blocks give the engine's gradient and the fp8 samples of eager blocks.

The aot_eager backend traces the blocks with dynamo and AOTAutograd as inductor does, without code generation, so the
test covers what compiling changes for the engine (graph breaks, recompiles per grad mode, the fp8 layers' swap)
in seconds on a CPU.
"""
from __future__ import annotations

import pytest
import torch

from tests.tuner_fixtures import BASE, PROMPTS, SIZE, ToyReward, relative_error, tiny_adapter, denoiser_grads
from tuner.config import ConfigError, load_config, validate
from tuner.engine import reward_backward, sample
from tuner.lora import add_lora
from tuner.methods import get_method
from tuner.pipelines.base import VAE_COMPILED_BLOCKS
from tuner.pipelines.unet import UNET_BLOCKS

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _adapter(family: str = "sdxl"):
    adapter = tiny_adapter(family, dtype=torch.float32)
    params = add_lora(adapter.denoiser, rank=4, alpha=4, target_modules=list(adapter.lora_targets))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return adapter


def _step(adapter):
    cond = adapter.encode_prompts(PROMPTS)
    plan = get_method("drtune", num_trained=2, early_stop_range=2).plan(5, torch.Generator().manual_seed(3))
    reward_backward(adapter, plan, cond, ToyReward(dtype=torch.float32), PROMPTS, height=SIZE, width=SIZE,
                    guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    return denoiser_grads(adapter)


def _samples(adapter):
    return sample(adapter, adapter.encode_prompts(PROMPTS), height=SIZE, width=SIZE, num_steps=4, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0))


def test_compiled_blocks_give_the_eager_gradient_and_fp8_samples():
    torch._dynamo.reset()
    eager, compiled = _adapter(), _adapter()
    compiled.compile(backend="aot_eager", dynamic=False)
    blocks = [m for root in (compiled.denoiser, compiled.vae.decoder) for m in root.modules()
              if isinstance(m, UNET_BLOCKS + VAE_COMPILED_BLOCKS)]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert relative_error(_step(compiled), _step(eager)) < 1e-5
    eager.fp8 = compiled.fp8 = True
    torch.testing.assert_close(_samples(compiled), _samples(eager), rtol=0, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_flux_blocks_give_the_eager_gradient():
    """FLUX.1's double- and single-stream blocks compile one by one; the engine's gradient does not move."""
    torch._dynamo.reset()
    eager, compiled = _adapter("flux"), _adapter("flux")
    compiled.compile(backend="aot_eager", dynamic=False)
    blocks = [m for m in compiled.denoiser.modules() if isinstance(m, compiled.denoiser_blocks)]
    assert len(blocks) == 3 and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    assert relative_error(_step(compiled), _step(eager)) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("other", ["train.memory=low", "train.gradient_checkpointing=true"])
def test_compile_refuses_recomputed_blocks(other):
    with pytest.raises(ConfigError, match="train.compile"):
        validate(load_config(BASE, ["train.compile=true", other]))
