"""How good the shapes model is: held-out checks of the CLIP and of the pipeline, and the docs' figures.

Two independent judges of "follows its caption":
- the shipped CLIP: does an image score its own caption above the same caption with one fact changed?
- pixel checks against the procedural ground truth (no model): are the captioned colours present, is the
  background colour right, is a single shape in its captioned place, do two shapes stand in their relation?
Both are also run on the real rendered images (the ceiling) and with captions shuffled (the floor).
"""
from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import torch

from tuner.shapes.data import COLORS, PLACES, RELATIONS, SIZE, Scene, ShapesData, mismatched_caption, render

COLOR_TOLERANCE = 0.2  # RGB distance under which a pixel counts as a colour
PRESENT = 0.3  # a colour is present when it covers this share of the pixels it covers in the real image
PLACE_TOLERANCE = 12.0  # pixels between the captioned and the found centre of a single shape


def _mask(images: torch.Tensor, color: str) -> torch.Tensor:
    rgb = torch.tensor(COLORS[color], device=images.device)[:, None, None]
    return (images - rgb).norm(dim=-3) < COLOR_TOLERANCE  # [B?, H, W]


def _centre(mask: torch.Tensor) -> torch.Tensor | None:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return None if len(xs) == 0 else torch.stack([xs.float().mean() + 0.5, ys.float().mean() + 0.5])


def caption_checks(images: torch.Tensor, scenes: list[Scene], real: torch.Tensor) -> dict[str, float]:
    """Share of images that pass each pixel check of their scene's caption; `real` = the scenes rendered."""
    hits = {"colors": [], "background": [], "place": [], "relation": []}
    for image, scene, truth in zip(images, scenes, real):
        present = []
        for shape in scene.shapes:
            want = _mask(truth, shape.color).sum()
            present.append(bool(want > 0 and _mask(image, shape.color).sum() >= PRESENT * want))
        hits["colors"].append(all(present))
        want = _mask(truth, scene.background).sum()
        hits["background"].append(bool(want > 0 and _mask(image, scene.background).sum() >= PRESENT * want))
        centres = [_centre(_mask(image, s.color)) for s in scene.shapes]
        if any(c is None for c in centres) or (len(centres) == 2 and scene.shapes[0].color == scene.shapes[1].color):
            ok = False
        elif len(scene.shapes) == 1:
            ok = bool((centres[0] - torch.tensor([scene.shapes[0].x, scene.shapes[0].y])).norm() < PLACE_TOLERANCE)
        else:
            dx, dy = RELATIONS[scene.relation]
            axis = 0 if dx else 1
            ok = bool((centres[0][axis] - centres[1][axis]) * (dx + dy) > 0)
        hits["place" if len(scene.shapes) == 1 else "relation"].append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items() if v}


@torch.no_grad()
def clip_accuracy(clip, images: torch.Tensor, scenes: list[Scene], seed: int = 0) -> dict[str, float]:
    """Share of images whose own caption outscores a caption with one fact changed, overall and per fact."""
    rng = random.Random(seed)
    negatives = [mismatched_caption(s, rng) for s in scenes]
    own = clip(images, [s.caption for s in scenes])
    other = clip(images, [n[0] for n in negatives])
    wins = (own > other).cpu()
    out = {"all": float(wins.float().mean())}
    for fact in sorted({n[1] for n in negatives}):
        picked = torch.tensor([n[1] == fact for n in negatives])
        out[fact] = float(wins[picked].float().mean())
    return out


@torch.no_grad()
def clip_retrieval(clip, images: torch.Tensor, captions: list[str]) -> float:
    """Top-1 accuracy of picking each image's caption among all captions of the batch."""
    scores = torch.stack([clip(images, [c] * len(images)) for c in captions], dim=1)  # [images, captions]
    return float((scores.argmax(1).cpu() == torch.arange(len(captions))).float().mean())


@torch.no_grad()
def generate(pipe, captions: list[str], device, batch: int = 128, steps: int = 25, guidance: float = 5.0, seed: int = 0):
    """Images [N,3,64,64] in [0,1] from a stock StableDiffusionPipeline (DDIM, seeded per batch)."""
    out = []
    for i in range(0, len(captions), batch):
        gen = torch.Generator(device).manual_seed(seed + i)
        out.append(pipe(captions[i:i + batch], height=SIZE, width=SIZE, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gen, output_type="pt").images.float())
    return torch.cat(out)


