"""Whole runs of `python -m tuner.run` on the shipped GPU configs, timed as a user meets them (issue 23).

    python -m benchmarks.whole_run --only sdxl --out benchmarks/results/whole_run            # one GPU
    python -m benchmarks.whole_run --only sdxl --cap-gib 75 --out benchmarks/results/whole_run   # an 80 GB card's fit
    python -m benchmarks.whole_run --smoke --out DIR                  # tiny pipelines on the CPU (tests run it)

A row is a shipped config (tuner/configs/sdxl_hpsv2.1.yaml, flux_hpsv2.1.yaml, sd35_hpsv2.1.yaml) with random
full-size weights written to disk as a diffusers folder (save_pretrained, bf16; SDXL with the fp16-fix VAE's config,
as the config's VAE) and HPSv2.1 (ViT-H-14) written in its official checkpoint format; the run loads them from there
as it would load the hub's files. Each row runs twice, each time `tuner.run`'s own `main` in a fresh process:
"first" with an empty compile cache (a fresh machine, but for the operating system's file cache, which holds the
weights just written), "second" with the cache the first run filled (a user's next run). A run changes only what
makes it short: `train.steps` (--steps), one evaluation gallery before and after, one checkpoint at the end, and
for SDXL `train.prompts_per_step` 8 instead of 16 (so a step takes half the time; `train.batch_size: auto` chooses
among the same micro-batches up to 8). Per run: the micro-batch auto chose, seconds per image over the steps after
the first, the peak allocated GPU memory of a step and of the whole run, and the warm-up: seconds from process start
(imports and loading included) to the end of the first optimizer step, as the run's summary reports it.

--cap-gib N calls torch.cuda.set_per_process_memory_fraction(N GiB / total) in the run's process before anything
else, so the run (and auto's choice) sees an N GiB card; 75 stands for an 80 GB H100 on a bigger card (an H100
leaves about 79 GiB to a process). Weights live under --weights (default: the user cache dir); a row deletes the
other rows' weights before writing its own (FLUX.1-dev alone is 34 GB), so rows can be split over calls with
--only and the second run of a row can come in a later call on the same machine (--runs second).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

AUTO_LINE = "train.batch_size=auto:"
RUNS = ("first", "second")
ROW_START_S = 45  # a run that cannot get this many seconds of the budget is skipped
SMOKE_DEVICE = "cpu (smoke run: tiny pipelines, 64 px; times mean nothing)"


@dataclass(frozen=True)
class Row:
    """A shipped config, the model written for it, and what the benchmark overrides besides the schedule."""

    config: str
    model: str  # "sdxl", "flux" or "sd35": benchmarks.low_memory.build_pipeline's names
    overrides: tuple[str, ...] = ()


ROWS = {
    "sdxl": Row("sdxl_hpsv2.1.yaml", "sdxl", ("vae=null", "train.prompts_per_step=8")),
    "flux": Row("flux_hpsv2.1.yaml", "flux"),
    "sd35": Row("sd35_hpsv2.1.yaml", "sd35"),
}
SMOKE = ("sampling.height=64", "sampling.width=64", "sampling.num_steps=4", "train.compile=false",
         "method_options={num_trained: 2, early_stop_range: 2}", "train.mixed_precision=null", "prompts.num_eval=1",
         "train.prompts_per_step=2")


def default_root() -> Path:
    from tuner.compile_cache import user_cache_dir

    return user_cache_dir() / "drtune-rewards" / "whole_run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/whole_run"),
                    help="where whole_run-<stamp>.json / .md go")
    ap.add_argument("--only", nargs="*", default=None, help=f"rows to run, of {', '.join(ROWS)} (default: all)")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS,
                    help="first (empty compile cache), second (the first run's cache), or both (default)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (4; smoke 2), the first not timed")
    ap.add_argument("--cap-gib", type=float, default=None, help="GiB the run's process may allocate (a smaller card)")
    ap.add_argument("--budget", type=float, default=530, help=f"seconds for this invocation; a run that cannot get "
                    f"{ROW_START_S} s of it is skipped, one still running when it ends is stopped")
    ap.add_argument("--weights", type=Path, default=None, help="where random weights are written and reused "
                    "(default: <user cache dir>/drtune-rewards/whole_run/weights)")
    ap.add_argument("--cache", type=Path, default=None, help="where the runs' compile caches go "
                    "(default: <user cache dir>/drtune-rewards/whole_run/compile)")
    ap.add_argument("--smoke", action="store_true", help="tiny pipelines and reward on the CPU")
    ap.add_argument("--child", nargs=2, metavar=("CAP_GIB", "SMOKE"), help=argparse.SUPPRESS)
    ap.add_argument("--write-weights", nargs=2, metavar=("ROW", "FOLDER"), help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child is None and rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.tuner_args = rest
    unknown = sorted(set(args.only or ()) - set(ROWS))
    if unknown:
        ap.error(f"--only: unknown row(s) {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    args.steps = args.steps or (2 if args.smoke else 4)
    root = default_root() / ("smoke" if args.smoke else "full")
    args.weights, args.cache = args.weights or root / "weights", args.cache or root / "compile"
    return args


def main(argv: list[str] | None = None) -> None:
    """Write what is missing, run every (row, run) in a process of its own, write JSON + a markdown table."""
    args = parse_args(argv)
    if args.child:
        sys.exit(child(float(args.child[0]) or None, args.child[1] == "1", args.tuner_args))
    if args.write_weights:
        write_pipeline(args.write_weights[0], Path(args.write_weights[1]), args.smoke)
        return
    start = time.perf_counter()
    hps = write_reward(args.weights, args.smoke)
    results = []
    for name in [n for n in ROWS if args.only is None or n in args.only]:
        for run in args.runs:
            left = args.budget - (time.perf_counter() - start)
            result = run_once(name, run, args, hps, left)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("step_times", "error")}), flush=True)
            if result.get("error"):
                print(f"{name} {run}: {result['error']}", flush=True)
    write(args.out, meta(args, time.perf_counter() - start), results)


# -- weights ----------------------------------------------------------------------------------------------
def write_reward(folder: Path, smoke: bool) -> Path:
    """The random HPSv2.1 checkpoint (benchmarks.low_memory's, reused when there)."""
    from benchmarks.low_memory import _architectures
    from benchmarks.low_memory import write_reward as write

    with _architectures(smoke):
        return write(folder, smoke)


def weights_folder(args: argparse.Namespace, name: str) -> Path:
    return args.weights / "pipelines" / ROWS[name].model


def ensure_pipeline(name: str, args: argparse.Namespace, seconds_left: float) -> tuple[Path, float]:
    """The row's pipeline folder, written by a process of its own if missing (the other rows' are deleted first:
    they are large and can be written again); returns it and the seconds writing took."""
    folder = weights_folder(args, name)
    if (folder / "model_index.json").is_file():
        return folder, 0.0
    for other in (args.weights / "pipelines").glob("*"):
        if other != folder:
            shutil.rmtree(other, ignore_errors=True)
    tic = time.perf_counter()
    if args.smoke:  # on the CPU: no CUDA context to keep out of this process
        write_pipeline(name, folder, smoke=True)
    else:
        command = [sys.executable, "-m", "benchmarks.whole_run", "--write-weights", name, str(folder)]
        subprocess.run(command, check=True, timeout=max(1.0, seconds_left))
    return folder, time.perf_counter() - tic


def write_pipeline(name: str, folder: Path, smoke: bool) -> None:
    """Build the row's random pipeline (bf16 on the GPU; tiny fp32 on the CPU for --smoke) and save it."""
    from benchmarks.low_memory import build_pipeline

    pipe = build_pipeline(ROWS[name].model, smoke)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)  # complete or absent


