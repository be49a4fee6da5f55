"""GPU cost of one tuning iteration for every method, on full-size SDXL with random weights.

    python -m benchmarks.tuner_methods --out results/            # writes tuner_methods.json and .md

Random weights cost exactly what trained ones cost. The reward is the weight-free `sharpness`, so the
numbers isolate the tuner (sampling chain, trained UNet calls, VAE decode); a model reward adds its own
gradient cost (benchmarks of the rewards measure that). Side by side: the engine (one UNet graph alive at a
time) against naive autograd that keeps the graphs of every trained step, which is what a user writes by
hand (DRaFT-K / AlignProp style).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rewards
from benchmarks.sdxl import count_parameters, sdxl_random_pipeline
from tuner.engine import reward_backward, sample
from tuner.lora import add_lora
from tuner.methods import Plan, get_method
from tuner.pipelines import adapter_from_pipeline


def _plan(name: str, T: int, **opts) -> Plan:
    """The plan a method draws, with a fixed generator so every run measures the same steps."""
    return get_method(name, **opts).plan(T, torch.Generator().manual_seed(0))


def cases(T: int) -> dict[str, Plan]:
    """Methods at their defaults, plus fixed plans that show memory stays flat as K or the suffix grows."""
    last = T - 1
    return {
        "drtune (K=5, default)": _plan("drtune", T),
        "drtune K=1": _plan("drtune", T, num_trained=1),
        "drtune K=10": _plan("drtune", T, num_trained=10),
        "refl": _plan("refl", T),
        "draft K=1": _plan("draft", T, k=1),
        "draft K=5": _plan("draft", T, k=5),
        "draft-lv n=2": _plan("draft-lv", T, n=2),
        f"alignprop suffix {min(10, T)}": Plan(T, last, False, tuple(range(max(T - 10, 0), T)), False, max(T - 10, 0)),
        f"alignprop suffix {T} (whole chain)": Plan(T, last, False, tuple(range(T)), False, 0),
    }


def naive_backward(adapter, cond, reward, prompts, *, T, k, height, width, guidance, generator):
    """Hand-written DRaFT-K: sample without grad, then keep the autograd graph of the last k steps."""
    sched = adapter.scheduler
    sched.set_timesteps(T, device=adapter.device)
    x = adapter.initial_latents(len(prompts), height, width, generator)
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i >= T - k):
            x = sched.step(adapter.eps(x, t, cond, guidance), t, x, return_dict=False)[0]
    loss = -reward(adapter.decode(x), prompts).mean()
    loss.backward()
    return loss


def measure(fn, iters: int) -> dict:
    """Mean seconds per call over `iters` calls after one warm-up, and the peak CUDA memory (0 on CPU)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"s_per_iter": (time.perf_counter() - start) / iters, "peak_gib": peak}


def main() -> None:
    """Run every case and write JSON + a markdown table to --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--naive-k", type=int, nargs="*", default=[1, 2, 5])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline on CPU: checks the script, measures nothing")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        from tuner.pipelines import tiny_sdxl_pipeline

        pipe, dtype = tiny_sdxl_pipeline(), torch.float32
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.device("cuda"):
            pipe = sdxl_random_pipeline()
        dtype = torch.bfloat16
    adapter = adapter_from_pipeline(pipe, device=device, dtype=dtype)
    add_lora(adapter.unet, rank=args.lora_rank, alpha=args.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    reward = rewards.load("sharpness", device=device)
    reward.check_values = False
    prompts = ["a photo of a cat"] * args.batch
    cond = adapter.encode_prompts(prompts)
    size = dict(height=args.resolution, width=args.resolution)
    params = [p for p in adapter.unet.parameters() if p.requires_grad]

    def zero():
        for p in params:
            p.grad = None

    rows = {}
    wanted = lambda name: args.only is None or any(w in name for w in args.only)  # noqa: E731
    gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    if wanted("sampling only (no grad)"):
        rows["sampling only (no grad)"] = measure(
            lambda: sample(adapter, cond, num_steps=args.steps, guidance_scale=args.guidance, generator=gen(), **size),
            args.iters,
        )
    for name, plan in cases(args.steps).items():
        if not wanted(name):
            continue
        def run(plan=plan):
            zero()
            reward_backward(adapter, plan, cond, reward, prompts, guidance_scale=args.guidance, generator=gen(), **size)
        rows[f"engine: {name}"] = {**measure(run, args.iters), "trained_steps": len(plan.trained), "stop": plan.stop}
        print(name, rows[f"engine: {name}"], flush=True)
    for k in args.naive_k:
        def naive(k=k):
            zero()
            naive_backward(adapter, cond, reward, prompts, T=args.steps, k=k, guidance=args.guidance, generator=gen(), **size)
        try:
            rows[f"naive autograd: draft K={k}"] = {**measure(naive, args.iters), "trained_steps": k}
        except torch.OutOfMemoryError:
            rows[f"naive autograd: draft K={k}"] = {"s_per_iter": None, "peak_gib": None, "trained_steps": k, "oom": True}
        torch.cuda.empty_cache()
        print("naive", k, rows[f"naive autograd: draft K={k}"], flush=True)
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)", "torch": torch.__version__, "dtype": "bf16 UNet, fp32 VAE (SDXL force_upcast)",
        "unet_params": count_parameters(adapter.unet), "vae_params": count_parameters(adapter.vae),
        "weights": "random (full-size SDXL base 1.0 architecture)", **vars(args),
    }
    write(args.out, meta, rows)


def write(out: Path, meta: dict, rows: dict) -> None:
    """tuner_methods.json and a markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuner_methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = [f"{meta['device']}, {meta['dtype']}, {meta['resolution']}px, batch {meta['batch']}, T={meta['steps']}, "
             f"CFG {meta['guidance']}, LoRA rank {meta['lora_rank']}, {meta['weights']}", "",
             "| case | trained UNet calls | s / iteration | peak GiB |", "|---|---|---|---|"]
    for name, r in rows.items():
        s = "OOM" if r.get("oom") else f"{r['s_per_iter']:.2f}"
        g = "OOM" if r.get("oom") else f"{r['peak_gib']:.1f}"
        lines.append(f"| {name} | {r.get('trained_steps', 0)} | {s} | {g} |")
    (out / "tuner_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
