"""Multi-GPU scaling of one tuning step: DRTune on full-size SDXL with random weights, the training loop's own step.

    accelerate launch --multi_gpu --num_processes 4 -m benchmarks.multi_gpu --out benchmarks/results/multi_gpu
    torchrun --nproc_per_node 2 -m benchmarks.multi_gpu --out ...     # the same under torch's launcher
    python -m benchmarks.multi_gpu --out ...                           # one process
    python -m benchmarks.multi_gpu --scaling-report DIR_OR_JSONS... --out DIR   # table of the N = 1, 2, 4 runs

Every process builds the same random-weight model (same seed) and runs `tuner.train.train_step` on the UNet that
accelerate prepared (DDP), exactly as a training run does: the engine's reward_backward with every backward but the
last under no_sync (one gradient all-reduce per optimizer step), then `optimizer_step`. The per-GPU batch is the same
at every N. After warm-up steps it measures images/s, seconds per optimizer step, the all-reduce time of profiled
steps (torch.profiler: NCCL all-reduce kernels on GPU, gloo all_reduce ops on CPU), peak memory per GPU, and whether
the ranks' trained weights are bitwise equal at the end. `--smoke` runs the tiny SDXL on CPU (gloo) in seconds: it
checks the script and measures nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tuner import lora
from tuner.config import Config, LoraConfig, SamplingConfig, TrainConfig
from tuner.methods import get_method
from tuner.prompts import PromptSampler, load_prompt_sets
from tuner.train import (DTYPES, StepParts, add_trainable, build_adapter, build_optimizer, build_reward,
                         make_accelerator, make_autocast, prepare_denoiser, prompt_conditioning, rank_generator,
                         train_step)

WEIGHTS = "random weights (full-size SDXL base 1.0 architecture)"
SMOKE_WEIGHTS = "random weights (tiny SDXL, CPU smoke run: checks the script, not a performance figure)"
GOAL = 0.90  # data-parallel efficiency asked for at every N
LAUNCHERS = ("accelerate", "torchrun", "torch.distributed.run", "accelerate.commands.launch")
FULL = dict(resolution=1024, sampling_steps=50, guidance=7.5, k=5, early_stop_range=10, lora_rank=64, batch_size=1,
            warmup=1, iters=8, profile_iters=1)
SMOKE = dict(resolution=64, sampling_steps=4, guidance=7.5, k=2, early_stop_range=2, lora_rank=4, batch_size=1,
             warmup=1, iters=2, profile_iters=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset run options take the full-size (or --smoke) defaults."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_gpu"))
    ap.add_argument("--smoke", action="store_true", help="tiny SDXL on CPU (gloo), a few steps: checks the script")
    ap.add_argument("--resolution", type=int, help="image side in pixels (1024)")
    ap.add_argument("--sampling-steps", type=int, help="sampling steps T (50)")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (7.5)")
    ap.add_argument("--k", type=int, help="DRTune's trained steps K (5)")
    ap.add_argument("--early-stop-range", type=int, help="DRTune's m: the stop step is uniform in the last m (10)")
    ap.add_argument("--lora-rank", type=int, help="LoRA rank on to_q, to_k, to_v, to_out.0 (64); alpha = rank")
    ap.add_argument("--batch-size", type=int, help="prompts per micro-batch on each GPU, the same at every N (1)")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (1)")
    ap.add_argument("--warmup", type=int, help="untimed optimizer steps first (1)")
    ap.add_argument("--iters", type=int, help="timed optimizer steps (8)")
    ap.add_argument("--profile-iters", type=int, help="steps run under torch.profiler after the timed ones (1)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reward", default="sharpness", help="reward name; the default is weight-free")
    ap.add_argument("--reward-source", action="append", default=[], metavar="KEY=PATH",
                    help="a local file of the reward, e.g. checkpoint=HPS_v2.1_compressed.pt (repeatable)")
    ap.add_argument("--vae-upcast", action="store_true",
                    help="decode in fp32 (stock SDXL VAE); by default the VAE runs in bf16 as the fp16-fix VAE does")
    ap.add_argument("--scaling-report", nargs="+", type=Path, metavar="JSON_OR_DIR",
                    help="only write the scaling table of earlier runs' JSON files (a folder: its multi_gpu-n*.json)")
    args = ap.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_config(args: argparse.Namespace) -> Config:
    """The run as a tuner configuration: what train_step, the reward and the optimizer read."""
    sources = dict(item.split("=", 1) for item in args.reward_source)
    return Config(
        name="multi-gpu-bench", model="tiny-sdxl" if args.smoke else "sdxl-random-weights", method="drtune",
        method_options={"num_trained": args.k, "early_stop_range": args.early_stop_range}, reward=args.reward,
        reward_sources={args.reward: sources} if sources else {},
        sampling=SamplingConfig(num_steps=args.sampling_steps, guidance_scale=args.guidance, height=args.resolution,
                                width=args.resolution),
        train=TrainConfig(steps=args.warmup + args.iters + args.profile_iters, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, lr=args.lr, mixed_precision="no" if args.smoke else "bf16"),
        lora=LoraConfig(rank=args.lora_rank, alpha=float(args.lora_rank)),
    )


def sdxl_adapter(cfg: Config, device: torch.device, vae_upcast: bool):
    """Full-size SDXL with random weights, built on `device` (the caller seeds torch alike on every rank)."""
    from benchmarks.sdxl import sdxl_random_pipeline

    with torch.device(device):
        pipe = sdxl_random_pipeline(force_upcast=vae_upcast)
    return build_adapter(cfg, device, DTYPES[cfg.train.mixed_precision], pipeline=pipe)


def build_parts(args: argparse.Namespace, cfg: Config, accelerator) -> tuple[StepParts, torch.nn.Module]:
    """Everything train() builds for its loop, in the same order: (step parts, the unwrapped UNet)."""
    device, t = accelerator.device, cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    if args.smoke:
        adapter = build_adapter(cfg, device, DTYPES[t.mixed_precision])
    else:
        adapter = sdxl_adapter(cfg, device, args.vae_upcast)
    unet = adapter.denoiser
    params = add_trainable(unet, cfg, adapter.lora_targets)
    reward = build_reward(cfg, device)
    train_prompts, _ = load_prompt_sets(cfg.prompts)
    sampler = PromptSampler(train_prompts, t.batch_size, grad_accum=t.grad_accum, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, seed=t.seed)
    method = get_method(cfg.method, **cfg.method_options)
    optimizer = build_optimizer(params, cfg)
    adapter.denoiser, optimizer, params = prepare_denoiser(accelerator, unet, optimizer)
    gen = rank_generator(t.seed, accelerator.process_index)
    conditioning = prompt_conditioning(adapter, sampler, range(t.steps), cfg)
    parts = StepParts(cfg, accelerator, adapter, method, reward, sampler, optimizer, None, params, gen,
                      make_autocast(device, t.mixed_precision), conditioning)
    return parts, unet


# ---------------------------------------------------------------- measuring


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (nothing to wait for on CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def one_step(parts: StepParts, step: int, sync: Callable[[], None]) -> dict[str, Any]:
    """Run optimizer step `step`; its wall seconds (device synchronised), plans and this rank's rewards."""
    sync()
    tic = time.perf_counter()
    r = train_step(parts, step)
    sync()
    return {"step": step, "s": time.perf_counter() - tic, "skipped": r.skipped,
            "stops": [p.stop for p in r.plans], "trained": [list(p.trained) for p in r.plans],
            "rewards": [float(x) for o in r.outs for x in o.rewards.reshape(-1)]}


