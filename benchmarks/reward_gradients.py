"""Reward-gradient benchmark in one command: the pytest-benchmark suite, then the run's JSON, table and plot.

    python -m benchmarks.reward_gradients --out benchmarks/results/          # full suite on one CUDA GPU
    python -m benchmarks.reward_gradients --smoke --out /tmp/smoke           # tiny models on the CPU (a check)
    python -m benchmarks.reward_gradients --select "hpsv2.1 and b32" --budget 400
    python -m benchmarks.reward_gradients --report RUN.pytest-benchmark.json # tables and plot of an earlier run
    python -m benchmarks.reward_gradients -- --benchmark-disable             # after --: more pytest arguments

Writes reward_gradients-<UTC time>-<device>.{json,md,png} (plus the raw .pytest-benchmark.json and a .jsonl log that
survives a killed run) in --out. Every figure is measured on random weights, which cost exactly what trained ones cost.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "test_reward_gradients.py"
NOTE = "random weights, full-size architectures: random weights cost exactly what trained ones cost"
SMOKE_NOTE = "SMOKE RUN: tiny architectures with random weights on the CPU; checks the suite, the figures mean nothing"
GOAL_SPEEDUP, GOAL_PEAK_SHARE = 2.0, 0.58  # issue 8: 2x imscore's images/s at no more memory; HPSv2.1 at 58% of peak
# A low-precision variant of ours counts only if its scores lie no further from our float32 scores than 1.25 times our
# eager scores of the same precision do: on random weights bf16 rounding alone moves scores by a large share of
# their mean, so distance to the eager bf16 scores would reject a variant that is as exact as eager.
ROUNDING_TOLERANCE = 1.25
PEERS = ("imscore", "official")  # the implementation each reward is compared with (HPSv3: benchmarks.hpsv3_official)


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or only report an earlier run) and write the outputs."""
    args, extra = _parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.report:
        records, meta = load_records(args.report)
        paths = write_report(records, meta, args.out or args.report.parent, _stem(meta))
        print("\n".join(str(p) for p in paths))
        return 0
    return run(args, extra, sys.argv[1:] if argv is None else argv)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="tiny architectures on the CPU: checks the suite only")
    ap.add_argument("--select", default=None, help="pytest -k expression over case ids, e.g. 'hpsv2.1 and bf16'")
    ap.add_argument("--budget", type=float, default=0, help="seconds after which no new case starts (0: none)")
    ap.add_argument("--report", type=Path, default=None,
                    help="only write the tables and plot of a .pytest-benchmark.json or .jsonl")
    for name in ("device", "size", "batches", "dtypes", "names", "impls", "variants", "rounds", "warmup", "weights",
                 "profile"):
        ap.add_argument(f"--{name}", default=None, help=f"pytest's --reward-{name} (see benchmarks/conftest.py)")
    ap.add_argument("--everywhere", action="store_true", help="every variant on every case it applies to")
    return ap


def run(args: argparse.Namespace, extra: list[str], argv: list[str]) -> int:
    """Run pytest-benchmark on the suite, then write the report; returns pytest's exit code."""
    import pytest

    start = time.time()
    out = args.out or ROOT / "benchmarks" / "results"
    meta = {**environment(), "smoke": bool(args.smoke),
            "command": " ".join(["python -m benchmarks.reward_gradients", *argv])}
    stem = _stem(meta)
    raw, log = out / f"{stem}.pytest-benchmark.json", out / f"{stem}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps({"meta": meta}) + "\n")
    code = pytest.main(pytest_args(args, extra, start, raw, log), plugins=[_Failures(log)])
    records, _ = load_records(raw if raw.is_file() else log)
    _, logged = load_records(log)
    meta.update(skipped=logged["skipped"], failed=logged["failed"], pytest_exit_code=int(code))
    meta["wall_s"] = round(time.time() - start, 1)
    for path in write_report(records, meta, out, stem):
        print(path)
    return int(code)


