"""shapes-flow, the SD3-style flow-matching shapes model: its training stage through the real entry point (a tiny
transformer), stock diffusers loading what it writes, its conditioning against the stock pipeline's and open_clip's,
the size budget of the shipped weights, `model: shapes-flow` in a run (tuned with DRTune), and its evaluation."""
import json

import open_clip
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import CLIPTextModel

from rewards.clip_score import SHAPES_CLIP_DIR
from tests.tuner_fixtures import BASE
from tuner import shapes
from tuner.config import ConfigError, load_config, validate
from tuner.engine import _step_seeds, sample
from tuner.pipelines import SD3Adapter, load_adapter
from tuner.shapes import data, models
from tuner.shapes.train import main

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = ["--workers=0", "--flow-steps=3", "--flow-batch=4", "--flow-layers=1", "--flow-heads=1"]
CAPTIONS = [s.caption for s in data.ShapesData(1).scenes(0, 3)] + [""]
BUDGET = 50_000_000  # bytes of safetensors of every shipped small model together


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    """A tiny shapes-flow (one joint block of width 32), three steps of the real flow stage on the shipped VAE,
    text encoder and CLIP."""
    out = tmp_path_factory.mktemp("shapes-flow")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([f"--out={out}", "--stage=flow", *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _stock(folder) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flow_stage_writes_a_folder_stock_sd3_samples_as_the_tuner_does(tiny_flow):
    rows = [json.loads(line) for line in (tiny_flow / "logs" / "flow.jsonl").read_text().splitlines()]
    assert rows[-1]["done"] == 3 and "loss" in rows[2] and rows[1]["vae_and_text_encoder"] == "shipped shapes-sd"
    pipe = _stock(tiny_flow / "flow")
    assert pipe.text_encoder_3 is None and pipe.tokenizer_max_length == models.FLOW_TOKENS
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.default_sample_size * pipe.vae_scale_factor == data.SIZE  # pipe(prompt) draws 64x64 by default
    # the VAE's latents of held-out images have mean 0 and std 1 after SD3's shift and scale
    images, _ = data.ShapesData(1).batch(0, 64)
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.mean
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert abs(float(z.mean())) < 0.1 and 0.85 < float(z.std()) < 1.15
    adapter = load_adapter(str(tiny_flow / "flow"), device="cpu", dtype=torch.float32)  # finds T5 absent itself
    assert isinstance(adapter, SD3Adapter)
    steps, prompts = 4, CAPTIONS[:2]
    ours = sample(adapter, adapter.encode_prompts(prompts), height=64, width=64, num_steps=steps, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    _step_seeds(steps, g)
    latents = adapter.initial_latents(len(prompts), 64, 64, g)
    stock = pipe(prompts, num_inference_steps=steps, latents=latents, guidance_scale=5.0, output_type="pt").images
    assert ours.shape == (2, 3, 64, 64) and ours.std() > 1e-3
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


def test_flow_stage_goes_on_training_a_folder_it_wrote(tiny_flow, tmp_path):
    """--flow-init: the same architecture and latent scaling (not the flags' defaults), weights that move on."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    assert main([f"--out={tmp_path}", "--stage=flow", "--workers=0", "--flow-steps=2", "--flow-batch=4",
                 f"--flow-init={tiny_flow / 'flow'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "logs" / "flow.jsonl").read_text().splitlines()]
    assert rows[1]["init"] == "flow" and rows[-1]["done"] == 2
    before, after = (SD3Transformer2DModel.from_pretrained(f / "flow" / "transformer") for f in (tiny_flow, tmp_path))
    assert after.config.num_layers == 1 and after.config.num_attention_heads == 1
    pairs = list(zip(before.parameters(), after.parameters()))
    assert any(not torch.equal(a, b) for a, b in pairs)  # trained on ...
    assert max(float((a - b).detach().abs().max()) for a, b in pairs) < 1e-3  # ... from the loaded weights (warm-up lr 8e-7)
    vae_before, vae_after = (AutoencoderKL.from_pretrained(f / "flow" / "vae") for f in (tiny_flow, tmp_path))
    assert vae_after.config.shift_factor == vae_before.config.shift_factor
    assert vae_after.config.scaling_factor == vae_before.config.scaling_factor


def test_training_conditioning_is_the_stock_pipelines(tiny_flow):
    """What the flow stage trains on (models.flow_prompt_embeds) equals StableDiffusion3Pipeline.encode_prompt with T5
    absent: 32 caption tokens of both encoders side by side, then 256 zero tokens; the two pooled projections."""
    pipe = _stock(tiny_flow / "flow")
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, None, device="cpu", do_classifier_free_guidance=False)
    tokens = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=models.FLOW_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        ours, ours_pooled = models.flow_prompt_embeds(pipe.text_encoder, pipe.text_encoder_2, tokens, 256)
    assert ours.shape == (4, models.FLOW_TOKENS + models.T5_TOKENS, 256) and ours_pooled.shape == (4, 128)
    assert torch.equal(ours, embeds) and torch.equal(ours_pooled, pooled)
    assert ours[:, models.FLOW_TOKENS:].abs().max() == 0


def test_text_encoders_are_shapes_sds_and_the_shapes_clips():
    """text_encoder_2 is the shapes CLIP's text tower: its pooled projection equals open_clip's encode_text; and
    text_encoder keeps shapes-sd's text encoder's hidden states."""
    tok = models.tokenizer(models.FLOW_TOKENS)
    tokens = tok(CAPTIONS, padding="max_length", max_length=models.FLOW_TOKENS, truncation=True,
                 return_tensors="pt").input_ids
    clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{SHAPES_CLIP_DIR}")
    sd = CLIPTextModel.from_pretrained(shapes.MODEL_DIR / "text_encoder")
    with torch.no_grad():
        want = clip.float().eval().encode_text(open_clip.get_tokenizer(f"local-dir:{SHAPES_CLIP_DIR}")(CAPTIONS))
        got = models.clip_text_encoder(SHAPES_CLIP_DIR, tok)(tokens).text_embeds
        sd_states = sd(tokens, output_hidden_states=True).hidden_states
        ours = models.flow_text_encoder(sd, tok)(tokens, output_hidden_states=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, sd_states))
    assert ours.text_embeds.shape == (4, models.FLOW_PROJECTION)


def test_shipped_weights_with_a_full_shapes_flow_fit_50_MB(tiny_flow, tmp_path):
    """shapes-sd and shapes-clip as shipped, plus shapes-flow: its installed files, or else the tiny run's VAE and
    text encoders (the same files) and a full-size transformer written here."""
    shipped = [*shapes.MODEL_DIR.glob("*/*.safetensors"), *SHAPES_CLIP_DIR.glob("*.safetensors")]
    if (shapes.FLOW_DIR / "model_index.json").is_file():
        flow = list(shapes.FLOW_DIR.glob("*/*.safetensors"))
    else:
        models.flow_transformer().save_pretrained(tmp_path / "transformer")
        flow = [*tmp_path.glob("transformer/*.safetensors"),
                *(f for f in (tiny_flow / "flow").glob("*/*.safetensors") if f.parent.name != "transformer")]
    assert len(shipped) == 4 and len(flow) == 4
    total = sum(f.stat().st_size for f in [*shipped, *flow])
    assert 45_000_000 < total <= BUDGET  # measured 49.01 MB: shapes-sd 22.17, shapes-clip 2.67, shapes-flow 24.18


def test_model_shapes_flow_loads_when_installed_and_says_how_to_make_it_when_not(tiny_flow, tmp_path, monkeypatch):
    monkeypatch.setitem(shapes.MODELS, shapes.FLOW_NAME, tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"shapes-flow's weights are not installed.*--stage flow.*--install"):
        validate(load_config(BASE, ["model=shapes-flow"]))
    monkeypatch.setitem(shapes.MODELS, shapes.FLOW_NAME, tiny_flow / "flow")
    assert validate(load_config(BASE, ["model=shapes-flow"])).model == "shapes-flow"


class Brightness(torch.nn.Module):
    """A differentiable reward: closeness of every pixel to 0.8."""

    def forward(self, images, prompts):
        return -(images - 0.8).pow(2).mean(dim=(1, 2, 3))


def test_drtune_tunes_shapes_flow_and_the_reward_rises(tiny_flow, tmp_path, monkeypatch):
    from tuner.train import train

    monkeypatch.setitem(shapes.MODELS, shapes.FLOW_NAME, tiny_flow / "flow")
    cfg = validate(load_config(BASE, [
        f"output_dir={tmp_path}", "name=flow", "model=shapes-flow", "method=drtune",
        "method_options={num_trained: 2, early_stop_range: 2}", "sampling.scheduler=auto", "sampling.num_steps=4",
        "sampling.height=64", "sampling.width=64", "sampling.guidance_scale=5.0", "train.steps=6",
        "train.batch_size=2", "train.lr=2e-2", "train.warmup_steps=0", "prompts.file=shapes_centered",
        "prompts.num_eval=2", "log.eval_every=6", "log.progress=false", "log.tensorboard=false",
        "checkpoint.every=100"]))
    summary = train(cfg, reward_fn=Brightness())
    assert summary["skipped_steps"] == 0 and summary["trained_parameters"] > 0
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 0.01  # fixed eval seeds, before and after
    assert set(summary["judge_before"]) >= {"colors", "background"}  # the shapes judge runs on shapes-flow too


def test_flow_eval_puts_both_models_side_by_side_over_seeds(tiny_flow):
    """The flow-eval stage: shapes-sd and shapes-flow on the same held-out captions and noise seeds, by the old
    checks and the judge, and the bar (each check at most 5 points below shapes-sd's mean)."""
    from tuner.shapes.evaluate import compare_flow
    from tuner.shapes.judge import judge, sample_shapes_sd

    flags = ["--flow-eval-captions=4", "--flow-eval-seeds=0,1,2", "--flow-eval-steps=2"]
    assert main([f"--out={tiny_flow}", "--stage=flow-eval", *flags]) == 0
    report = json.loads((tiny_flow / "flow_report.json").read_text())
    assert (tiny_flow / "flow_samples.png").is_file() and (tiny_flow / "flow_losses.png").is_file()
    assert report["seeds"] == [0, 1, 2]
    captions = [s.caption for s in data.ShapesData(1).scenes(0, 4)]
    again = judge(sample_shapes_sd(captions, seed=1, steps=2), captions)  # shapes-sd, loaded on its own
    assert {k: v[1] for k, v in report["shapes-sd"]["judge"].items()} == again
    for key, bar in report["bar"].items():
        kind, check = key.split("/")
        sd, flow = (sum(report[m][kind][check]) / 3 for m in ("shapes-sd", "shapes-flow"))
        assert bar["met"] == (flow >= sd - 0.05) and bar["shapes-sd"] == pytest.approx(sd)
    assert {"old/colors", "judge/colors", "judge/background"} <= set(report["bar"])
    assert report["bar_met"] == all(b["met"] for b in report["bar"].values())
    with pytest.raises(ValueError, match="at least 3 noise seeds"):
        compare_flow(tiny_flow / "flow", shapes.MODEL_DIR, tiny_flow, "cpu", captions=4, seeds=(0, 1))


def test_install_copies_what_the_run_trained(tiny_flow, tmp_path, monkeypatch):
    from tuner.shapes import train

    targets = {name: tmp_path / name for name in train.INSTALLS}
    monkeypatch.setattr(train, "INSTALLS", targets)
    assert main([f"--out={tiny_flow}", "--install"]) == 0  # this run trained only the flow pipeline
    assert (targets["flow"] / "model_index.json").is_file()
    assert not targets["pipeline"].exists() and not targets["clip"].exists()
    configs = [json.loads(p.read_text()) for p in (targets["flow"]).glob("*/config.json")]
    assert len(configs) >= 4 and not any("_name_or_path" in c for c in configs)  # no build path ships
    with pytest.raises(SystemExit, match="run the training stages first"):
        main([f"--out={tmp_path / 'empty'}", "--install"])


def test_flop_count_of_the_flow_stage_matches_a_hand_count():
    """tuner.shapes.flops counts the flow stage's training FLOPs; one more joint block adds its forward matmuls
    (image stream, text stream, attention over all 544 tokens, two adaLN projections) three times over (forward,
    and the backward's gradients of inputs and of weights)."""
    from tuner.shapes.flops import flow_flops

    width, image, text = 32, 256, models.FLOW_TOKENS + models.T5_TOKENS
    block = (2 * 2 * 6 * width**2 + 2 * (image + text) * 12 * width**2  # adaLN, attention projections and MLPs
             + 4 * (image + text) ** 2 * width)  # q k^T and attention @ v
    assert flow_flops(batch=1, layers=2, heads=1) - flow_flops(batch=1, layers=1, heads=1) == 3 * block
