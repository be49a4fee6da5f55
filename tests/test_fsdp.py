"""Full fine-tuning under FSDP2 on two CPU processes (gloo, launched by torchrun): the weights really are sharded, and
one DRTune optimizer step of the loop (tuner.train.train_step) gives the gradient, weights and AdamW state of the
same step taken by one process over both ranks' prompts and noise.

accelerate enables FSDP only for accelerator processes, so the worker shards the transformer with torch's
fully_shard itself, as accelerate's FSDP2 plugin does (each transformer block, then the root), and runs the loop's
own step on it. The oracle is a plain single-process step: each rank's prompts and generator, the engine's gradient
halved, torch's clip_grad_norm_ and AdamW.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tuner.train as T
from tests.tuner_fixtures import BASE, ToyReward
from tuner import engine, lora
from tuner.config import load_config, validate
from tuner.methods import get_method
from tuner.prompts import PromptSampler

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
MODELS = ("tiny-sd3", "tiny-flux")
PROMPTS = ["a red square", "a blue circle on the left", "two green triangles", "a yellow star"]
OVERRIDES = ["train.full_finetune=true", "train.gradient_checkpointing=true", "train.batch_size=1", "train.lr=1e-3",
             "train.lr_schedule=constant", "train.max_grad_norm=0.002", "train.ema_decay=0.9", "sampling.num_steps=4",
             "sampling.scheduler=auto", "sampling.negative_prompt=", "sampling.guidance_scale=2.0",
             "method_options={num_trained: 2, early_stop_range: 2}"]

WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import tuner.train as T
    from tuner import fsdp, lora
    from tests.test_fsdp import PROMPTS, ToyReward, config

    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    accelerator = T.make_accelerator()  # gloo processes: the loop's reduce and no_sync run through it
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    report = {}
    for model in sys.argv[2:]:
        cfg = config(model)
        torch.manual_seed(cfg.train.seed)
        adapter = T.build_adapter(cfg, torch.device("cpu"), torch.float32)
        denoiser = adapter.denoiser
        T.add_trainable(denoiser, cfg, adapter.lora_targets)
        for block in denoiser.modules():  # as accelerate's FSDP2 plugin: each block its own unit, then the root
            if isinstance(block, adapter.denoiser_blocks):
                fully_shard(block, mesh=mesh)
        fully_shard(denoiser, mesh=mesh)
        params = list(lora.trainable_parameters(denoiser).values())
        optimizer = T.build_optimizer(params, cfg)
        ema = T.EMA(lora.trainable_parameters(denoiser), cfg.train.ema_decay)  # sharded shadows, as train() keeps them
        grads = {}
        step = T.optimizer_step

        def spy(acc, opt, scaler, ps, *args, **kwargs):  # the reduced gradients, whole, before clip and step
            grads.update(fsdp.full_state({n: p.grad for n, p in denoiser.named_parameters() if p.grad is not None}))
            return step(acc, opt, scaler, ps, *args, **kwargs)

        T.optimizer_step = spy
        sampler = T.PromptSampler(PROMPTS, 1, rank=rank, world_size=dist.get_world_size(), seed=cfg.train.seed)
        parts = T.StepParts(cfg, accelerator, adapter, T.get_method(cfg.method, **cfg.method_options),
                            ToyReward(1, torch.float32), sampler, optimizer, None, params,
                            T.rank_generator(cfg.train.seed, rank), T.make_autocast(torch.device("cpu"), "no"),
                            lambda prompts: adapter.encode_prompts(prompts),
                            plans_from=lambda step, micro: T.plan_generator(cfg.train.seed, step, micro))
        result = T.train_step(parts, 0)
        T.optimizer_step = step
        ema.update()
        shadow = fsdp.full_state(ema.shadow)
        weights = T.trained_state(denoiser)
        state = fsdp.optimizer_state(denoiser, optimizer)

        # what resume does: whole tensors back into a freshly sharded copy
        torch.manual_seed(cfg.train.seed)
        fresh = T.build_adapter(cfg, torch.device("cpu"), torch.float32).denoiser
        T.add_trainable(fresh, cfg, adapter.lora_targets)
        for block in fresh.modules():
            if isinstance(block, adapter.denoiser_blocks):
                fully_shard(block, mesh=mesh)
        fully_shard(fresh, mesh=mesh)
        fresh_optimizer = T.build_optimizer(list(lora.trainable_parameters(fresh).values()), cfg)
        fsdp.load_into(dict(fresh.named_parameters()), weights)
        fsdp.load_optimizer_state(fresh, fresh_optimizer, state)
        mine = dict(denoiser.named_parameters())
        restored = all(torch.equal(p.to_local(), mine[n].to_local()) for n, p in fresh.named_parameters())
        moments = [(fresh_optimizer.state[p]["exp_avg"], optimizer.state[mine[n]]["exp_avg"])
                   for n, p in fresh.named_parameters()]
        restored = restored and all(torch.equal(a.to_local(), b.to_local()) for a, b in moments)

        report[model] = {
            "all_dtensor": all(isinstance(p, DTensor) for p in denoiser.parameters()),
            "sharded": [[n, list(p.to_local().shape), list(p.shape)] for n, p in denoiser.named_parameters()],
            "grad_norm": result.grad_norm, "skipped": result.skipped, "restored": restored,
        }
        if rank == 0:
            save_file({k: v.contiguous() for k, v in grads.items()}, out / f"{model}-grads.safetensors")
            save_file({k: v.contiguous() for k, v in weights.items()}, out / f"{model}-weights.safetensors")
            exp_avg = {n: s["exp_avg"].contiguous() for n, s in state["state"].items()}
            save_file(exp_avg, out / f"{model}-exp_avg.safetensors")
            save_file({k: v.contiguous() for k, v in shadow.items()}, out / f"{model}-ema.safetensors")
            T._save_state(denoiser, weights, out / f"{model}-transformer")  # the run's final weights
    (out / f"report-{rank}.json").write_text(json.dumps(report))
""")

