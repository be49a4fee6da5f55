"""The training loop end to end on a tiny SDXL: outputs, exact resume, non-finite steps."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tuner_fixtures import BASE
from tuner import checkpoint as ckpt
from tuner.config import ConfigError, load_config, validate
from tuner.logging import read_metrics
from tuner.run import main
from tuner.train import NonFiniteError, lr_at, train

FAST = ["model=tiny-sdxl", "sampling.num_steps=4", "method_options={num_trained: 2, early_stop_range: 2}", "train.batch_size=1",
        "log.progress=false", "prompts.num_eval=2"]


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(tmp_path, name, *overrides):
    return validate(load_config(BASE, [f"output_dir={tmp_path}", f"name={name}", *FAST, *overrides]))


class Brightness(torch.nn.Module):
    """A small differentiable reward; raises or returns NaN on chosen training calls (eval calls run without grad)."""

    def __init__(self, crash_at=None, nan_at=()):
        super().__init__()
        self.calls, self.crash_at, self.nan_at = 0, crash_at, set(nan_at)

    def forward(self, images, prompts):
        score = -(images - 0.7).pow(2).mean(dim=(1, 2, 3))
        if not torch.is_grad_enabled():
            return score
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        return score * float("nan") if self.calls in self.nan_at else score


def test_end_to_end_writes_every_output(tmp_path):
    args = [f"output_dir={tmp_path}", "name=e2e", *FAST, "train.steps=4", "log.eval_every=2", "checkpoint.every=2",
            "checkpoint.keep=1", "train.ema_decay=0.5", "train.grad_accum=2"]
    assert main(["--config", str(BASE), *args]) == 0  # the command line, the real `symmetry` through rewards.load
    run = tmp_path / "e2e"
    cfg = load_config(run / "config.yaml")
    summary = json.loads((run / "summary.json").read_text())
    for name in ("config.yaml", "metrics.jsonl", "reward_curve.png", "summary.json", "summary.md",
                 "gallery/before.safetensors", "gallery/step-00000002.png", "gallery/step-00000004.png",
                 "lora/pytorch_lora_weights.safetensors"):
        assert (run / name).is_file(), name
    assert any((run / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000004"]  # keep=1
    assert not list((run / "checkpoints").glob(".tmp-*"))
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if "reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["skipped"] == 0 and r["grad_norm"] > 0 and r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg)) for r in train_rows)
    assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2, 4]
    assert 0 < summary["eval_reward_before"] <= 1 and summary["skipped_steps"] == 0
    assert summary["final_weights"].endswith("pytorch_lora_weights.safetensors")
    assert cfg.name == "e2e" and cfg.train.mixed_precision == "no" and cfg.train.steps == 4 and cfg.train.grad_accum == 2
    # the final LoRA holds the EMA weights, the same as the last checkpoint's EMA
    ema = ckpt.read_tensors(ckpt.latest(run / "checkpoints"), "ema.safetensors")
    lora = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert len(lora) == len(ema)
    assert sorted(round(v.double().square().sum().item(), 9) for v in lora.values()) == \
        sorted(round(v.double().square().sum().item(), 9) for v in ema.values())
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume=latest"):
        train(validate(load_config(BASE, args)))


def test_resume_reaches_the_same_weights(tmp_path):
    common = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=5", "log.eval_every=100", "train.ema_decay=0.8",
              "train.warmup_steps=1", "log.tensorboard=false"]
    train(tiny(tmp_path, "whole", *common), reward_fn=Brightness())
    with pytest.raises(KeyboardInterrupt):  # killed during step 3, after the checkpoint of step 2
        train(tiny(tmp_path, "cut", *common), reward_fn=Brightness(crash_at=3))
    assert ckpt.latest(tmp_path / "cut" / "checkpoints").name == "step-00000002"
    summary = train(tiny(tmp_path, "cut", *common, "resume=latest"), reward_fn=Brightness())
    assert summary["resumed_from_step"] == 2
    a, b = (ckpt.latest(tmp_path / n / "checkpoints") for n in ("whole", "cut"))
    assert a.name == b.name == "step-00000004"
    for name in ("trainable.safetensors", "ema.safetensors"):
        wa, wb = ckpt.read_tensors(a, name), ckpt.read_tensors(b, name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name  # bitwise
    oa, ob = (ckpt.read_state(p, "optimizer.pt")["optimizer"]["state"] for p in (a, b))
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    # the moved-on weights differ from the step-2 ones (the test could fail)
    w2 = ckpt.read_tensors(tmp_path / "cut" / "checkpoints" / "step-00000002", "trainable.safetensors")
    assert any(not torch.equal(w2[k], ckpt.read_tensors(b, "trainable.safetensors")[k]) for k in w2)
    rows = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4]  # the dead run's partial rows are gone


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    cfg = tiny(tmp_path, "nan", "train.steps=8", "checkpoint.every=1", "checkpoint.keep=10", "log.eval_every=100",
               "train.max_nonfinite=2", "log.tensorboard=false")
    # step 2 is NaN (skipped, then training goes on); steps 4 and 5 are NaN: two in a row stop the run
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps \(up to step 5\).*step-00000004"):
        train(cfg, reward_fn=Brightness(nan_at=(2, 4, 5, 6, 7, 8)))
    run = tmp_path / "nan"
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "reward" in r]
    assert [(r["step"], r["skipped"]) for r in rows] == [(1, 0), (2, 1), (3, 0), (4, 1), (5, 1)]
    assert rows[1]["reward"] is None and rows[2]["reward"] is not None
    assert ckpt.latest(run / "checkpoints").name == "step-00000004"  # none written for the stopping step

    def state(step):
        folder = run / "checkpoints" / f"step-{step:08d}"
        return ckpt.read_tensors(folder, "trainable.safetensors"), ckpt.read_state(folder, "optimizer.pt")["optimizer"]

    (w1, o1), (w2, o2), (w3, o3), (w4, o4) = (state(s) for s in (1, 2, 3, 4))
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(w3[k], w4[k]) for k in w3)  # skipped: no update
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # a finite step updates
    steps = [float(next(iter(o["state"].values()))["step"]) for o in (o1, o2, o3, o4)]
    assert steps == [1.0, 1.0, 2.0, 2.0]  # Adam's moments untouched by a skipped step


def test_full_finetune_of_sd15_saves_a_loadable_unet(tmp_path):
    from diffusers import UNet2DConditionModel

    from tuner.pipelines import tiny_sd15_pipeline

    cfg = tiny(tmp_path, "full", "model=tiny-sd15", "train.full_finetune=true", "train.steps=2", "log.eval_every=100",
               "checkpoint.every=100", "log.tensorboard=false", "sampling.guidance_scale=1.0", "train.lr=1e-3",
               "train.ema_decay=0.9")
    summary = train(cfg, reward_fn=Brightness())
    base = tiny_sd15_pipeline(seed=0).unet
    assert summary["trained_parameters"] == sum(p.numel() for p in base.parameters())
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet")
    saved = ckpt.read_tensors(ckpt.latest(tmp_path / "full" / "checkpoints"), "ema.safetensors")  # EMA is on
    state = tuned.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in state.items())


def test_lr_schedules():
    def lrs(schedule, warmup=2, steps=10):
        cfg = load_config(BASE, [f"train.lr_schedule={schedule}", f"train.warmup_steps={warmup}",
                                 f"train.steps={steps}", "train.lr=1.0"])
        return [lr_at(s, cfg) for s in range(steps)]

    assert lrs("constant") == [1.0] * 10
    assert lrs("constant_with_warmup") == [0.5, 1.0] + [1.0] * 8
    assert lrs("linear")[:3] == [0.5, 1.0, 1.0] and lrs("linear")[-1] == pytest.approx(1 / 8)
    cosine = lrs("cosine", warmup=0, steps=4)
    assert cosine == pytest.approx([1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5)])


FLOW = ["sampling.scheduler=auto", "sampling.num_steps=4", "method_options={num_trained: 2, early_stop_range: 2}", "train.batch_size=1",
        "log.progress=false", "prompts.num_eval=2", "log.tensorboard=false", "log.eval_every=100"]


def test_flux_run_caches_prompts_and_saves_a_lora_stock_flux_loads(tmp_path):
    """FLUX: prompts encoded once with the text encoders then off the device; the LoRA (image and text streams) loads
    into a stock FluxPipeline."""
    from diffusers import FluxPipeline

    from tuner.pipelines import tiny_flux_pipeline

    cfg = validate(load_config(BASE, [f"output_dir={tmp_path}", "name=flux", "model=tiny-flux", *FLOW, "train.steps=2",
                                      "sampling.guidance_scale=3.5", "checkpoint.every=100", "train.lr=1e-2"]))
    summary = train(cfg, reward_fn=Brightness())
    assert summary["skipped_steps"] == 0 and summary["trained_parameters"] > 0
    state = load_file(tmp_path / "flux" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(".add_q_proj.lora_A" in k for k in state) and any(".to_add_out.lora_B" in k for k in state)
    pipe = tiny_flux_pipeline()
    pipe.load_lora_weights(tmp_path / "flux" / "lora")  # strict enough to fail on a key it does not know
    assert any(k.startswith("transformer.") for k in state)


def test_sd3_resume_reaches_the_same_weights(tmp_path):
    common = [*FLOW, "model=tiny-sd3", "train.steps=3", "checkpoint.every=1", "checkpoint.keep=5",
              "sampling.guidance_scale=3.0", "train.lr=1e-2"]
    whole = validate(load_config(BASE, [f"output_dir={tmp_path}", "name=whole", *common]))
    train(whole, reward_fn=Brightness())
    with pytest.raises(KeyboardInterrupt):
        train(validate(load_config(BASE, [f"output_dir={tmp_path}", "name=cut", *common])),
              reward_fn=Brightness(crash_at=3))
    train(validate(load_config(BASE, [f"output_dir={tmp_path}", "name=cut", *common, "resume=latest"])),
          reward_fn=Brightness())
    a, b = (ckpt.latest(tmp_path / n / "checkpoints") for n in ("whole", "cut"))
    wa, wb = ckpt.read_tensors(a, "trainable.safetensors"), ckpt.read_tensors(b, "trainable.safetensors")
    assert a.name == b.name == "step-00000003" and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w1 = ckpt.read_tensors(tmp_path / "whole" / "checkpoints" / "step-00000001", "trainable.safetensors")
    assert any(not torch.equal(w1[k], wa[k]) for k in wa)


def test_full_finetune_of_a_transformer_saves_a_loadable_transformer(tmp_path):
    from diffusers import SD3Transformer2DModel

    cfg = validate(load_config(BASE, [f"output_dir={tmp_path}", "name=full", "model=tiny-sd3", *FLOW, "train.steps=1",
                                      "train.full_finetune=true", "checkpoint.every=100", "sampling.guidance_scale=1.0"]))
    summary = train(cfg, reward_fn=Brightness())
    tuned = SD3Transformer2DModel.from_pretrained(tmp_path / "full" / "transformer")
    assert summary["trained_parameters"] == sum(p.numel() for p in tuned.parameters())


def test_flow_models_refuse_fp8_sampling_and_negative_prompts(tmp_path):
    with pytest.raises(ConfigError, match="fp8_sampling"):
        train(validate(load_config(BASE, [f"output_dir={tmp_path}", "name=a", "model=tiny-flux", *FLOW,
                                          "train.fp8_sampling=true"])), reward_fn=Brightness())


def test_a_shapes_run_logs_the_judge_before_and_after(tmp_path):
    from tuner.shapes.judge import judge

    args = ["--config", str(BASE), f"output_dir={tmp_path}", "name=shapes", "model=shapes-sd", "sampling.num_steps=4",
            "train.steps=1", "train.batch_size=2", "prompts.file=shapes_centered", "prompts.num_eval=4",
            "log.progress=false", "method_options={num_trained: 1, early_stop_range: 1}", "reward={symmetry: 1.0}"]
    assert main(args) == 0
    run = tmp_path / "shapes"
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(run / "config.yaml")
    from tuner.prompts import load_prompt_sets

    _, captions = load_prompt_sets(cfg.prompts)
    before = ckpt.read_tensors(run / "gallery", "before.safetensors")["images"]
    assert summary["judge_before"] == pytest.approx(judge(before, captions), abs=0)  # the judge's own rates
    assert set(summary["judge_after"]) == set(summary["judge_before"]) >= {"colors", "background", "all"}
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "eval/judge/all" in r]
    assert [r["step"] for r in rows] == [0, 1]
    assert "| colors |" in (run / "summary.md").read_text()


def test_runs_off_the_shapes_model_have_no_judge(tmp_path, capsys):
    summary = train(tiny(tmp_path, "plain", "train.steps=1", "log.judge_captions=8"))  # as a default would set it
    assert "judge_before" not in summary and "ground_truth" not in summary
    assert "no held-out test for tiny-sdxl" in capsys.readouterr().out


def test_wilson_interval_matches_the_textbook_values():
    from tuner.shapes.judge import wilson

    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # Wilson (1927); Newcombe (1998), method 3
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)


def test_ground_truth_test_of_a_shapes_run(tmp_path):
    from tuner import engine
    from tuner.prompts import read_prompts
    from tuner.shapes import judge
    from tuner.train import JUDGE_SEED

    args = ["--config", str(BASE), f"output_dir={tmp_path}", "name=truth", "model=shapes-sd", "sampling.num_steps=4",
            "train.steps=1", "train.batch_size=2", "prompts.file=shapes_centered", "prompts.num_eval=2",
            "log.progress=false", "method_options={num_trained: 1, early_stop_range: 1}", "reward={symmetry: 1.0}",
            "train.lr=0", "log.judge_captions=6", "log.judge_seeds=2"]
    assert main(args) == 0
    truth = json.loads((tmp_path / "truth" / "summary.json").read_text())["ground_truth"]
    assert truth["before"] == truth["after"]  # lr 0: the final weights are the base model's, same seeds
    captions = judge.held_out_captions(6, exclude=read_prompts("shapes_centered"))
    assert not set(captions) & set(read_prompts("shapes_centered"))
    # the same test by hand: the shipped model, caption i of seed k from noise seed JUDGE_SEED + 6 k + i
    from tuner import pipelines, shapes

    adapter = pipelines.load_adapter(str(shapes.MODEL_DIR), device=torch.device("cpu"), dtype=torch.float32)
    verdicts = []
    for k in range(2):
        gens = [torch.Generator().manual_seed(JUDGE_SEED + 6 * k + i) for i in range(6)]
        images = engine.sample_each(adapter, adapter.encode_prompts(captions, [""] * 6), generators=gens,
                                    batch_size=6, height=64, width=64, num_steps=4, guidance_scale=5.0)
        verdicts += judge.judge_each(images.float(), captions)
    expected = judge.tallies(verdicts)
    assert {c: (r["rate"] * r["n"], r["n"]) for c, r in truth["before"].items()} == \
        {c: (pytest.approx(p), n) for c, (p, n) in expected.items()}
    assert "Ground truth" in (tmp_path / "truth" / "summary.md").read_text()