class _Failures:
    """pytest plugin: appends each failed case and the last line of its error to the run's JSONL log."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = (crash.message if crash else report.longreprtext.strip().splitlines()[-1])[:500]
            case = report.nodeid.split("[")[-1].rstrip("]")
            with self.log.open("a") as f:
                f.write(json.dumps({"failed": case, "when": report.when, "error": message}) + "\n")


def pytest_args(args: argparse.Namespace, extra: list[str], start: float, raw: Path, log: Path) -> list[str]:
    """The pytest command line of a run."""
    argv = [str(SUITE), f"--rootdir={ROOT}", "-p", "no:cacheprovider", "-q", f"--benchmark-json={raw}",
            "--benchmark-disable-gc", "--benchmark-columns=median,min,max,rounds", f"--reward-jsonl={log}",
            f"--reward-start={start}", f"--reward-budget={args.budget}"]
    if args.smoke:
        argv.append("--reward-smoke")
    if args.everywhere:
        argv.append("--reward-everywhere")
    for name in ("device", "size", "batches", "dtypes", "names", "impls", "variants", "rounds", "warmup", "weights",
                 "profile"):
        if getattr(args, name) is not None:
            argv.append(f"--reward-{name}={getattr(args, name)}")
    if args.select:
        argv += ["-k", f"({args.select}) or matmul_peak"]
    return argv + extra


def environment() -> dict:
    """Device, library versions and date of this run."""
    import torch

    def version(dist: str) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        **{name: version(dist) for name, dist in (("torch", "torch"), ("transformers", "transformers"),
                                                  ("open_clip", "open_clip_torch"), ("timm", "timm"),
                                                  ("imscore", "imscore"), ("pytest_benchmark", "pytest-benchmark"))},
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # variants named tf32 set "high"
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _stem(meta: dict) -> str:
    stamp = re.sub(r"[^0-9T]", "", str(meta.get("date", "")))[:15] or "undated"
    device = re.sub(r"[^a-z0-9]+", "-", str(meta.get("device", "unknown")).lower()).strip("-")
    return f"reward_gradients-{stamp}-{device.replace('nvidia-', '')[:24]}"


# -- reading a run -----------------------------------------------------------------------------------------------
def load_records(path: Path) -> tuple[list[dict], dict]:
    """(records, meta) of a pytest-benchmark JSON or of the suite's JSONL log; records hold stats and extra_info."""
    path = Path(path)
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        meta = next((line["meta"] for line in lines if "meta" in line), {})
        skipped = [line["skipped"] for line in lines if "skipped" in line]
        failed = [{k: line[k] for k in ("failed", "when", "error")} for line in lines if "failed" in line]
        records = [line for line in lines if "extra_info" in line]
        return records, {**meta, "skipped": skipped, "failed": failed}
    data = json.loads(path.read_text())
    meta = dict(data.get("machine_info", {}).get("reward_gradients", {}))
    return [b for b in data.get("benchmarks", []) if b.get("stats")], meta


def rows_from(records: list[dict]) -> tuple[list[dict], float | None]:
    """One row of derived figures per reward case, and the measured bf16 matmul peak in TFLOP/s."""
    peak = None
    rows = []
    for rec in records:
        info, stats = rec["extra_info"], rec.get("stats") or {}
        if not stats.get("median"):
            continue
        if info.get("kind") == "matmul":
            peak = info["flops"] / stats["median"] / 1e12
        elif info.get("kind") == "reward":
            rows.append(_row(info, stats))
    for row in rows:
        row["peak_share"] = row["tflops"] / peak if peak and row["tflops"] else None
    _compare(rows)
    _rounding(rows)
    return rows, peak


