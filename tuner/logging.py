"""What a run writes for people: metrics (JSONL, TensorBoard, wandb), galleries, reward curve, summary."""
from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

METRICS = "metrics.jsonl"


class RunLogger:
    """Writes metrics rows to <run>/metrics.jsonl, TensorBoard (<run>/tb) and wandb if asked; a no-op off the main process."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "drtune", config: dict | None = None, resume_step: int | None = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS
        if resume_step is not None:
            self._truncate(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step)
        if wandb:
            import wandb as wb

            self.wandb = wb.init(project=wandb_project, name=self.run_dir.name, dir=str(self.run_dir),
                                 config=config, resume="allow")

    def _truncate(self, step: int) -> None:
        """Drop rows written after `step` by a run that died later than its last checkpoint."""
        if self.path.is_file():
            rows = [r for r in read_metrics(self.path) if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write one row of scalar metrics for `step`."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """Send a saved image (a gallery) to TensorBoard / wandb."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb as wb

            self.wandb.log({tag: wb.Image(str(path))}, step=step)

    def close(self) -> None:
        """Flush and close the writers (again: nothing)."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None


def process_start_time() -> float:
    """When this process started, in seconds since the epoch (the operating system's record, so interpreter start and
    imports count); the time this module was imported where that record cannot be read."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or the platform refuses: the next best start
        return _IMPORTED


_IMPORTED = time.time()


def _scalar(v: Any) -> float | None:
    v = float(v.item() if torch.is_tensor(v) else v)
    return v if math.isfinite(v) else None  # JSON has no NaN; the row's `skipped` says why


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def to_pil(image: torch.Tensor) -> Image.Image:
    """A [3,H,W] tensor in [0,1] as a PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _fit(images: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """Enlarge tiny images (nearest, to be seen) and shrink large ones (area, to keep the PNG small)."""
    side = min(images.shape[-2:])
    scale = min_size / side if side < min_size else max_size / side if side > max_size else 1.0
    if scale == 1.0:
        return images
    size = [round(d * scale) for d in images.shape[-2:]]
    return torch.nn.functional.interpolate(images.float(), size=size, mode="nearest" if scale > 1 else "area")


def gallery(before: torch.Tensor, now: torch.Tensor, prompts: list[str], title: str, pad: int = 4,
            min_size: int = 192, max_size: int = 512) -> Image.Image:
    """A grid with one row per prompt: the base model's image (left) beside the current one (right)."""
    before, now = _fit(before, min_size, max_size), _fit(now, min_size, max_size)
    n, _, h, w = now.shape
    caption = 28
    cols = 2
    width = cols * w + (cols + 1) * pad
    height = caption + n * (h + caption) + (n + 1) * pad
    canvas = Image.new("RGB", (max(width, 240), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), f"left: base model (step 0)   right: {title}", fill="black")
    for i in range(n):
        top = caption + pad + i * (h + caption + pad)
        draw.text((pad, top), textwrap.shorten(prompts[i], width=max(20, width // 6), placeholder="..."), fill="black")
        for j, img in enumerate((before[i], now[i])):
            canvas.paste(to_pil(img), (pad + j * (w + pad), top + caption))
    return canvas


def plot_rewards(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Training reward (raw and smoothed) and evaluation reward against step, as a PNG; for a mixture, a second
    panel shows each part's evaluation reward (the total can hide a part that rises while another falls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["reward"]) for r in rows if r.get("reward") is not None]
    evals = [(r["step"], r["eval/reward"]) for r in rows if r.get("eval/reward") is not None]
    parts = sorted({k for r in rows for k in r if k.startswith("eval/reward/")})
    fig, axes = plt.subplots(1, 2 if parts else 1, figsize=(12 if parts else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        steps, values = map(np.asarray, zip(*train))
        ax.plot(steps, values, color="tab:blue", alpha=0.3, lw=1, label="train reward")
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=2, label=f"train reward (mean of {window})")
    if evals:
        steps, values = zip(*evals)
        ax.plot(steps, values, "o-", color="tab:orange", lw=2, label="eval reward (held-out prompts, fixed seeds)")
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward")
    axes[0][0].legend()
    for key in parts:
        steps, values = zip(*[(r["step"], r[key]) for r in rows if r.get(key) is not None])
        axes[0][1].plot(steps, values, "o-", lw=2, label=key.removeprefix("eval/reward/"))
    if parts:
        axes[0][1].set_title("eval reward of each part (unweighted)")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_summary(run_dir: str | Path, summary: dict[str, Any]) -> None:
    """summary.json (everything) and summary.md (a short table for people)."""
    run_dir = Path(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [f"# Run {summary.get('name', run_dir.name)}", "", "| | |", "|---|---|"]
    for k, v in summary.items():
        if not isinstance(v, (dict, list)):
            lines.append(f"| {k} | {f'{v:.4g}' if isinstance(v, float) else v} |")
    if "judge_before" in summary:
        lines += ["", "Ground truth (tuner.shapes.judge, evaluation prompts): pass rates", "",
                  "| check | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {summary['judge_after'].get(k, float('nan')):.3f} |"
                  for k, v in summary["judge_before"].items()]
    if "ground_truth" in summary:
        lines += ["", ground_truth_lines(summary["ground_truth"], markdown=True)]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")


def ground_truth_lines(truth: dict[str, Any], markdown: bool = False) -> str:
    """The held-out ground-truth test, before and after tuning, each rate with its 95% interval."""
    def cell(r: dict) -> str:
        return f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"
    head = (f"Ground truth (tuner.shapes.judge) on {truth['captions']} held-out captions x {truth['seeds']} seeds, "
            f"95% intervals:")
    rows = [(check, cell(b), cell(truth["after"][check]), b["n"]) for check, b in truth["before"].items()
            if check in truth["after"]]
    if markdown:
        return "\n".join([head, "", "| check | before | after | images |", "|---|---|---|---|",
                          *(f"| {c} | {b} | {a} | {n} |" for c, b, a, n in rows)])
    return "\n".join([head, *(f"  {c:<10} {b:>22} -> {a:<22} ({n} images)" for c, b, a, n in rows)])
