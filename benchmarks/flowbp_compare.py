"""FlowBP's DRTune step beside ours on SD3.5-Medium: the same random weights, prompts and trained steps, FlowBP's
own settings (its configs/final/sd35/sd3_5_drtune.yaml: 512 px, 25 steps, K = 3 trained steps equally spaced before
an early stop drawn in the last 40% of the chain, CFG 3.5, batch 8, fp32 master weights computing in bf16, AdamW lr
1e-5, clip 1.0, EMA 0.995, every transformer block checkpointed).

FlowBP (arXiv 2606.11075, Apache-2.0, github.com/RuoyuWang-2077/FlowBP) is not a dependency and is never committed
here: give its source folder (`--flowbp .flowbp`, git-ignored; docs/benchmarks.md says how to fill it).

    python -m benchmarks.flowbp_compare --flowbp .flowbp --flops --out benchmarks/results/flowbp     # one GPU
    python -m benchmarks.flowbp_compare --flowbp .flowbp --check-only                      # the gradient check alone

What runs on each side, one optimizer step at a time, timed after a warm-up step:
- FlowBP: its SD3.5 DRTune rollout (`sample_drtune_trajectory_sd35`: the K trained calls keep their graphs, the
  negative CFG branch runs without gradient), its VAE decode, its loss relu(0.55 - reward), its FSDP wrap of the
  transformer (FULL_SHARD, bf16 compute, fp32 reduce, on one process), its block checkpointing, its AdamW (no foreach),
  clip and EMA. Its SD3.5 trainer cannot build that wrap itself at the fetched commit (its `get_no_split_modules`
  accepts FLUX transformers only and raises for SD3Transformer2DModel), so this script passes SD3's
  JointTransformerBlock to the same torch FSDP options.
- Ours: tuner.engine.reward_backward with the same trained steps and early stop (drawn by FlowBP's own sampling
  functions from its seed), fp32 master weights under bf16 autocast as tuner.train runs a full fine-tune, the
  transformer's gradient checkpointing (`--ours-checkpointing on`) or none, tuner.train.EMA, torch's AdamW.
Both score with the same HPSv2.1 (random weights in the official checkpoint format, rewards.load). The gradients
differ by design in one respect: FlowBP drops the negative CFG branch from the gradient; the engine differentiates the
guided output (both branches).

The gradient check (tiny SD3, CPU or GPU, no CFG so that both differentiate the same function) runs FlowBP's rollout
and the engine from the same initial noise, schedule (FlowBP's sigmas 1 .. 1/T) and trained steps, and compares the
transformer gradients. FlowBP rounds the latents, the timestep and its Euler updates to bf16 at every step, so the
two agree to bf16 rounding; with that rounding imposed on our adapter (`use_flowbp_rounding`, the check only) they
must be equal. A control gradient (the same chain with other trained steps) shows how far apart two different
gradients are.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.machinery
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

FLOWBP_REPO = "RuoyuWang-2077/FlowBP"
FLOWBP_COMMIT = "93b220ad48782357efd55bfdf5e0a987f9b035f2"
FLOWBP_CONFIG = "configs/final/sd35/sd3_5_drtune.yaml"
PROMPT = "a portrait photo of an old fisherman with a grey beard, golden hour, 35mm film"


class FlowBPMissing(FileNotFoundError):
    """FlowBP's source is not where --flowbp points."""


