"""Whole short training runs under GPU memory caps: the low-memory mode against the default (issue 12).

    python -m benchmarks.low_memory --out benchmarks/results/low_memory   # one H200, about 4 minutes
    python -m benchmarks.low_memory --smoke --out /tmp/lowmem     # tiny pipelines on the CPU: checks the script

Each row is one whole `tuner.train` run (setup, DRTune steps, the evaluation gallery before and after, a
checkpoint, the final LoRA) in a process of its own, so caps and peaks do not leak between rows. A capped row
calls torch.cuda.set_per_process_memory_fraction(cap / total) first: an allocation past the cap fails as it would
on a card of that size (the CUDA context, about 0.5 GiB on a real card, is outside the cap). Every row runs with
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, as the low-memory example config advises.

Full-size architectures with random weights (they cost exactly what trained ones cost): SDXL base 1.0 with the
VAE config of the fp16-fix VAE (the example configs' VAE: decoded in bf16), SD 1.5, and HPSv2.1 (open_clip
ViT-H-14) written as HPS_v2.1_compressed.pt and loaded through rewards.load. The runs start from
tuner/configs/sdxl_hpsv2.1_lowmem.yaml: DRTune K = 5, T = 50 DDIM, CFG 7.5, LoRA rank 64 (fp32, AdamW, EMA 0.99),
bf16, batch 1. Measured per row: peak torch.cuda.max_memory_allocated (and max_memory_reserved) over the whole
run, seconds per image over the optimizer steps after the first, and whether it ran out of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CONFIG = "sdxl_hpsv2.1_lowmem.yaml"
# Each model's run: its example config, sampling steps and guidance (SD 1.5 runs the SDXL low-memory config's recipe).
MODELS = {
    "sdxl": (CONFIG, 50, 7.5), "sd15": (CONFIG, 50, 7.5),
    "flux": ("flux_hpsv2.1_lowmem.yaml", 28, 3.5),  # FLUX.1-dev: 28 steps, guidance embedding 3.5
    "sd35": ("sd35_hpsv2.1.yaml", 40, 4.5),  # SD3.5 Medium: 40 steps, CFG 4.5
}
ALLOC_CONF = "expandable_segments:True"
ROW_START_S = 60  # a row that cannot get this many seconds of the budget is skipped
SMOKE_DEVICE = "cpu (smoke run: tiny pipelines, 64 px, K=2; times mean nothing)"


@dataclass(frozen=True)
class Row:
    """One table row: which model at which size, which memory mode, under which cap (GiB; None: uncapped)."""

    model: str  # "sdxl", "sd15", "flux" (FLUX.1-dev) or "sd35" (SD3.5 Medium)
    memory: str  # train.memory
    cap_gib: float | None
    size: int


ROWS = {
    "sdxl-low-16": Row("sdxl", "low", 16.0, 1024),
    "sdxl-low-24": Row("sdxl", "low", 24.0, 1024),
    "sdxl-default": Row("sdxl", "default", None, 1024),  # the reference of the time goal (low <= 1.3x default)
    "sd15-low-8": Row("sd15", "low", 8.0, 512),
    "flux-low-32": Row("flux", "low", 32.0, 1024),
    "sd35-low-16": Row("sd35", "low", 16.0, 1024),
}
REFERENCE = {"sdxl": "sdxl-default"}
COMMON = ["UNet, VAE (fp16-fix config) and text encoders in the run's precision", "LoRA folded into the gradient-free "
          "UNet calls", f"PYTORCH_CUDA_ALLOC_CONF={ALLOC_CONF} (GPU rows)"]
ON = {
    "low": ["trained denoiser calls recomputed block by block (UNet: ResnetBlock2D / BasicTransformerBlock; SD3: "
            "JointTransformerBlock; FLUX: double- and single-stream blocks)",
            "VAE decode one image at a time, recomputed per ResnetBlock2D / Attention / Upsample2D",
            "reward one image at a time", "prompts encoded once, text encoders on the CPU after"],
    "default": ["one denoiser graph at a time (the engine)", "whole VAE decode recomputed in backward",
                "prompts encoded per step, text encoders on the GPU (SD3 / FLUX: encoded once, then on the CPU)"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where low_memory.json / .md go")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run, the first not timed (3; smoke 2)")
    ap.add_argument("--num-steps", type=int, default=None, help="sampling steps T (each model's own; smoke 4)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (each model's own)")
    ap.add_argument("--only", nargs="*", default=None, help=f"run only these rows, of {', '.join(ROWS)}")
    ap.add_argument("--budget", type=float, default=500, help=f"seconds for the whole run; a row that cannot get "
                    f"{ROW_START_S} s of it is skipped, a row still running when it ends is stopped")
    ap.add_argument("--weights", type=Path, default=None,
                    help="folder for the random HPSv2.1 checkpoint, reused by later runs (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny pipelines and reward on the CPU")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each row in a process of its own (the default; --smoke runs them in this one)")
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "ROW"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(ROWS))
    if unknown:
        ap.error(f"--only: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    args.steps = args.steps or (2 if args.smoke else 3)
    args.num_steps = args.num_steps or (4 if args.smoke else None)
    args.isolate = not args.smoke if args.isolate is None else args.isolate
    return args


def main(argv: list[str] | None = None) -> None:
    """Write the reward checkpoint, run every row, and write JSON + a markdown table to --out."""
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child[0]).read_text())
        with _architectures(spec["smoke"]):
            _write_json(Path(spec["rows"]) / f"{args.child[1]}.json", run_row(args.child[1], spec))
        return
    start = time.perf_counter()
    names = [n for n in ROWS if args.only is None or n in args.only]
    with tempfile.TemporaryDirectory(prefix="low_memory-") as tmp, _architectures(args.smoke):
        work = Path(tmp)
        spec = {"steps": args.steps, "num_steps": args.num_steps, "guidance": args.guidance, "smoke": args.smoke,
                "hps": str(write_reward(args.weights or work / "weights", args.smoke)),
                "work": str(work / "runs"), "rows": str(work / "rows")}
        Path(spec["rows"]).mkdir()
        (work / "spec.json").write_text(json.dumps(spec))
        rows = {}
        for name in names:
            left = args.budget - (time.perf_counter() - start)
            rows[name] = run_child(work / "spec.json", name, spec, left) if args.isolate else run_row(name, spec)
            print(name, json.dumps({k: v for k, v in rows[name].items() if k != "summary"}), flush=True)
    meta = _meta(args, time.perf_counter() - start)
    write(args.out, meta, rows)


# -- the reward's random checkpoint and the pipelines ----------------------------------------------------
@contextlib.contextmanager
def _architectures(smoke: bool):
    """Smoke runs: ViT-H-14 means a tiny open_clip model while active (benchmarks.reward_models)."""
    if not smoke:
        yield
        return
    from benchmarks.reward_models import tiny_architectures

    with tiny_architectures():
        yield


def write_reward(folder: Path, smoke: bool) -> Path:
    """HPS_v2.1_compressed.pt with random weights in the official format (reused when already there)."""
    from benchmarks import checkpoints as ck

    path = Path(folder) / ("tiny" if smoke else "full") / ck.HPS_FILE
    if not path.is_file():
        ck.write_hps(path, "ViT-H-14", seed=0)
    return path


def build_pipeline(model: str, smoke: bool):
    """A random-weight pipeline with its weights in bf16 on the GPU (fp32 on the CPU for smoke runs), as
    from_pretrained(dtype=bf16) would give it; its build peak is not part of any row's peak."""
    from benchmarks.flow_models import random_pipeline
    from benchmarks.sdxl import sd15_random_pipeline, sdxl_random_pipeline
    from tuner.pipelines import TINY_PIPELINES

    if smoke:
        return TINY_PIPELINES[{"sdxl": "tiny-sdxl", "sd15": "tiny-sd15", "flux": "tiny-flux", "sd35": "tiny-sd3"}[model]](0)
    if model in ("flux", "sd35"):
        return random_pipeline(model)
    with torch.device("cuda"):
        pipe = sdxl_random_pipeline(force_upcast=False) if model == "sdxl" else sd15_random_pipeline()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(torch.bfloat16)
    torch.cuda.empty_cache()
    return pipe