# -- one run ----------------------------------------------------------------------------------------------
def cache_folder(name: str, run: str, args: argparse.Namespace) -> tuple[Path | None, str]:
    """The compile cache of a run: a new empty folder for "first" (recorded for "second"), the first run's for
    "second"; and how it stood."""
    args.cache.mkdir(parents=True, exist_ok=True)
    pointer = args.cache / f"{name}.latest"
    if run == "first":
        for old in args.cache.glob(f"{name}-*"):
            shutil.rmtree(old, ignore_errors=True)
        folder = args.cache / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir()
        pointer.write_text(str(folder))
        return folder, "empty"
    folder = Path(pointer.read_text()) if pointer.is_file() else None
    if folder is None or not folder.is_dir():
        return None, "missing: run --runs first on this machine first"
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    return folder, f"the first run's ({files} files)"


def tuner_args(name: str, run: str, args: argparse.Namespace, model: Path, hps: Path, cache: Path, work: Path) -> list[str]:
    """`python -m tuner.run` arguments: the shipped config with the row's model and a short schedule."""
    from tuner.config import CONFIG_DIR

    row, steps = ROWS[name], args.steps
    overrides = [f"output_dir={work}", f"name={name}-{run}", f"model={model}",
                 f"reward_sources.hpsv2.1.checkpoint={hps}", f"train.steps={steps}", "train.warmup_steps=0",
                 f"log.eval_every={steps}", f"checkpoint.every={steps}", "checkpoint.keep=1", "log.progress=false",
                 f"train.compile_cache={cache}", *row.overrides, *(SMOKE if args.smoke else ())]
    return ["--config", str(CONFIG_DIR / row.config), *overrides]


