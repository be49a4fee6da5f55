"""benchmarks.plots: the figures' points are the committed JSON rows, and both figures are written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import plots

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _row(name: str, key: str) -> dict:
    return json.loads((RESULTS / name).read_text())["rows"][key]


def test_time_points_are_the_json_rows():
    points = plots.time_points(RESULTS)
    assert all(points.values())
    b5 = _row("tuner_methods-20261203-h200-compiled-b5-ksweep.json", "engine: drtune (K=5, default) [batch 5]")
    b3 = _row("tuner_methods-20261203-h200-compiled-b3-variants.json",
              "engine: drtune (K=5, default), sampling calls bf16 [batch 3]")
    compiled = dict(points["every block compiled (train.compile)"])
    assert compiled[5] == pytest.approx(b5["s_per_iter"] / 5) and compiled[3] == pytest.approx(b3["s_per_iter"] / 3)
    assert sorted(compiled) == [3, 5, 6]


def test_memory_points_cover_k_and_leave_out_sampling():
    for label, pts in plots.memory_points(RESULTS).items():
        assert [k for k, _ in pts] == [1, 5, 25], label
    k25 = _row("tuner_methods-20261203-h200-compiled-b5-ksweep.json", "engine: drtune K=25 [batch 5]")
    assert dict(plots.memory_points(RESULTS)["compiled, batch 5"])[25] == k25["peak_gib"]


def test_trl_points_and_figures(tmp_path):
    data = plots.trl_points(RESULTS)
    assert sorted(data) == [10, 50] and all(set(d) == {"trl", "engine", "engine-low", "engine-compiled"}
                                             for d in data.values())
    plots.main(["--results", str(RESULTS), "--out", str(tmp_path)])
    for name in ("tuning_step-20261203-h200.png", "alignprop_trl-20261203-h200.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