def _row(info: dict, stats: dict) -> dict:
    median, batch = stats["median"], info["batch"]
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    return {
        "reward": info["reward"], "impl": info["impl"], "variant": info["variant"], "dtype": info["dtype"],
        "batch": batch, "size": info["size"], "median_s": median, "min_s": stats["min"], "rounds": stats["rounds"],
        "ms_per_image": 1e3 * median / batch, "images_per_s": batch / median,
        "gflop_per_image": info["flops"] / batch / 1e9 if info["flops"] else None,  # None: a peer run uncounted
        "tflops": info["flops"] / median / 1e12 if info["flops"] else None,
        "peak_gib": gib(info.get("peak_bytes")), "base_gib": gib(info.get("base_bytes")),
        "weights_gib": gib(info.get("weights_bytes")), "input_gib": gib(info.get("input_bytes")),
        "first_call_s": info.get("first_call_s"), "load_s": info.get("load_s"),
        "score_rel_diff_vs_ours_eager": info.get("score_rel_diff_vs_ours_eager"), "profile": info.get("profile"),
        "score_rel_diff_vs_fp32": info.get("score_rel_diff_vs_fp32"),
        "component": info.get("component"), "variant_doc": info.get("variant_doc"),
    }


def _compare(rows: list[dict]) -> None:
    """Speed-up and memory ratio of every row against imscore's row of the same reward, precision and batch."""
    theirs = {(r["reward"], r["dtype"], r["batch"]): r for r in rows if r["impl"] in PEERS}
    for row in rows:
        ref = None if row["component"] else theirs.get((row["reward"], row["dtype"], row["batch"]))
        row["speedup_vs_imscore"] = row["images_per_s"] / ref["images_per_s"] if ref else None
        both = ref and row["peak_gib"] and ref["peak_gib"]
        row["memory_vs_imscore"] = row["peak_gib"] / ref["peak_gib"] if both else None


def _rounding(rows: list[dict]) -> None:
    """`counts`: whether each of our variants is within ROUNDING_TOLERANCE of our eager distance to float32 (None
    where no float32 reference was taken: float32 cases, the largest models, peers and components)."""
    eager = {(r["reward"], r["dtype"], r["batch"]): r["score_rel_diff_vs_fp32"]
             for r in rows if r["impl"] == "ours" and r["variant"] == "eager"}
    for row in rows:
        base = eager.get((row["reward"], row["dtype"], row["batch"]))
        own = row["score_rel_diff_vs_fp32"]
        mine = row["impl"] == "ours" and not row["component"]
        row["counts"] = own <= ROUNDING_TOLERANCE * base if mine and own is not None and base is not None else None


def goals(rows: list[dict], peak: float | None) -> list[dict]:
    """Issue 8's targets at each precision's largest batch: our best variant against imscore."""
    out = []
    for (reward, dtype), group in _groups(rows).items():
        batch = max(r["batch"] for r in group)
        ref = next((r for r in group if r["impl"] in PEERS and r["batch"] == batch), None)
        ours = [r for r in group if r["impl"] == "ours" and r["batch"] == batch and not r["component"]
                and r["counts"] is not False]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["images_per_s"])
        speed_ok = best["speedup_vs_imscore"] is not None and best["speedup_vs_imscore"] >= GOAL_SPEEDUP
        memory_ok = best["memory_vs_imscore"] is None or best["memory_vs_imscore"] <= 1.0
        out.append({
            "reward": reward, "dtype": dtype, "batch": batch, "best_variant": best["variant"],
            "ours_images_per_s": best["images_per_s"], "imscore_images_per_s": ref["images_per_s"] if ref else None,
            "speedup": best["speedup_vs_imscore"], "memory_ratio": best["memory_vs_imscore"],
            "peak_share": best["peak_share"], "meets_2x_no_more_memory": (speed_ok and memory_ok) if ref else None,
            "meets_58pct_peak": (best["peak_share"] or 0) >= GOAL_PEAK_SHARE if reward == "hpsv2.1" and peak else None,
        })
    return out


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["reward"], row["dtype"]), []).append(row)
    return groups


