"""The reward protocol (validation, dtypes, gradients, frozen weights, text cache, registry, combine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rewards
from rewards import InputError, Reward, UnknownRewardError
from rewards.lowlevel import sharpness_score, symmetry_score

NAMES = ["hpsv2", "hpsv2.1", "pickscore", "imagereward", "aesthetic", "clip", "symmetry", "sharpness"]


class FakePromptReward(Reward):
    """Prompt reward with a trainable-looking weight: score = mean(image) * w + text feature; counts encode calls."""

    name = "fake"
    needs_prompt = True
    input_size = 8

    def __init__(self, cache_size: int = 4096) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.text_cache_size = cache_size
        self.calls: list[list[str]] = []

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        lengths = torch.tensor([float(len(p)) for p in prompts], device=self.device, dtype=self.weight.dtype)
        return torch.stack([lengths, lengths * self.weight], dim=1)  # depends on a parameter: a graph if not guarded

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        text = self.text_features(prompts)
        return images.float().mean(dim=(1, 2, 3)) * self.weight + text[:, 0]


@pytest.fixture
def fake() -> FakePromptReward:
    return FakePromptReward().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(1))


# -- registry -----------------------------------------------------------------------------------------
def test_available_lists_every_reward():
    assert set(NAMES) <= set(rewards.available())


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownRewardError, match="Did you mean 'hpsv2.1'") as info:
        rewards.load("hpsv21")
    assert "Available:" in str(info.value)
    with pytest.raises(KeyError):  # also catchable as the builtin lookup error
        rewards.load("pickscor")


def test_unknown_source_option_names_the_accepted_ones():
    with pytest.raises(TypeError, match="unexpected option.*checkpoint.*accepts: no options"):
        rewards.load("symmetry", checkpoint="x.pt")
    with pytest.raises(TypeError, match="accepts: size"):
        rewards.load("sharpness", tokenizer="x")


@pytest.mark.parametrize("name", ["symmetry", "sharpness"])
def test_loaded_rewards_are_frozen_eval_modules(name):
    reward = rewards.load(name)
    assert isinstance(reward, Reward) and not reward.training
    assert reward.name == name and reward.needs_prompt is False
    assert isinstance(reward.scale_note, str) and reward.scale_note
    assert all(not p.requires_grad for p in reward.parameters())


def test_weights_are_frozen_after_load():
    rewards.register("fake-test", f"{__name__}:load_fake", needs_prompt=True)
    try:
        reward = rewards.load("fake-test")
        assert isinstance(reward, FakePromptReward) and not reward.training
        assert not reward.weight.requires_grad
    finally:
        rewards.registry._REGISTRY.pop("fake-test")


def load_fake(*, device: torch.device, dtype: torch.dtype) -> FakePromptReward:
    """Factory used by the registry test above."""
    return FakePromptReward().to(device, dtype)


# -- image validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 8, 8), r"\[B,3,H,W\].*add a batch dimension"),
        (torch.rand(1, 1, 3, 8, 8), r"\[B,3,H,W\]"),
        (torch.rand(2, 4, 8, 8), r"\[B,3,H,W\], got \[2, 4, 8, 8\]"),
        (torch.rand(2, 1, 8, 8), r"\[B,3,H,W\]"),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), r"float tensor.*torch.uint8.*/ 255"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), r"float tensor"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, r"\[0,1\].*looks like \[-1,1\]"),
        (torch.rand(2, 3, 8, 8) * 255, r"\[0,1\].*looks like \[0,255\]"),
        (torch.rand(2, 3, 8, 8) + 0.05, r"must lie in \[0,1\]"),
        (torch.zeros(0, 3, 8, 8), r"batch is empty"),
        (torch.zeros(2, 3, 0, 8), r"positive"),
        ([[0.0]], r"must be a torch.Tensor"),
    ],
)
def test_bad_images_raise_input_error(bad, message):
    reward = rewards.load("symmetry")
    with pytest.raises(InputError, match=message):
        reward(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(value):
    images = torch.rand(2, 3, 8, 8)
    images[1, 2, 3, 4] = value
    with pytest.raises(InputError, match="NaN or Inf"):
        rewards.load("sharpness")(images)


def test_small_overshoot_within_margin_is_accepted():
    images = torch.rand(2, 3, 8, 8)
    images[0, 0, 0, 0], images[1, 0, 0, 0] = -0.5 * rewards.base.RANGE_MARGIN, 1 + 0.5 * rewards.base.RANGE_MARGIN
    assert torch.isfinite(rewards.load("symmetry")(images)).all()


def test_device_mismatch_is_reported():
    reward = rewards.load("symmetry", device="meta")  # a second device type that exists on any machine
    with pytest.raises(InputError, match="are on cpu but the reward is on meta"):
        reward(torch.rand(1, 3, 8, 8))


# -- prompts --------------------------------------------------------------------------------------------
def test_prompts_missing_wrong_count_single_string_non_string(fake, images):
    with pytest.raises(InputError, match="needs one prompt per image.*length 2"):
        fake(images)
    with pytest.raises(InputError, match="got 3 prompts for 2 images"):
        fake(images, ["a", "b", "c"])
    with pytest.raises(InputError, match="single string"):
        fake(images, "a cat")
    with pytest.raises(InputError, match="item 1 is int"):
        fake(images, ["a", 3])
    assert fake.calls == []  # validation happens before any text is encoded


def test_prompt_free_rewards_ignore_prompts(images):
    reward = rewards.load("symmetry")
    torch.testing.assert_close(reward(images, ["a", "b"]), reward(images))


# -- dtypes and gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["symmetry", "sharpness"])
def test_any_float_input_gives_float32_scores(name, dtype, images):
    reward = rewards.load(name)
    out = reward(images.to(dtype))
    assert out.dtype == torch.float32 and out.shape == (2,)
    oracle = (symmetry_score if name == "symmetry" else sharpness_score)(images.to(dtype).double())
    torch.testing.assert_close(out.double(), oracle, atol=1e-4 if dtype == torch.float64 else 2e-2, rtol=0)


def test_fake_reward_in_half_precision_returns_float32(fake, images):
    out = fake(images.half(), ["a", "bb"])
    assert out.dtype == torch.float32


@pytest.mark.parametrize("name", ["symmetry", "sharpness"])
def test_gradients_flow_to_pixels_only(name, images):
    reward = rewards.load(name)
    x = images.clone().requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradients_with_prompts_and_frozen_parameters(fake, images):
    x = images.clone().requires_grad_(True)
    fake(x, ["a", "bb"]).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0 / x[0].numel()))
    assert fake.weight.grad is None


# -- the text cache ---------------------------------------------------------------------------------------
def test_repeated_prompts_are_encoded_once(fake, images):
    fake(images, ["cat", "cat"])
    fake(images, ["cat", "dog"])
    fake(images, ["dog", "cat"])
    assert fake.calls == [["cat"], ["dog"]]
    out = fake(images, ["cat", "dog"])
    expected = images.mean(dim=(1, 2, 3)) * 2.0 + torch.tensor([3.0, 3.0])
    torch.testing.assert_close(out, expected)


def test_cache_is_bounded_and_evicts_least_recently_used(images):
    fake = FakePromptReward(cache_size=2).requires_grad_(False)
    fake(images, ["a", "b"])
    fake(images, ["a", "a"])  # "a" is now the most recent
    fake(images, ["c", "c"])  # evicts "b"
    assert list(fake._text_cache) == ["a", "c"]
    fake(images, ["a", "b"])
    assert fake.calls == [["a", "b"], ["c"], ["b"]]
    assert len(fake._text_cache) <= 2


def test_cache_holds_no_graph_even_with_trainable_weights(images):
    fake = FakePromptReward()  # weight requires grad: encode_text would build a graph if not guarded
    x = images.clone().requires_grad_(True)
    fake(x, ["cat", "dog"]).sum().backward()
    for feature in fake._text_cache.values():
        assert not feature.requires_grad and feature.grad_fn is None


def test_cache_is_cleared_when_dtype_or_device_changes(fake, images):
    fake(images, ["cat", "dog"])
    fake.to(torch.float64)
    assert len(fake._text_cache) == 0
    fake(images, ["cat", "dog"])
    assert fake.calls == [["cat", "dog"], ["cat", "dog"]]
    assert all(f.dtype == torch.float64 for f in fake._text_cache.values())
    fake.clear_text_cache()
    assert len(fake._text_cache) == 0


# -- combine ------------------------------------------------------------------------------------------------
def test_combine_is_the_weighted_sum_and_reports_parts(images):
    mix = rewards.combine({"symmetry": 0.5, "sharpness": -2.0})
    assert isinstance(mix, Reward) and mix.needs_prompt is False
    x = images.clone().requires_grad_(True)
    out = mix(x)
    expected = 0.5 * symmetry_score(images) - 2.0 * sharpness_score(images)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mix.last_parts["symmetry"], symmetry_score(images))
    torch.testing.assert_close(mix.last_parts["sharpness"], sharpness_score(images))
    assert all(not v.requires_grad for v in mix.last_parts.values())
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_combine_accepts_reward_objects_and_propagates_prompt_requirement(fake, images):
    mix = rewards.combine([(fake, 1.0), ("symmetry", 3.0)])
    assert mix.needs_prompt is True
    with pytest.raises(InputError, match="needs one prompt per image"):
        mix(images)
    out = mix(images, ["ab", "c"])
    manual = fake(images, ["ab", "c"]) + 3.0 * symmetry_score(images)
    torch.testing.assert_close(out, manual)
    assert set(mix.last_parts) == {"fake", "symmetry"}


def test_combine_takes_names_with_dots(images):
    part = rewards.load("symmetry")
    part.name = "symmetry.v2"  # like hpsv2.1: module names may not hold dots, reward names may
    mix = rewards.combine([(part, 2.0)])
    assert torch.allclose(mix(images), 2.0 * rewards.load("symmetry")(images))
    assert list(mix.last_parts) == ["symmetry.v2"]


def test_combine_sources_errors():
    with pytest.raises(InputError, match="sources given for pickscore, which are not in the mixture"):
        rewards.combine({"symmetry": 1.0}, sources={"pickscore": {"checkpoint": "x"}})
    with pytest.raises(TypeError, match="unexpected option"):
        rewards.combine({"symmetry": 1.0}, sources={"symmetry": {"checkpoint": "x"}})
    with pytest.raises(InputError, match="given twice"):
        rewards.combine([("symmetry", 1.0), ("symmetry", 2.0)])
    with pytest.raises(InputError, match="at least one reward"):
        rewards.combine({})


def test_combine_validates_inputs_once_for_all_parts(images):
    mix = rewards.combine({"symmetry": 1.0, "sharpness": 1.0})
    assert all(not part.check_values for part in mix.parts)
    with pytest.raises(InputError, match="looks like \\[0,255\\]"):
        mix(images * 255)
