"""Tables (report.md) and plots (PNG) from a profile's results.jsonl: means and spread over seeds.

Gains are held-out: the reward of the final weights' images of the held-out prompts (fixed noise seeds) minus the
base model's on the same prompts and seeds. Spread is the sample standard deviation over seeds (n in brackets).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from benchmarks.reproduction.study import (
    PROFILES, REWARDS, Profile, Settings, base_id, canonical_options, drtune_variant, group_variants, read_rows,
    variants,
)

Row = dict[str, Any]


# ---------------------------------------------------------------- numbers


def stats(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample std (0 for one value), n)."""
    values = list(values)
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def fmt(values: Iterable[float], bold: bool = False, signed: bool = True) -> str:
    """'mean ± std (n)', or '-' with no values."""
    mean, std, n = stats(values)
    if not n:
        return "-"
    text = f"{mean:{'+' if signed else ''}.3g} ± {std:.2g} ({n})"
    return f"**{text}**" if bold else text


def gain(row: Row, bases: dict[str, Row], reward: str) -> float:
    """Held-out reward of the run minus the base model's on the same prompts and seeds."""
    return row["heldout"][reward] - bases[base_id(row.get("prompts"))]["heldout"][reward]


def at_seconds(curve: list[list[float]], seconds: float) -> float:
    """The eval reward reached after `seconds` of training, linearly interpolated on the eval curve."""
    for (_, r0, t0), (_, r1, t1) in zip(curve, curve[1:]):
        if t0 <= seconds <= t1:
            return r0 + (r1 - r0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return curve[-1][1]


class Results:
    """The ok rows of a profile, looked up by (method, options, reward, prompts, steps)."""

    def __init__(self, p: Profile, rows: list[Row]):
        self.p, self.s = p, p.settings
        self.rows = [r for r in rows if r.get("status") == "ok"]
        self.bases = {r["id"]: r for r in self.rows if r["label"] == "base"}

    def select(self, method: str, options: dict[str, Any], reward: str, steps: int | None = None,
               prompts: str | None = None) -> list[Row]:
        """Rows of one variant (options compared after the method's defaults are filled in), every seed."""
        want = dict(canonical_options(method, options))
        steps = steps or self.s.steps
        return sorted((r for r in self.rows if r["label"] != "base" and r["method"] == method
                       and r["options"] == want and r["reward"] == reward and r["steps"] == steps
                       and r.get("prompts") == prompts), key=lambda r: r["seed"])

    def gains(self, rows: list[Row], reward: str) -> list[float]:
        """Held-out gains of `reward` of the rows."""
        return [gain(r, self.bases, reward) for r in rows]


# ---------------------------------------------------------------- tables


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def methods_table(res: Results, prompts: str | None = None, rewards: tuple[str, ...] | None = None) -> str:
    """Held-out gain of the tuned reward, every main method x reward, equal iterations; best mean in bold."""
    rewards = rewards or res.p.rewards
    labels = res.p.methods or tuple(variants(res.s))
    cols = {w: {lab: res.gains(res.select(*variants(res.s)[lab], w, prompts=prompts), w) for lab in labels}
            for w in rewards}
    best = {w: max(labels, key=lambda lab: stats(cols[w][lab])[0] if cols[w][lab] else -math.inf) for w in rewards}
    body = [[lab] + [fmt(cols[w][lab], bold=lab == best[w] and bool(cols[w][lab])) for w in rewards] for lab in labels]
    base = res.bases.get(base_id(prompts))
    if base:
        body.append(["*base model (absolute)*"] + [f"{base['heldout'][w]:.4g}" for w in rewards])
    return _table(["method"] + [f"{w} gain" for w in rewards], body)


def wallclock_table(res: Results) -> str:
    """Eval-reward gain each method had reached when the cheapest method of that reward finished training."""
    labels = res.p.methods or tuple(variants(res.s))
    header, body, budgets = ["method"], {lab: [lab] for lab in labels}, []
    for w in res.p.rewards:
        rows = {lab: res.select(*variants(res.s)[lab], w) for lab in labels}
        totals = [statistics.median(r["train_seconds"] for r in rs) for rs in rows.values() if rs]
        if not totals:
            continue
        budget = min(totals)
        budgets.append(f"{w}: {budget:.0f} s")
        header.append(f"{w} gain at {budget:.0f} s")
        for lab in labels:
            body[lab].append(fmt(at_seconds(r["eval_curve"], budget) - r["eval_curve"][0][1] for r in rows[lab]))
    return _table(header, list(body.values())) if budgets else "(no results)"


def side_effects_table(res: Results, long: bool = False) -> str:
    """Held-out change of every reward after tuning one: the diagonal is the tuned one, the rest side effects."""
    body = []
    specs = [("DRTune, long", *drtune_variant(res.s, "")[1:])] if long else [(lab, *variants(res.s)[lab]) for lab in
                                                                        (res.p.methods or tuple(variants(res.s)))]
    steps = res.s.hacking_steps if long else res.s.steps
    for tuned in res.p.rewards:
        for label, method, opts in specs:
            rows = res.select(method, opts, tuned, steps=steps)
            if rows:
                body.append([f"{label} on {tuned}"] + [fmt(res.gains(rows, w), bold=w == tuned) for w in REWARDS])
    return _table(["tuned"] + [f"Δ {w}" for w in REWARDS], body) if body else "(no results)"


def group_table(res: Results, group: str) -> str:
    """Held-out gain of each variant of an ablation group, one column per reward it was run on."""
    rewards = res.p.rewards if group == "stopgrad" else res.s.ablation_rewards
    body = [[label] + [fmt(res.gains(res.select(method, opts, w), w)) for w in rewards]
            for label, method, opts in group_variants(group, res.p)]
    return _table(["variant"] + [f"{w} gain" for w in rewards], body)


def stopgrad_table(res: Results) -> str:
    """DRTune with and without the stop-gradient: gain, and the optimizer-step gradient norm (before clipping)."""
    body = []
    for label, method, opts in group_variants("stopgrad", res.p):
        for w in res.p.rewards:
            rows = res.select(method, opts, w)
            norms = [r["grad_norm"] for r in rows if r.get("grad_norm")]
            body.append([label, w, fmt(res.gains(rows, w))] + [fmt((n[k] for n in norms), signed=False)
                                                              for k in ("mean", "max", "clipped_share")])
    header = ["variant", "reward", "held-out gain", "gradient norm, mean", "gradient norm, max", "share clipped"]
    return _table(header, body)


def _step_means(rows: list[Row]) -> dict[int, float]:
    """Per sampling step: the mean over seeds of the run's mean gradient norm that step contributed."""
    steps = sorted({int(i) for r in rows for i in r["grad_per_step"]})
    return {i: stats(r["grad_per_step"][str(i)]["mean"] for r in rows if str(i) in r["grad_per_step"])[0]
            for i in steps}


def grad_by_step_table(res: Results) -> str:
    """Mean parameter-gradient norm contributed by each trained sampling step, DRTune with and without stop-gradient."""
    body = []
    for label, method, opts in group_variants("stopgrad", res.p):
        for w in res.p.rewards:
            means = _step_means(res.select(method, opts, w))
            if means:
                body.append([label, w, ", ".join(f"{i}: {v:.2g}" for i, v in means.items())])
    return _table(["variant", "reward", "sampling step: mean gradient norm it contributes (mean over seeds)"], body)


def cost_table(res: Results) -> str:
    """Seconds per step and peak memory per method: from the cost group (run alone) when present."""
    body = []
    for label, method, opts in group_variants("cost", res.p):
        alone = res.select(method, opts, "symmetry", steps=res.s.cost_steps)
        rows = alone or [r for w in res.p.rewards for r in res.select(method, opts, w)]
        if not rows:
            continue
        cuda = [r["peak_cuda_mib"] for r in rows if r.get("peak_cuda_mib") is not None]
        body.append([label, "alone (cost group)" if alone else "the study's cells",
                     f"{statistics.median(r['step_time_median'] for r in rows):.3g}",
                     f"{max(cuda):.0f}" if cuda else "n/a (CPU)", f"{max(r['peak_rss_mib'] for r in rows):.0f}"])
    return _table(["method", "measured", "s / step (median)", "peak CUDA MiB", "peak RSS MiB"], body)


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_methods(res: Results, path: Path) -> Path:
    """Bars of held-out gain per method and reward (mean, std error bars, seeds as dots)."""
    plt = _plt()
    labels = res.p.methods or tuple(variants(res.s))
    fig, axes = plt.subplots(1, len(res.p.rewards), figsize=(4.5 * len(res.p.rewards), 3.8), squeeze=False)
    for ax, w in zip(axes[0], res.p.rewards):
        for i, lab in enumerate(labels):
            g = res.gains(res.select(*variants(res.s)[lab], w), w)
            if g:
                mean, std, _ = stats(g)
                ax.bar(i, mean, yerr=std, color=f"C{i}", alpha=0.7, capsize=3)
                ax.plot([i] * len(g), g, "k.", ms=4)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_title(f"tuned for {w}: held-out gain", fontsize=10)
    return _save(fig, path)


def plot_curves(res: Results, path: Path) -> Path:
    """Eval reward (held-out prompts) against step and against training seconds, mean over seeds."""
    plt = _plt()
    labels = res.p.methods or tuple(variants(res.s))
    fig, axes = plt.subplots(2, len(res.p.rewards), figsize=(4.5 * len(res.p.rewards), 7), squeeze=False)
    for j, w in enumerate(res.p.rewards):
        for i, lab in enumerate(labels):
            rows = res.select(*variants(res.s)[lab], w)
            if not rows:
                continue
            n = min(len(r["eval_curve"]) for r in rows)
            for k, ax in enumerate(axes[:, j]):
                xs = [statistics.fmean(r["eval_curve"][t][2 * k] for r in rows) for t in range(n)]
                ys = [statistics.fmean(r["eval_curve"][t][1] for r in rows) for t in range(n)]
                ax.plot(xs, ys, "o-", ms=3, color=f"C{i}", label=lab)
        axes[0, j].set_title(f"{w}", fontsize=10)
        axes[0, j].set_xlabel("optimizer step")
        axes[1, j].set_xlabel("training seconds (this machine)")
        axes[0, j].set_ylabel("eval reward")
        axes[1, j].set_ylabel("eval reward")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_grad_by_step(res: Results, path: Path) -> Path:
    """Gradient norm each trained sampling step contributes, with and without the stop-gradient (log scale)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(res.p.rewards), figsize=(4.5 * len(res.p.rewards), 3.6), squeeze=False)
    for ax, w in zip(axes[0], res.p.rewards):
        for i, (label, method, opts) in enumerate(group_variants("stopgrad", res.p)):
            for r in res.select(method, opts, w):
                steps = sorted(int(k) for k in r["grad_per_step"])
                ax.plot(steps, [r["grad_per_step"][str(k)]["mean"] for k in steps], "o-", ms=3, color=f"C{i}",
                        alpha=0.7, label=label if r["seed"] == res.s.seeds[0] else None)
        ax.set_yscale("log")
        ax.set_xlabel("sampling step (0 = pure noise)")
        ax.set_title(f"{w}: gradient norm per trained step", fontsize=10)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_sweeps(res: Results, path: Path) -> Path:
    """Held-out gain against K and against the early-stop range m (DRTune), one line per ablation reward."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, group, name in ((axes[0], "k", "num_trained"), (axes[1], "early_stop", "early_stop_range")):
        for i, w in enumerate(res.s.ablation_rewards):
            xs, means, stds = [], [], []
            for _, method, opts in group_variants(group, res.p):
                g = res.gains(res.select(method, opts, w), w)
                if g:
                    mean, std, _ = stats(g)
                    xs.append(opts[name])
                    means.append(mean)
                    stds.append(std)
            if xs:
                ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=3, color=f"C{i}", label=w)
        ax.set_xlabel({"k": "K (trained steps)", "early_stop": "m (early-stop range)"}[group])
        ax.set_ylabel("held-out gain")
        ax.legend(fontsize=8)
    return _save(fig, path)