def row_config(name: str, spec: dict):
    """The row's run configuration: the low-memory example config with the row's model, mode and short schedule."""
    from tuner.config import CONFIG_DIR, load_config, validate

    row, smoke, steps = ROWS[name], spec["smoke"], spec["steps"]
    config, num_steps, guidance = MODELS[row.model]
    size = 64 if smoke else row.size
    overrides = [
        f"output_dir={spec['work']}", f"name={name}", f"model=random/{row.model}", "vae=null",
        f"train.memory={row.memory}", f"train.steps={steps}", "train.batch_size=1", "train.grad_accum=1",
        "train.prompts_per_step=null",
        "train.warmup_steps=0", f"sampling.num_steps={spec['num_steps'] or num_steps}",
        f"sampling.guidance_scale={spec['guidance'] or guidance}", f"sampling.height={size}", f"sampling.width={size}",
        "prompts.num_eval=1", f"log.eval_every={steps}",
        f"checkpoint.every={steps}", "checkpoint.keep=1", "log.tensorboard=false", "log.progress=false",
        f"reward_sources.hpsv2.1.checkpoint={spec['hps']}",
    ]
    if smoke:
        overrides += ["train.mixed_precision=null", "method_options={num_trained: 2, early_stop_range: 2}"]
    return validate(load_config(CONFIG_DIR / config, overrides))