def load_flowbp(source: Path) -> types.SimpleNamespace:
    """FlowBP's modules this comparison calls, imported from its source folder (wandb, which they import at the top
    but never use here, is stood in for when absent)."""
    source = Path(source).resolve()
    if not (source / "flowbp" / "trainers" / "sd35" / "drtune.py").is_file():
        raise FlowBPMissing(
            f"no FlowBP source under {source}: put github.com/{FLOWBP_REPO} at commit {FLOWBP_COMMIT[:12]} there "
            f"(git archive {FLOWBP_COMMIT} flowbp configs LICENSE | tar -x -C {source}), then run again")
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))
    stand_in = None
    if importlib.util.find_spec("wandb") is None:
        stand_in = types.ModuleType("wandb")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        sys.modules["wandb"] = stand_in
    try:
        ns = types.SimpleNamespace(source=source)
        ns.drtune = importlib.import_module("flowbp.trainers.sd35.drtune")
        ns.sd35 = importlib.import_module("flowbp.trainers.sd35.leapalign")
        ns.scheduler = importlib.import_module("flowbp.schedulers.fm_euler_discrete_with_pred_x0")
        ns.fsdp_util = importlib.import_module("flowbp.utils.fsdp_util")
        ns.parser = importlib.import_module("flowbp.train_flowbp_flux")
        ns.config = importlib.import_module("flowbp.config.flowbp")
    finally:
        if stand_in is not None:  # FlowBP's modules keep it; nothing else should see a wandb that is not there
            sys.modules.pop("wandb", None)
    return ns


def flowbp_settings(fb: types.SimpleNamespace, **overrides) -> argparse.Namespace:
    """FlowBP's SD3.5 DRTune settings, read by its own parser from its own config file, then `overrides`."""
    parser = fb.parser.build_parser()
    parser.set_defaults(**fb.config.load_config_defaults(fb.source / FLOWBP_CONFIG))
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def flowbp_plans(fb, args, count: int) -> list[tuple[list[int], int]]:
    """(trained steps, early stop) of FlowBP's next `count` rollouts: its own draws from a generator seeded as its
    trainer seeds it (select_idx_seed), early stop first, as its rollout draws them."""
    gen = torch.Generator().manual_seed(args.select_idx_seed)
    out = []
    for _ in range(count):
        stop = fb.drtune._sample_drtune_early_stop_idx(args, args.rollout_steps, gen)
        trained = fb.drtune._sample_equally_spaced_train_indices(stop + 1, args.drtune_num_train_steps, gen)
        out.append((trained, stop))
    return out


def our_plan(trained: list[int], stop: int, num_steps: int):
    """The engine's DRTune plan for those trained steps and that early stop (x0 predicted at the stop)."""
    from tuner.methods import Plan

    return Plan(num_steps, stop, True, tuple(trained), True, trained[0])