def grid(res: Results, samples: Path, rows: list[tuple[str, str]], path: Path) -> Path | None:
    """Stack sample strips (base model first) into one labelled PNG: rows = (label, strip file stem)."""
    from PIL import Image, ImageDraw

    found = [(label, samples / f"{stem}.png") for label, stem in rows if (samples / f"{stem}.png").is_file()]
    if len(found) < 2:  # the base model alone
        return None
    strips = [(label, Image.open(f).convert("RGB")) for label, f in found]
    label_w, scale = 170, 2
    width = label_w + max(s.width for _, s in strips) * scale
    height = sum(s.height for _, s in strips) * scale
    canvas = Image.new("RGB", (width, height), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for label, strip in strips:
        big = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
        canvas.paste(big, (label_w, top))
        draw.text((4, top + big.height // 2 - 6), label, fill="black")
        top += big.height
    canvas.save(path)
    return path


def grids(res: Results, out: Path) -> list[Path]:
    """Per reward: the base model and every method (first seed); the long DRTune runs; the centered prompts."""
    samples, made = out / "samples", []
    seed = res.s.seeds[0]
    labels = res.p.methods or tuple(variants(res.s))
    for w in res.p.rewards:
        rows = [("base model", "base")]
        rows += [(lab, r["id"]) for lab in labels for r in res.select(*variants(res.s)[lab], w) if r["seed"] == seed]
        rows += [(f"DRTune, {res.s.hacking_steps} steps", r["id"]) for r in
                 res.select(*drtune_variant(res.s, "")[1:], w, steps=res.s.hacking_steps) if r["seed"] == seed]
        made.append(grid(res, samples, rows, out / f"grid-{w}.png"))
    return [m for m in made if m is not None]


# ---------------------------------------------------------------- the report


def report(profile: str, results: Path | None = None) -> Path:
    """Write report.md and the plots next to the profile's results.jsonl; returns report.md."""
    from benchmarks.reproduction.runner import paths

    p = PROFILES[profile]
    out, _ = paths(profile, results)
    res = Results(p, read_rows(out / "results.jsonl"))
    if "fair" in p.groups:
        return _fair_report(profile, res, out)
    sections = [f"# Reproduction study, profile `{profile}`", "", _settings_line(p.settings, res), "",
                "## Held-out gain of the tuned reward, equal iterations and images per step", "",
                methods_table(res), "", "![gains](methods.png)", "",
                "## Equal wall-clock", "",
                "The gain of the in-loop evaluation (the held-out prompts, fixed noise seeds of their own) each method "
                "had reached after the training seconds the cheapest method needed for all its steps, interpolated "
                "between evaluations.", "",
                wallclock_table(res), "", "![curves](curves.png)", "",
                "## Side effects: every reward after tuning one (held-out)", "", side_effects_table(res), "",
                "## Cost", "", cost_table(res), ""]
    plots = [plot_methods(res, out / "methods.png"), plot_curves(res, out / "curves.png")]
    if "stopgrad" in p.groups:
        sections += ["## Stop-gradient ablation", "",
                     stopgrad_table(res), "", grad_by_step_table(res), "", "![gradient norms](grad_by_step.png)", ""]
        plots.append(plot_grad_by_step(res, out / "grad_by_step.png"))
    for group, title in (("k", "K (trained steps)"), ("spacing", "Equally spaced vs last K"),
                         ("early_stop", "Early-stop range m")):
        if group in p.groups:
            sections += [f"## {title}", "", group_table(res, group), ""]
    if "k" in p.groups or "early_stop" in p.groups:
        plots.append(plot_sweeps(res, out / "sweeps.png"))
        sections += ["![sweeps](sweeps.png)", ""]
    if "centered" in p.groups:
        sections += ["## Symmetry on the centred captions", "",
                     methods_table(res, prompts=p.settings.centered_prompts, rewards=("symmetry",)), ""]
    if "hacking" in p.groups:
        sections += [f"## Long runs ({p.settings.hacking_steps} steps, DRTune): every reward", "",
                     side_effects_table(res, long=True), ""]
    for g in grids(res, out):
        sections += [f"![{g.stem}]({g.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(sections))
    print(f"wrote {path} and {len(plots)} plots")
    return path


def _fair_report(profile: str, res: Results, out: Path) -> Path:
    """report.md (and fair.json, fronts.png) of a fair-test profile."""
    from benchmarks.reproduction import fair

    lrs = ", ".join(f"{lr:g}" for lr in res.s.lrs)
    head = [f"# The fair test, profile `{profile}`", "", _settings_line(res.s, res).replace(
        f"AdamW lr {res.s.lr:g}", f"AdamW lr {lrs} (guards: {res.s.guard_lr:g})"), ""]
    path = out / "report.md"
    path.write_text("\n".join(head + fair.sections(res, out)))
    (out / "fair.json").write_text(json.dumps(fair.summary(res), indent=1) + "\n")
    print(f"wrote {path}, fair.json and fronts.png")
    return path


def _settings_line(s: Settings, res: Results) -> str:
    env = next((r for r in res.rows if r.get("device")), {})
    return (f"shapes-sd, {s.steps} steps of {s.batch_size} images, DDIM T = {s.num_steps}, CFG {s.guidance_scale}, "
            f"LoRA rank 8, AdamW lr {s.lr:g} (warm-up {s.warmup_steps}), clip {s.max_grad_norm:g}; prompts "
            f"`{s.prompts}` ({s.num_eval} held out; held-out images: each with noise seeds {list(s.heldout_seeds)}); "
            f"DRTune K = {s.drtune_k}, DRTune/ReFL m = {s.early_stop}; seeds {list(s.seeds)}. "
            f"{len(res.rows)} results; measured on {env.get('device', '?')}, torch {env.get('torch', '?')}.")