def run_once(name: str, run: str, args: argparse.Namespace, hps: Path, seconds_left: float) -> dict:
    """One whole run of tuner.run in a fresh process, read back from its summary and metrics."""
    row = ROWS[name]
    result = {"row": name, "run": run, "config": f"tuner/configs/{row.config}", "cap_gib": args.cap_gib,
              "error": None, "rc": None, "step_times": []}
    if seconds_left < ROW_START_S:
        return {**result, "error": f"skipped: {seconds_left:.0f} s of the budget left"}
    tic = time.perf_counter()
    cache, result["compile_cache"] = cache_folder(name, run, args)
    if cache is None:
        return {**result, "error": f"compile cache {result['compile_cache']}"}
    model, result["write_weights_s"] = ensure_pipeline(name, args, seconds_left)
    work = args.weights.parent / "runs"
    shutil.rmtree(work / f"{name}-{run}", ignore_errors=True)
    command = [sys.executable, "-m", "benchmarks.whole_run", "--child", str(args.cap_gib or 0),
               "1" if args.smoke else "0", *tuner_args(name, run, args, model, hps, cache, work)]
    left = seconds_left - (time.perf_counter() - tic)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, left))
    except subprocess.TimeoutExpired as stopped:  # keep what the run got through: its warm-up lines, its metrics
        out, err = _text(stopped.stdout), _text(stopped.stderr)
        return {**result, "error": f"stopped: the budget ended after {left:.0f} s", "warm_up_lines": warm_up_lines(out),
                "stderr_tail": err.strip()[-2000:], **read_run(work / f"{name}-{run}")}
    result.update(rc=done.returncode, wall_s=round(time.perf_counter() - started, 1),
                  warm_up_lines=warm_up_lines(done.stdout))
    auto = [line for line in done.stdout.splitlines() if line.startswith(AUTO_LINE)]
    result["auto"] = auto[0] if auto else None
    if done.returncode != 0:
        result["error"] = done.stderr.strip()[-3000:] or f"exit status {done.returncode}"
    return {**result, **read_run(work / f"{name}-{run}")}


def _text(output: bytes | str | None) -> str:
    """What a stopped subprocess had written (bytes from some Python versions even with text=True)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def warm_up_lines(stdout: str) -> list[str]:
    """The run's own account of its warm-up: the phase it entered and when, up to the end of the first step."""
    return [line for line in stdout.splitlines() if line.startswith(("warm-up", AUTO_LINE))]