def is_allreduce(name: str, on_gpu: bool) -> bool:
    """Whether a profiler event is an all-reduce: an NCCL kernel on GPU, a c10d collective's op on CPU."""
    low = name.lower()
    if on_gpu:
        return "nccl" in low and "allreduce" in low.replace("_", "")
    return low in ("gloo:all_reduce", "nccl:all_reduce")


def merged(spans: list[tuple[float, float]]) -> list[list[float]]:
    """The union of intervals as sorted, disjoint [start, end] pairs."""
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def uncovered(spans: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Length of the union of `spans` that no interval of `cover` overlaps."""
    cover_m, total, j = merged(cover), 0.0, 0
    for start, end in merged(spans):
        while j < len(cover_m) and cover_m[j][1] <= start:
            j += 1
        hidden, k = 0.0, j
        while k < len(cover_m) and cover_m[k][0] < end:
            hidden += min(end, cover_m[k][1]) - max(start, cover_m[k][0])
            k += 1
        total += end - start - hidden
    return total


def nccl_kernels(kernels) -> dict[str, list[float]]:
    """Every NCCL kernel name of a profiled step with its count and summed seconds (shows what was counted)."""
    seen: dict[str, list[float]] = {}
    for e in kernels:
        if "nccl" in e.name.lower():
            entry = seen.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += (e.time_range.end - e.time_range.start) / 1e6
    return seen


def allreduce_stats(events, on_gpu: bool) -> dict[str, Any]:
    """Summed all-reduce durations of one profiled step (seconds), their count, and on GPU the part of them that
    no other kernel runs beside (communication or waiting for the slowest rank that compute does not hide)."""
    if on_gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        if not kernels:  # a profiler that saw nothing must not read as "no all-reduce"
            return {"allreduce_s": None, "allreduce_calls": None, "allreduce_alone_s": None, "nccl_kernels": {}}
        comm = [e for e in kernels if is_allreduce(e.name, True)]
        compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    else:
        kernels, comm, compute = [], [e for e in events if is_allreduce(e.name, False)], []
    spans = [(e.time_range.start, e.time_range.end) for e in comm]
    return {"allreduce_s": sum(end - start for start, end in spans) / 1e6, "allreduce_calls": len(spans),
            "allreduce_alone_s": uncovered(spans, compute) / 1e6 if on_gpu else None,
            "nccl_kernels": nccl_kernels(kernels)}


def profiled_step(parts: StepParts, step: int, sync: Callable[[], None], on_gpu: bool) -> dict[str, Any]:
    """One optimizer step under torch.profiler (device kernels only on GPU, ops on CPU): its row plus the
    all-reduce figures."""
    from torch.profiler import ProfilerActivity, profile

    tic = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        row = one_step(parts, step, sync)
    stats = allreduce_stats(prof.events(), on_gpu)
    return {**row, **stats, "profile_wall_s": time.perf_counter() - tic}


def weights_digest(unet: torch.nn.Module) -> str:
    """sha256 over the trained weights' names and bytes, in name order."""
    h = hashlib.sha256()
    for name, value in sorted(lora.trainable_state(unet).items()):
        h.update(name.encode())
        h.update(value.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def measure_rank(args: argparse.Namespace, parts: StepParts, unet: torch.nn.Module) -> dict[str, Any]:
    """This rank's warm-up, timed and profiled steps, peak memory and weight digests."""
    acc, device = parts.accelerator, parts.accelerator.device
    on_gpu, sync = device.type == "cuda", device_sync(device)
    before = weights_digest(unet)
    warm = [one_step(parts, step, sync)["s"] for step in range(args.warmup)]
    acc.print("warm-up steps (s, rank 0):", " ".join(f"{x:.2f}" for x in warm), flush=True)
    acc.wait_for_everyone()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    timed = [one_step(parts, args.warmup + i, sync) for i in range(args.iters)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    acc.print("timed steps (s, rank 0):", " ".join(f"{t['s']:.2f}" for t in timed), flush=True)
    first = args.warmup + args.iters
    profiled = [profiled_step(parts, first + i, sync, on_gpu) for i in range(args.profile_iters)]
    acc.print("profiled steps (s, with parsing):", " ".join(f"{p['profile_wall_s']:.1f}" for p in profiled), flush=True)
    return {"rank": parts.accelerator.process_index, "device": device_name(device), "peak_gib": peak, "timed": timed,
            "profiled": profiled, "weights_sha256_before": before, "weights_sha256": weights_digest(unet)}


# ---------------------------------------------------------------- the record


def launch_command() -> str:
    """The command that started the run: the launcher's (the parent process) under torchrun or accelerate."""
    cmdline = Path(f"/proc/{os.getppid()}/cmdline")
    argv = [a.decode() for a in cmdline.read_bytes().split(b"\0") if a] if cmdline.is_file() else []
    if not any(Path(a).name in LAUNCHERS for a in argv[:3]):
        return shlex.join(["python", "-m", "benchmarks.multi_gpu", *sys.argv[1:]])
    if Path(argv[0]).name.startswith("python"):  # "python .../bin/torchrun ..." -> "torchrun ..."
        argv = ["python", *argv[1:]] if argv[1:2] == ["-m"] else argv[1:]
    env = [f"{k}={os.environ[k]}" for k in ("NCCL_NVLS_ENABLE",) if k in os.environ]
    return shlex.join([*env, Path(argv[0]).name, *argv[1:]])


def versions() -> dict[str, Any]:
    """torch, CUDA, NCCL, diffusers, accelerate and peft versions."""
    import accelerate
    import diffusers
    import peft

    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "nccl": nccl, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__, "python": platform.python_version()}


def meta(args: argparse.Namespace, cfg: Config, accelerator, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """What ran, where and how."""
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {
        "weights": SMOKE_WEIGHTS if args.smoke else WEIGHTS, "smoke": args.smoke,
        "processes": accelerator.num_processes, "backend": backend, "per_gpu_batch": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "method": f"drtune K={args.k}, early stop in the last {args.early_stop_range}", "reward": args.reward,
        "resolution": args.resolution, "sampling_steps": args.sampling_steps, "guidance": args.guidance,
        "lora_rank": args.lora_rank, "trained_parameters": sum(p.numel() for p in params),
        "precision": "fp32 (CPU)" if args.smoke else "bf16 UNet under bf16 autocast, fp32 LoRA, "
                     + ("fp32 VAE" if args.vae_upcast else "bf16 VAE"),
        "warmup": args.warmup, "iters": args.iters, "profile_iters": args.profile_iters,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": launch_command(),
        "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "OMP_NUM_THREADS") if k in os.environ},
        **versions(),
    }


def summarize(info: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput, step time, all-reduce, memory and weight equality over every rank."""
    n = len(ranks)
    per_step = [max(r["timed"][i]["s"] for r in ranks) for i in range(len(ranks[0]["timed"]))]
    s_per_step = statistics.mean(per_step)
    images = n * info["per_gpu_batch"] * info["grad_accum"]
    prof = [p for r in ranks for p in r["profiled"] if p["allreduce_s"] is not None]
    comm = [p["allreduce_s"] for p in prof]
    alone = [p["allreduce_alone_s"] for p in prof if p["allreduce_alone_s"] is not None]
    share = [p["allreduce_s"] / p["s"] for p in prof]
    peaks = [r["peak_gib"] for r in ranks if r["peak_gib"] is not None]
    return {
        "processes": n, "images_per_step": images, "s_per_step": s_per_step, "images_per_s": images / s_per_step,
        "images_per_s_per_gpu": images / s_per_step / n,
        "allreduce_s_per_step": statistics.mean(comm) if comm else None,
        "allreduce_s_per_step_min_rank": min(comm) if comm else None,
        "allreduce_alone_s_per_step": statistics.mean(alone) if alone else None,
        "allreduce_share_of_step": statistics.mean(share) if share else None,
        "allreduce_calls_per_step": statistics.mean(p["allreduce_calls"] for p in prof) if prof else None,
        "peak_gib_max": max(peaks) if peaks else None,
        "weights_bitwise_equal": len({r["weights_sha256"] for r in ranks}) == 1,
        "weights_changed": all(r["weights_sha256"] != r["weights_sha256_before"] for r in ranks),
        "skipped_steps": sum(s["skipped"] for r in ranks for s in r["timed"] + r["profiled"]),
    }


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def run_markdown(record: dict[str, Any]) -> str:
    """The run as markdown: settings, the result row, then one row per rank."""
    m, s = record["meta"], record["summary"]
    head = (f"**{m['weights']}**. {m['processes']} process(es), {m['backend'] or 'no process group'}; per-GPU batch "
            f"{m['per_gpu_batch']} x {m['grad_accum']} micro-batch(es); {m['method']}; {m['resolution']}px, "
            f"T={m['sampling_steps']}, CFG {m['guidance']}, LoRA rank {m['lora_rank']} "
            f"({m['trained_parameters']:,} trained parameters); {m['precision']}; reward {m['reward']}; "
            f"{m['warmup']} warm-up, {m['iters']} timed, {m['profile_iters']} profiled step(s). torch {m['torch']}, "
            f"CUDA {m['cuda']}, NCCL {m['nccl']}, diffusers {m['diffusers']}, accelerate {m['accelerate']}; "
            f"{m['date']}. Devices: {', '.join(sorted({r['device'] for r in record['ranks']}))}.\n\n`{m['command']}`")
    table = ["| GPUs | images/s | images/s per GPU | s / optimizer step | all-reduce s / step | all-reduce alone s "
             "| share of step | peak GiB (max rank) | weights bitwise equal |", "|---|---|---|---|---|---|---|---|---|",
             f"| {s['processes']} | {s['images_per_s']:.4g} | {s['images_per_s_per_gpu']:.4g} | "
             f"{s['s_per_step']:.3f} | {_f(s['allreduce_s_per_step'], '.4f')} | "
             f"{_f(s['allreduce_alone_s_per_step'], '.4f')} | {_f(s['allreduce_share_of_step'], '.2%')} | "
             f"{_f(s['peak_gib_max'], '.1f')} | {s['weights_bitwise_equal']} |"]
    ranks = ["| rank | device | peak GiB | mean step s | all-reduce s (profiled) | stop steps (timed) |",
             "|---|---|---|---|---|---|"]
    for r in record["ranks"]:
        found = [p["allreduce_s"] for p in r["profiled"] if p["allreduce_s"] is not None]
        comm = statistics.mean(found) if found else None
        stops = " ".join(str(x) for t in r["timed"] for x in t["stops"])
        ranks.append(f"| {r['rank']} | {r['device']} | {_f(r['peak_gib'], '.1f')} | "
                     f"{statistics.mean(t['s'] for t in r['timed']):.3f} | {_f(comm, '.4f')} | {stops} |")
    return "\n".join([head, "", *table, "", *ranks]) + "\n"


def write_run(out: Path, record: dict[str, Any]) -> Path:
    """multi_gpu-n<N>[-smoke].json and .md in `out`; returns the JSON's path."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"multi_gpu-n{record['meta']['processes']}" + ("-smoke" if record["meta"]["smoke"] else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    (out / f"{stem}.md").write_text(run_markdown(record))
    return out / f"{stem}.json"


# ---------------------------------------------------------------- scaling report

SAME = ("weights", "per_gpu_batch", "grad_accum", "method", "reward", "resolution", "sampling_steps", "guidance",
        "lora_rank", "precision")


def read_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """The run records of these JSON files (a folder stands for its multi_gpu-n*.json), ordered by N; one per N."""
    files = [f for p in paths for f in (sorted(p.glob("multi_gpu-n*.json")) if p.is_dir() else [p])]
    by_n: dict[int, list[Path]] = {}
    runs = []
    for f in files:
        runs.append(json.loads(f.read_text()))
        by_n.setdefault(runs[-1]["meta"]["processes"], []).append(f)
    twice = {n: [str(f) for f in fs] for n, fs in by_n.items() if len(fs) > 1}
    if twice:
        raise SystemExit(f"more than one run per GPU count: {twice}; pass the JSON files to compare")
    return sorted(runs, key=lambda r: r["meta"]["processes"])


def scaling_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run with its data-parallel efficiency against the N=1 run (None without one)."""
    base = next((r["summary"]["images_per_s_per_gpu"] for r in runs if r["meta"]["processes"] == 1), None)
    keys = ("images_per_s", "images_per_s_per_gpu", "s_per_step", "allreduce_s_per_step", "allreduce_alone_s_per_step",
            "allreduce_share_of_step", "peak_gib_max", "weights_bitwise_equal")
    return [{"gpus": r["meta"]["processes"], **{k: r["summary"][k] for k in keys},
             "efficiency": r["summary"]["images_per_s_per_gpu"] / base if base else None} for r in runs]


def verdict(rows: list[dict[str, Any]], mismatched: list[str], smoke: bool) -> str:
    """Whether every N > 1 keeps at least GOAL of the single GPU's images/s per GPU."""
    multi = [r for r in rows if r["gpus"] > 1]
    if smoke:
        return "no verdict: CPU smoke runs check the script and measure nothing"
    if mismatched:
        return f"no verdict: the runs differ in {', '.join(mismatched)}"
    if not multi or any(r["efficiency"] is None for r in multi):
        return "no verdict: an N=1 run and at least one N>1 run are needed"
    low = [r for r in multi if r["efficiency"] < GOAL]
    if not low:
        return f"goal met: efficiency >= {GOAL:.0%} at N = {', '.join(str(r['gpus']) for r in multi)}"
    return f"goal not met: below {GOAL:.0%} at N = {', '.join(str(r['gpus']) for r in low)}"


def scaling_report(paths: list[Path], out: Path) -> dict[str, Any]:
    """scaling.json and scaling.md in `out`: images/s per GPU at each N against N=1, and the 90% verdict."""
    runs = read_runs(paths)
    if not runs:
        raise SystemExit(f"no run JSON found in {', '.join(map(str, paths))}")
    mismatched = [k for k in SAME if len({json.dumps(r["meta"].get(k)) for r in runs}) > 1]
    rows = scaling_rows(runs)
    smoke = any(r["meta"]["smoke"] for r in runs)
    report = {"goal": GOAL, "verdict": verdict(rows, mismatched, smoke), "rows": rows,
              "meta": [r["meta"] for r in runs]}
    m = runs[0]["meta"]
    lines = [f"**{m['weights']}**; per-GPU batch {m['per_gpu_batch']}, {m['method']}, {m['resolution']}px, "
             f"T={m['sampling_steps']}, CFG {m['guidance']}, LoRA rank {m['lora_rank']}, {m['precision']}; "
             f"devices: {', '.join(sorted({d for r in runs for d in (x['device'] for x in r['ranks'])}))}.", "",
             "| GPUs | images/s | images/s per GPU | efficiency | s / step | all-reduce s / step | all-reduce alone s "
             "| share of step | peak GiB | weights bitwise equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['images_per_s']:.4g} | {r['images_per_s_per_gpu']:.4g} | "
                     f"{_f(r['efficiency'], '.1%')} | {r['s_per_step']:.3f} | {_f(r['allreduce_s_per_step'], '.4f')} | "
                     f"{_f(r['allreduce_alone_s_per_step'], '.4f')} | {_f(r['allreduce_share_of_step'], '.2%')} | "
                     f"{_f(r['peak_gib_max'], '.1f')} | {r['weights_bitwise_equal']} |")
    lines += ["", f"Data-parallel efficiency = images/s per GPU at N / at N=1. Goal: >= {GOAL:.0%}. "
              f"**{report['verdict']}**.", "", *(f"- N={r['processes']}: `{r['command']}`" for r in report["meta"])]
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2))
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Measure this launch's N (or, with --scaling-report, tabulate earlier runs)."""
    args = parse_args(argv)
    if args.scaling_report:
        scaling_report(args.scaling_report, args.out)
        return
    from accelerate.utils import gather_object

    cfg = build_config(args)
    tic = time.perf_counter()
    accelerator = make_accelerator()
    parts, unet = build_parts(args, cfg, accelerator)
    accelerator.print(f"{accelerator.num_processes} process(es): model, LoRA and DDP ready in "
                      f"{time.perf_counter() - tic:.0f} s", flush=True)
    mine = measure_rank(args, parts, unet)
    ranks = gather_object([mine])
    if accelerator.is_main_process:
        info = meta(args, cfg, accelerator, parts.params)
        record = {"meta": info, "summary": summarize(info, ranks), "ranks": sorted(ranks, key=lambda r: r["rank"])}
        path = write_run(args.out, record)
        print(run_markdown(record), f"\nwritten: {path} and .md", sep="", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
