"""The fair test of the reproduction study (profile `fair`, docs/reproduction.md): cells at several learning rates
and with guards, each scored by the ground-truth judge; the report compares methods at matched side effects."""
import json

import pytest
import torch

from benchmarks.reproduction import fair, report
from benchmarks.reproduction.study import GUARDS, PROFILES, cells, config, run_base, run_cell, write_row


def test_every_method_runs_at_every_rate_and_each_guard_once():
    p = PROFILES["fair"]
    found = cells(p)
    methods, s = 6, p.settings
    assert len(s.lrs) >= 4 and all(2.5 < b / a < 4 for a, b in zip(s.lrs, s.lrs[1:]))  # log-spaced
    fair_cells = [c for c in found if "fair" in c.groups]
    assert len(fair_cells) == methods * len(s.lrs) * len(s.fair_rewards) * len(s.seeds)
    guarded = [c for c in found if c.guards]
    assert len(guarded) == (len(GUARDS) - 1) * len(s.fair_rewards) * len(s.seeds)
    # the unguarded guard run is the fair group's DRTune at the guard rate: one cell in both groups
    shared = [c for c in found if c.groups == ("fair", "guards")]
    assert len(shared) == len(s.fair_rewards) * len(s.seeds) and all(c.lr == s.guard_lr for c in shared)
    assert len({c.id for c in found}) == len(found)


def test_cell_configs_carry_rate_guards_and_judge(tmp_path):
    p = PROFILES["fair"]
    for cell in (c for c in cells(p) if c.seed == 0 and c.reward == "symmetry" and c.label.startswith("DRTune")):
        cfg = config(cell, p.settings, tmp_path)  # validated by the tuner
        assert cfg.train.lr == cell.lr and cfg.log.judge_captions == 128
        for key, value in cell.guards:
            assert getattr(cfg.guards, key) == (list(value) if isinstance(value, tuple) else value)


def _row(label: str, lr: float, gain: float, effect: float, seed: int = 0, guards=(), groups=("fair",)) -> dict:
    rate = lambda r: {c: {"rate": r} for c in fair.CHECKS}  # noqa: E731
    return {"id": f"{label}{lr}{seed}{guards}", "label": label, "status": "ok", "reward": "symmetry", "seed": seed,
            "lr": lr, "groups": list(groups), "guards": fair._plain(guards), "prompts": None,
            "heldout": {"symmetry": 0.5 + gain}, "ground_truth": {"before": rate(0.9), "after": rate(0.9 + effect / 100)}}


def _results(rows):
    base = {"id": "base", "label": "base", "status": "ok", "prompts": None, "heldout": {"symmetry": 0.5}}
    return report.Results(PROFILES["fair"], [base] + rows)


def test_front_and_matched_side_effects():
    rows = [_row("DRTune", 1e-4, 0.01, 0.0), _row("DRTune", 3e-4, 0.03, -0.5), _row("DRTune", 1e-3, 0.08, -4.0),
            _row("DRTune", 3e-3, 0.06, -9.0),  # dominated: less gain and more loss than 1e-3
            _row("ReFL", 1e-4, 0.005, 0.0), _row("ReFL", 3e-4, 0.02, -2.0)]
    res = _results(rows)
    pts = fair.points(res, "symmetry", "DRTune")
    assert [round(p[1], 6) for p in fair.front(pts)] == [0.08, 0.03, 0.01]  # ordered by side effect
    assert fair.best_within(pts)[0] == 3e-4  # 1e-3 gains more but loses 4 points
    assert fair.best_within(fair.points(res, "symmetry", "ReFL"))[0] == 1e-4
    table = fair.matched_table(res)
    assert "| symmetry | DRTune | 0.0003 | +0.03 | -0.50 | 4 |" in table
    assert fair.along(pts, 0.055) == pytest.approx(-0.5 + (-4.0 + 0.5) * 0.5)  # on the front: 0.03 to 0.08
    assert fair.along(pts, 0.09) is None


def test_a_guard_is_compared_with_the_unguarded_curve_at_its_own_gain():
    kl = GUARDS["KL 1.0"]
    rows = [_row("DRTune", 1e-4, 0.0, 0.0), _row("DRTune", 1e-3, 0.1, -10.0),
            _row("DRTune, KL 1.0", 3e-3, 0.05, -1.0, guards=kl, groups=("guards",))]
    table = fair.guards_table(_results(rows))
    assert "| symmetry | KL 1.0 |" in table and "| -5.00 | +4.00 |" in table  # 4 points less lost at that gain


def test_tiny_fair_study_runs_and_reports(tmp_path, monkeypatch):
    """The fair-ci profile end to end on the CPU: rows with rate, guards and judge figures, then the report. The
    base model's held-out test runs once: every later cell reads the first cell's tallies."""
    import tuner.train

    judged, ground_truth = [], tuner.train.ground_truth
    monkeypatch.setattr(tuner.train, "ground_truth", lambda *a, **k: judged.append(1) or ground_truth(*a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        p, runs = PROFILES["fair-ci"], tmp_path / "runs"
        rows = [run_base(p.settings, runs)["row"]] + [run_cell(c, p.settings, runs)["row"] for c in cells(p)]
    finally:
        torch.set_num_threads(threads)
    assert len(judged) == 1 + len(rows[1:])  # one base test, then each cell's tuned model
    assert len({json.dumps(r["ground_truth"]["before"], sort_keys=True) for r in rows[1:]}) == 1
    for row in rows[1:]:
        truth = row["ground_truth"]
        assert truth["captions"] == 4 and set(truth["before"]) == set(fair.CHECKS)
        assert row["lr"] in p.settings.lrs and row["skipped_steps"] == 0
    assert {json.dumps(r["guards"]) for r in rows[1:]} == {"{}", '{"kl_weight": 1.0}'}
    folder = tmp_path / "fair-ci"
    for row in rows:
        write_row(folder / "results.jsonl", json.loads(json.dumps(row)))
    text = report.report("fair-ci", results=tmp_path).read_text()
    assert "### At matched side effects" in text and "| symmetry | KL 1.0 |" in text
    assert (folder / "fronts.png").is_file() and "DRTune" in json.loads((folder / "fair.json").read_text())["symmetry"]
