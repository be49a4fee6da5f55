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
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

import rewards
from benchmarks.sdxl import count_parameters, sdxl_random_pipeline, set_layout
from tuner import engine
from tuner.engine import reward_backward, sample
from tuner.lora import add_lora
from tuner.methods import Plan, get_method
from tuner.pipelines import adapter_from_pipeline


def _plan(name: str, T: int, **opts) -> Plan:
    """The plan a method draws, with a fixed generator so every run measures the same steps."""
    return get_method(name, **opts).plan(T, torch.Generator().manual_seed(0))


def cases(T: int, k_sweep: list[int]) -> dict[str, Plan]:
    """Methods at their defaults, plus fixed plans that show memory stays flat as K or the suffix grows."""
    last = T - 1
    rows = {"drtune (K=5, default)": _plan("drtune", T)}
    rows.update({f"drtune K={k}": _plan("drtune", T, num_trained=k) for k in k_sweep if k != 5})
    rows.update({
        "refl": _plan("refl", T),
        "draft K=1": _plan("draft", T, k=1),
        "draft K=5": _plan("draft", T, k=5),
        "draft-lv n=2": _plan("draft-lv", T, n=2),
        f"alignprop suffix {min(10, T)}": Plan(T, last, False, tuple(range(max(T - 10, 0), T)), False, max(T - 10, 0)),
        f"alignprop suffix {T} (whole chain)": Plan(T, last, False, tuple(range(T)), False, 0),
    })
    return rows


def naive_backward(adapter, cond, reward, prompts, *, T, k, height, width, guidance, generator):
    """Hand-written DRaFT-K: sample without grad, then keep the autograd graph of the last k steps."""
    sched = adapter.scheduler
    sched.set_timesteps(T, device=adapter.device)
    x = adapter.initial_latents(len(prompts), height, width, generator)
    for i, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(i >= T - k):
            x = sched.step(adapter.denoise(x, t, cond, guidance), t, x, return_dict=False)[0]
    loss = -reward(adapter.decode(x), prompts).mean()
    loss.backward()
    return loss


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# The engine's three phases: the gradient-free chain, decode + reward + their backward, the sweep of trained steps.
PHASES = {"_sample": "sample", "_score_backward": "decode_reward_backward", "_sweep": "sweep"}


