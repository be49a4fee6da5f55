"""The fair test's report (profile `fair`, docs/reproduction.md): every method at several learning rates, each run
scored by its tuned reward and by the ground-truth judge, compared at matched side effects; and the guards.

Side effect = the change of the judge's pass rate over all checks (tuner.shapes.judge, held-out captions), after
minus before, in points. A method's Pareto front: its runs (mean over seeds per learning rate) that no other of its
runs beats on both tuned-reward gain and side effect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.reproduction.report import Results, Row, _plt, _save, _table, fmt, stats
from benchmarks.reproduction.study import GUARDS, variants

CHECKS = ("all", "colors", "background", "place", "relation")
MATCHED_LOSS = 1.0  # points of the judge's "all" rate a run may lose and still count as free of side effects


def truth_change(row: Row, check: str = "all") -> float:
    """After minus before of the judge's pass rate of `check`, in points."""
    truth = row["ground_truth"]
    return 100 * (truth["after"][check]["rate"] - truth["before"][check]["rate"])


def fair_rows(res: Results, reward: str, label: str) -> dict[float, list[Row]]:
    """The fair group's rows of one method and reward, by learning rate (every seed)."""
    out: dict[float, list[Row]] = {}
    for r in res.rows:
        if "fair" in r.get("groups", ()) and r["reward"] == reward and r["label"] == label and r.get("ground_truth"):
            out.setdefault(r["lr"], []).append(r)
    return dict(sorted(out.items()))


def points(res: Results, reward: str, label: str) -> list[tuple[float, float, float]]:
    """(learning rate, mean gain, mean side effect) of a method on a reward, by learning rate."""
    return [(lr, stats(res.gains(rows, reward))[0], stats(truth_change(r) for r in rows)[0])
            for lr, rows in fair_rows(res, reward, label).items()]


def front(pts: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """The points no other point beats on both gain (higher) and side effect (higher: less ground truth lost)."""
    return sorted((p for p in pts if not any(q[1] >= p[1] and q[2] >= p[2] and q != p for q in pts)),
                  key=lambda p: p[2])


def labels(res: Results) -> list[str]:
    """The method labels of the fair group, in the study's order."""
    return list(res.p.methods or variants(res.s))


def fair_table(res: Results, reward: str) -> str:
    """Method x learning rate: tuned-reward gain and the change of every check, mean ± std over seeds."""
    body = []
    for label in labels(res):
        for lr, rows in fair_rows(res, reward, label).items():
            body.append([label, f"{lr:g}", fmt(res.gains(rows, reward))] +
                        [fmt(truth_change(r, c) for r in rows) for c in CHECKS])
    return _table(["method", "lr", f"{reward} gain"] + [f"{c} (points)" for c in CHECKS], body)


def best_within(pts: list[tuple[float, float, float]], loss: float = MATCHED_LOSS) -> tuple[float, float, float] | None:
    """The point of the largest gain among those losing at most `loss` points of ground truth."""
    ok = [p for p in pts if p[2] >= -loss]
    return max(ok, key=lambda p: p[1]) if ok else None


def matched_table(res: Results) -> str:
    """Per reward and method: the largest gain whose side effect stays within MATCHED_LOSS points."""
    body = []
    for reward in res.p.rewards:
        for label in labels(res):
            pts = points(res, reward, label)
            best = best_within(pts)
            body.append([reward, label, f"{best[0]:g}" if best else "-", f"{best[1]:+.3g}" if best else "none",
                         f"{best[2]:+.2f}" if best else "-", str(len(pts))])
    return _table(["reward", "method", "lr", f"largest gain losing <= {MATCHED_LOSS:g} point", "side effect",
                   "learning rates run"], body)


def along(curve: list[tuple[float, float, float]], gain_value: float) -> float | None:
    """The side effect along a method's front at `gain_value`, linearly interpolated between its points; None
    outside the gains the front reached."""
    pts = sorted(front(curve), key=lambda p: p[1])
    for (_, g0, s0), (_, g1, s1) in zip(pts, pts[1:]):
        if g0 <= gain_value <= g1:
            return s0 + (s1 - s0) * (gain_value - g0) / max(g1 - g0, 1e-12)
    return None


def guards_table(res: Results) -> str:
    """Each guard at the guard learning rate: gain, side effect, and the unguarded DRTune's side effect at the same
    gain (its learning-rate curve, interpolated): a guard helps where its side effect is smaller."""
    body = []
    for reward in res.p.rewards:
        curve = points(res, reward, "DRTune")
        for label in res.p.guards or GUARDS:
            rows = [r for r in res.rows if "guards" in r.get("groups", ()) and r["reward"] == reward
                    and r.get("guards") == _plain(GUARDS[label]) and r.get("ground_truth")]
            if not rows:
                continue
            g, effect = stats(res.gains(rows, reward))[0], stats(truth_change(r) for r in rows)[0]
            ref = along(curve, g)
            body.append([reward, label, fmt(res.gains(rows, reward)), fmt(truth_change(r) for r in rows),
                         "-" if ref is None else f"{ref:+.2f}", "-" if ref is None else f"{effect - ref:+.2f}"])
    return _table(["reward", "guard", "gain", "side effect (points)", "no guard at that gain",
                   "guard's advantage (points)"], body)


def _plain(guards: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """Guards as a result row stores them (JSON: tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in guards}


def plot_fronts(res: Results, path: Path) -> Path:
    """Per reward: each method's runs (gain against side effect, one point per learning rate) and its front."""
    plt = _plt()
    rewards = res.p.rewards
    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 4), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for label in labels(res):
            pts = points(res, reward, label)
            if not pts:
                continue
            line = ax.plot([p[2] for p in pts], [p[1] for p in pts], "o", alpha=0.5)[0]
            best = front(pts)
            ax.plot([p[2] for p in best], [p[1] for p in best], "-", color=line.get_color(), label=label)
            for lr, g, effect in pts:
                ax.annotate(f"{lr:g}", (effect, g), fontsize=6, alpha=0.7)
        ax.axvline(-MATCHED_LOSS, color="gray", lw=0.8, ls="--")
        ax.set(title=reward, xlabel="ground truth change (points, judge 'all')", ylabel=f"{reward} gain")
        ax.legend(fontsize=7)
    return _save(fig, path)


def sections(res: Results, out: Path) -> list[str]:
    """The fair test's part of report.md (its plot written beside it)."""
    plot = plot_fronts(res, out / "fronts.png")
    lines = ["## The fair test: every method at each learning rate, judged by ground truth", "",
             f"Side effect: the judge's pass rate over all checks after minus before (points), on "
             f"{res.s.judge_captions} held-out captions x {res.s.judge_seeds} noise seeds; mean ± std over seeds.",
             "", f"![fronts]({plot.name})", "", "### At matched side effects", "", matched_table(res), ""]
    for reward in res.p.rewards:
        lines += [f"### {reward}", "", fair_table(res, reward), ""]
    lines += ["## Which guards work", "", guards_table(res), ""]
    return lines


def summary(res: Results) -> dict[str, Any]:
    """The fair test as numbers (per reward and method: points, front, best within MATCHED_LOSS)."""
    return {reward: {label: _summary(points(res, reward, label)) for label in labels(res)} for reward in res.p.rewards}


def _summary(pts: list[tuple[float, float, float]]) -> dict[str, Any]:
    return {"points": pts, "front": front(pts), "best_within": best_within(pts)}

