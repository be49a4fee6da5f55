"""Relation runs on shapes-sd: one tuner run per setting, judged on held-out captions; every setting logged.

    python -m benchmarks.shapes_relation --name clip-lr1e-3 reward=shapes-clip train.lr=1e-3
    python -m benchmarks.shapes_relation --table        # the log as a markdown table (docs/tuner.md)

Each run is `python -m tuner.run --config tuner/configs/shapes_relation.yaml <overrides>`: DRTune on two-shape
captions of the training seed (shapes_pairs), gallery on seed 2, keep-best selection (where a setting turns it on) on
seed 3, and the ground-truth judge (tuner.shapes.judge) on `log.judge_captions` held-out captions (seed 1) x
`log.judge_seeds` noise seeds, before and after. The base model's figures depend only on those captions, seeds and
the sampler, so they are computed once and reused (a run folder that holds ground_truth_before.json skips them).
Each setting appends one JSON line to benchmarks/results/shapes_relation.jsonl: its overrides, the judge's tallies
before and after, and the seconds it took.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

CONFIG = Path(__file__).parents[1] / "tuner" / "configs" / "shapes_relation.yaml"
LOG = Path(__file__).parent / "results" / "shapes_relation.jsonl"
CHECKS = ("colors", "background", "place", "relation", "all")


def before_key(cfg) -> str:
    """What the base model's ground truth depends on: the held-out captions (set by the training prompts), their
    seeds and the sampler."""
    s = cfg.sampling
    return (f"{cfg.prompts.file}-n{cfg.log.judge_captions}-s{cfg.log.judge_seeds}-{s.scheduler}{s.num_steps}"
            f"-g{s.guidance_scale}")


def run(name: str, overrides: list[str], output_dir: Path, log: Path = LOG, note: str = "") -> dict:
    """One tuner run of the relation config with `overrides`; its judged figures, appended to `log`."""
    from tuner.config import load_config, validate
    from tuner.train import train

    cfg = validate(load_config(str(CONFIG), [*overrides, f"name={name}", f"output_dir={output_dir}"]))
    cache = output_dir / "base" / f"{before_key(cfg)}.json"
    run_dir = output_dir / name
    if cache.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(cache, run_dir / "ground_truth_before.json")
    start = time.time()
    summary = train(cfg)
    seconds = time.time() - start
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "ground_truth_before.json", cache)
    truth = summary["ground_truth"]
    row = {"name": name, "overrides": overrides, "captions": truth["captions"], "seeds": truth["seeds"],
           "before": {k: [round(v["rate"] * v["n"]), v["n"]] for k, v in truth["before"].items()},
           "after": {k: [round(v["rate"] * v["n"]), v["n"]] for k, v in truth["after"].items()},
           "eval_reward": [summary.get("eval_reward_before"), summary.get("eval_reward_after")],
           "seconds": round(seconds), "date": time.strftime("%Y-%m-%d"), "note": note}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(log: Path = LOG) -> str:
    """The log as a markdown table: each setting's judged rates after the run (the base model's first); a setting
    stopped before its held-out test shows its note instead."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    head = "| setting | overrides | " + " | ".join(CHECKS) + " | seconds | note |"
    out = [head, "|" + "---|" * (len(CHECKS) + 4)]
    seen = set()
    for row in rows:
        key = (row["captions"], row["seeds"], json.dumps(row["before"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            cells = [f"{100 * p / n:.1f}" for p, n in (row["before"][c] for c in CHECKS)]
            base = f"| base model ({row['captions']} x {row['seeds']} seeds) | - | "
            out.append(base + " | ".join(cells) + " | - | |")
        cells = ([f"{100 * p / n:.1f}" for p, n in (row["after"][c] for c in CHECKS)] if row.get("after")
                 else ["-"] * len(CHECKS))
        seconds = row.get("seconds") or "-"
        out.append(f"| {row['name']} | `{' '.join(row['overrides'])}` | " + " | ".join(cells)
                   + f" | {seconds} | {row.get('note', '')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shapes_relation", description=__doc__.split("\n")[0])
    p.add_argument("--name", help="the setting's name (its run folder)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/shapes_relation"))
    p.add_argument("--log", type=Path, default=LOG)
    p.add_argument("--note", default="", help="what the log should say about this setting (e.g. its reward weights)")
    p.add_argument("--table", action="store_true", help="print the log as a markdown table and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.log))
        return 0
    if not args.name:
        p.error("--name is required for a run")
    row = run(args.name, args.overrides, args.output_dir, args.log, args.note)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