@contextlib.contextmanager
def phase_timer(totals: dict[str, float]):
    """Inside the block, seconds spent in each engine phase add up in `totals` (a device sync around each)."""
    originals = {name: getattr(engine, name) for name in PHASES}

    def timed(fn, label):
        def run(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync()
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
            return out
        return run

    try:
        for name, label in PHASES.items():
            setattr(engine, name, timed(originals[name], label))
        yield totals
    finally:
        for name, fn in originals.items():
            setattr(engine, name, fn)


def measure(fn, iters: int, warmup: bool = True, phases: bool = False) -> dict:
    """Mean seconds per call over `iters` calls after one warm-up (unless the caller made it), the peak CUDA
    memory over them (0 on CPU) and, with `phases`, the mean seconds of each engine phase in them."""
    cuda = torch.cuda.is_available()
    if warmup:
        fn()
    _sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    totals: dict[str, float] = {}
    with phase_timer(totals) if phases else contextlib.nullcontext():
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync()
        seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    row = {"s_per_iter": seconds, "peak_gib": peak}
    if totals:
        row["phases_s"] = {label: total / iters for label, total in totals.items()}
    return row


def count_flops(fn) -> int:
    """FLOPs of one call (UNet, VAE and reward alike), as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: str, n: int = 8192, iterations: int = 20) -> float | None:
    """bf16 matmul throughput of an n^3 product on this GPU, the hardware limit the FLOP floor is taken from."""
    if device != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return 2 * n**3 * iterations / (time.perf_counter() - start) / 1e12


# Settings of the gradient-free sampling calls a case can run under (adapter attributes).
VARIANTS = {"bf16": {}, "fp8": {"fp8": True}, "frozen-autocast": {"plain_half": False}}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="images per iteration; one table row each")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--k-sweep", type=int, nargs="*", default=[1, 5, 10, 25], help="DRTune K values (memory against K)")
    ap.add_argument("--naive-k", type=int, nargs="*", default=[1, 2, 5])
    ap.add_argument("--no-autocast", action="store_true",
                    help="run without bf16 autocast (LoRA matmuls in fp32); training runs under autocast")
    ap.add_argument("--compare-fold", action="store_true",
                    help="also run the drtune default with the LoRA left unfolded in the gradient-free calls")
    ap.add_argument("--flops", action="store_true", help="count each case's FLOPs and report its share of the floor")
    ap.add_argument("--vae-upcast", action="store_true",
                    help="decode in fp32 as the stock SDXL VAE needs (force_upcast); by default the VAE runs in bf16 "
                         "as the fp16-fix VAE of the example config does")
    ap.add_argument("--frozen-autocast", action="store_true",
                    help="run the gradient-free sampling calls under autocast too (before 2026-12-03's change they "
                         "did); by default they run the bf16 model plainly")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the repeated blocks of the UNet and the VAE decoder as train.compile does "
                         "(Adapter.compile); the first iteration of each case, where compilation happens, is a warm-up "
                         "and not timed")
    ap.add_argument("--channels-last", action="store_true",
                    help="store the UNet's and the VAE's convolution weights channels-last (NHWC); measured not to "
                         "pay with compiled blocks, so no training option does it (docs/benchmarks.md, Tuning step)")
    ap.add_argument("--variants", nargs="+", default=["bf16"], choices=sorted(VARIANTS),
                    help="run every case once per variant of the gradient-free sampling calls: bf16 (the default), "
                         "fp8 (train.fp8_sampling) or frozen-autocast (under autocast, as before plain_half)")
    ap.add_argument("--phases", action="store_true",
                    help="also time the engine's phases (sampling, decode + reward backward, sweep), with a device "
                         "sync around each")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose name contains one of these")
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline on CPU: checks the script, measures nothing")
    return ap.parse_args()


def main() -> None:
    """Run every case at every batch size and write JSON + a markdown table to --out."""
    args = parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        from tuner.pipelines import tiny_sdxl_pipeline

        pipe, dtype = tiny_sdxl_pipeline(), torch.float32
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.device("cuda"):
            pipe = sdxl_random_pipeline(force_upcast=args.vae_upcast)
        dtype = torch.bfloat16
    adapter = adapter_from_pipeline(pipe, device=device, dtype=dtype)
    if "frozen-autocast" in args.variants and args.frozen_autocast:
        raise SystemExit("--frozen-autocast runs every variant under autocast; use --variants frozen-autocast alone")
    add_lora(adapter.denoiser, rank=args.lora_rank, alpha=args.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    reward = rewards.load("sharpness", device=device)
    reward.check_values = False
    autocast = contextlib.nullcontext if args.no_autocast or args.smoke else (
        lambda: torch.autocast(device, dtype=torch.bfloat16))
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    if args.channels_last:
        set_layout(adapter, torch.channels_last)
    if args.compile:
        adapter.compile()
    peak = matmul_peak_tflops(device)
    rows: dict = {}
    flush = lambda: write(args.out, _meta(args, adapter, device, peak), rows)  # noqa: E731
    for batch in args.batches:
        for variant in args.variants:
            adapter.plain_half, adapter.fp8 = not args.frozen_autocast, False
            for key, value in VARIANTS[variant].items():
                setattr(adapter, key, value)
            suffix = "" if args.variants == ["bf16"] else f", sampling calls {variant}"
            run_batch(args, adapter, reward, params, autocast, batch, device, peak, rows, suffix, flush)


def _meta(args, adapter, device: str, peak: float | None) -> dict:
    """What, where and how: stored next to the rows."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)", "torch": torch.__version__,
        "dtype": "bf16 UNet" + ("" if args.no_autocast else " under bf16 autocast") + ", fp32 LoRA, "
                 + ("fp32 VAE (SDXL force_upcast)" if args.vae_upcast else "bf16 VAE (as the fp16-fix VAE)")
                 + (", channels-last weights" if args.channels_last else ""),
        "unet_params": count_parameters(adapter.denoiser), "vae_params": count_parameters(adapter.vae),
        "matmul_peak_tflops": peak, "date": time.strftime("%Y-%m-%d"), "command": "python -m benchmarks.tuner_methods " + " ".join(sys.argv[1:]),
        "weights": "random (full-size SDXL base 1.0 architecture)", "compiled": args.compile, **vars(args),
    }