def captioned_grid(images: torch.Tensor, captions: list[str], path: Path, cols: int = 8, scale: int = 2) -> Path:
    """A PNG grid of images (enlarged `scale` times, nearest) with their captions wrapped underneath."""
    from PIL import Image, ImageDraw

    from tuner.logging import to_pil

    side, text_h, pad = SIZE * scale, 40, 4
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (side + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = pad + (i % cols) * (side + pad), pad + (i // cols) * (side + text_h + pad)
        canvas.paste(to_pil(image).resize((side, side), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + side + 1), "\n".join(textwrap.wrap(caption, 24)[:3]), fill="black", spacing=0)
    canvas.save(path)
    return path


def loss_curves(logs: Path, path: Path, names: tuple[str, ...] = ("vae", "unet", "clip")) -> Path:
    """The training loss of each stage of `names` against its step (from <out>/logs/*.jsonl) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if (logs / f"{n}.jsonl").is_file()]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [json.loads(line) for line in (logs / f"{name}.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if "loss" in r]
        ax.plot(steps, [r["loss"] for r in rows if "loss" in r], lw=1.2)
        done = next((r for r in rows if "done" in r), {})
        ax.set_title(f"{name}: {done.get('done', '?')} steps, {done.get('seconds', 0) / 60:.1f} min")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(pipeline_dir: Path, clip_dir: Path, logs: Path, out: Path, device, samples: int = 512) -> dict:
    """Held-out report of a pipeline and a CLIP folder: writes report.json, samples.png, real.png, losses.png to `out`."""
    from diffusers import StableDiffusionPipeline

    import rewards

    out.mkdir(parents=True, exist_ok=True)
    scenes = ShapesData(1).scenes(0, samples)
    captions = [s.caption for s in scenes]
    real = render(scenes, device)
    clip = rewards.load("clip", checkpoint=clip_dir, device=device)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    generated = generate(pipe, captions, device)
    shuffled = scenes[1:] + scenes[:1]
    report = {
        "heldout_samples": samples,
        "clip": {"own_vs_one_fact_changed_real": clip_accuracy(clip, real, scenes),
                 "top1_among_256_real": clip_retrieval(clip, real[:256], captions[:256])},
        "pipeline": {
            "sampler": "DDIM 25 steps, guidance 5.0",
            "clip_own_vs_one_fact_changed_generated": clip_accuracy(clip, generated, scenes),
            "clip_top1_among_256_generated": clip_retrieval(clip, generated[:256], captions[:256]),
            "pixel_checks_generated": caption_checks(generated.cpu(), scenes, real.cpu()),
            "pixel_checks_real": caption_checks(real.cpu(), scenes, real.cpu()),
            "pixel_checks_generated_with_shuffled_captions": caption_checks(
                generated.cpu(), shuffled, render(shuffled, "cpu")),
        },
        "training": {p.stem: json.loads(p.read_text().splitlines()[-1]) for p in sorted(logs.glob("*.jsonl"))},
        "safetensors_bytes": {f"{folder.name}/{p.relative_to(folder)}": p.stat().st_size
                              for folder in (pipeline_dir, clip_dir) for p in sorted(folder.glob("**/*.safetensors"))},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    captioned_grid(generated[:32], captions[:32], out / "samples.png")
    captioned_grid(real[:32], captions[:32], out / "real.png")
    loss_curves(logs, out / "losses.png")
    print(json.dumps(report, indent=2))
    return report


BAR = 0.05  # shapes-flow's bar: no check's mean more than 5 points below shapes-sd's
BAR_CHECKS = ("colors", "background", "place", "relation")


def seed_figures(adapter, scenes: list[Scene], seeds: list[int], steps: int = 25, guidance: float = 5.0
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]], torch.Tensor]:
    """Each check's pass rate per noise seed on held-out scenes, by the old pixel checks and by the judge; and the
    images of the first seed."""
    from tuner.shapes.judge import judge, sample_shapes_sd

    captions, real = [s.caption for s in scenes], render(scenes)
    old, new, first = {}, {}, None
    for seed in seeds:
        images = sample_shapes_sd(captions, seed, steps, guidance, device=str(adapter.device), adapter=adapter)
        first = images if first is None else first
        for figures, rates in ((old, caption_checks(images, scenes, real)), (new, judge(images, captions))):
            for check, rate in rates.items():
                figures.setdefault(check, []).append(rate)
    return old, new, first


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def flow_table(report: dict) -> str:
    """A markdown table: each check's mean +- std over seeds for shapes-sd and shapes-flow, old checks and judge."""
    from tuner.shapes.judge import CHECKS, spread

    sd, flow = report["shapes-sd"], report["shapes-flow"]
    rows = ["| check | shapes-sd, old checks | shapes-flow, old checks | shapes-sd, judge | shapes-flow, judge |",
            "|---|---|---|---|---|"]
    for check in CHECKS:
        cells = [spread(m[kind][check]) if check in m[kind] else "-" for kind in ("old", "judge") for m in (sd, flow)]
        rows.append(f"| {check} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def compare_flow(flow_dir: Path, sd_dir: Path, out: Path, device, captions: int = 128, seeds=(0, 1, 2, 3),
                 steps: int = 25, guidance: float = 5.0) -> dict:
    """shapes-flow beside shapes-sd on the same held-out captions and noise seeds (at least 3): every check's rate
    per seed by both checkers, and whether each of colors, background, place and relation (both checkers) is at
    most 5 points below shapes-sd's mean. Writes flow_report.json and flow_samples.png to `out`."""
    from tuner import pipelines

    if len(seeds) < 3:
        raise ValueError(f"give at least 3 noise seeds for a spread, got {list(seeds)}")
    out.mkdir(parents=True, exist_ok=True)
    scenes = ShapesData(1).scenes(0, captions)
    report, first = {"captions": captions, "seeds": list(seeds), "sampler": f"{steps} steps, guidance {guidance}"}, None
    for name, folder in (("shapes-sd", sd_dir), ("shapes-flow", flow_dir)):
        adapter = pipelines.load_adapter(str(folder), device=torch.device(device), dtype=torch.float32)
        old, new, images = seed_figures(adapter, scenes, list(seeds), steps, guidance)
        report[name] = {"folder": Path(folder).name, "old": old, "judge": new}  # no machine's paths in reports
        first = images if name == "shapes-flow" else first
    report["bar"] = {f"{kind}/{check}": {
        "shapes-sd": _mean(report["shapes-sd"][kind][check]), "shapes-flow": _mean(report["shapes-flow"][kind][check]),
        "met": _mean(report["shapes-flow"][kind][check]) >= _mean(report["shapes-sd"][kind][check]) - BAR}
        for kind in ("old", "judge") for check in BAR_CHECKS if check in report["shapes-sd"][kind]}
    report["bar_met"] = all(b["met"] for b in report["bar"].values())
    (out / "flow_report.json").write_text(json.dumps(report, indent=2) + "\n")
    captioned_grid(first[:32], [s.caption for s in scenes[:32]], out / "flow_samples.png")
    print(f"{captions} held-out captions, seeds {list(seeds)}, {report['sampler']}:\n\n{flow_table(report)}\n\n"
          f"bar (each of {', '.join(BAR_CHECKS)} at most {100 * BAR:.0f} points below shapes-sd): "
          f"{'met' if report['bar_met'] else 'NOT met'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """python -m tuner.shapes.evaluate: the report and figures of docs/shapes.md, from the shipped model by default."""
    import argparse

    from rewards.clip_score import SHAPES_CLIP_DIR
    from tuner.shapes import MODEL_DIR

    docs = Path(__file__).parents[2] / "docs" / "shapes"
    p = argparse.ArgumentParser(prog="python -m tuner.shapes.evaluate", description=main.__doc__)
    p.add_argument("--pipeline", type=Path, default=MODEL_DIR, help="StableDiffusionPipeline folder")
    p.add_argument("--clip", type=Path, default=SHAPES_CLIP_DIR, help="open_clip model folder")
    p.add_argument("--logs", type=Path, default=docs / "logs", help="training logs (<stage>.jsonl)")
    p.add_argument("--out", type=Path, default=docs, help="where report.json and the PNGs go")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    evaluate(args.pipeline, args.clip, args.logs, args.out, torch.device(args.device), args.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
