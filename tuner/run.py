"""Command line: `python -m tuner.run [--config run.yaml] [--model M] [--resume latest] [key=value ...]`.

With no arguments it runs the embedded default (tuner/configs/default.yaml). Multi-GPU and
multi-node: `accelerate launch -m tuner.run ...` (one process per GPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

EXTRA_MODULES = {"yaml": "pyyaml", "diffusers": "diffusers", "peft": "peft", "accelerate": "accelerate"}


def missing_extra() -> list[str]:
    """Distributions of the `tuner` extra that are not installed (the rewards package alone does not need them)."""
    return [dist for module, dist in EXTRA_MODULES.items() if importlib.util.find_spec(module) is None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags plus free `key=value` overrides (dotted keys for sections: train.lr=1e-4)."""
    p = argparse.ArgumentParser(prog="python -m tuner.run", description=__doc__.split("\n")[0],
                                epilog="Every option and its default: docs/tuner.md (or python -m tuner.config).")
    p.add_argument("--config", help="YAML run configuration (default: the embedded tuner/configs/default.yaml)")
    p.add_argument("--model", help="diffusers repo id or local folder (SDXL, SD 1.5, SD3 / SD3.5, FLUX.1), shapes-sd, shapes-flow, or a "
                   "tiny random pipeline (tiny-sdxl, tiny-sd15, tiny-sd3, tiny-flux, tiny-flux-schnell)")
    p.add_argument("--resume", help="checkpoint folder, run folder, or latest")
    p.add_argument("--name", help="run name (the run writes to <output_dir>/<name>)")
    p.add_argument("--output-dir", help="folder that holds the runs")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--check", action="store_true", help="validate the configuration and exit (loads no model)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4 reward=aesthetic")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse, validate (before any model loads), then train; configuration errors exit with status 2."""
    args = parse_args(argv)
    missing = missing_extra()
    if missing:
        print(f"error: the tuner needs the 'tuner' extra, and {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not installed. Install it with: "
              "pip install 'drtune-rewards[tuner]'", file=sys.stderr)
        return 2
    import yaml

    from tuner.config import ConfigError, load_config, to_dict, validate

    overrides = list(args.overrides)
    for flag, key in (("model", "model"), ("resume", "resume"), ("name", "name"), ("output_dir", "output_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = validate(load_config(args.config, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.check:
        print("configuration OK")
        return 0
    from tuner.memory import OutOfMemory
    from tuner.train import NonFiniteError, train

    try:
        summary = train(cfg)
    except (ConfigError, NonFiniteError, OutOfMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if summary:
        if "judge_before" in summary:
            print("ground truth (shapes judge, evaluation prompts): " + ", ".join(
                f"{k} {v:.2f} -> {summary['judge_after'].get(k, float('nan')):.2f}" for k, v in summary["judge_before"].items()))
        if "ground_truth" in summary:
            from tuner.logging import ground_truth_lines

            print(ground_truth_lines(summary["ground_truth"]))
        print(f"done: {summary['run_dir']} (final weights: {summary['final_weights']})")
        if summary.get("peak_gib_steps") is not None:
            print(f"GPU memory: peak {summary['peak_gib_steps']:.2f} GiB a step, {summary['peak_gib_session']:.2f} GiB "
                  f"in all, of {summary['gpu_memory_gib']:.2f} GiB on {summary['gpu']}")
        if summary.get("seconds_to_first_step") is not None:
            print(f"warm-up: {summary['seconds_to_first_step']:.1f} s from process start to the end of the first "
                  "optimizer step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
