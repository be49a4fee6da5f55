"""GPU cost of a tuning step on the flow-matching models: full-size FLUX.1-dev and SD3.5 Medium, random weights.

    python -m benchmarks.flow_tuning --model flux --batches 1 2 --compare-batch 1 --flops --out benchmarks/results/flow
    python -m benchmarks.flow_tuning --model sd35 --batches 2 4 6 --compare-batch 2 --out benchmarks/results/flow
    python -m benchmarks.flow_tuning --model sd35 --full-finetune --batches 1 2 --checkpointing off on \
        --out benchmarks/results/flow
    python -m benchmarks.flow_tuning --smoke --out /tmp/flow      # tiny pipelines on the CPU: checks the script

Every row is one optimizer step's gradient (sampling, decode, HPSv2.1 reward, backward) of a fixed plan, timed after a
warm-up, with the peak CUDA memory over the timed steps. The reward is HPSv2.1 (open_clip ViT-H-14, random weights in
the official checkpoint format, loaded through rewards.load, fp32 weights under bf16 autocast as tuner.train runs
it). The LoRA (rank 64) sits on the attention projections of both streams, as train does by default.

`--full-finetune` times full fine-tuning instead, as tuner.train runs it with train.full_finetune=true: every
transformer weight trained, the whole pipeline in fp32 (master weights) under bf16 autocast, torch's AdamW (fp32
moments), the optimizer step, gradient clipping and zeroing inside the timed step; each batch size with the
transformer's own gradient checkpointing off and / or on (`--checkpointing`; the engine keeps one trained call's
graph alive either way). Rows go to flow_tuning-<model>-full.json / .md.

Side by side with each engine row, a plain autograd implementation of the same gradient (`naive_step`): every
gradient-free call under no_grad, every trained call checkpointed whole (torch.utils.checkpoint), the chain's
graph kept to the reward; tests/test_flow_bench_smoke.py checks it gives the engine's gradient on a tiny model.

The FLOP floor of a row is the FLOPs torch's flop counter counts in one step, over the bf16 matmul peak measured
in the same run (benchmarks.tuner_methods.matmul_peak_tflops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import rewards
from benchmarks.tuner_methods import count_flops, matmul_peak_tflops, measure
from tuner.engine import _step_seeds, reward_backward
from tuner.lora import add_lora
from tuner.methods import Plan, get_method
from tuner.pipelines import adapter_from_pipeline

MODELS = {  # the stock pipelines' defaults: FLUX.1-dev 28 steps, guidance embedding 3.5; SD3.5 Medium 40 steps, CFG 4.5
    "flux": {"steps": 28, "guidance": 3.5, "name": "FLUX.1-dev (11.9B transformer)"},
    "sd35": {"steps": 40, "guidance": 4.5, "name": "SD3.5 Medium (2.24B transformer)"},
}
PROMPT = "a portrait photo of an old fisherman with a grey beard, golden hour, 35mm film"


def plans(T: int) -> dict[str, Plan]:
    """The compared plans: DRTune at its defaults (K=5, m=10; fixed draw), DRaFT K=5, AlignProp with a 10-step suffix."""
    return {
        "drtune K=5": get_method("drtune").plan(T, torch.Generator().manual_seed(0)),
        "draft K=5": get_method("draft", k=5).plan(T, torch.Generator().manual_seed(0)),
        "alignprop suffix 10": Plan(T, T - 1, False, tuple(range(max(T - 10, 0), T)), False, max(T - 10, 0)),
    }


def naive_step(adapter, plan: Plan, cond, reward, prompts, *, height: int, width: int, guidance_scale: float,
               generator: torch.Generator) -> torch.Tensor:
    """The same gradient by plain autograd: no_grad outside the plan, each trained call checkpointed, one backward.

    Draws from `generator` in the engine's order (step seeds, then the initial latents), so both see the same chain.
    """
    adapter.set_timesteps(plan.num_steps, height, width)
    seeds = _step_seeds(plan.num_steps, generator)
    x = adapter.initial_latents(len(prompts), height, width, generator)
    timesteps = adapter.scheduler.timesteps
    for i in range(plan.stop + 1):
        t, on = timesteps[i], i >= plan.grad_from
        x = x if on else x.detach()
        if on and i in plan.trained:
            x_in = x.detach() if plan.detach_input else x
            out = checkpoint(lambda x_in, t=t: adapter.denoise(x_in, t, cond, guidance_scale), x_in, use_reentrant=False)
        else:
            with torch.no_grad():
                out = adapter.denoise(x, t, cond, guidance_scale)
        if plan.predict_x0 and i == plan.stop:
            x = adapter.predict_x0(x, out, t)
            break
        step_generator = torch.Generator(generator.device).manual_seed(seeds[i])
        x = adapter.step(i, t, x, out, generator=step_generator)
    loss = -reward(adapter.decode(x), prompts).float().mean()
    loss.backward()
    return loss.detach()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="flux")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps T (the model's default)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (the model's default)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="DRTune rows at these batch sizes")
    ap.add_argument("--compare-batch", type=int, default=None, help="engine against plain autograd at this batch")
    ap.add_argument("--compare-plans", nargs="+", default=None, help="compare only these plans (default: all three)")
    ap.add_argument("--iters", type=int, default=1, help="timed steps per row, after one warm-up step")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--flops", action="store_true", help="count one DRTune step's FLOPs at batch 1 (the floor)")
    ap.add_argument("--cap-gib", type=float, default=75.0, help="rows past this peak are reported as not fitting")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/flow"))
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder for the random HPSv2.1 checkpoint, reused by later runs (default: --out/.weights)")
    ap.add_argument("--full-finetune", action="store_true",
                    help="full fine-tuning (fp32 weights, bf16 autocast, AdamW step timed) instead of the LoRA rows")
    ap.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="with --full-finetune: the transformer's gradient checkpointing in these rows")
    ap.add_argument("--lr", type=float, default=1e-5, help="with --full-finetune: AdamW's learning rate")
    ap.add_argument("--smoke", action="store_true", help="tiny pipelines and reward on the CPU; measures nothing")
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.smoke else MODELS[args.model]["steps"])
    args.guidance = args.guidance if args.guidance is not None else MODELS[args.model]["guidance"]
    args.resolution = 64 if args.smoke else args.resolution
    return args


def build(args: argparse.Namespace, device: str):
    """(adapter with a LoRA, or fully trainable under --full-finetune; HPSv2.1 reward; autocast factory)."""
    from benchmarks import checkpoints as ck

    full = args.full_finetune
    if args.smoke:
        from tuner.pipelines import TINY_PIPELINES

        pipe, dtype = TINY_PIPELINES["tiny-flux" if args.model == "flux" else "tiny-sd3"](0), torch.float32
    else:
        from benchmarks.flow_models import random_pipeline

        dtype = torch.float32 if full else torch.bfloat16  # tuner.train: fp32 master weights for a full fine-tune
        pipe = random_pipeline(args.model, dtype=dtype)
    adapter = adapter_from_pipeline(pipe, device=device, dtype=dtype)
    if full:
        adapter.denoiser.requires_grad_(True).train()
    else:
        add_lora(adapter.denoiser, rank=args.lora_rank, alpha=args.lora_rank, target_modules=list(adapter.lora_targets))
    hps = (args.weights or Path(args.out) / ".weights") / ("tiny" if args.smoke else "full") / ck.HPS_FILE
    if not hps.is_file():
        ck.write_hps(hps, "ViT-H-14", seed=0)
    reward = rewards.load("hpsv2.1", checkpoint=hps, device=device)
    reward.check_values = False
    autocast = contextlib.nullcontext if args.smoke else (lambda: torch.autocast(device, dtype=torch.bfloat16))
    return adapter, reward, autocast


def main(argv: list[str] | None = None) -> None:
    """Measure every row and write flow_tuning-<model>.json / .md to --out (flushed after each row)."""
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        from benchmarks.reward_models import tiny_architectures

        context = tiny_architectures()
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        context = contextlib.nullcontext()
    with context:
        adapter, reward, autocast = build(args, device)
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    if args.full_finetune:
        full_finetune_rows(args, adapter, reward, autocast, params, device)
        return
    batches = sorted(set(args.batches + ([args.compare_batch] if args.compare_batch else [])))
    cond = adapter.encode_prompts([PROMPT] * max(batches))  # encoded once; the text encoders then leave the GPU
    adapter.offload_text_encoders()
    if device == "cuda":
        torch.cuda.empty_cache()
    peak = matmul_peak_tflops(device)
    meta = _meta(args, adapter, device, peak)
    rows: dict = {}

    def step(kind: str, plan: Plan, batch: int):
        def run():
            for p in params:
                p.grad = None
            kwargs = dict(height=args.resolution, width=args.resolution, guidance_scale=args.guidance,
                          generator=torch.Generator(device).manual_seed(0))
            with autocast():
                if kind == "engine":
                    reward_backward(adapter, plan, cond[:batch], reward, [PROMPT] * batch, **kwargs)
                else:
                    naive_step(adapter, plan, cond[:batch], reward, [PROMPT] * batch, **kwargs)
        return run

    cases = plans(args.steps)
    jobs = [("engine", "drtune K=5", b) for b in args.batches]
    if args.compare_batch:
        compared = args.compare_plans or list(cases)
        jobs += [(kind, name, args.compare_batch) for name in compared for kind in ("engine", "naive")
                 if (kind, name, args.compare_batch) not in jobs]
    for kind, name, batch in jobs:
        row = {"kind": kind, "plan": name, "batch": batch, "trained_steps": len(cases[name].trained),
               "stop": cases[name].stop, **_measured(step(kind, cases[name], batch), args.iters)}
        if row.get("s_per_iter") is not None:
            row["s_per_image"] = row["s_per_iter"] / batch
            row["fits_cap"] = row["peak_gib"] <= args.cap_gib
        rows[f"{kind}: {name} [batch {batch}]"] = row
        print(kind, name, batch, row, flush=True)
        write(args.out, args.model, meta, rows)
    if args.flops:  # last, so a run cut short still has its timed rows
        meta["tflop_drtune_step_per_image"] = count_flops(step("engine", cases["drtune K=5"], 1)) / 1e12
        meta["floor_s_per_image"] = meta["tflop_drtune_step_per_image"] / peak if peak else None
        write(args.out, args.model, meta, rows)


def full_finetune_rows(args, adapter, reward, autocast, params: list, device: str) -> None:
    """Time full fine-tuning steps (gradient, clip, AdamW step, zeroing) at each batch size and checkpointing
    setting; writes flow_tuning-<model>-full.json / .md after each row."""
    cond = adapter.encode_prompts([PROMPT] * max(args.batches))
    adapter.offload_text_encoders()
    if device == "cuda":
        torch.cuda.empty_cache()
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    plan = plans(args.steps)["drtune K=5"]
    meta = _meta(args, adapter, device, None)
    meta.update(lora_rank=None, optimizer=f"torch AdamW (lr {args.lr}, fp32 moments), clip 1.0, step inside the timing",
                dtype="fp32 transformer and VAE (master weights), bf16 autocast, HPSv2.1 fp32 weights under bf16 "
                      "autocast")
    rows: dict = {}
    for batch in args.batches:
        for ckpt in args.checkpointing:
            (adapter.denoiser.enable_gradient_checkpointing if ckpt == "on"
             else adapter.denoiser.disable_gradient_checkpointing)()

            def run(batch=batch):
                kwargs = dict(height=args.resolution, width=args.resolution, guidance_scale=args.guidance,
                              generator=torch.Generator(device).manual_seed(0))
                with autocast():
                    reward_backward(adapter, plan, cond[:batch], reward, [PROMPT] * batch, **kwargs)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            row = {"kind": "full", "plan": "drtune K=5", "batch": batch, "checkpointing": ckpt,
                   "trained_steps": len(plan.trained), "stop": plan.stop, **_measured(run, args.iters)}
            if row.get("s_per_iter") is not None:
                row["s_per_image"] = row["s_per_iter"] / batch
                row["fits_cap"] = row["peak_gib"] <= args.cap_gib
            rows[f"full: drtune K=5 [batch {batch}, checkpointing {ckpt}]"] = row
            print(row, flush=True)
            write_full(args.out, args.model, meta, rows)


def write_full(out: Path, model: str, meta: dict, rows: dict) -> None:
    """flow_tuning-<model>-full.json and .md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"flow_tuning-{model}-full.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = [f"{meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}; {meta['model']} "
             f"({meta['transformer_params'] / 1e9:.2f}B parameters, all trained), {meta['resolution']} px, "
             f"T={meta['steps']}, guidance {meta['guidance']}; {meta['dtype']}; {meta['optimizer']}; "
             f"{meta['weights']}; {meta['date']}", "",
             "| row | batch | gradient checkpointing | s / image | peak GiB |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("oom"):
            lines.append(f"| {name} | {r['batch']} | {r['checkpointing']} | OOM | OOM |")
        else:
            lines.append(f"| {name} | {r['batch']} | {r['checkpointing']} | {r['s_per_image']:.2f} | "
                         f"{r['peak_gib']:.1f} |")
    (out / f"flow_tuning-{model}-full.md").write_text("\n".join(lines) + "\n")