TRAIN_WORKER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import tuner.train as T
    from tuner import lora
    from tuner.config import load_config, validate
    from tests.tuner_fixtures import BASE

    def prepare_sharded(accelerator, denoiser, optimizer):  # what accelerate's FSDP2 plugin does on accelerators
        mesh = init_device_mesh("cpu", (accelerator.num_processes,))
        for block in denoiser.modules():
            if type(block).__name__ in denoiser._no_split_modules:
                fully_shard(block, mesh=mesh)
        fully_shard(denoiser, mesh=mesh)
        params = list(lora.trainable_parameters(denoiser).values())
        optimizer.param_groups[0]["params"] = params  # the sharded parameters, as the plugin swaps them in
        return denoiser, optimizer, params

    T.prepare_denoiser = prepare_sharded
    out, common = sys.argv[1], sys.argv[2:]
    for extra in (["name=whole", "train.steps=2"], ["name=cut", "train.steps=1"],
                  ["name=cut", "train.steps=2", "resume=latest"]):
        T.train(validate(load_config(BASE, [f"output_dir={out}", *common, *extra])))
""")


def config(model: str):
    """The run both sides take."""
    return validate(load_config(BASE, [f"model={model}", *OVERRIDES]))


def single_process_step(model: str) -> tuple[dict, dict, dict, float, dict]:
    """(gradient, weights, AdamW exp_avg, grad norm, weights before) of the step taken by one process over both ranks'
    batches."""
    cfg = config(model)
    torch.manual_seed(cfg.train.seed)
    adapter = T.build_adapter(cfg, torch.device("cpu"), torch.float32)
    adapter.denoiser.requires_grad_(True)
    before = {k: v.clone() for k, v in lora.trainable_state(adapter.denoiser).items()}
    method = get_method(cfg.method, **cfg.method_options)
    s = cfg.sampling
    for rank in range(WORLD):
        prompts = PromptSampler(PROMPTS, 1, rank=rank, world_size=WORLD, seed=cfg.train.seed).batch(0)
        generator = T.rank_generator(cfg.train.seed, rank)  # each rank's noise, the plan all ranks share
        plan = method.plan(s.num_steps, T.plan_generator(cfg.train.seed, 0, 0))
        engine.reward_backward(adapter, plan, adapter.encode_prompts(prompts), ToyReward(1, torch.float32), prompts,
                               height=s.height, width=s.width, guidance_scale=s.guidance_scale, generator=generator,
                               loss_scale=1 / WORLD)
    params = dict(adapter.denoiser.named_parameters())
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.train.max_grad_norm)
    t = cfg.train
    optimizer = torch.optim.AdamW(list(params.values()), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    optimizer.step()
    exp_avg = {n: optimizer.state[p]["exp_avg"] for n, p in params.items()}
    return grads, lora.trainable_state(adapter.denoiser), exp_avg, float(norm), before


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    num = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want)
    return (num / sum(float((want[k] ** 2).sum()) for k in want)) ** 0.5


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    (out / "worker.py").write_text(WORKER)
    _launch(out / "worker.py", str(out), *MODELS)
    return out, [json.loads((out / f"report-{r}.json").read_text()) for r in range(WORLD)]


def _launch(worker: Path, *args: str) -> None:
    """Run `worker` on WORLD CPU processes (gloo) with torchrun."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(worker), *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("model", MODELS)
