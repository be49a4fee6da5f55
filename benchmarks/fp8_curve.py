"""Does fp8 sampling (train.fp8_sampling) change what a tuning run learns? The same runs with it off and on.

    python -m benchmarks.fp8_curve --out benchmarks/results/fp8_curve --seeds 0 1 2 --workers 6

Each seed runs `python -m tuner.run` twice with identical settings (the embedded default unless --config / key=value
overrides say otherwise): once with the gradient-free sampling calls in the run's precision, once in fp8. Same seed,
same prompts and noise: the runs differ only by the fp8 rounding of the frozen calls. The seed-to-seed spread of the
plain runs is the yardstick of "unchanged". Writes fp8_curve.json, .md and .png (train and eval reward curves).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tuner.logging import METRICS, read_metrics

SETTINGS = {"plain": "false", "fp8": "true"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_curve"))
    ap.add_argument("--runs", type=Path, default=None, help="where the runs write (default: OUT/runs)")
    ap.add_argument("--config", default=None, help="run configuration (default: the embedded default)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (one GPU holds several small runs)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return ap.parse_args(argv)


def command(args: argparse.Namespace, setting: str, seed: int) -> list[str]:
    """The tuner command of one run."""
    cmd = [sys.executable, "-m", "tuner.run", "--name", f"{setting}-seed{seed}", "--output-dir", str(_runs(args))]
    if args.config:
        cmd += ["--config", args.config]
    return cmd + [*args.overrides, f"train.seed={seed}", f"train.fp8_sampling={SETTINGS[setting]}",
                  "log.progress=false", "log.tensorboard=false"]


def _runs(args: argparse.Namespace) -> Path:
    return args.runs or args.out / "runs"


def run_all(args: argparse.Namespace) -> dict[str, float]:
    """Every (setting, seed) run, `workers` at a time; returns each run's wall seconds. A failed run stops all."""
    queue = [(setting, seed) for seed in args.seeds for setting in SETTINGS]
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    seconds = {}
    while queue or running:
        while queue and len(running) < args.workers:
            key = queue.pop(0)
            log = open(_runs(args) / f"{key[0]}-seed{key[1]}.log", "w")
            running[key] = (subprocess.Popen(command(args, *key), stdout=log, stderr=subprocess.STDOUT), time.time())
        time.sleep(1)
        for key, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            if proc.returncode:
                for other, _ in running.values():
                    other.kill()
                raise SystemExit(f"run {key} failed ({proc.returncode}); see {_runs(args)}/{key[0]}-seed{key[1]}.log")
            seconds[f"{key[0]}-seed{key[1]}"] = round(time.time() - start, 1)
    return seconds


def curves(runs: Path, name: str) -> dict[str, list[list[float]]]:
    """[step, value] pairs of the train reward and of the eval reward of one run."""
    rows = read_metrics(runs / name / METRICS)
    return {key: [[r["step"], r[key]] for r in rows if r.get(key) is not None] for key in ("reward", "eval/reward")}


def summarize(runs: Path, seeds: list[int]) -> dict:
    """Per run: its curves and eval rewards; per seed: fp8 minus plain; the plain runs' seed-to-seed spread."""
    result = {"runs": {}, "seeds": seeds}
    for setting in SETTINGS:
        for seed in seeds:
            result["runs"][f"{setting}-seed{seed}"] = curves(runs, f"{setting}-seed{seed}")
    final = {k: v["eval/reward"][-1][1] for k, v in result["runs"].items()}
    gain = {k: v["eval/reward"][-1][1] - v["eval/reward"][0][1] for k, v in result["runs"].items()}
    result["final_eval"] = final
    result["eval_gain"] = gain
    result["fp8_minus_plain_final"] = {s: final[f"fp8-seed{s}"] - final[f"plain-seed{s}"] for s in seeds}
    plain = [gain[f"plain-seed{s}"] for s in seeds]
    result["plain_gain_std"] = statistics.stdev(plain) if len(plain) > 1 else None
    result["mean_gain"] = {setting: statistics.fmean(gain[f"{setting}-seed{s}"] for s in seeds) for setting in SETTINGS}
    return result


def plot(result: dict, path: Path) -> Path:
    """Train reward (running mean) and eval reward against step, plain vs fp8, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"plain": "tab:blue", "fp8": "tab:orange"}
    for name, run in result["runs"].items():
        setting = name.split("-")[0]
        steps, values = zip(*run["reward"]) if run["reward"] else ((), ())
        window = 10
        smooth = [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]
        kwargs = dict(color=colours[setting], alpha=0.8, lw=1.2, label=setting if name.endswith(f"seed{result['seeds'][0]}") else None)
        axes[0].plot(steps, smooth, **kwargs)
        axes[1].plot(*zip(*run["eval/reward"]), marker="o", **kwargs)
    axes[0].set(title="train reward (running mean of 10 steps)", xlabel="step", ylabel="reward")
    axes[1].set(title="eval reward (held-out prompts, fixed seeds)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(args: argparse.Namespace, result: dict, meta: dict) -> None:
    """fp8_curve.json, .md (table) and .png."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_curve.json").write_text(json.dumps({"meta": meta, **result}, indent=2))
    plot(result, args.out / "fp8_curve.png")
    lines = [f"{meta['device']}; torch {meta['torch']}; {meta['date']}; `{meta['command']}`", "",
             "| seed | eval reward before | after, plain | after, fp8 | fp8 - plain |", "|---|---|---|---|---|"]
    for s in result["seeds"]:
        before = result["runs"][f"plain-seed{s}"]["eval/reward"][0][1]
        lines.append(f"| {s} | {before:.4f} | {result['final_eval'][f'plain-seed{s}']:.4f} | "
                     f"{result['final_eval'][f'fp8-seed{s}']:.4f} | {result['fp8_minus_plain_final'][s]:+.4f} |")
    std = result["plain_gain_std"]
    spread = f"; seed-to-seed std of the plain gains: {std:.4f}" if std is not None else ""
    lines += ["", f"Mean eval gain: plain {result['mean_gain']['plain']:+.4f}, fp8 {result['mean_gain']['fp8']:+.4f}"
              + spread]
    (args.out / "fp8_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    _runs(args).mkdir(parents=True, exist_ok=True)
    seconds = run_all(args)
    result = summarize(_runs(args), args.seeds)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "seconds": seconds, "overrides": args.overrides, "config": args.config,
            "command": "python -m benchmarks.fp8_curve " + " ".join(sys.argv[1:] if argv is None else argv)}
    write(args, result, meta)


if __name__ == "__main__":
    main()