def use_flowbp_rounding(adapter) -> None:
    """Make our SD3 adapter round where FlowBP's rollout does: latents stored in bf16 after every step, the timestep
    handed to the transformer in bf16, the Euler update's and the x0 prediction's velocity term computed in bf16 (a
    float32 0-dim sigma times a bf16 velocity stays bf16). For the gradient check only: with it the two gradients must
    be equal, which pins any remaining difference on the rounding alone."""
    bf16, step, predict_x0, denoise = torch.bfloat16, adapter.step, adapter.predict_x0, adapter.denoise

    def velocity_term(sigma_delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return (sigma_delta.to(out.device) * out.to(bf16)).float()

    def rounded_step(i, t, x, out, *, generator, eta=0.0):
        dt = adapter.scheduler.sigmas[i + 1] - adapter.scheduler.sigmas[i]
        return (x.to(bf16).float() + velocity_term(dt, out)).to(bf16).float()

    def rounded_x0(x, out, t):
        sigma = adapter.scheduler.sigmas[adapter._index(t)]
        return (x.to(bf16).float() + velocity_term(-sigma, out)).to(bf16).float()

    def rounded_denoise(x, t, cond, guidance_scale):
        return denoise(x.to(bf16).float(), t.to(bf16).float(), cond, guidance_scale)

    adapter.step, adapter.predict_x0, adapter.denoise = rounded_step, rounded_x0, rounded_denoise


def use_flowbp_schedule(adapter) -> None:
    """Give our SD3 adapter FlowBP's sigmas (1 .. 1/T, then the scheduler's shift) instead of the stock pipeline's."""
    adapter._schedule = lambda num_steps, height, width: {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}


# ---------------------------------------------------------------- the gradient check (tiny model)


def gradient_check(fb, device: str = "cpu", num_steps: int = 8, seed: int = 3) -> dict:
    """Transformer gradients of FlowBP's DRTune rollout and of the engine on a tiny SD3 (bf16 weights, no CFG), from
    the same noise, schedule and trained steps; and of a control (the engine with other trained steps)."""
    from tuner.engine import reward_backward
    from tuner.pipelines import adapter_from_pipeline, tiny_sd3_pipeline

    adapter = adapter_from_pipeline(tiny_sd3_pipeline(0), device=device, dtype=torch.bfloat16)
    adapter.denoiser.requires_grad_(True)
    use_flowbp_schedule(adapter)
    prompts = ["a red square", "a blue circle"]
    cond = adapter.encode_prompts(prompts)
    reward = ProbeReward(len(prompts), 64).to(device)
    args = flowbp_settings(fb, h=64, w=64, rollout_steps=num_steps, sampling_steps=num_steps, cfg_guidance=1.0)
    scheduler = fb.scheduler.FlowMatchEulerDiscreteWithPredX0Scheduler.from_config(adapter.scheduler.config)

    torch.manual_seed(seed)  # FlowBP draws its initial noise from torch's global stream, in bf16
    noise = torch.randn((len(prompts), 16, 8, 8), device=device, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(args.select_idx_seed)
    _, x0, _, _ = fb.drtune.sample_drtune_trajectory_sd35(
        args, torch.device(device), adapter.denoiser, scheduler, cond.prompt_embeds, cond.pooled, None, None, gen)
    (-reward(adapter.decode(x0), prompts).float().mean()).backward()
    payload = args._last_connector_payload
    trained, stop = payload["executed_train_indices"], payload["early_stop_idx"]
    theirs = _take_grads(adapter.denoiser)

    adapter.initial_latents = lambda batch, height, width, generator: noise.float().clone()

    def ours_with(plan) -> dict[str, torch.Tensor]:
        reward_backward(adapter, plan, cond, reward, prompts, height=64, width=64, guidance_scale=1.0,
                        generator=torch.Generator().manual_seed(0))
        return _take_grads(adapter.denoiser)

    ours = ours_with(our_plan(trained, stop, num_steps))
    other = [i - 1 if i > 0 else i + 1 for i in trained]
    control = ours_with(our_plan(sorted(set(other)), stop, num_steps))
    use_flowbp_rounding(adapter)
    rounded = ours_with(our_plan(trained, stop, num_steps))
    return {"trained": trained, "stop": stop, "num_steps": num_steps,
            "relative_error": _relative(ours, theirs), "cosine": _cosine(ours, theirs),
            "relative_error_with_flowbp_rounding": _relative(rounded, theirs),
            "control_relative_error": _relative(control, theirs), "control_cosine": _cosine(control, theirs)}


class ProbeReward(torch.nn.Module):
    """A smooth differentiable score of [B,3,S,S] images: a fixed random linear functional plus a quadratic term."""

    def __init__(self, batch: int, size: int, seed: int = 1):
        super().__init__()
        self.register_buffer("w", torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)))

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        images = images.float()
        return (images * self.w).mean((1, 2, 3)) + (images**2).mean((1, 2, 3))


def _take_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def _relative(got: dict, want: dict) -> float:
    assert got.keys() == want.keys(), "the two sides trained different parameter sets"
    num = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want)
    return (num / sum(float((want[k] ** 2).sum()) for k in want)) ** 0.5


def _cosine(a: dict, b: dict) -> float:
    dot = sum(float((a[k] * b[k]).sum()) for k in b)
    return dot / (sum(float((a[k] ** 2).sum()) for k in a) * sum(float((b[k] ** 2).sum()) for k in b)) ** 0.5


# ---------------------------------------------------------------- the timed steps (SD3.5-Medium, one GPU)


