"""Low-memory mode (train.memory=low): the same gradient as the default mode, what it switches on, a whole run, the
configuration check, and the benchmark script's smoke mode."""
import json

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

import rewards
from tests.tuner_fixtures import BASE, PROMPTS, SIZE, tiny_adapter, denoiser_grads
from tuner import checkpoint as ckpt
from tuner import memory
from tuner.config import CONFIG_DIR, ConfigError, load_config, validate
from tuner.engine import reward_backward
from tuner.logging import read_metrics
from tuner.methods import Plan
from tuner.pipelines import SDXLAdapter
from tuner.prompts import PromptSampler, load_prompt_sets
from tuner.train import reward_dtype, train

T = 6
GUIDANCE = 3.0
SEED = 5
PLANS = {  # shaped like each method's own plans (tests/test_engine_exact.py)
    "drtune": Plan(T, 4, True, (1, 3, 4), detach_input=True, grad_from=1),
    "draft": Plan(T, T - 1, False, (3, 4, 5), detach_input=False, grad_from=3),
    "alignprop": Plan(T, T - 1, False, (1, 2, 3, 4, 5), detach_input=False, grad_from=1),
    "draft-lv": Plan(T, T - 1, False, (T - 1,), detach_input=False, grad_from=T - 1, renoise=2),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def _gradient(adapter, plan, low: bool):
    """(UNet gradients, step output) of one reward_backward with the weight-free symmetry reward."""
    adapter.low_memory = low
    adapter.denoiser.zero_grad(set_to_none=True)
    cond = adapter.encode_prompts(PROMPTS)
    out = reward_backward(adapter, plan, cond, rewards.load("symmetry"), PROMPTS, height=SIZE, width=SIZE,
                          guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED))
    return denoiser_grads(adapter), out


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("method", sorted(PLANS))
def test_low_memory_gives_the_default_gradient(family, method):
    adapter = tiny_adapter(family)  # float64
    want, want_out = _gradient(adapter, PLANS[method], low=False)
    got, got_out = _gradient(adapter, PLANS[method], low=True)
    assert got.keys() == want.keys() and len(want) > 10
    assert sum(bool(w.abs().sum() > 0) for w in want.values()) > len(want) // 2
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-14 * want[k].abs().max().item())
    torch.testing.assert_close(got_out.rewards, want_out.rewards, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_out.images, want_out.images, rtol=1e-10, atol=1e-12)
    assert got_out.loss == pytest.approx(want_out.loss, rel=1e-6) and want_out.loss != 0


def test_the_comparison_can_fail():
    """The tolerance tells apart a gradient off by a factor: e.g. per-image losses summed instead of averaged (2x)."""
    adapter = tiny_adapter("sd15")
    want, _ = _gradient(adapter, PLANS["drtune"], low=False)
    adapter.low_memory = True
    adapter.denoiser.zero_grad(set_to_none=True)
    reward_backward(adapter, PLANS["drtune"], adapter.encode_prompts(PROMPTS), rewards.load("symmetry"), PROMPTS,
                    height=SIZE, width=SIZE, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                    loss_scale=2.0)
    got = denoiser_grads(adapter)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close({k: v / 2 for k, v in got.items()}, want, rtol=1e-9, atol=1e-14)


class ForwardCounter:
    """Counts ResnetBlock2D forward runs per model (original and recomputed ones alike)."""

    def __init__(self, monkeypatch, adapter):
        self.owner = {id(m): name for name, model in (("unet", adapter.denoiser), ("vae", adapter.vae.decoder))
                      for m in model.modules() if isinstance(m, ResnetBlock2D)}
        self.counts = {"unet": 0, "vae": 0}
        original = ResnetBlock2D.forward

        def counted(module, *args, **kwargs):
            self.counts[self.owner[id(module)]] += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(ResnetBlock2D, "forward", counted)

    def blocks(self, name: str) -> int:
        return sum(owner == name for owner in self.owner.values())


@pytest.mark.parametrize("method", ["drtune", "draft-lv"])
def test_low_memory_recomputes_trained_calls_and_decodes_image_by_image(monkeypatch, method):
    plan, calls = PLANS[method], {}
    for low in (False, True):
        adapter = tiny_adapter("sdxl")
        counter = ForwardCounter(monkeypatch, adapter)
        _gradient(adapter, plan, low)
        calls[low] = dict(counter.counts)
        monkeypatch.undo()
    unet_blocks, vae_blocks, trained = counter.blocks("unet"), counter.blocks("vae"), plan.renoise or len(plan.trained)
    # one recompute of every UNet block per trained call, none for the gradient-free sampling calls
    assert calls[True]["unet"] - calls[False]["unet"] == trained * unet_blocks
    # default: the batch decoded once and recomputed once per scoring; low: the same, image by image
    scorings = plan.renoise or 1
    assert calls[False]["vae"] == 2 * scorings * vae_blocks
    assert calls[True]["vae"] == 2 * scorings * len(PROMPTS) * vae_blocks


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_low_memory_recomputes_the_transformer_blocks_of_trained_calls(monkeypatch, family):
    plan, calls = PLANS["drtune"], {}
    for low in (False, True):
        adapter = tiny_adapter(family)
        blocks = [m for m in adapter.denoiser.modules() if isinstance(m, adapter.denoiser_blocks)]
        seen = []
        for kind in adapter.denoiser_blocks:  # the class's forward: a recompute calls it without module hooks
            monkeypatch.setattr(kind, "forward", lambda self, *a, _f=kind.forward, **k: seen.append(1) or _f(self, *a, **k))
        _gradient(adapter, plan, low)
        calls[low] = len(seen)
        monkeypatch.undo()
    assert len(blocks) >= 2
    assert calls[True] - calls[False] == len(plan.trained) * len(blocks)