# -- writing -----------------------------------------------------------------------------------------------------
def write_report(records: list[dict], meta: dict, out: Path, stem: str) -> list[Path]:
    """<stem>.json (meta, peak, rows, goals), <stem>.md and <stem>.png in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, peak = rows_from(records)
    meta = {**meta, "matmul_n": next((r["extra_info"].get("n") for r in records
                                      if r["extra_info"].get("kind") == "matmul"), None)}
    targets = goals(rows, peak)
    data = {"meta": meta, "note": _note(meta), "matmul_peak_tflops": peak, "goals": targets, "rows": rows}
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(data, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(meta, rows, targets, peak))
    plot(rows, meta, paths[2])
    return paths


def _note(meta: dict) -> str:
    return SMOKE_NOTE if meta.get("smoke") else NOTE


def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(share: float | None) -> str:
    return _f(None if share is None else 100 * share, 1, "%")


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def _table(header: list[str], rows: list[list]) -> list[str]:
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), line(["---"] * len(header))] + [line(r) for r in rows]


TARGET_COLUMNS = ["reward", "precision", "batch", "best variant of ours", "ours img/s", "imscore img/s", "speed-up",
                  "memory ours/imscore", "share of matmul peak", "2x, no more memory", "HPSv2.1 >= 58% of peak"]
CASE_COLUMNS = ["reward", "precision", "batch", "impl", "variant", "ms / image", "images / s", "GFLOP / image",
                "TFLOP/s", "% of peak", "peak GiB", "vs imscore", "first call s", "score diff vs ours eager",
                "score diff vs fp32", "counts"]


def markdown(meta: dict, rows: list[dict], targets: list[dict], peak: float | None) -> str:
    """The run as markdown: conditions, goals, every case, profiles, skipped cases."""
    note = _note(meta)
    lines = _header(meta, rows, peak, note) + ["", f"## Issue 8 targets ({note})", ""]
    lines += _table(TARGET_COLUMNS, [[
        g["reward"], g["dtype"], g["batch"], g["best_variant"], _f(g["ours_images_per_s"], 1),
        _f(g["imscore_images_per_s"], 1), _f(g["speedup"], 2, "x"), _f(g["memory_ratio"], 2), _pct(g["peak_share"]),
        _yes(g["meets_2x_no_more_memory"]), _yes(g["meets_58pct_peak"])] for g in targets])
    order = lambda r: (r["dtype"], r["reward"], -r["batch"], r["impl"] != "ours", r["variant"])  # noqa: E731
    lines += ["", f"## Every case ({note})", ""]
    lines += _table(CASE_COLUMNS, [[
        r["reward"], r["dtype"], r["batch"], r["impl"], r["variant"], _f(r["ms_per_image"], 3),
        _f(r["images_per_s"], 1), _f(r["gflop_per_image"], 1), _f(r["tflops"], 1), _pct(r["peak_share"]),
        _f(r["peak_gib"], 2), _f(r["speedup_vs_imscore"], 2, "x"), _f(r["first_call_s"], 1),
        _f(r["score_rel_diff_vs_ours_eager"], 4), _f(r["score_rel_diff_vs_fp32"], 4), _yes(r["counts"]),
    ] for r in sorted(rows, key=order)])
    lines += _profiles(rows, note) + _variants(rows) + _failed_and_skipped(meta)
    return "\n".join(lines) + "\n"


def _header(meta: dict, rows: list[dict], peak: float | None, note: str) -> list[str]:
    size = rows[0]["size"] if rows else "?"
    versions = ", ".join(f"{k} {meta.get(k)}" for k in ("torch", "cuda", "transformers", "open_clip", "timm", "imscore",
                                                         "python"))
    return [
        f"# Reward gradients: {meta.get('device', '?')}, {meta.get('date', '?')}",
        "",
        f"{versions}. Command: `{meta.get('command', '?')}`.",
        "",
        f"Each case: d(sum of scores)/d(pixels) of a batch of {size}x{size} images in [0, 1] in the case's precision,",
        "preprocessing included, CUDA-synchronised; median of the timed rounds. TFLOP/s: FlopCounterMode's count of",
        "one forward+backward / median time. Peak GiB: torch.cuda.max_memory_allocated over the timed rounds, reset",
        "before them, with only this implementation's weights on the device (included, as the input batch is).",
        "Score diff: max |scores - reference| / mean |reference|, same images; the reference is our eager scores in",
        "the same precision, or (vs fp32) our eager float32 scores of the same images. Counts: a variant of ours",
        f"counts if its diff vs fp32 is at most {ROUNDING_TOLERANCE}x our eager bf16 diff vs fp32 (none if unmeasured).",
        f"**All figures: {note}.** bf16 matmul peak ({meta.get('matmul_n')}^3 `torch.mm`, same run): "
        f"**{_f(peak, 0)} TFLOP/s**.",
    ]


def _profiles(rows: list[dict], note: str) -> list[str]:
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return []
    lines = ["", f"## Where the time goes: device time of one call by kernel category ({note})", ""]
    for r in profiled:
        p, name = r["profile"], f"**{r['reward']} {r['dtype']} b{r['batch']} {r['impl']} {r['variant']}**"
        if "error" in p:
            lines += [f"{name}: profile failed: {p['error']}", ""]
            continue
        categories = ", ".join(f"{k} {v}%" for k, v in p["categories_pct"].items())
        lines += [f"{name}: {p['total_ms']:.1f} ms; {categories}.", ""]
        lines += _table(["kernel", "ms", "%"], [[f"`{k['kernel'].replace('|', '/')}`", k["ms"], k["pct"]]
                                                for k in p["top"][:8]]) + [""]
    return lines


def _variants(rows: list[dict]) -> list[str]:
    docs = {r["variant"]: r["variant_doc"] for r in rows if r.get("variant_doc")}
    return ["", "## Variants", ""] + [f"- `{k}`: {v}" for k, v in docs.items()] if docs else []


def _failed_and_skipped(meta: dict) -> list[str]:
    failed = [f"- `{f['failed']}` ({f['when']}): {f['error']}" for f in meta.get("failed") or []]
    lines = ["", "## Failed cases", ""] + failed if failed else []
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", f"Skipped for the time budget: {', '.join(skipped)}."]
    return lines


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """images/s per reward and batch, per precision: our eager and best variant against imscore (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows}) or ["bf16"]
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(14, 4.5 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes):
        _bars(ax, [r for r in rows if r["dtype"] == dtype and not r["component"]], dtype)
    title = f"Reward gradient throughput, {meta.get('device', '?')}, {meta.get('date', '')[:10]}"
    fig.suptitle(f"{title}\n({_note(meta)})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, rows: list[dict], dtype: str) -> None:
    keys = sorted({(r["reward"], r["batch"]) for r in rows}, key=lambda k: (k[0], -k[1]))
    series = {"ours (eager)": lambda g: _pick(g, "ours", "eager"), "ours (best variant)": lambda g: _best(g),
              "imscore (HPSv3: official)": lambda g: _pick(g, "imscore", "eager")
              or _pick(g, "official", "differentiable")}
    width = 0.8 / len(series)
    for i, (label, choose) in enumerate(series.items()):
        values = [choose([r for r in rows if (r["reward"], r["batch"]) == k]) for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], [v or 0 for v in values], width, label=label)
    ax.set_xticks([x + width for x in range(len(keys))], [f"{r}\nb{b}" for r, b in keys], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(f"{dtype}: d(sum of scores)/d(pixels), preprocessing included")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _pick(group: list[dict], impl: str, variant: str) -> float | None:
    return next((r["images_per_s"] for r in group if r["impl"] == impl and r["variant"] == variant), None)


def _best(group: list[dict]) -> float | None:
    ours = [r["images_per_s"] for r in group if r["impl"] == "ours"]
    return max(ours) if ours else None


if __name__ == "__main__":
    sys.exit(main())