def describe(cfg) -> list[str]:
    """What a run turns on, read from its configuration."""
    t = cfg.train
    ema = f" + fp32 EMA {t.ema_decay}" if t.ema_decay else ""
    return ON[t.memory] + [f"reward weights in {_reward_dtype(cfg)}", f"mixed precision {t.mixed_precision or 'auto'}",
                           f"fp32 LoRA rank {cfg.lora.rank} + {t.optimizer}{ema}"] + COMMON


def _reward_dtype(cfg) -> str:
    from tuner.train import reward_dtype

    return str(reward_dtype(cfg) or torch.float32).removeprefix("torch.")


# -- one row ---------------------------------------------------------------------------------------------
def run_row(name: str, spec: dict) -> dict:
    """One whole training run under the row's cap: peak memory, seconds per image, OOM or not."""
    from tuner.logging import read_metrics
    from tuner.train import train

    row, cuda = ROWS[name], not spec["smoke"]
    cfg = row_config(name, spec)
    pipe = build_pipeline(row.model, spec["smoke"])
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        if row.cap_gib is not None:
            torch.cuda.set_per_process_memory_fraction(min(1.0, row.cap_gib * 2**30 / total))
        torch.cuda.reset_peak_memory_stats()
    result = {**asdict(row), "size": cfg.sampling.height, "reward_dtype": _reward_dtype(cfg), "oom": False,
              "error": None, "on": describe(cfg), "summary": None}
    tic = time.perf_counter()
    try:
        result["summary"] = train(cfg, pipeline=pipe)
    except torch.OutOfMemoryError as e:
        result.update(oom=True, error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - a row's failure is recorded; the other rows still run
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    result["run_s"] = round(time.perf_counter() - tic, 1)
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    metrics = Path(cfg.output_dir) / name / "metrics.jsonl"
    times = [r["step_time"] for r in read_metrics(metrics) if "step_time" in r] if metrics.is_file() else []
    timed = times[1:]
    result.update(step_times=times, steps_timed=len(timed),
                  s_per_image=sum(timed) / len(timed) / cfg.train.batch_size if timed else None)
    return result


def run_child(spec_file: Path, name: str, spec: dict, seconds_left: float) -> dict:
    """A row in a process of its own, stopped when the budget ends."""
    row = {**asdict(ROWS[name]), "oom": False, "on": ON[ROWS[name].memory] + COMMON, "summary": None}
    if seconds_left < ROW_START_S:
        return {**row, "error": f"skipped: {seconds_left:.0f} s of the budget left"}
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": ALLOC_CONF}
    command = [sys.executable, "-m", "benchmarks.low_memory", "--child", str(spec_file), name]
    try:
        done = subprocess.run(command, env=env, timeout=seconds_left)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"stopped: the budget ended after {seconds_left:.0f} s"}
    out = Path(spec["rows"]) / f"{name}.json"
    if not out.is_file():
        return {**row, "error": f"the row's process exited with status {done.returncode} and wrote no result"}
    return json.loads(out.read_text())


