"""The guards against reward hacking (tuner.guards, tuner.mix): each checked against an independent computation on
tiny float64 models of a UNet family (SD 1.5) and a flow family (FLUX.1, SD3)."""
import pytest
import torch

from tests.tuner_fixtures import (
    BASE, PROMPTS, SIZE, ToyReward, _guided, denoiser_grads, naive_backward, relative_error, tiny_adapter,
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


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_penalty_keeps_one_denoiser_graph_at_a_time(family):
    from tests.test_engine_exact import GraphCounter

    adapter, plan = perturbed_lora_adapter(family), PLANS["draft"]
    counter = GraphCounter(adapter.denoiser)
    reward_backward(adapter, plan, adapter.encode_prompts(PROMPTS), ToyReward(), PROMPTS, height=SIZE, width=SIZE,
                    guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED), step_term=BasePenalty(1.0))
    assert counter.calls == len(plan.trained) and counter.peak == 1 and not counter.live


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


# -- 6. LoRA strength and mixing ----------------------------------------------------------------------------------
def _saved_lora(family: str, rank: int, alpha: float, seed: int, folder):
    """A tiny float32 adapter's LoRA, away from zero, saved as the run would save it."""
    from tuner.lora import save_lora

    adapter = tiny_adapter(family, dtype=torch.float32)
    params = add_lora(adapter.denoiser, rank=rank, alpha=alpha, target_modules=list(adapter.lora_targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return save_lora(adapter.denoiser, folder, adapter.pipeline_class)


def _file_deltas(path):
    """Effective updates (alpha / r) B A read straight from a LoRA file, independently of tuner.mix."""
    import json

    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = {k.split(".", 1)[1]: v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
        t = {k: f.get_tensor(k).double() for k in f.keys()}
    down = [k for k in t if k.endswith(("lora.down.weight", "lora_A.weight"))]
    up = {k: k.replace("lora.down", "lora.up").replace("lora_A", "lora_B") for k in down}
    ranks = {t[k].shape[0] for k in down}
    return {k: meta["lora_alpha"] / meta["r"] * t[up[k]] @ t[k] for k in down}, ranks


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_mix_is_the_weighted_sum_of_updates(family, tmp_path):
    from tuner.mix import main

    first = _saved_lora(family, 2, 4.0, 1, tmp_path / "a")
    second = _saved_lora(family, 3, 1.5, 2, tmp_path / "b")
    d1, _ = _file_deltas(first)
    d2, _ = _file_deltas(second)
    cases = {"half": (0.5, 0.5), "first": (1.0, 0.0), "second": (0.0, 1.0), "scaled": (0.7, None)}
    for name, (w1, w2) in cases.items():
        loras = ["--lora", str(tmp_path / "a")] + (["--lora", str(tmp_path / "b")] if w2 is not None else [])
        weights = [str(w1)] + ([str(w2)] if w2 is not None else [])
        assert main([*loras, "--weights", *weights, "--out", str(tmp_path / name)]) == 0
        got, ranks = _file_deltas(tmp_path / name / "pytorch_lora_weights.safetensors")
        assert ranks == ({5} if w2 is not None else {2})  # stacked factors, not interpolated ones
        for k in d1:
            want = w1 * d1[k] + (w2 * d2[k] if w2 is not None else 0)
            assert torch.allclose(got[k], want, rtol=1e-6, atol=1e-7), (name, k)
    assert max(float((d1[k] - d2[k]).abs().max()) for k in d1) > 1e-2  # the endpoints are told apart


def test_stock_pipeline_loads_the_mix_and_computes_the_summed_update(tmp_path):
    from tuner.mix import main
    from tuner.pipelines import TINY_PIPELINES

    _saved_lora("sd15", 2, 4.0, 1, tmp_path / "a")
    _saved_lora("sd15", 3, 1.5, 2, tmp_path / "b")
    assert main(["--lora", str(tmp_path / "a"), "--lora", str(tmp_path / "b"), "--out", str(tmp_path / "mix")]) == 0
    d1, _ = _file_deltas(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    d2, _ = _file_deltas(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    loaded, folded = TINY_PIPELINES["tiny-sd15"](0), TINY_PIPELINES["tiny-sd15"](0)
    loaded.load_lora_weights(str(tmp_path / "mix"))  # stock diffusers loading
    weights = dict(folded.unet.named_parameters())
    with torch.no_grad():
        for key in d1:  # fold 0.5 dW1 + 0.5 dW2 into the plain UNet's weights by hand
            name = key.removeprefix("unet.").replace(".lora.down.weight", "").replace(".processor", "")
            weights[name + ".weight"] += (0.5 * d1[key] + 0.5 * d2[key]).float()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, loaded.unet.config.cross_attention_dim,
                                                               generator=g)
    plain = TINY_PIPELINES["tiny-sd15"](0).unet(x, 500, encoder_hidden_states=ctx).sample
    want = folded.unet(x, 500, encoder_hidden_states=ctx).sample
    got = loaded.unet(x, 500, encoder_hidden_states=ctx).sample
    assert (want - plain).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_mix_gallery_across_strengths(tmp_path):
    from PIL import Image

    from tuner.mix import main

    _saved_lora("sd15", 2, 4.0, 1, tmp_path / "a")
    assert main(["--lora", str(tmp_path / "a"), "--weights", "0.5", "--out", str(tmp_path / "half"), "--gallery",
                 "--model", "tiny-sd15", "--prompts", "a cat", "a dog", "--strengths", "0", "1", "--steps", "2"]) == 0
    image = Image.open(tmp_path / "half" / "gallery.png")
    assert image.width > 2 * 128 and image.height > 2 * 128


# -- 4. Differentiable augmentations -----------------------------------------------------------------------------
def _by_hand(images, seed, crop, shift, noise):
    """crop -> flip -> shift -> noise written with plain torch (slicing, interpolate, flip, gather), the parameters
    drawn from a generator seeded `seed` in the documented order."""
    import math

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    out = []
    for img in images.split(1):
        H, W = img.shape[-2:]
        h = int(torch.randint(math.ceil(crop * H), H + 1, (), generator=g))
        w = max(1, round(h * W / H))
        top, left = int(torch.randint(0, H - h + 1, (), generator=g)), int(torch.randint(0, W - w + 1, (), generator=g))
        flip = float(torch.rand((), generator=g)) < 0.5
        m = round(shift * min(H, W))
        dy, dx = int(torch.randint(-m, m + 1, (), generator=g)), int(torch.randint(-m, m + 1, (), generator=g))
        eps = noise * torch.randn(3, H, W, generator=g, dtype=torch.float64)
        x = F.interpolate(img[..., top:top + h, left:left + w], size=(H, W), mode="bilinear", align_corners=True)
        x = x.flip(-1) if flip else x
        rows = (torch.arange(H) - dy).clamp(0, H - 1)
        cols = (torch.arange(W) - dx).clamp(0, W - 1)
        x = x[..., rows, :][..., cols] + eps
        out.append(x + (x.clamp(0, 1) - x).detach())
    return torch.cat(out)


def test_augmented_reward_gradient_equals_the_explicit_composition():
    from tuner.guards.augment import Augment
    from tuner.guards.normalize import GuardedReward

    images = torch.rand(4, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    images.requires_grad_(True)
    reward = ToyReward(batch=4)
    guarded = GuardedReward(reward, augment=Augment(["crop", "flip", "shift", "noise"], crop=0.6, shift=0.15,
                                                    noise=0.05, seed=7))
    got = torch.autograd.grad(guarded(images, None).sum(), images)[0]
    want = torch.autograd.grad(reward(_by_hand(images, 7, 0.6, 0.15, 0.05), None).sum(), images)[0]
    plain = torch.autograd.grad(reward(images, None).sum(), images)[0]
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert (got - plain).abs().max() > 1e-3  # the augmentation changed the gradient


def test_augmentations_batched_and_one_at_a_time_agree():
    from tuner.guards.augment import Augment

    images = torch.rand(3, 3, 16, 24, dtype=torch.float64)
    batched = Augment(["crop", "flip", "shift", "noise"], seed=2)(images)
    one = Augment(["crop", "flip", "shift", "noise"], seed=2)
    assert torch.equal(batched, torch.cat([one(images[i:i + 1]) for i in range(3)]))
    with pytest.raises(ValueError, match="unknown augmentation.*rotate"):
        Augment(["rotate"])


# -- 3. Reward normalisation -------------------------------------------------------------------------------------
def test_normalisation_of_the_total_and_of_each_part():
    import rewards
    from tuner.guards.normalize import GuardedReward, statistics

    mixture = rewards.combine({"symmetry": 2.0, "sharpness": 0.5})
    base = torch.rand(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stats = statistics(mixture(base.float(), None), mixture.last_parts)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    total = mixture(images, None)
    parts = dict(mixture.last_parts)
    sym, sharp = mixture.last_parts["symmetry"], mixture.last_parts["sharpness"]
    base_total = mixture(base.float(), None).double()
    want_total = (total.double() - base_total.mean()) / base_total.std()
    got_total = GuardedReward(mixture, stats=stats, mode="total")(images, None)
    assert torch.allclose(got_total.double(), want_total, rtol=1e-5)
    base_parts = {k: mixture.part(k)(base.float(), None).double() for k in ("symmetry", "sharpness")}
    want_parts = sum(w * (parts[k].double() - base_parts[k].mean()) / base_parts[k].std()
                     for k, w in (("symmetry", 2.0), ("sharpness", 0.5)))
    guarded = GuardedReward(mixture, stats=stats, mode="parts")
    assert torch.allclose(guarded(images, None).double(), want_parts, rtol=1e-5)
    assert torch.equal(guarded.last_parts["symmetry"], sym) and torch.equal(guarded.last_parts["sharpness"], sharp)
    with pytest.raises(ValueError, match="no spread"):
        statistics(torch.ones(4), {})


# -- 2. The pretraining (denoising) loss -------------------------------------------------------------------------
def _imagefolder(folder, n=3, size=SIZE):
    """A tiny dataset in the diffusers imagefolder layout."""
    import json

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(4)
    rows, arrays = [], []
    for i in range(n):
        array = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(array.numpy()).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}"}))
        arrays.append(array.permute(2, 0, 1).float() / 255)
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return torch.stack(arrays)


def test_pair_sources_read_an_imagefolder_and_the_shapes_generator(tmp_path):
    from tuner.guards.pretrain import PairSource
    from tuner.shapes.data import ShapesData

    pixels = _imagefolder(tmp_path / "data")
    source = PairSource(str(tmp_path / "data"), batch_size=2, height=SIZE, width=SIZE, seed=1)
    seen = []
    for step in range(3):  # one epoch and a half: every image once before any repeats
        images, captions = source.batch(step)
        for image, caption in zip(images, captions):
            assert torch.equal(image, pixels[int(caption.split()[1])])
            seen.append(caption)
    assert sorted(seen[:3]) == ["caption 0", "caption 1", "caption 2"]
    images, captions = PairSource("shapes", batch_size=2, height=SIZE, width=SIZE).batch(1)
    want, want_captions = ShapesData(0).batch(2, 2)
    assert torch.equal(images, want) and captions == want_captions


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_denoising_loss_equals_a_hand_computation(family, tmp_path):
    from tuner.guards.pretrain import denoising_loss

    adapter = perturbed_lora_adapter(family)
    images = _imagefolder(tmp_path / "data", n=2).double()
    captions = ["caption 0", "caption 1"]
    got = denoising_loss(adapter, images, captions, num_steps=T, generator=torch.Generator().manual_seed(9),
                         height=SIZE, width=SIZE)
    g = torch.Generator().manual_seed(9)
    index = int(torch.randint(0, T, (), generator=g))
    vae = adapter.vae
    z = vae.encode(images * 2 - 1).latent_dist.mean
    x0 = (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    adapter.set_timesteps(T, SIZE, SIZE)
    sched = adapter.scheduler
    t = sched.timesteps[index]
    if family in ("sd3", "flux"):
        s = sched.sigmas[index].double()
        x_t, want_out = (1 - s) * x0 + s * noise, noise - x0
    else:
        abar = sched.alphas_cumprod[int(t)].double()
        x_t, want_out = abar.sqrt() * x0 + (1 - abar).sqrt() * noise, noise
    cond = adapter.encode_prompts(captions, None if family == "flux" else ["", ""])
    with torch.no_grad():
        want = ((_guided(adapter, x_t, t, cond, 1.0) - want_out) ** 2).mean()
    assert got.requires_grad and float(got.detach()) == pytest.approx(float(want), rel=1e-9)


# -- the guards in the training loop -----------------------------------------------------------------------------
JUDGED = []


def stand_in_judge(images, captions):
    """A stand-in for tuner.shapes.judge.judge: scores 0.5, 0.9, 0.1, 0.2, ... in call order (best: the 2nd call)."""
    JUDGED.append(len(captions))
    return {"pass": [0.5, 0.9, 0.1, 0.2, 0.3][len(JUDGED) - 1], "other": 0.0}


def _run(tmp_path, name, *overrides, **kwargs):
    from tuner.config import load_config, validate
    from tuner.train import train

    fast = ["sampling.num_steps=4", "method_options={num_trained: 2, early_stop_range: 2}", "log.progress=false",
            "prompts.num_eval=2", "log.tensorboard=false", "sampling.height=64", "sampling.width=64",
            "reward=symmetry", "train.lr=1e-3", "sampling.scheduler=auto", "train.batch_size=1", "train.warmup_steps=0"]
    cfg = validate(load_config(BASE, [f"output_dir={tmp_path}", f"name={name}", *fast, *overrides]))
    return train(cfg, **kwargs)

ALL_GUARDS = ["guards.kl_weight=1.0", "guards.pretrain_weight=0.5", "guards.pretrain_data=shapes",
              "guards.augment=[crop,flip,shift,noise]", "guards.normalize_samples=3"]


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_every_guard_at_once_and_keep_best_with_a_stand_in_judge(family, tmp_path):
    from safetensors.torch import load_file

    from tuner import checkpoint as ckpt
    from tuner.logging import read_metrics

    JUDGED.clear()
    summary = _run(tmp_path, "all", f"model=tiny-{family}", "train.steps=5", *ALL_GUARDS, "guards.normalize=total",
                   "guards.select_every=1", "guards.select_metric=tests.test_guards:stand_in_judge",
                   "guards.select_key=pass", "guards.keep_best=true", "guards.early_stop_patience=2",
                   "guards.select_num=2", "checkpoint.every=1", "checkpoint.keep=10", "log.eval_every=100")
    run = tmp_path / "all"
    assert JUDGED == [2, 2, 2, 2]  # the base model, then steps 1, 2, 3; stopped there (2 evaluations without a best)
    final_eval = summary["selection"].pop("eval_reward_of_final_weights")
    assert summary["selection"] == {"best_step": 1, "best_score": 0.9, "stopped_early_at": 3,
                                    "final_weights_from_step": 1}
    assert 0 < final_eval <= 1 and final_eval != summary["eval_reward_after"]  # the best weights, not the last
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(r["pretrain_loss"] > 0 and "kl_penalty" in r and "reward/unnormalized" in r for r in train_rows)
    assert train_rows[-1]["kl_penalty"] > 0  # the LoRA has moved away from the base
    assert [r["select/score"] for r in rows if "select/score" in r] == [0.5, 0.9, 0.1, 0.2]
    assert (run / "reward_stats.safetensors").is_file()
    # the final LoRA holds the step-1 weights, not the last ones
    best = ckpt.read_tensors(ckpt.latest(run / "best"), "trainable.safetensors")
    step1 = ckpt.read_tensors(ckpt.step_dir(run / "checkpoints", 1), "trainable.safetensors")
    step3 = ckpt.read_tensors(ckpt.step_dir(run / "checkpoints", 3), "trainable.safetensors")
    assert all(torch.equal(best[k], step1[k]) for k in step1)
    assert any(not torch.equal(step3[k], step1[k]) for k in step1)
    final = load_file(run / "lora" / "pytorch_lora_weights.safetensors")

    def norms(state):
        return sorted(round(v.double().square().sum().item(), 9) for v in state.values())

    assert norms(final) == norms(step1) != norms(step3)


def test_full_finetune_with_the_penalty_and_the_pretraining_loss(tmp_path):
    summary = _run(tmp_path, "full", "model=tiny-sd15", "train.steps=2", "train.full_finetune=true", *ALL_GUARDS,
                   "guards.normalize=parts", "reward={symmetry: 1.0, sharpness: 0.1}", "train.lr=1e-4")
    from tuner.logging import read_metrics

    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "reward" in r]
    assert summary["skipped_steps"] == 0 and rows[-1]["kl_penalty"] > 0 and rows[-1]["pretrain_loss"] > 0
    assert {"reward/symmetry", "reward/sharpness", "reward/unnormalized"} <= set(rows[-1])


def test_resume_restores_the_normalisation_statistics_bit_for_bit(tmp_path, monkeypatch):
    from tests.test_train import Brightness
    from tuner import checkpoint as ckpt
    from tuner.guards import normalize

    common = ["model=tiny-sd15", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5", "log.eval_every=100",
              *ALL_GUARDS, "guards.normalize=total"]
    _run(tmp_path, "whole", *common, reward_fn=Brightness())
    with pytest.raises(KeyboardInterrupt):  # killed during step 3, after the checkpoint of step 2
        _run(tmp_path, "cut", *common, reward_fn=Brightness(crash_at=3))
    stats_file = tmp_path / "cut" / normalize.STATS_FILE
    before = stats_file.read_bytes()
    sampled = []
    monkeypatch.setattr(normalize, "statistics", lambda *a: sampled.append(a))
    _run(tmp_path, "cut", *common, "resume=latest", reward_fn=Brightness())
    assert sampled == [] and stats_file.read_bytes() == before  # read back, not sampled again
    assert before == (tmp_path / "whole" / normalize.STATS_FILE).read_bytes()
    stats = normalize.load_stats(tmp_path / "cut")
    assert stats["std/total"] > 0 and stats["mean/total"].dtype == torch.float64
    a, b = (ckpt.latest(tmp_path / n / "checkpoints") for n in ("whole", "cut"))
    wa, wb = ckpt.read_tensors(a, "trainable.safetensors"), ckpt.read_tensors(b, "trainable.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the resumed run used the same statistics and augmentations


def test_guard_options_are_checked_before_a_model_loads(tmp_path):
    from tuner.config import ConfigError, load_config, validate

    def check(*overrides):
        return validate(load_config(BASE, ["model=tiny-sd15", *overrides]))

    with pytest.raises(ConfigError, match="pretrain_data"):
        check("guards.pretrain_weight=1")
    with pytest.raises(ConfigError, match="metadata.jsonl"):
        check("guards.pretrain_weight=1", f"guards.pretrain_data={tmp_path}")
    with pytest.raises(ConfigError, match="select_metric"):
        check("guards.keep_best=true")
    with pytest.raises(ConfigError, match="no_such_module.*not importable"):
        check("guards.select_every=5", "guards.select_metric=no_such_module:judge")
    check("guards.select_every=5", "guards.select_metric=shapes-judge")  # the judge ships with the tuner
    with pytest.raises(ConfigError, match="overlap the evaluation seeds"):
        check("guards.select_every=5", "guards.select_metric=symmetry", "guards.select_seed=1235")
    with pytest.raises(ConfigError, match="guards.augment.*rotate"):
        check("guards.augment=[rotate]")
    (tmp_path / "select.txt").write_text("a cat\n")
    (tmp_path / "train.txt").write_text("a cat\na dog\na cow\na fox\na owl\na bee\n")
    with pytest.raises(ConfigError, match="disjoint from the (training|evaluation)"):
        check("guards.select_every=5", "guards.select_metric=symmetry", f"prompts.file={tmp_path / 'train.txt'}",
              "prompts.num_eval=2", f"guards.select_prompts={tmp_path / 'select.txt'}")
    check("guards.select_every=5", "guards.select_metric=symmetry", f"prompts.file={tmp_path / 'train.txt'}",
          "prompts.num_eval=2", "guards.select_num=2")  # held out of the training prompts: disjoint by construction


def test_guards_give_the_same_gradient_in_low_memory_mode():
    from tuner.guards.augment import Augment
    from tuner.guards.normalize import GuardedReward

    adapter, plan = perturbed_lora_adapter("sd15"), PLANS["drtune"]
    cond = adapter.encode_prompts(PROMPTS)
    stats = {"mean/total": torch.tensor(0.3, dtype=torch.float64), "std/total": torch.tensor(0.2, dtype=torch.float64)}
    grads = []
    for low in (False, True):
        adapter.low_memory = low
        reward = GuardedReward(ToyReward(batch=1), augment=Augment(["crop", "flip", "shift", "noise"], seed=3),
                               stats=stats, mode="total")
        reward_backward(adapter, plan, cond, reward, PROMPTS, height=SIZE, width=SIZE, guidance_scale=GUIDANCE,
                        generator=torch.Generator().manual_seed(SEED), step_term=BasePenalty(2.0))
        grads.append(denoiser_grads(adapter))
        adapter.denoiser.zero_grad(set_to_none=True)
    assert relative_error(grads[1], grads[0]) < 1e-10


def test_stock_flux_pipeline_fuses_the_mix_into_the_summed_update(tmp_path):
    from tuner.mix import main
    from tuner.pipelines import TINY_PIPELINES

    _saved_lora("flux", 2, 4.0, 1, tmp_path / "a")
    _saved_lora("flux", 3, 1.5, 2, tmp_path / "b")
    assert main(["--lora", str(tmp_path / "a"), "--lora", str(tmp_path / "b"), "--weights", "0.5", "0.5",
                 "--out", str(tmp_path / "mix")]) == 0
    d1, _ = _file_deltas(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    d2, _ = _file_deltas(tmp_path / "b" / "pytorch_lora_weights.safetensors")
    pipe = TINY_PIPELINES["tiny-flux"](0)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(tmp_path / "mix"))  # stock diffusers loading, then folding
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    for key in d1:
        name = key.removeprefix("transformer.").replace(".lora_A.weight", ".weight")
        want = base[name].double() + 0.5 * d1[key] + 0.5 * d2[key]
        assert torch.allclose(fused[name].double(), want, atol=1e-6), name
