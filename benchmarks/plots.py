"""Figures of the committed tuning-step and TRL results (docs/benchmarks.md), redrawn from their JSON files.

    python -m benchmarks.plots --results benchmarks/results --out benchmarks/results

Writes tuning_step-20261203-h200.png (DRTune's time per image against batch size, eager and compiled, with the
2.0 s goal and the FLOP floor; peak memory against K) and alignprop_trl-20261203-h200.png (time per image and
peak memory of TRL's AlignProp step and of ours, with the goals at half of TRL's). Nothing is measured here: every
point is a row of a JSON file that a benchmark command wrote (the files are named below).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GOAL_S_PER_IMAGE = 2.0  # issue 8: DRTune K=5, SDXL 1024, bf16, at a batch that fits 75 GiB
FLOOR_S_PER_IMAGE = 0.99  # bf16 FLOP floor of that step (eager FLOP count, docs/benchmarks.md)
MEMORY_CAP_GIB = 75.0
DRTUNE_K5 = "engine: drtune (K=5, default)"

# (label, file, row name without its " [batch N]" suffix): the DRTune K=5 points of the time-per-image panel.
TIME_SERIES = {
    "eager": [("tuner_methods-20261203-h200-b2b3.json", DRTUNE_K5)],
    "transformer blocks compiled (diffusers)": [("tuner_methods-20261203-h200-compiled-b2.json", DRTUNE_K5)],
    "every block compiled (train.compile)": [
        ("tuner_methods-20261203-h200-compiled-b3-variants.json", DRTUNE_K5 + ", sampling calls bf16"),
        ("tuner_methods-20261203-h200-compiled-b5-ksweep.json", DRTUNE_K5),
        ("tuner_methods-20261203-h200-compiled-b6.json", DRTUNE_K5)],
    "every block compiled, VAE decode without autocast": [
        ("tuner_methods-20261203-h200-compiled-b5b6-vae-plain.json", DRTUNE_K5)],
}
# (label, file, batch): peak memory against K (rows "drtune K=k" and the K=5 default).
MEMORY_SERIES = [("eager, batch 2", "tuner_methods-20261203-h200-b2b3.json", 2),
                 ("eager, batch 3", "tuner_methods-20261203-h200-b2b3.json", 3),
                 ("compiled, batch 5", "tuner_methods-20261203-h200-compiled-b5-ksweep.json", 5)]
TRL_RUN = "alignprop_trl-20261203-h200-b4-low-compiled.json"


def rows(results: Path, name: str) -> dict:
    """The rows of one benchmark JSON file."""
    return json.loads((results / name).read_text())["rows"]


def time_points(results: Path) -> dict[str, list[tuple[int, float]]]:
    """(batch, s / image) of DRTune K=5 for each series of TIME_SERIES."""
    points = {}
    for label, sources in TIME_SERIES.items():
        found = []
        for name, row_name in sources:
            for key, row in rows(results, name).items():
                if key.rsplit(" [batch", 1)[0] == row_name and row.get("s_per_iter"):
                    found.append((row["batch"], row["s_per_iter"] / row["batch"]))
        points[label] = sorted(found)
    return points


def memory_points(results: Path) -> dict[str, list[tuple[int, float]]]:
    """(K, peak GiB) of DRTune at one batch size for each series of MEMORY_SERIES."""
    points = {}
    for label, name, batch in MEMORY_SERIES:
        found = [(row["trained_steps"], row["peak_gib"]) for key, row in rows(results, name).items()
                 if row.get("batch") == batch and key.startswith("engine: drtune") and row.get("peak_gib")]
        points[label] = sorted(found)
    return points


def trl_points(results: Path) -> dict[int, dict[str, dict]]:
    """suffix -> implementation -> row of the TRL comparison run."""
    out: dict[int, dict[str, dict]] = {}
    for row in rows(results, TRL_RUN).values():
        out.setdefault(row["suffix"], {})[row["impl"]] = row
    return out


def plot_tuning_step(results: Path, path: Path) -> Path:
    """Time per image against batch size, and peak memory against K."""
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, pts in time_points(results).items():
        ax_t.plot([b for b, _ in pts], [s for _, s in pts], "o-", label=label)
    ax_t.axhline(GOAL_S_PER_IMAGE, color="k", ls="--", lw=1, label="goal (2.0 s)")
    ax_t.axhline(FLOOR_S_PER_IMAGE, color="gray", ls=":", lw=1, label="bf16 FLOP floor")
    ax_t.set(xlabel="images per step (batch)", ylabel="s / image", ylim=(0, None),
             title="DRTune K=5, SDXL 1024, T=50, CFG, LoRA 64, bf16 (H200)")
    ax_t.legend(fontsize=8)
    for label, pts in memory_points(results).items():
        ax_m.plot([k for k, _ in pts], [g for _, g in pts], "o-", label=label)
    ax_m.axhline(MEMORY_CAP_GIB, color="k", ls="--", lw=1, label="75 GiB (an 80 GB H100)")
    ax_m.set(xlabel="K (trained steps)", ylabel="peak GiB", ylim=(0, 80), title="DRTune peak memory against K")
    ax_m.legend(fontsize=8)
    return _save(fig, path)


def plot_trl(results: Path, path: Path) -> Path:
    """TRL's AlignProp step beside ours: s / image and peak GiB per implementation, per trained suffix."""
    plt = _pyplot()
    data = trl_points(results)
    impls = ["trl", "engine", "engine-compiled", "engine-low"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(impls)
    for ax, key, unit in ((axes[0], "s_per_image", "s / image"), (axes[1], "peak_gib", "peak GiB")):
        for i, impl in enumerate(impls):
            xs = [j + i * width for j in range(len(data))]
            ax.bar(xs, [data[s][impl][key] for s in sorted(data)], width, label=impl)
        for j, suffix in enumerate(sorted(data)):
            half = data[suffix]["trl"][key] / 2
            ax.hlines(half, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--", lw=1,
                      label="goal: half of TRL's" if j == 0 else None)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(data))], [f"trained suffix {s}" for s in sorted(data)])
        ax.set(ylabel=unit, title=f"SD 1.5 512, T=50, CFG 5, batch 4: {unit}")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"), help="folder of the JSON files")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    print(plot_tuning_step(args.results, args.out / "tuning_step-20261203-h200.png"))
    print(plot_trl(args.results, args.out / "alignprop_trl-20261203-h200.png"))


if __name__ == "__main__":
    main()