def _measured(fn, iters: int) -> dict:
    try:
        row = measure(fn, iters)
    except torch.OutOfMemoryError:
        row = {"s_per_iter": None, "peak_gib": None, "oom": True}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _meta(args, adapter, device: str, peak: float | None) -> dict:
    import diffusers

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: tiny models, times mean nothing)",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"),
        "model": args.model if args.smoke else MODELS[args.model]["name"],
        "transformer_params": sum(p.numel() for n, p in adapter.denoiser.named_parameters() if "lora_" not in n),
        "resolution": args.resolution, "steps": args.steps, "guidance": args.guidance, "lora_rank": args.lora_rank,
        "matmul_peak_tflops": peak, "cap_gib": args.cap_gib,
        "dtype": "bf16 transformer and VAE, fp32 LoRA, HPSv2.1 fp32 weights under bf16 autocast",
        "weights": "random (full-size architectures)",
        "command": "python -m benchmarks.flow_tuning " + " ".join(sys.argv[1:] if __name__ == "__main__" else []),
    }


def write(out: Path, model: str, meta: dict, rows: dict) -> None:
    """flow_tuning-<model>.json and .md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"flow_tuning-{model}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    floor = meta.get("floor_s_per_image")
    lines = [f"{meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}; {meta['model']}, "
             f"{meta['resolution']} px, T={meta['steps']}, guidance {meta['guidance']}, LoRA rank {meta['lora_rank']}, "
             f"{meta['dtype']}; {meta['weights']}; bf16 matmul peak {meta['matmul_peak_tflops'] or 0:.0f} TFLOP/s"
             + (f"; DRTune step {meta['tflop_drtune_step_per_image']:.0f} TFLOP per image, floor {floor:.2f} s"
                if floor else "") + f"; {meta['date']}", "",
             "| row | batch | trained calls | s / image | peak GiB | within floor x | vs plain autograd |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("oom"):
            lines.append(f"| {name} | {r['batch']} | {r['trained_steps']} | OOM | OOM | | |")
            continue
        naive = rows.get(name.replace("engine:", "naive:")) if r["kind"] == "engine" else None
        ratio = f"{naive['s_per_image'] / r['s_per_image']:.2f}x faster" if naive and naive.get("s_per_image") else ""
        within = f"{r['s_per_image'] / floor:.2f}" if floor and r["plan"] == "drtune K=5" else ""
        lines.append(f"| {name} | {r['batch']} | {r['trained_steps']} | {r['s_per_image']:.2f} | {r['peak_gib']:.1f} | "
                     f"{within} | {ratio} |")
    (out / f"flow_tuning-{model}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
