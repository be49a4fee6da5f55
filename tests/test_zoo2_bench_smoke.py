"""The reward-gradient suite's opt-in cases of imscore's own rewards and Aesthetic Shadow, in smoke mode: ours and
imscore's models on the same files run, give one finite score per image and a pixel gradient, and agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.reward_models import ZOO2_REWARDS

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_cases_run_ours_and_imscore(tmp_path):
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("imscore")
    cmd = [sys.executable, "-m", "benchmarks.reward_gradients", "--smoke", "--names", ",".join(ZOO2_REWARDS),
           "--dtypes", "fp32", "--variants", "eager", "--out", str(tmp_path), "--weights", str(tmp_path / "weights")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    report = next(p for p in tmp_path.glob("reward_gradients-*.json") if not p.name.endswith(".pytest-benchmark.json"))
    rows = json.loads(report.read_text())["rows"]
    seen = {(r["reward"], r["impl"]) for r in rows}
    assert seen == {(name, impl) for name in ZOO2_REWARDS for impl in ("ours", "imscore")}, seen
    for row in rows:
        assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0, row
        if row["impl"] == "imscore":  # same weights, the same preprocessing up to PIL's 8-bit rounding (Shadow)
            assert row["score_rel_diff_vs_ours_eager"] < 0.02, row