def flowbp_step(fb, args, transformer, vae, scheduler_config, reward, cond, prompts: list[str], device: str):
    """FlowBP's optimizer step as its SD3.5 trainer takes it (FSDP wrap, block checkpointing, AdamW, clip, EMA);
    returns (step function, the plans it drew)."""
    from diffusers.models.attention import JointTransformerBlock
    from functools import partial
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    ema = copy.deepcopy(transformer) if args.use_ema else None
    if device == "cuda":
        kwargs = dict(auto_wrap_policy=partial(transformer_auto_wrap_policy,
                                               transformer_layer_cls=(JointTransformerBlock,)),
                      mixed_precision=fb.fsdp_util.get_mixed_precision(args.master_weight_type),
                      sharding_strategy=ShardingStrategy.FULL_SHARD, limit_all_gathers=True,
                      device_id=torch.cuda.current_device())
        model = FSDP(transformer, **kwargs)
        ema = FSDP(ema, **kwargs).eval().requires_grad_(False) if ema is not None else None
        clip = model.clip_grad_norm_
    else:  # smoke run: FSDP1 needs a GPU; bf16 weights stand in for its bf16 compute
        model = transformer.to(torch.bfloat16)
        ema = ema.to(torch.bfloat16).requires_grad_(False) if ema is not None else None
        clip = lambda norm: torch.nn.utils.clip_grad_norm_(list(model.parameters()), norm)  # noqa: E731
    if args.gradient_checkpointing:
        fb.fsdp_util.apply_fsdp_checkpointing(model, (JointTransformerBlock,), args.selective_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8, fused=False,
                                  foreach=False)
    scheduler = fb.scheduler.FlowMatchEulerDiscreteWithPredX0Scheduler.from_config(scheduler_config)
    gen = torch.Generator().manual_seed(args.select_idx_seed)
    drawn: list[tuple[list[int], int]] = []

    def step():
        _, x0, _, _ = fb.drtune.sample_drtune_trajectory_sd35(
            args, torch.device(device), model, scheduler, cond.prompt_embeds, cond.pooled, cond.negative_embeds,
            cond.negative_pooled, gen)
        payload = args._last_connector_payload
        drawn.append((payload["train_indices"], payload["early_stop_idx"]))
        images = fb.sd35._decode_sd35_latents(args, vae, x0)
        with torch.autocast(device, dtype=torch.bfloat16):
            scores = reward(images, prompts)
        loss = (torch.relu(args.loss_relu_clip - scores.float()) * args.loss_grad_scale).mean()
        (loss / args.gradient_accumulation_steps).backward()  # FlowBP's CFG compensation is off in this config
        clip(args.max_grad_norm)
        fb.sd35._align_grad_dtype_to_param_dtype(model)
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None:
            with torch.no_grad():
                for target, source in zip(ema.parameters(), model.parameters()):
                    target.lerp_(source.to(target), 1 - args.ema_decay)

    return step, drawn


def our_step(args, adapter, reward, cond, prompts: list[str], plans: list, device: str, checkpointing: bool):
    """Our full fine-tuning step at FlowBP's settings (the engine; fp32 weights under bf16 autocast; EMA)."""
    from tuner.engine import reward_backward
    from tuner.train import EMA

    denoiser = adapter.denoiser.requires_grad_(True).train()
    (denoiser.enable_gradient_checkpointing if checkpointing else denoiser.disable_gradient_checkpointing)()
    params = list(denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  eps=1e-8)
    ema = EMA(dict(denoiser.named_parameters()), args.ema_decay) if args.use_ema else None
    calls = iter(plans)

    def step():
        trained, stop = next(calls)
        with torch.autocast(device, dtype=torch.bfloat16):
            reward_backward(adapter, our_plan(trained, stop, args.rollout_steps), cond, reward, prompts,
                            height=args.h, width=args.w, guidance_scale=args.cfg_guidance,
                            generator=torch.Generator(device).manual_seed(0))
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()

    return step