def test_one_sharded_step_equals_the_single_process_step(sharded_run, model):
    out, reports = sharded_run
    shards = [report[model]["sharded"] for report in reports]
    for report in reports:
        assert report[model]["all_dtensor"] and not report[model]["skipped"] and report[model]["restored"]
    for per_rank in zip(*shards):  # each parameter split along its first dimension, every rank a part of it
        full = per_rank[0][2]
        assert sum(local[0] for _, local, _ in per_rank) == full[0]
        assert all(local[1:] == full[1:] for _, local, _ in per_rank)
    split = sum(all(local[0] < full[0] for _, local, full in per_rank) for per_rank in zip(*shards))
    assert split > 0.9 * len(shards[0])  # all but the few parameters smaller than two rows

    grads, weights, exp_avg, norm, before = single_process_step(model)
    got = {name: load_file(out / f"{model}-{name}.safetensors") for name in ("grads", "weights", "exp_avg", "ema")}
    print(model, "relative errors: grads", _relative(got["grads"], grads), "exp_avg",
          _relative(got["exp_avg"], exp_avg), "norm", norm, reports[0][model]["grad_norm"])
    assert _relative(got["grads"], grads) < 1e-5
    assert norm > 0.002 and abs(reports[0][model]["grad_norm"] - norm) < 1e-5 * norm  # the clip was active
    assert _relative(got["exp_avg"], exp_avg) < 1e-5
    assert got["weights"].keys() == weights.keys()
    decay = config(model).train.ema_decay  # EMA: its sharded shadows moved a tenth of the way, as whole ones would
    assert _relative(got["ema"], {k: before[k] + (1 - decay) * (got["weights"][k] - before[k]) for k in before}) < 1e-6
    cls = type(T.build_adapter(config(model), torch.device("cpu"), torch.float32).denoiser)
    loaded, info = cls.from_pretrained(out / f"{model}-transformer", output_loading_info=True)  # train()'s final files
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved = dict(loaded.named_parameters())
    assert all(torch.equal(saved[k], v) for k, v in got["weights"].items()) and saved.keys() == weights.keys()
    # AdamW's first step moves a weight by lr * g / (|g| + eps), about lr = 1e-3: both sides agree to 1/1000 of that
    # wherever the gradient stands clear of eps = 1e-8 (below it float32 noise in g moves the step itself)
    clear = {k: grads[k].abs() > 1e-6 for k in grads}
    assert sum(int(m.sum()) for m in clear.values()) > 0.5 * sum(m.numel() for m in clear.values())
    gaps = [(got["weights"][k] - weights[k])[clear[k]].abs() for k in clear]
    print("largest weight gap where the gradient is clear of eps", max(float(g.max()) for g in gaps if g.numel()))
    assert max(float(g.max()) for g in gaps if g.numel()) < 1e-6


def test_what_fsdp_does_not_serve_is_refused_before_any_model_loads():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tuner import fsdp
    from tuner.config import ConfigError

    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)
    fsdp.check_config(config("tiny-sd3"), fsdp2)  # a full fine-tune: served
    fsdp.check_config(validate(load_config(BASE, ["model=tiny-sd3"])), SimpleNamespace(
        distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False))  # not FSDP: nothing to refuse
    refusals = {"fsdp_version: 2": (config("tiny-sd3"), SimpleNamespace(distributed_type=DistributedType.FSDP,
                                                                          is_fsdp2=False)),
                "full_finetune=true": (validate(load_config(BASE, ["model=tiny-sd3"])), fsdp2),
                "guards.kl_weight": (validate(load_config(BASE, [f"model={MODELS[0]}", *OVERRIDES,
                                                                 "guards.kl_weight=0.1"])), fsdp2)}
    for message, (cfg, accelerator) in refusals.items():
        with pytest.raises(ConfigError, match=message):
            fsdp.check_config(cfg, accelerator)


@pytest.mark.usefixtures("single_thread")
def test_sharded_run_saves_resumes_and_writes_a_loadable_transformer(tmp_path):
    """train() itself on two sharded processes: evaluation on every rank, checkpoints gathered whole (right after an
    evaluation too), a run cut at step 1 and resumed ends on the weights (EMA applied) of the run never cut."""
    from diffusers import SD3Transformer2DModel

    from tuner import checkpoint as ckpt

    (tmp_path / "worker.py").write_text(TRAIN_WORKER)
    common = ["model=tiny-sd3", *OVERRIDES, "reward=symmetry", "train.lr=1e-2", "checkpoint.every=1",
              "checkpoint.keep=5", "log.progress=false", "log.tensorboard=false", "log.eval_every=1",
              "prompts.num_eval=2"]
    _launch(tmp_path / "worker.py", str(tmp_path), *common)
    whole, cut = (tmp_path / name for name in ("whole", "cut"))
    assert json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 1
    assert json.loads((whole / "summary.json").read_text())["processes"] == WORLD
    assert (whole / "gallery" / "step-00000001.png").is_file()
    for step in (1, 2):
        a, b = (ckpt.read_tensors(run / "checkpoints" / f"step-{step:08d}", "trainable.safetensors")
                for run in (whole, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.read_state(cut / "checkpoints" / "step-00000001", "optimizer.pt")["sharded"]
    first = ckpt.read_tensors(whole / "checkpoints" / "step-00000001", "trainable.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a)  # training moved the weights
    loaded = [dict(SD3Transformer2DModel.from_pretrained(run / "transformer").named_parameters()) for run in (whole, cut)]
    assert all(torch.equal(loaded[0][k], loaded[1][k]) for k in loaded[0])
    ema = ckpt.read_tensors(whole / "checkpoints" / "step-00000002", "ema.safetensors")
    assert all(torch.equal(loaded[0][k], ema[k]) for k in ema)  # the final weights are the EMA's