def test_checkpointed_is_undone_and_skips_nested_blocks():
    adapter = tiny_adapter("sdxl")
    unet = adapter.denoiser
    inside = {id(c) for r in unet.modules() if isinstance(r, ResnetBlock2D) for c in r.modules() if c is not r}
    blocks = list(memory.outermost(unet, (ResnetBlock2D, torch.nn.Conv2d)))
    assert any(isinstance(b, ResnetBlock2D) for b in blocks) and any(isinstance(b, torch.nn.Conv2d) for b in blocks)
    assert not any(id(b) in inside for b in blocks)
    with pytest.raises(RuntimeError, match="inside"):
        with memory.checkpointed(unet, (ResnetBlock2D,)):
            assert all("forward" in m.__dict__ for m in unet.modules() if isinstance(m, ResnetBlock2D))
            raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in unet.modules())


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_conditioning_cache_matches_encoding_and_needs_no_encoder(family, monkeypatch):
    adapter = tiny_adapter(family)
    prompts = ["a cat", "a red dog", "a cat", "an owl"]
    negative = "" if family == "flux" else "blurry"  # FLUX.1 takes no negative prompt
    cache = memory.ConditioningCache(adapter, prompts, negative, chunk=2)
    assert len(cache) == 3
    batch = ["an owl", "a cat"]
    want = adapter.encode_prompts(batch, [negative] * 2)
    monkeypatch.setattr(type(adapter), "encode_prompts", lambda *a, **k: pytest.fail("the cache encoded again"))
    got = cache(batch)
    for name in ("prompt_embeds", "negative_embeds", "pooled", "negative_pooled", "add_time_ids"):
        w, g = getattr(want, name), getattr(got, name)
        assert (w is None) == (g is None), name
        if w is not None:
            assert w.abs().sum() > 0
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(KeyError, match="not encoded when the cache was built"):
        cache(["a horse"])


def test_encode_prompts_works_after_offloading():
    adapter = tiny_adapter("sdxl")
    want = adapter.encode_prompts(PROMPTS)
    adapter.offload_text_encoders()
    assert all(next(e.parameters()).device.type == "cpu" for e in adapter._text_encoders())
    got = adapter.encode_prompts(PROMPTS)
    assert got.prompt_embeds.device == adapter.device
    torch.testing.assert_close(got.prompt_embeds, want.prompt_embeds, rtol=0, atol=0)


# -- the training loop ----------------------------------------------------------------------------------
FAST = ["model=tiny-sdxl", "sampling.num_steps=4", "method_options={num_trained: 2, early_stop_range: 2}",
        "train.batch_size=2", "log.progress=false", "prompts.num_eval=2", "log.tensorboard=false", "reward=symmetry"]


def _run(tmp_path, name, *overrides):
    cfg = validate(load_config(BASE, [f"output_dir={tmp_path}", f"name={name}", *FAST, *overrides]))
    return train(cfg), tmp_path / name


def _train_rows(run) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "reward" in r]


def _final_weights(run) -> dict[str, torch.Tensor]:
    return ckpt.read_tensors(ckpt.latest(run / "checkpoints"), "trainable.safetensors")


