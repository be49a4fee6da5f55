"""Speed switches (rewards.speed): `fast`, `compile` and `recompute` compute the default path's scores and pixel
gradients.

Tiny architectures through the real loading paths (benchmarks.reward_models.tiny_architectures); `compile` runs with
the aot_eager backend, which traces the blocks with dynamo and AOTAutograd as inductor does, without code generation.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import rewards
from benchmarks.reward_models import REWARDS, load_ours, prompts_for, tiny_architectures, write_files
from rewards import speed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
EAGER_COMPILE = {"backend": "aot_eager", "dynamic": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    with tiny_architectures():
        yield write_files(tmp_path_factory.mktemp("speed"), tiny=True, rewards=(*REWARDS, "evalmuse"))


@pytest.fixture
def tiny(files):
    with tiny_architectures():
        yield lambda name, **options: load_ours(name, files, device="cpu", dtype=torch.float32, **options)


def _gradient(reward, images):
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, prompts_for(len(images)))
    (grad,) = torch.autograd.grad(scores.sum(), pixels)
    return scores, grad


def _assert_same(ours, reference, rtol=1e-5):
    (s, g), (s_ref, g_ref) = ours, reference
    torch.testing.assert_close(s, s_ref, rtol=rtol, atol=rtol * s_ref.abs().max().item())
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-4 * g_ref.abs().max().item())


@pytest.mark.parametrize("name", ["hpsv2.1", "clip", "aesthetic", "pickscore"])
def test_fast_equals_default(tiny, name, single_thread):
    default, fast = tiny(name), tiny(name, fast=True)
    images = torch.rand(3, 3, 60, 90, generator=torch.Generator().manual_seed(0))
    _assert_same(_gradient(fast, images), _gradient(default, images))
    assert list(fast.state_dict()) == list(default.state_dict())  # same weights under the same names
    kinds = {type(m).__name__ for m in fast.modules()}
    assert "ClassTokenBlock" in kinds or "ClassTokenLayer" in kinds
    if name != "pickscore":
        assert "SelfAttention" in kinds
        assert "MultiheadAttention" not in {type(m).__name__ for m in _visual(fast).modules()}


def _visual(reward):
    return getattr(reward, "visual", None) or reward.model.visual


@pytest.mark.parametrize("name", ["hpsv2.1", "pickscore", "imagereward", "vqascore", "evalmuse"])
def test_compile_equals_default(tiny, name, single_thread):
    torch._dynamo.reset()
    default, compiled = tiny(name), tiny(name, compile=EAGER_COMPILE)
    blocks = speed.compiled_blocks(compiled)
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _assert_same(_gradient(compiled, images), _gradient(default, images), rtol=1e-4)
    torch._dynamo.reset()


def test_class_token_block_needs_class_token_pooling(tiny):
    reward = tiny("hpsv2.1")
    reward.model.visual.pool_type = "avg"  # the score would read every token: the last block must stay whole
    speed.optimize(reward, fast=True)
    assert type(reward.model.visual.transformer.resblocks[-1]).__name__ == "ResidualAttentionBlock"
    assert isinstance(reward.model.visual.transformer.resblocks[-1].attn, speed.SelfAttention)


def test_optimize_reaches_every_part_of_a_mixture(tiny):
    mix = rewards.combine([(tiny("clip"), 1.0), (tiny("aesthetic"), 0.5), (rewards.load("symmetry"), 0.1)])
    speed.optimize(mix, fast=True)
    for part in ("clip", "aesthetic"):
        assert isinstance(_visual(mix.part(part)).transformer.resblocks[-1], speed.ClassTokenBlock)


def test_optimize_is_idempotent(tiny):
    reward = tiny("hpsv2.1", fast=True)
    speed.optimize(reward, fast=True)
    last = reward.model.visual.transformer.resblocks[-1]
    assert isinstance(last, speed.ClassTokenBlock)
    assert not any(isinstance(c, speed.ClassTokenBlock) for c in last.children())


def test_self_attention_refuses_cross_attention(tiny):
    attn = tiny("hpsv2.1", fast=True).model.visual.transformer.resblocks[0].attn
    x = torch.rand(1, 5, attn.in_proj_weight.shape[1])
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, x.clone(), x.clone())


def test_weight_free_rewards_accept_the_switches():
    assert rewards.load("symmetry", fast=True, compile=True)(torch.rand(1, 3, 8, 8)).shape == (1,)


def test_bad_compile_option_says_what_is_accepted():
    with pytest.raises(TypeError, match="dict of torch.compile options"):
        speed.optimize(rewards.load("symmetry"), compile="yes")


@pytest.mark.parametrize("name", ["hpsv2.1", "pickscore", "imagereward", "mps", "hpsv3", "vqascore", "evalmuse"])
def test_recompute_equals_default_and_saves_less(tiny, name, single_thread):
    """The same scores and pixel gradient, while autograd keeps a fraction of the activations: recomputation in
    the backward, not another function."""
    default, recomputed = tiny(name), tiny(name, recompute=True)
    assert speed.recomputed_blocks(recomputed)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _assert_same(_gradient(recomputed, images), _gradient(default, images), rtol=1e-6)
    saved = {key: _saved_bytes(reward, images) for key, reward in (("default", default), ("recompute", recomputed))}
    assert saved["recompute"] < 0.75 * saved["default"], saved  # tiny towers: 0.25-0.6; the blocks dominate full size


def _saved_bytes(reward, images) -> int:
    """Bytes of the tensors autograd saves for the backward of one scoring call (weights excluded)."""
    weights = {t.data_ptr() for t in reward.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    pixels = images.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reward(pixels, prompts_for(len(images))).sum()
    return total


def test_recompute_with_compile_equals_default(tiny, single_thread):
    torch._dynamo.reset()
    default, both = tiny("hpsv2.1"), tiny("hpsv2.1", recompute=True, compile=EAGER_COMPILE)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _assert_same(_gradient(both, images), _gradient(default, images), rtol=1e-4)
    torch._dynamo.reset()


def test_a_copy_of_a_recomputing_reward_runs_its_own_blocks(tiny):
    """benchmarks.gradient_suite.derive deep-copies rewards: each copied block must recompute itself, not the
    original (a closure over the original's forward would)."""
    import copy

    reward = tiny("pickscore", recompute=True)
    clone = copy.deepcopy(reward)
    blocks, copies = speed.recomputed_blocks(reward), speed.recomputed_blocks(clone)
    assert all(c.forward.args[0] is c for c in copies) and all(b.forward.args[0] is b for b in blocks)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(_gradient(clone, images)[0], _gradient(reward, images)[0])
    speed.optimize(reward, recompute=True)  # idempotent: no second wrapper around the first
    assert all(b.forward.func is speed._forward_recomputed and b.forward.args == (b,) for b in blocks)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
                    reason="inductor's CPU kernels need a C++ compiler")
@pytest.mark.parametrize("name", ["imagereward", "mps"])
def test_inductor_in_bf16_is_no_farther_from_float32_than_eager(files, name, single_thread):
    """The compiled variants' bf16 scores differ from eager bf16 (inductor fuses ops and keeps their intermediates
    in float32); what decides whether the variant counts is its distance from the float32 scores, which must not
    exceed eager bf16's. Inductor generates real kernels here (CPU C++), not the aot_eager traces above."""
    torch._dynamo.reset()
    images = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    prompts = prompts_for(len(images))
    with tiny_architectures(), torch.no_grad():
        reference = load_ours(name, files, device="cpu", dtype=torch.float32)(images, prompts)
        eager = load_ours(name, files, device="cpu", dtype=torch.bfloat16)(images, prompts)
        compiled = load_ours(name, files, device="cpu", dtype=torch.bfloat16, compile=True)(images, prompts)
    scale = reference.abs().mean()
    eager_off, compiled_off = ((eager - reference).abs().mean() / scale), ((compiled - reference).abs().mean() / scale)
    assert 0 < eager_off < 0.05 and compiled_off <= 1.25 * eager_off, (eager_off.item(), compiled_off.item())
