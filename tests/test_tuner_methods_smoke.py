"""benchmarks.tuner_methods on the tiny SDXL (CPU): every variant gets its rows, the engine's phases add up, and the
channels-last switch reaches the run's description."""
from __future__ import annotations

import json
import sys

import pytest

from benchmarks import tuner_methods

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def test_variants_and_phases(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tuner_methods", "--smoke", "--resolution", "64", "--steps", "6", "--iters", "1",
                                      "--variants", "bf16", "fp8", "--phases", "--channels-last", "--k-sweep", "--naive-k",
                                      "--only", "drtune (K=5", "sampling", "--out", str(tmp_path)])
    tuner_methods.main()
    result = json.loads((tmp_path / "tuner_methods.json").read_text())
    rows = result["rows"]
    assert result["meta"]["channels_last"] and "channels-last" in result["meta"]["dtype"]
    assert sorted(rows) == sorted(f"{case}, sampling calls {v} [batch 1]" for v in ("bf16", "fp8")
                                  for case in ("sampling only (no grad)", "engine: drtune (K=5, default)"))
    for name, row in rows.items():
        assert row["s_per_iter"] > 0
        if name.startswith("engine"):
            phases = row["phases_s"]
            assert set(phases) == set(tuner_methods.PHASES.values())
            assert 0 < sum(phases.values()) <= row["s_per_iter"] * 1.05
        else:
            assert "phases_s" not in row
    assert "sample / decode+reward bwd / sweep" in (tmp_path / "tuner_methods.md").read_text()