def timed(step, iters: int) -> dict:
    """Seconds per optimizer step over `iters` steps after one warm-up, and the peak memory over them (a row that
    runs out of memory says so)."""
    from benchmarks.tuner_methods import measure

    try:
        row = measure(step, iters)
    except torch.OutOfMemoryError:
        return {"s_per_step": None, "peak_gib": None, "oom": True}
    return {"s_per_step": row["s_per_iter"], "peak_gib": row["peak_gib"]}


def compare(fb, args: argparse.Namespace, out: Path, iters: int, ours_checkpointing: list[str], smoke: bool,
            weights: Path | None = None, flops: bool = False) -> dict:
    """Time our step, then FlowBP's (from the same initial weights and plans), and with `flops` count one more step's
    FLOPs on each side (the same plan); write flowbp_compare.json / .md after each row."""
    import torch.distributed as dist

    import rewards
    from benchmarks import checkpoints as ck
    from tuner.pipelines import adapter_from_pipeline

    device = "cpu" if smoke else "cuda"
    if not smoke:
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = bool(args.allow_tf32)
    if not smoke and not dist.is_initialized():  # FlowBP's FSDP wrap needs a process group: one process here
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    if smoke:
        from benchmarks.reward_models import tiny_architectures
        from tuner.pipelines import tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(0)
        with tiny_architectures():
            hps = (weights or out / ".weights") / "tiny" / ck.HPS_FILE
            if not hps.is_file():
                ck.write_hps(hps, "ViT-H-14", seed=0)
            reward = rewards.load("hpsv2.1", checkpoint=hps, device=device)
    else:
        from benchmarks.flow_models import random_pipeline

        pipe = random_pipeline("sd35", dtype=torch.float32)
        hps = (weights or out / ".weights") / "full" / ck.HPS_FILE
        if not hps.is_file():
            ck.write_hps(hps, "ViT-H-14", seed=0)
        reward = rewards.load("hpsv2.1", checkpoint=hps, device=device)
    reward.check_values = False
    adapter = adapter_from_pipeline(pipe, device=device, dtype=torch.float32)
    use_flowbp_schedule(adapter)
    prompts = [PROMPT] * args.train_batch_size
    cond = adapter.encode_prompts(prompts)
    adapter.offload_text_encoders()
    vae_bf16 = copy.deepcopy(adapter.vae).to(torch.bfloat16)  # FlowBP decodes with a bf16 VAE
    base = {k: v.detach().cpu().clone() for k, v in adapter.denoiser.state_dict().items()}
    plans = flowbp_plans(fb, args, iters + 1 + int(flops))
    rows, meta = {}, _meta(args, device, iters, smoke)

    for setting in ours_checkpointing:
        adapter.denoiser.load_state_dict(base)
        step = our_step(args, adapter, reward, cond, prompts, plans, device, setting == "on")
        row = _counted(step, timed(step, iters), flops)
        rows[f"ours (engine), checkpointing {setting}"] = _per_image(row, args.train_batch_size)
        _write(out, meta, rows)
        del step  # its AdamW moments and EMA shadows go before the next side is built
        adapter.denoiser.zero_grad(set_to_none=True)
        _free(device)

    transformer = adapter.denoiser
    transformer.disable_gradient_checkpointing()
    transformer.load_state_dict(base)
    adapter.denoiser = None
    their_cond = cond.to(dtype=torch.bfloat16) if smoke else cond  # smoke: bf16 weights take bf16 inputs
    step, drawn = flowbp_step(fb, args, transformer, vae_bf16, adapter.scheduler.config, reward, their_cond, prompts,
                              device)
    row = _counted(step, timed(step, iters), flops)
    row["same_plans_as_ours"] = drawn == plans
    rows["FlowBP (its DRTune step)"] = _per_image(row, args.train_batch_size)
    _write(out, meta, rows)
    return {"meta": meta, "rows": rows}


def _counted(step, row: dict, flops: bool) -> dict:
    """The row, with the FLOPs of one more step as torch's flop counter counts them (unless it ran out of memory)."""
    if flops and not row.get("oom"):
        from benchmarks.tuner_methods import count_flops

        row["tflop_per_step"] = count_flops(step) / 1e12
    return row


