"""Command line: `python -m tuner.run [--config run.yaml] [--model M] [--resume latest] [key=value ...]`.

With no arguments it runs the embedded default (tuner/configs/default.yaml). Multi-GPU and
multi-node: `accelerate launch -m tuner.run ...` (one process per GPU).
"""
from __future__ import annotations

import argparse
import sys

import yaml

from tuner.config import DEFAULT_CONFIG, ConfigError, load_config, to_dict, validate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags plus free `key=value` overrides (dotted keys for sections: train.lr=1e-4)."""
    p = argparse.ArgumentParser(prog="python -m tuner.run", description=__doc__.split("\n")[0],
                                epilog="Every option and its default: docs/tuner.md (or python -m tuner.config).")
    p.add_argument("--config", help=f"YAML run configuration (default: the embedded {DEFAULT_CONFIG.name})")
    p.add_argument("--model", help="diffusers repo id or local folder (SDXL or SD 1.5), or tiny-sdxl / tiny-sd15")
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
    from tuner.train import NonFiniteError, train

    try:
        summary = train(cfg)
    except (ConfigError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if summary:
        print(f"done: {summary['run_dir']} (final weights: {summary['final_weights']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
