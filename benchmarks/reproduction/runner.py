"""Run a profile's cells in parallel worker processes, one fresh process per cell, appending results as they end.

Each cell runs as `python -m benchmarks.reproduction cell ...` in its own process (so its peak memory is its
own, and a crash costs one cell), which writes <runs>/<id>/result.json; the parent appends that row to the
results file the moment the process ends. Cells whose id already has an "ok" row are skipped, so a run killed
at the end of a lease loses only the cells in flight, and the next run continues.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.reproduction.study import PROFILES, RESULTS, RUNS, Profile, base_id, cells, read_rows, write_row

RESULT = "result.json"
LOG = "log.txt"


@dataclass(frozen=True)
class Job:
    """A cell or a base-model evaluation, as the runner schedules it."""

    id: str
    base_prompts: str | None = None  # for a base job: the prompt list (None: the profile's)
    is_base: bool = False
    steps: int = 0  # optimizer steps (0 for a base job)


def jobs(p: Profile, groups: tuple[str, ...] | None = None) -> list[Job]:
    """The base evaluations the cells need, then the cells in priority order."""
    todo = cells(p, groups)
    prompt_lists = dict.fromkeys(c.prompts for c in todo)
    return [Job(base_id(w), w, True) for w in prompt_lists] + [Job(c.id, steps=c.steps) for c in todo]


def paths(profile: str, results: Path | None = None, runs: Path | None = None) -> tuple[Path, Path]:
    """(results folder, runs folder) of a profile."""
    return (results or RESULTS) / profile, (runs or RUNS) / profile


def _launch(job: Job, profile: str, results_dir: Path, runs_dir: Path, threads: int) -> subprocess.Popen:
    folder = runs_dir / job.id
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt
    folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.reproduction", "cell", "--profile", profile, "--id", job.id,
           "--results", str(results_dir.parent), "--runs", str(runs_dir.parent), "--threads", str(threads)]
    with (folder / LOG).open("w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[2])


def _harvest(job: Job, runs_dir: Path, returncode: int | None, seconds: float | None) -> dict[str, Any]:
    """The row a finished process left, or an error row with the end of its log."""
    folder = runs_dir / job.id
    if (folder / RESULT).is_file():
        return json.loads((folder / RESULT).read_text())
    log = (folder / LOG).read_text()[-3000:] if (folder / LOG).is_file() else ""
    return {"id": job.id, "status": "error", "returncode": returncode, "seconds": seconds, "log_tail": log}


def pending(profile: str, groups: tuple[str, ...] | None, results_dir: Path, runs_dir: Path) -> list[Job]:
    """Jobs without an ok row; rows that finished processes left unharvested (a killed parent) are filed first."""
    results_file = results_dir / "results.jsonl"
    done = {r["id"] for r in read_rows(results_file) if r.get("status") == "ok"}
    todo = [j for j in jobs(PROFILES[profile], groups) if j.id not in done]
    for job in [j for j in todo if (runs_dir / j.id / RESULT).is_file()]:
        write_row(results_file, _harvest(job, runs_dir, 0, None))
        todo.remove(job)
    return todo


class _Pool:
    """The cell processes in flight, and the pace (seconds per optimizer step) of those finished, per variant."""

    def __init__(self, profile: str, results_dir: Path, runs_dir: Path, threads: int):
        self.profile, self.results_dir, self.runs_dir, self.threads = profile, results_dir, runs_dir, threads
        self.running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
        self.pace: dict[str, list[float]] = {}
        self.ok, self.start = 0, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def launch(self, job: Job) -> None:
        proc = _launch(job, self.profile, self.results_dir, self.runs_dir, self.threads)
        self.running[job.id] = (job, proc, time.monotonic())

    def reap(self, waiting: int) -> None:
        """File the rows of the processes that ended."""
        for job_id, (job, proc, began) in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[job_id]
            seconds = time.monotonic() - began
            row = _harvest(job, self.runs_dir, proc.returncode, seconds)
            write_row(self.results_dir / "results.jsonl", row)
            if row["status"] == "ok":
                self.ok += 1
                if job.steps:
                    self.pace.setdefault(variant(job.id), []).append(seconds / job.steps)
            print(f"[{self.elapsed():7.0f}s] {row['status']:5s} {job_id} ({len(self.running)} running, "
                  f"{waiting} waiting)", flush=True)


def run(profile: str, *, groups: tuple[str, ...] | None = None, workers: int = 1, threads: int = 1,
        start_until_min: float | None = None, stop_at_min: float | None = None, results: Path | None = None,
        runs: Path | None = None, limit: int | None = None) -> int:
    """Run every pending job of the profile (at most `workers` at a time); returns how many ended ok.

    No job starts after `start_until_min` minutes, nor one that would not end by `stop_at_min` at the pace
    of the cells finished so far; at `stop_at_min` the jobs still running are killed (they run again next time)
    so that the caller can save the results before its own time is up.
    """
    results_dir, runs_dir = paths(profile, results, runs)
    todo = pending(profile, groups, results_dir, runs_dir)[:limit]
    print(f"{profile}: {len(todo)} to run with {workers} workers", flush=True)
    pool = _Pool(profile, results_dir, runs_dir, threads)
    while todo or pool.running:
        may_start = start_until_min is None or pool.elapsed() < 60 * start_until_min
        while may_start and len(pool.running) < workers:
            job = next((j for j in todo if _fits(j, pool.elapsed(), pool.pace, stop_at_min)), None)
            if job is None:
                break
            todo.remove(job)
            pool.launch(job)
        if not pool.running:
            break
        if stop_at_min is not None and pool.elapsed() >= 60 * stop_at_min:
            _stop(pool.running)
            break
        time.sleep(0.5)
        pool.reap(len(todo))
    if todo or pool.running:
        print(f"stopped: {len(todo) + len(pool.running)} cells left for the next run", flush=True)
    return pool.ok


def variant(job_id: str) -> str:
    """The method variant of a cell id (its part before the reward): cells of one variant run at one pace."""
    return job_id.split("__")[0]


def _fits(job: Job, elapsed: float, pace: dict[str, list[float]], stop_at_min: float | None) -> bool:
    """Whether the job would end before the stop time: at the slowest pace its variant ran at so far, else
    at the median pace of every cell finished (none finished yet: yes)."""
    if stop_at_min is None or not pace or not job.steps:
        return True
    seen = pace.get(variant(job.id)) or [statistics.median(p for ps in pace.values() for p in ps)]
    return elapsed + 1.1 * max(seen) * job.steps < 60 * stop_at_min


def _stop(running: dict[str, tuple[Job, subprocess.Popen, float]]) -> None:
    """Kill the cell processes this runner started and still runs; their cells stay pending."""
    for job_id, (_, proc, _) in running.items():
        proc.kill()
        proc.wait()
        print(f"killed {job_id} at the stop time; it runs again next time", flush=True)


def run_job(profile: str, job_id: str, results: Path | None = None, runs: Path | None = None) -> dict[str, Any]:
    """Run one job in this process and write its result.json (and its sample strip); returns the row."""
    from benchmarks.reproduction.study import GROUPS, run_base, run_cell

    p = PROFILES[profile]
    results_dir, runs_dir = paths(profile, results, runs)
    base = {j.id: j for j in jobs(p, GROUPS) if j.is_base}
    if job_id in base:
        out, seed0 = run_base(p.settings, runs_dir, base[job_id].base_prompts), True
    else:
        cell = {c.id: c for c in cells(p, GROUPS)}[job_id]
        out, seed0 = run_cell(cell, p.settings, runs_dir), cell.seed == p.settings.seeds[0]
    if seed0:
        save_strip(out["images"][: p.settings.grid_prompts], results_dir / "samples" / f"{job_id}.png")
    folder = runs_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (RESULT + ".tmp")).write_text(json.dumps(out["row"]))
    os.replace(folder / (RESULT + ".tmp"), folder / RESULT)
    return out["row"]


def save_strip(images, path: Path, pad: int = 2) -> Path:
    """Images [N,3,H,W] in [0,1] side by side in one PNG."""
    from PIL import Image

    from tuner.logging import to_pil

    n, _, h, w = images.shape
    canvas = Image.new("RGB", (n * w + (n + 1) * pad, h + 2 * pad), "white")
    for i in range(n):
        canvas.paste(to_pil(images[i]), (pad + i * (w + pad), pad))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