def run_batch(args, adapter, reward, params, autocast, batch: int, device: str, peak: float | None, rows: dict,
              suffix: str = "", flush=lambda: None) -> None:
    """Every case at one batch size into `rows` (flushed after each): seconds per iteration and per image, peak
    memory, engine phases, FLOPs and their floor."""
    prompts = ["a photo of a cat"] * batch
    cond = adapter.encode_prompts(prompts)
    size = dict(height=args.resolution, width=args.resolution)
    gen = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
    wanted = lambda name: args.only is None or any(w in name for w in args.only)  # noqa: E731

    def zero():
        for p in params:
            p.grad = None

    def engine_step(plan):
        zero()
        with autocast():
            reward_backward(adapter, plan, cond, reward, prompts, guidance_scale=args.guidance, generator=gen(), **size)

    def sampling():
        with autocast():
            sample(adapter, cond, num_steps=args.steps, guidance_scale=args.guidance, generator=gen(), **size)

    jobs = {"sampling only (no grad)": (sampling, {"trained_steps": 0})}
    for name, plan in cases(args.steps, args.k_sweep).items():
        jobs[f"engine: {name}"] = (lambda plan=plan: engine_step(plan), {"trained_steps": len(plan.trained), "stop": plan.stop})
    if args.compare_fold:
        plan = cases(args.steps, [])["drtune (K=5, default)"]
        jobs["engine: drtune (K=5, default), LoRA not folded"] = (lambda: _unfolded(adapter, engine_step, plan), {
            "trained_steps": len(plan.trained), "stop": plan.stop})
    for k in args.naive_k:
        def naive(k=k):
            zero()
            with autocast():
                naive_backward(adapter, cond, reward, prompts, T=args.steps, k=k, guidance=args.guidance, generator=gen(), **size)
        jobs[f"naive autograd: draft K={k}"] = (naive, {"trained_steps": k})
    for name, (fn, info) in jobs.items():
        if not wanted(name):
            continue
        row = {**info, "batch": batch, **_measured(fn, args.iters, args.phases and name.startswith("engine"))}
        if args.flops and not row.get("oom"):
            row["tflop"] = count_flops(fn) / 1e12
            row["floor_s"] = row["tflop"] / peak if peak else None
            row["share_of_floor"] = row["floor_s"] / row["s_per_iter"] if peak else None
        rows[f"{name}{suffix} [batch {batch}]"] = row
        print(name, suffix, batch, row, flush=True)
        flush()  # after every row: a run cut off by its time limit keeps what it measured


def _unfolded(adapter, step, plan) -> None:
    adapter.fold_lora = False
    try:
        step(plan)
    finally:
        adapter.fold_lora = True


def _measured(fn, iters: int, phases: bool = False) -> dict:
    try:
        row = measure(fn, iters, phases=phases)
    except torch.OutOfMemoryError:
        row = {"s_per_iter": None, "peak_gib": None, "oom": True}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def write(out: Path, meta: dict, rows: dict) -> None:
    """tuner_methods.json and a markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuner_methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    lines = [f"{meta['device']}, {meta['dtype']}, {meta['resolution']}px, T={meta['steps']}, CFG {meta['guidance']}, "
             f"LoRA rank {meta['lora_rank']}, {meta['weights']}; bf16 matmul peak {meta['matmul_peak_tflops'] or 0:.0f} "
             f"TFLOP/s; {meta['date']}; `{meta['command']}`", "",
             "| case | batch | trained UNet calls | s / iteration | s / image | peak GiB | TFLOP | share of the FLOP floor "
             "| sample / decode+reward bwd / sweep, s per iteration |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if r.get("oom"):
            lines.append(f"| {name} | {r['batch']} | {r.get('trained_steps', 0)} | OOM | OOM | OOM | | | |")
            continue
        share = f"{r['share_of_floor']:.0%}" if r.get("share_of_floor") else ""
        tflop = f"{r['tflop']:.0f}" if r.get("tflop") else ""
        phases = " / ".join(f"{r['phases_s'].get(label, 0):.2f}" for label in PHASES.values()) if "phases_s" in r else ""
        lines.append(f"| {name} | {r['batch']} | {r.get('trained_steps', 0)} | {r['s_per_iter']:.2f} | "
                     f"{r['s_per_iter'] / r['batch']:.2f} | {r['peak_gib']:.1f} | {tflop} | {share} | {phases} |")
    (out / "tuner_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