def read_run(run_dir: Path) -> dict:
    """What a finished run's summary.json and metrics.jsonl say."""
    from tuner.logging import read_metrics

    out = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
        keys = ("gpu", "gpu_memory_gib", "batch_size", "grad_accum", "prompts_per_step", "peak_gib_steps",
                "peak_gib_session", "seconds_to_first_step", "seconds_this_session", "steps")
        out.update({k: summary.get(k) for k in keys})
    if (run_dir / "metrics.jsonl").is_file():
        times = [r["step_time"] for r in read_metrics(run_dir / "metrics.jsonl") if "step_time" in r]
        out["step_times"] = times
        per_step = (out.get("batch_size") or 0) * (out.get("grad_accum") or 0)
        timed = times[1:]
        out["s_per_image"] = round(sum(timed) / len(timed) / per_step, 3) if timed and per_step else None
    return out


def child(cap_gib: float | None, smoke: bool, argv: list[str]) -> int:
    """The run's own process: cap the GPU memory if asked, then `python -m tuner.run`'s main."""
    import torch

    if cap_gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total))
    from benchmarks.low_memory import _architectures
    from tuner.run import main as tuner_main

    with _architectures(smoke):
        return tuner_main(argv)


# -- output -----------------------------------------------------------------------------------------------
def cards() -> str | None:
    """The GPUs as nvidia-smi names them (this process never opens a CUDA context: the runs get the whole card)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "; ".join(line.strip() for line in done.stdout.splitlines() if line.strip()) or None


def meta(args: argparse.Namespace, seconds: float) -> dict:
    import diffusers
    import torch

    return {"cards": SMOKE_DEVICE if args.smoke else cards(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"),
            "seconds": round(seconds, 1), "command": "python -m benchmarks.whole_run " + " ".join(sys.argv[1:]),
            "steps": args.steps, "cap_gib": args.cap_gib, "smoke": args.smoke,
            "weights": "random (full-size SDXL base 1.0 with the fp16-fix VAE config / FLUX.1-dev / SD3.5 Medium; "
                       "HPSv2.1 ViT-H-14), written as diffusers folders and loaded from disk",
            "rows": {name: asdict(row) for name, row in ROWS.items()}}


def _cell(value, fmt: str = "{:.2f}") -> str:
    return "" if value is None else fmt.format(value)


def card(result: dict, smoke: bool) -> str:
    """The card a run ran on, with its cap."""
    name = SMOKE_DEVICE if smoke else (result.get("gpu") or "see cards above")
    return name + (f", capped at {result['cap_gib']:g} GiB" if result.get("cap_gib") else "")


def _first_words(error: str) -> str:
    """What a table cell shows of an error: the tuner's out-of-memory line, else the last line (a traceback's)."""
    lines = error.strip().splitlines()
    oom = [line for line in lines if "out of CUDA memory" in line]
    return (oom[0] if oom else lines[-1])[:120]


def write(out: Path, info: dict, results: list[dict]) -> Path:
    """whole_run-<stamp>.json and .md (one table row per run), labelled with the card."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"whole_run-{stamp}.json").write_text(json.dumps({"meta": info, "runs": results}, indent=2, default=str))
    lines = [f"{info['cards']}; `{info['command']}`, torch {info['torch']}, diffusers {info['diffusers']}, {info['date']}; "
             f"{info['weights']}; {info['steps']} optimizer steps a run (s / image over all but the first), an "
             f"evaluation gallery before and after, one checkpoint; {info['seconds']:.0f} s in all", "",
             "| row | run | card | micro-batch x accumulation | s / image | peak GiB (step) | peak GiB (run) | "
             "process start to first step, s | compile cache | result |", "|" + "---|" * 10]
    for r in results:
        layout = f"{r['batch_size']} x {r['grad_accum']}" if r.get("batch_size") else ""
        status = "ok" if not r.get("error") else _first_words(r["error"])
        if (r.get("error") or "").startswith("stopped") and r.get("warm_up_lines"):
            status += f" (last: {r['warm_up_lines'][-1]})"
        lines.append(f"| {r['row']} | {r['run']} | {card(r, info['smoke'])} | {layout} | {_cell(r.get('s_per_image'))} | "
                     f"{_cell(r.get('peak_gib_steps'))} | {_cell(r.get('peak_gib_session'))} | "
                     f"{_cell(r.get('seconds_to_first_step'), '{:.1f}')} | {r.get('compile_cache', '')} | {status} |")
    path = out / f"whole_run-{stamp}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
