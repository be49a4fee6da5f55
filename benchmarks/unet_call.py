"""Cost of one gradient-free SDXL UNet call (CFG, LoRA folded) in each setting of the sampling calls.

    python -m benchmarks.unet_call --out benchmarks/results/unet_call
    python -m benchmarks.unet_call --batches 5 --variants plain fp8 --out benchmarks/results/unet_call

Settings (`--variants`): under bf16 autocast (as before `Adapter.plain_half`), plain bf16 (the default), fp8
transformer linears (`train.fp8_sampling`), channels-last (NHWC) weights of the UNet and the VAE; `--compile`
compiles the blocks as `train.compile` does.

A sampling chain is 50 such calls; this isolates where a call's time goes (GPU kernels against host-side
overhead) with a profiler table of the top kernels. Full-size SDXL architecture, random weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.sdxl import sdxl_random_pipeline, set_layout
from benchmarks.tuner_methods import measure
from tuner.lora import add_lora
from tuner.pipelines import adapter_from_pipeline


def timed(fn, iters: int) -> float:
    """Milliseconds per call after two warm-ups, CUDA-synchronised."""
    fn()
    return measure(fn, iters)["s_per_iter"] * 1e3


def profile(fn) -> dict:
    """Kernel time, host time and the top CUDA kernels of one call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    return {"gpu_kernel_ms": gpu_ms, "kernel_launches": sum(e.count for e in kernels),
            "top": [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 2)) for e in top],
            "table": prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)}


VARIANTS = ("autocast", "plain", "fp8", "channels-last")


def set_variant(adapter, name: str) -> contextlib.AbstractContextManager:
    """Put the adapter in setting `name`; returns the context a call runs in (autocast or none)."""
    adapter.fp8 = name == "fp8"
    set_layout(adapter, torch.channels_last if name == "channels-last" else torch.contiguous_format)
    if name == "autocast":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["autocast", "plain"])
    ap.add_argument("--compile", action="store_true", help="compile the blocks as train.compile does")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/unet_call"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.device("cuda"):
        pipe = sdxl_random_pipeline()
    adapter = adapter_from_pipeline(pipe, device="cuda", dtype=torch.bfloat16)
    add_lora(adapter.denoiser, rank=64, alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    if args.compile:
        adapter.compile()
    rows, tables = {}, {}
    for batch in args.batches:
        cond = adapter.encode_prompts(["a photo of a cat"] * batch)
        x = torch.randn(batch, 4, 128, 128, device="cuda")
        t = adapter.scheduler.timesteps[0] if len(adapter.scheduler.timesteps) else torch.tensor(999)
        for name in args.variants:
            ctx = set_variant(adapter, name)

            def call(ctx=ctx):
                with torch.no_grad(), ctx:
                    adapter.denoise(x, t, cond, 7.5)
            with adapter.frozen_calls():
                ms = timed(call, args.iters)
                prof = profile(call)
            key = f"{name} [batch {batch}]"
            tables[key] = prof.pop("table")
            rows[key] = {"ms_per_call": ms, **prof}
            print(key, round(ms, 1), "ms; kernels", round(prof["gpu_kernel_ms"], 1), "ms,", prof["kernel_launches"],
                  "launches", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "weights": "random (full-size SDXL base 1.0 architecture)", "lora": "rank 64, folded",
            "compiled": args.compile, "command": "python -m benchmarks.unet_call " + " ".join(sys.argv[1:])}
    (args.out / "unet_call.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "unet_call_profiles.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))


if __name__ == "__main__":
    main()