def _per_image(row: dict, batch: int) -> dict:
    return {**row, "batch": batch, "images_per_s": batch / row["s_per_step"] if row["s_per_step"] else None}


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _meta(args, device: str, iters: int, smoke: bool) -> dict:
    import diffusers

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: tiny models, times mean "
                                                                        "nothing)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"),
        "model": "tiny SD3" if smoke else "SD3.5 Medium (2.24B transformer), random weights",
        "flowbp": f"github.com/{FLOWBP_REPO} @ {FLOWBP_COMMIT[:12]}, {FLOWBP_CONFIG}",
        "settings": {k: getattr(args, k) for k in ("h", "w", "rollout_steps", "drtune_num_train_steps",
                                                     "drtune_early_stop_ratio", "cfg_guidance", "cfg_detach_neg",
                                                     "train_batch_size", "learning_rate", "weight_decay",
                                                     "max_grad_norm", "use_ema", "ema_decay", "master_weight_type",
                                                     "gradient_checkpointing", "selective_checkpointing")},
        "timed_steps": iters, "reward": "HPSv2.1 (random weights, rewards.load), bf16 autocast, both sides",
        "command": "python -m benchmarks.flowbp_compare " + " ".join(sys.argv[1:] if __name__ == "__main__" else []),
    }


def _write(out: Path, meta: dict, rows: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "flowbp_compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    s = meta["settings"]
    lines = [f"{meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}; {meta['model']}; "
             f"{s['h']} px, T={s['rollout_steps']}, K={s['drtune_num_train_steps']}, CFG {s['cfg_guidance']}, "
             f"batch {s['train_batch_size']}, EMA {s['ema_decay']}; {meta['flowbp']}; {meta['date']}", "",
             "| side | images / s | s / step | peak GiB | TFLOP / step (counted) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("oom"):
            lines.append(f"| {name} | OOM | OOM | OOM | |")
        else:
            counted = f"{r['tflop_per_step']:.1f}" if "tflop_per_step" in r else ""
            lines.append(f"| {name} | {r['images_per_s']:.2f} | {r['s_per_step']:.2f} | {r['peak_gib']:.1f} | "
                         f"{counted} |")
    (out / "flowbp_compare.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flowbp", type=Path, default=Path(".flowbp"), help="FlowBP's source folder (git-ignored)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flowbp"))
    ap.add_argument("--iters", type=int, default=3, help="timed optimizer steps per side, after one warm-up")
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder for the random HPSv2.1 checkpoint, reused by later runs (default: --out/.weights)")
    ap.add_argument("--ours-checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--flops", action="store_true", help="count one more step's FLOPs on each side (same plan)")
    ap.add_argument("--batch", type=int, default=None,
                    help="images per step on both sides instead of FlowBP's 8 per GPU (its batch does not fit one "
                         "80 GB card: docs/benchmarks.md)")
    ap.add_argument("--check-only", action="store_true", help="the tiny-model gradient check alone")
    ap.add_argument("--smoke", action="store_true", help="tiny SD3 on the CPU, batch 2, 64 px, T=6: checks the script")
    args = ap.parse_args(argv)
    fb = load_flowbp(args.flowbp)
    check_device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    check = gradient_check(fb, check_device)
    print("gradient check:", check, flush=True)
    result = {"gradient_check": check}
    if not args.check_only:
        small = dict(h=64, w=64, rollout_steps=6, sampling_steps=6, train_batch_size=2) if args.smoke else {}
        batch = {"train_batch_size": args.batch} if args.batch else {}
        settings = flowbp_settings(fb, **{**small, **batch})
        result.update(compare(fb, settings, args.out, args.iters, args.ours_checkpointing, args.smoke, args.weights,
                              args.flops))
        result["meta"]["gradient_check"] = check
        _write(args.out, result["meta"], result["rows"])
        print(json.dumps(result["rows"], indent=1), flush=True)
    return result


if __name__ == "__main__":
    main()
