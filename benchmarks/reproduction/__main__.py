"""Command line of the reproduction study (docs/reproduction.md).

    python -m benchmarks.reproduction list   --profile full                  # cells, and which are done
    python -m benchmarks.reproduction run    --profile full --workers 12 --start-until 24
    python -m benchmarks.reproduction run    --profile full --groups cost --workers 1
    python -m benchmarks.reproduction report --profile full                  # tables (report.md) and plots
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Subcommand and options."""
    from benchmarks.reproduction.study import GROUPS, PROFILES

    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduction", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["list", "run", "report", "cell"])
    p.add_argument("--profile", default="full", choices=sorted(PROFILES))
    p.add_argument("--groups", help=f"comma-separated groups to run (default: the profile's); of {', '.join(GROUPS)}")
    p.add_argument("--workers", type=int, default=1, help="cells run at once, each its own process")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell process")
    p.add_argument("--start-until", type=float, help="start no new cell after this many minutes")
    p.add_argument("--stop-at", type=float, help="kill the cells still running after this many minutes and exit")
    p.add_argument("--limit", type=int, help="run at most this many pending cells")
    p.add_argument("--results", type=Path, help="results root (default benchmarks/results/reproduction)")
    p.add_argument("--runs", type=Path, help="run folders root (default runs/reproduction)")
    p.add_argument("--id", help="cell: the id of the one cell to run in this process")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Dispatch the subcommand."""
    args = parse_args(argv)
    groups = tuple(args.groups.split(",")) if args.groups else None
    if args.command == "cell":
        import torch

        from benchmarks.reproduction.runner import run_job

        torch.set_num_threads(args.threads)
        run_job(args.profile, args.id, args.results, args.runs)
        return 0
    if args.command == "run":
        from benchmarks.reproduction.runner import run

        run(args.profile, groups=groups, workers=args.workers, threads=args.threads,
            start_until_min=args.start_until, stop_at_min=args.stop_at, results=args.results, runs=args.runs,
            limit=args.limit)
        return 0
    if args.command == "list":
        from benchmarks.reproduction.runner import jobs, paths
        from benchmarks.reproduction.study import PROFILES, read_rows

        results_dir, _ = paths(args.profile, args.results, args.runs)
        done = {r["id"]: r["status"] for r in read_rows(results_dir / "results.jsonl")}
        todo = jobs(PROFILES[args.profile], groups)
        for job in todo:
            print(f"{done.get(job.id, '-'):5s} {job.id}")
        print(f"{sum(done.get(j.id) == 'ok' for j in todo)} of {len(todo)} done")
        return 0
    from benchmarks.reproduction.report import report

    report(args.profile, results=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