# -- output ----------------------------------------------------------------------------------------------
def _meta(args: argparse.Namespace, seconds: float) -> dict:
    import diffusers

    cuda = torch.cuda.is_available() and not args.smoke
    return {
        "device": torch.cuda.get_device_name() if cuda else SMOKE_DEVICE,
        "total_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"),
        "seconds": round(seconds, 1), "command": "python -m benchmarks.low_memory " + " ".join(sys.argv[1:]),
        "config": "each model's example config (" + ", ".join(sorted({f"tuner/configs/{m[0]}" for m in MODELS.values()}))
                  + ") with each row's overrides", "steps": args.steps,
        "num_steps": args.num_steps, "guidance": args.guidance,
        "weights": "random (full-size SDXL base 1.0 / SD 1.5 / FLUX.1-dev / SD3.5 Medium / HPSv2.1 ViT-H-14 "
                   "architectures)",
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def _cell(value, fmt: str = "{:.2f}") -> str:
    return "" if value is None else fmt.format(value)


def write(out: Path, meta: dict, rows: dict) -> None:
    """low_memory.json and low_memory.md (one table row per run)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "low_memory.json", {"meta": meta, "rows": rows})
    lines = [f"{meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}; {meta['weights']}; "
             "DRTune K=5, LoRA rank 64, bf16, batch 1, HPSv2.1; SDXL and SD 1.5 T=50 DDIM with CFG 7.5, FLUX.1-dev "
             "T=28 with guidance embedding 3.5, SD3.5 Medium T=40 with CFG 4.5 (unless the command says otherwise); "
             f"{meta['steps']} optimizer steps per run (s / image over all but the first), eval gallery before and "
             f"after, one checkpoint; {meta['date']}; `{meta['command']}` ({meta['seconds']:.0f} s)", "",
             "| row | model | px | memory | reward weights | cap GiB | result | peak allocated GiB | "
             "peak reserved GiB | s / image | vs default | run s |", "|" + "---|" * 12]
    for name, r in rows.items():
        ref = rows.get(REFERENCE.get(r["model"], ""), {}).get("s_per_image")
        ratio = r.get("s_per_image") / ref if r.get("s_per_image") and ref else None
        result = "OOM" if r.get("oom") else ("ok" if not r.get("error") else r["error"].splitlines()[0][:80])
        lines.append(f"| {name} | {r['model']} | {r['size']} | {r['memory']} | {r.get('reward_dtype', '')} | "
                     f"{_cell(r['cap_gib'], '{:g}') or 'none'} | "
                     f"{result} | {_cell(r.get('peak_allocated_gib'))} | {_cell(r.get('peak_reserved_gib'))} | "
                     f"{_cell(r.get('s_per_image'))} | {_cell(ratio, '{:.2f}x')} | {_cell(r.get('run_s'), '{:.0f}')} |")
    lines += ["", "What each mode turns on:", ""]
    lines += [f"- {mode}: " + "; ".join(ON[mode]) for mode in ON] + ["- both: " + "; ".join(COMMON)]
    (out / "low_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