def test_low_memory_run_end_to_end_matches_the_default_run(tmp_path, monkeypatch):
    encoded, real = [], SDXLAdapter.encode_prompts

    def counted(self, prompts, negative=None):
        encoded.append(len(prompts))
        return real(self, prompts, negative)

    monkeypatch.setattr(SDXLAdapter, "encode_prompts", counted)
    common = ["train.steps=3", "log.eval_every=2", "checkpoint.every=2", "train.ema_decay=0.5", "train.grad_accum=2"]
    low, low_dir = _run(tmp_path, "low", "train.memory=low", *common)
    cfg = load_config(low_dir / "config.yaml")
    sampler = PromptSampler(load_prompt_sets(cfg.prompts)[0], 2, grad_accum=2)
    drawn = {p for step in range(3) for micro in range(2) for p in sampler.batch(step, micro)}
    assert encoded == [2] + [1] * len(drawn)  # the eval prompts, then once every prompt the run draws, one by one
    encoded.clear()
    default, default_dir = _run(tmp_path, "default", *common)
    assert encoded == [2] + [2] * 6  # the default mode encodes each micro-batch when drawn
    assert low["memory"] == "low" and default["memory"] == "default"
    for name in ("gallery/step-00000002.png", "gallery/step-00000003.png", "lora/pytorch_lora_weights.safetensors",
                 "checkpoints/step-00000003/trainable.safetensors", "summary.json"):
        assert (low_dir / name).is_file(), name
    low_rows, default_rows = _train_rows(low_dir), _train_rows(default_dir)
    assert [r["step"] for r in low_rows] == [1, 2, 3]
    for a, b in zip(low_rows, default_rows):
        assert a["skipped"] == 0 and a["grad_norm"] > 0
        for key in ("reward", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    wa, wb = _final_weights(low_dir), _final_weights(default_dir)
    assert wa.keys() == wb.keys() and any(w.abs().sum() > 0 for k, w in wa.items() if "lora_B" in k)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert json.loads((low_dir / "summary.json").read_text())["memory"] == "low"


# -- configuration ----------------------------------------------------------------------------------------
def test_memory_mode_is_checked_before_any_model_loads():
    with pytest.raises(ConfigError, match=r"'train.memory': 'lowest' is not known. Allowed: default, low.*'low'"):
        validate(load_config(BASE, ["train.memory=lowest"]))
    with pytest.raises(ConfigError, match=r"train.memory=low already recomputes.*train.gradient_checkpointing=false"):
        validate(load_config(BASE, ["train.memory=low", "train.gradient_checkpointing=true"]))
    assert validate(load_config(BASE, ["train.memory=low"])).train.memory == "low"
    assert load_config(None).train.memory == "default"


def test_the_low_memory_example_config():
    cfg = validate(load_config(CONFIG_DIR / "sdxl_hpsv2.1_lowmem.yaml"))
    base = load_config(CONFIG_DIR / "sdxl_hpsv2.1.yaml")
    assert cfg.train.memory == "low" and not cfg.train.gradient_checkpointing
    assert (cfg.model, cfg.method, cfg.method_options, cfg.reward, cfg.sampling, cfg.lora) == \
        (base.model, base.method, base.method_options, base.reward, base.sampling, base.lora)


def test_reward_precision_follows_the_mode():
    def dtype(*overrides):
        return reward_dtype(load_config(BASE, list(overrides)))

    assert dtype("train.memory=low", "train.mixed_precision=bf16") == torch.bfloat16
    assert dtype("train.memory=low", "train.mixed_precision=fp16") == torch.float16
    assert dtype("train.memory=low", "train.mixed_precision='no'") is None
    assert dtype("train.mixed_precision=bf16") is None


# -- the GPU benchmark's script, on tiny pipelines --------------------------------------------------------
def test_benchmark_smoke(tmp_path):
    from benchmarks import low_memory

    low_memory.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "low_memory.json").read_text())
    rows = result["rows"]
    assert set(rows) == set(low_memory.ROWS)
    for name, row in rows.items():
        assert not row["oom"] and row.get("error") is None, (name, row)
        assert row["steps_timed"] >= 1 and row["s_per_image"] > 0 and row["summary"]["memory"] == row["memory"]
    assert "| sdxl-low-16 |" in (tmp_path / "low_memory.md").read_text()


def test_low_memory_encodes_alone_then_places_the_denoiser_then_loads_the_reward(tmp_path, monkeypatch):
    """On the GPU, FLUX.1-dev's transformer and T5-XXL together fill a 32 GiB cap (setup ran out of memory when
    both were placed at once): in low-memory mode the denoiser waits on the CPU while the text encoders encode every
    prompt the run needs and leave; then it takes the device, then the reward loads."""
    import tuner.train as T
    from tuner.pipelines.base import Adapter

    events, build = [], T.build_reward

    def spy(cls, name, label):
        real = getattr(cls, name)

        def spied(self, *args, **kwargs):
            events.append((label, self._parked))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, spied)

    spy(SDXLAdapter, "encode_prompts", "encode")
    spy(Adapter, "offload_text_encoders", "text encoders off")
    spy(Adapter, "place_denoiser", "denoiser on")
    monkeypatch.setattr(T, "build_reward", lambda cfg, device: events.append(("reward", None)) or build(cfg, device))
    _run(tmp_path, "order", "train.memory=low", "train.steps=1")
    labels = [label for label, _ in events]
    placed = labels.index("denoiser on")
    assert labels[:placed] == ["encode"] * (placed - 1) + ["text encoders off"] and placed >= 3  # eval + drawn
    assert all(parked for _, parked in events[:placed + 1])  # the denoiser was on the CPU all along
    assert labels[placed + 1] == "reward" and labels.count("denoiser on") == 1
    events.clear()
    _run(tmp_path, "default", "train.steps=1")  # the default mode places it at once
    assert ("denoiser on", False) in events and ("text encoders off", True) not in events
