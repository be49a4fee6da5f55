"""A ground-truth judge of shapes images that an optimiser cannot flatter: blobs, the place grid, both axes.

`judge(images, captions)` reads only pixels and captions (no scene, no model) and returns per-check pass rates;
`judge_each` gives the verdicts of each image. The checks:

- colors: each captioned colour forms a blob, a connected set of pixels explained as that colour laid over the
  captioned background (any tone of its gradient or stripes) with at least half opacity, as well as by any other
  colour of the palette. So a blurred thin ring, whose pixels are half ring and half background, is found, and a
  pixel that the background's own tones explain (the darker tone of a white gradient, 0.11 from gray) is not.
  A blob must be shape-like: big enough for a small shape, no bigger than a large one, clear of the image border
  (the generator keeps every shape inside; a background band always touches it), opaque enough at its peak for
  its captioned kind and size, not the blurred rim of another colour's opaque core (gray around a black shape on
  white) and not enclosed by other colours (the background showing through the hole of a ring).
- background: pixels away from the shapes lie on the captioned background's tones (plain colour, or anywhere
  between the two tones of its gradient or stripes).
- place (one shape): the blob's centre is nearest to the captioned place among the generator's nine place
  centres for the captioned size.
- relation (two shapes): the blob centres are in the captioned order on the relation's axis, and that offset
  exceeds the offset on the other axis.
- all: every check of the image passes.

Known blind spot: where a shape's colour, the background colour and its second tone lie on one line of RGB (gray
on a white gradient, white on a black one), a blurred thin ring's pixels are background tones pixel by pixel and
the ring is missed (none of 600 held-out real images; tests/test_shapes_judge.py lists what is covered).

`python -m tuner.shapes.judge` samples shapes-sd on held-out captions over several noise seeds and reports each
rate of the old checkers (tuner.shapes.evaluate) and of this judge, per seed and as mean +- std (docs/shapes.md),
and the share of images broken on purpose (tuner.shapes.broken) that each passes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from tuner.shapes.data import COLORS, PLACES, RELATIONS, SIZE, SIZES

PALETTE = torch.tensor(list(COLORS.values()))  # [12, 3], the order of COLORS
OPACITY = 0.5  # a pixel belongs to a colour laid over the background with at least this share
PEAK_OPACITY = 0.8  # a blob's most opaque pixel must reach this (real blurred shapes: 0.94 and up) ...
THIN_PEAK_OPACITY = {("ring", "small"): OPACITY, ("ring", ""): 0.65}  # ... or this for thin rings (real: 0.55, 0.82)
RESIDUAL = 0.12  # RGB distance the colour-over-background mixture may miss a pixel by
PREFERENCE = 0.04  # a captioned colour must explain a pixel within this of the best palette colour
CORE_OPACITY = 0.9  # a colour's opaque core, whose rim another colour cannot claim
EDGE_OPACITY = 0.25  # ... as far as the core colour explains the rim pixel with this opacity
EDGE_REACH = 4  # pixels from a core that count as its rim (a blur of sigma 1.6 spreads an edge this far)
TONE_STEPS = 17  # points along the background's tone segment tried per pixel
OPACITY_COST = 0.1  # residual one unit of opacity costs: a pixel on the background's tones is background
BACKGROUND_TOLERANCE = 0.15  # RGB distance from the background's tones of a background pixel
BACKGROUND_SHARE = 0.8  # share of the pixels away from shapes that must be background
MIN_AREA = 12  # pixels: under a third of the smallest small shape
MAX_EXTENT = 44  # pixels: the widest large shape (a star of 1.1 x 15 px turned) and its blur
MAX_AREA = 1000  # pixels: a third more than the largest large shape
CHECKS = ("colors", "background", "place", "relation", "all")

_CAPTION = re.compile(
    r"^an? (?P<first>.+?) (?P<where>" + "|".join(map(re.escape, [*PLACES, *RELATIONS])) + r")(?: an? (?P<second>.+?))?"
    r" on an? (?P<background>\w+)(?: (?P<style>gradient|striped))? background$")


@dataclass(frozen=True)
class Noun:
    """One captioned shape: size word ("" = medium), colour, kind."""

    size: str
    color: str
    kind: str


@dataclass(frozen=True)
class Caption:
    """What a caption says: its shapes, their place (one) or relation (two), the background colour and style."""

    shapes: tuple[Noun, ...]
    where: str
    background: str
    style: str


def _noun(words: str, caption: str) -> Noun:
    parts = words.split()
    size = parts[0] if len(parts) == 3 else ""
    if len(parts) not in (2, 3) or size not in SIZES or parts[-2] not in COLORS:
        raise ValueError(f"cannot read the shape {words!r} of caption {caption!r}")
    return Noun(size, parts[-2], parts[-1])


def parse_caption(caption: str) -> Caption:
    """The facts of a caption of the shapes grammar (tuner/shapes/data.py); ValueError if it is not one."""
    m = _CAPTION.match(caption.strip())
    if m is None or m["background"] not in COLORS or (m["second"] is None) != (m["where"] in PLACES):
        raise ValueError(f"not a caption of the shapes grammar: {caption!r}")
    nouns = tuple(_noun(w, caption) for w in (m["first"], m["second"]) if w is not None)
    return Caption(nouns, m["where"], m["background"], m["style"] or "plain")


def background_tones(color: str, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tones a background runs between (equal for plain): the colour and a darker (or lighter) one."""
    base = torch.tensor(COLORS[color])
    if style == "plain":
        return base, base
    return base, base * 0.6 if float(base.mean()) > 0.3 else base + 0.25


def place_centre(place: str, size: str) -> tuple[float, float]:
    """Pixel centre (x, y) of a single shape's place for a size word, as the generator lays out its grid."""
    r = SIZES[size]
    low, high = r + 3, SIZE - r - 3
    fx, fy = PLACES[place]
    return low + fx * (high - low), low + fy * (high - low)


def nearest_place(x: float, y: float, size: str) -> str:
    """The place whose centre (for this size) lies nearest to (x, y)."""
    return min(PLACES, key=lambda p: math.dist((x, y), place_centre(p, size)))


def unmix(image: torch.Tensor, colors: torch.Tensor, tones: tuple[torch.Tensor, torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Opacity and residual [K,H,W] of each pixel as colour k laid over the nearest tone of the background.

    Per colour and tone point b the best opacity is the clamped projection of (pixel - b) on (colour - b); the
    tone point with the smallest residual wins, opacity counted as a small cost so that a pixel that the
    background explains stays background even where a colour lies on the line through it (gray beyond the tones
    of a white gradient). A blurred or anti-aliased shape edge is such a mixture.
    """
    t = torch.linspace(0, 1, TONE_STEPS)[:, None]
    b = tones[0] + t * (tones[1] - tones[0])  # [T,3]
    offset = image[None] - b[:, :, None, None]  # [T,3,H,W]
    direction = colors[:, None] - b[None]  # [K,T,3]
    dot = torch.einsum("tchw,ktc->kthw", offset, direction)
    length = direction.square().sum(-1)[..., None, None]  # [K,T,1,1]
    alpha = (dot / length.clamp(min=1e-6)).clamp(0, 1)
    squared = offset.square().sum(1)[None] - 2 * alpha * dot + alpha.square() * length
    residual = squared.clamp(min=0).sqrt()  # [K,T,H,W]
    best = (residual + OPACITY_COST * alpha).argmin(1, keepdim=True)
    return alpha.gather(1, best)[:, 0], residual.gather(1, best)[:, 0]


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels [H,W] of a boolean mask (0 outside; each component one positive label)."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w), 0.0)
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * mask
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def _dilate(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """Pixels within `reach` pixels (chessboard distance) of a mask [...,H,W]."""
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    return (F.max_pool2d(flat, 2 * reach + 1, stride=1, padding=reach) > 0).reshape(mask.shape)


@dataclass(frozen=True)
class Blob:
    """A connected set of pixels of one colour: its pixels, size, opacity-weighted centre, extent, peak opacity,
    border contact, and whether other colours enclose it (it shows through the hole of a ring)."""

    pixels: torch.Tensor = field(repr=False, compare=False)
    area: int
    x: float
    y: float
    extent: int
    peak: float
    touches_border: bool
    enclosed: bool

    def shape_like(self, noun: Noun) -> bool:
        """Whether the generator's shape `noun` could make this blob."""
        peak = THIN_PEAK_OPACITY.get((noun.kind, noun.size), PEAK_OPACITY)
        return (MIN_AREA <= self.area <= MAX_AREA and self.extent <= MAX_EXTENT and self.peak >= peak
                and not self.touches_border and not self.enclosed)


def _outside(walls: torch.Tensor) -> torch.Tensor:
    """Pixels [H,W] joined to the image border without crossing `walls` (dilated by a pixel to close blurred rims)."""
    free = ~_dilate(walls, 1)
    labels = components(free)
    frame = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return free & torch.isin(labels, frame[frame > 0])


def blobs(mask: torch.Tensor, alpha: torch.Tensor, walls: torch.Tensor) -> list[Blob]:
    """The blobs of a mask [H,W], largest first; `walls` marks the pixels of other colours."""
    labels, outside = components(mask), _outside(walls)
    out = []
    for label in labels.unique()[1:].tolist():
        pixels = labels == label
        ys, xs = torch.nonzero(pixels, as_tuple=True)
        w = alpha[ys, xs]
        extent = max(int(xs.max() - xs.min()), int(ys.max() - ys.min())) + 1
        border = bool((xs.min() == 0) | (ys.min() == 0) | (xs.max() == SIZE - 1) | (ys.max() == SIZE - 1))
        enclosed = not bool((pixels & outside).any())
        out.append(Blob(pixels, len(xs), float((xs + 0.5) @ w / w.sum()), float((ys + 0.5) @ w / w.sum()), extent,
                        float(w.max()), border, enclosed))
    return sorted(out, key=lambda b: -b.area)


def colour_masks(image: torch.Tensor, caption: Caption) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per captioned colour [n_shapes,H,W]: its pixels, their opacity, and the pixels of every other colour that
    are not its own rim (walls that may enclose it).

    A pixel is colour k when k laid over the background explains it (opacity, residual, within PREFERENCE of the
    best palette colour), unless another colour explains it as well and that colour's opaque core lies within
    EDGE_REACH pixels: then it is that shape's anti-aliased or blurred edge (gray at the rim of a black shape on
    white).
    """
    alpha, residual = unmix(image, PALETTE, background_tones(caption.background, caption.style))
    explained = (residual <= RESIDUAL) & (residual <= residual.amin(0) + PREFERENCE)  # [12,H,W]
    masks = explained & (alpha >= OPACITY)
    near_core = _dilate(explained & (alpha >= CORE_OPACITY), EDGE_REACH)
    edge_of = explained & (alpha >= EDGE_OPACITY) & near_core  # [12,H,W]: the rim of each colour's core
    index = [list(COLORS).index(s.color) for s in caption.shapes]
    others = [torch.arange(len(COLORS)) != k for k in index]
    own = torch.stack([masks[k] & ~edge_of[o].any(0) for k, o in zip(index, others)])
    mixed = explained & (alpha >= EDGE_OPACITY)  # a colour's own blurred rim, whichever colour it looks like
    walls = torch.stack([masks[o].any(0) & ~(mixed[k] & _dilate(m, EDGE_REACH))
                         for k, o, m in zip(index, others, own)])
    return own, alpha[index], walls


def tone_distance(image: torch.Tensor, tones: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RGB distance [H,W] of each pixel of [3,H,W] to the segment between the background's two tones."""
    pix, (a, b) = image.permute(1, 2, 0), tones
    t = ((pix - a) @ (b - a) / (b - a).square().sum().clamp(min=1e-6)).clamp(0, 1)
    return (pix - a - t[..., None] * (b - a)).norm(dim=-1)


def _background_ok(image: torch.Tensor, caption: Caption, shapes: torch.Tensor) -> bool:
    """Whether the pixels away from the shapes (dilated by 2 px) lie on the captioned background's tones."""
    away = ~_dilate(shapes, 2)
    on_tones = tone_distance(image, background_tones(caption.background, caption.style)) <= BACKGROUND_TOLERANCE
    return bool(away.any()) and float(on_tones[away].float().mean()) >= BACKGROUND_SHARE


def _relation_ok(first: Blob, second: Blob, relation: str) -> bool:
    dx, dy = RELATIONS[relation]
    sign, along_x = dx + dy, bool(dx)
    along = (first.x - second.x if along_x else first.y - second.y) * sign
    across = abs(first.y - second.y if along_x else first.x - second.x)
    return along > 0 and along > across


def judge_image(image: torch.Tensor, caption: str) -> dict[str, bool | None]:
    """Verdicts of one image [3,H,W] in [0,1] on its caption: colors, background, place or relation (None when
    not captioned), all."""
    if image.shape != (3, SIZE, SIZE):
        raise ValueError(f"the judge reads shapes images [3,{SIZE},{SIZE}]; got {tuple(image.shape)}")
    facts = parse_caption(caption)
    image = image.detach().float().cpu().clamp(0, 1)
    found = [[b for b in blobs(*planes) if b.shape_like(noun)]
             for noun, *planes in zip(facts.shapes, *colour_masks(image, facts))]
    shapes = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    for blob in (b for bs in found for b in bs):
        shapes |= blob.pixels
    out: dict[str, bool | None] = {"colors": all(found), "background": _background_ok(image, facts, shapes),
                                   "place": None, "relation": None}
    if len(facts.shapes) == 1:
        out["place"] = bool(found[0]) and nearest_place(found[0][0].x, found[0][0].y, facts.shapes[0].size) == \
            facts.where
    else:
        out["relation"] = all(found) and _relation_ok(found[0][0], found[1][0], facts.where)
    out["all"] = all(v for v in out.values() if v is not None)
    return out


def judge_each(images: torch.Tensor, captions: list[str]) -> list[dict[str, bool | None]]:
    """Verdicts of each image [B,3,H,W] in [0,1] on its caption (see judge_image)."""
    if len(images) != len(captions):
        raise ValueError(f"the judge needs one caption per image: {len(captions)} captions for {len(images)} images")
    return [judge_image(image, caption) for image, caption in zip(images, captions)]


def rates(verdicts: list[dict[str, bool | None]]) -> dict[str, float]:
    """Share of passes of each check over the images it applies to (checks that apply to none are left out)."""
    out = {}
    for check in CHECKS:
        seen = [v[check] for v in verdicts if v.get(check) is not None]
        if seen:
            out[check] = sum(seen) / len(seen)
    return out


def judge(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Per-check pass rates of images [B,3,64,64] in [0,1] on their shapes captions: colors, background, place
    (single shapes), relation (pairs), all; a check that applies to no image is left out."""
    return rates(judge_each(images, captions))


def run_metrics(model: str, captions: list[str]) -> Callable[[torch.Tensor], dict[str, float]] | None:
    """For a run on a shapes model whose evaluation captions the judge reads: images -> {eval/judge/<check>: rate}
    (logged with every evaluation, before and after in the run summary); None for any other run."""
    from tuner import shapes

    if model not in shapes.MODELS:
        return None
    try:
        for caption in captions:
            parse_caption(caption)
    except ValueError:
        return None
    return lambda images: {f"eval/judge/{k}": v for k, v in judge(images, captions).items()}


HELD_OUT_SEED = 1  # the dataset seed held out of the shapes models' training (the tuner's prompt files: seed 2)


def held_out_scenes(first: int, n: int, exclude: set[str]) -> list:
    """Held-out scenes first .. first + n - 1 of those whose caption is not in `exclude`."""
    from tuner.shapes.data import ShapesData

    data, scenes, index = ShapesData(HELD_OUT_SEED), [], 0
    while len(scenes) < first + n:
        scenes += [s for s in data.scenes(index, first + n) if s.caption not in exclude]
        index += first + n
    return scenes[first:first + n]


def held_out_captions(n: int, exclude: set[str] | list[str] = ()) -> list[str]:
    """The first n captions of the held-out dataset seed that are not in `exclude` (a run's training prompts)."""
    return [s.caption for s in held_out_scenes(0, n, set(exclude))]


def tallies(verdicts: list[dict[str, bool | None]]) -> dict[str, tuple[int, int]]:
    """(passes, images it applies to) of each check."""
    out = {}
    for check in CHECKS:
        seen = [v[check] for v in verdicts if v.get(check) is not None]
        if seen:
            out[check] = (sum(seen), len(seen))
    return out


def wilson(passes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a pass rate (sound near 0 and 1, unlike the normal approximation)."""
    p, z2 = passes / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_with_interval(passes: int, n: int) -> dict[str, float]:
    """{rate, low, high, n}: a pass rate with its 95% Wilson interval."""
    low, high = wilson(passes, n)
    return {"rate": passes / n, "low": low, "high": high, "n": n}


# ------------------------------------------------------------------------------------ the docs' figures
def sample_shapes_sd(captions: list[str], seed: int, steps: int = 25, guidance: float = 5.0, batch: int = 64,
                     device: str = "cpu", adapter=None) -> torch.Tensor:
    """Images [N,3,64,64] of shapes-sd (DDIM), or of `adapter` (any shapes model), caption i drawn from noise seed
    `seed` * 100003 + i, whatever the batch (tuner.engine.sample_each)."""
    from tuner import engine

    if adapter is None:
        adapter = _adapter(None, device)
    gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(captions))]
    return engine.sample_each(adapter, adapter.encode_prompts(captions), generators=gens, batch_size=batch,
                              height=SIZE, width=SIZE, num_steps=steps, guidance_scale=guidance).float().cpu()


def spread(values: list[float]) -> str:
    """mean +- std over seeds (n-1), then each seed's value, in percent."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{100 * mean:.1f} +- {100 * std:.1f} ({', '.join(f'{100 * v:.1f}' for v in values)})"


def seed_table(old: list[dict[str, float]], new: list[dict[str, float]]) -> str:
    """A markdown table of each check's rate, old checker beside the judge, over seeds."""
    rows = ["| check | old checker (tuner.shapes.evaluate) | judge (tuner.shapes.judge) |", "|---|---|---|"]
    for check in CHECKS:
        cells = [spread([r[check] for r in runs]) if check in runs[0] else "-" for runs in (old, new)]
        rows.append(f"| {check} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def broken_table(scenes: list) -> str:
    """A markdown table: the share of broken-on-purpose images (tuner.shapes.broken) each checker passes on the
    checks the breakage must fail, and on real images."""
    import random

    from tuner.shapes import broken
    from tuner.shapes.data import render
    from tuner.shapes.evaluate import caption_checks

    real = render(scenes)
    rows = ["| images | checks that must fail | old checker passes | judge passes |", "|---|---|---|---|"]
    old, new = caption_checks(real, scenes, real), judge(real, [s.caption for s in scenes])
    rows.append(f"| real ({len(scenes)}) | none: all should pass | " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                old.items()) + " | " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in new.items()) + " |")
    for breaker, must in broken.BREAKERS.items():
        rng = random.Random(breaker.__name__)
        pairs = [(s, b) for s in scenes if (b := breaker(s, rng)) is not None]
        images, kept = render([b for _, b in pairs]), [s for s, _ in pairs]
        old, new = caption_checks(images, kept, render(kept)), judge(images, [s.caption for s in kept])
        cells = [", ".join(f"{k} {100 * r[k]:.1f}%" for k in must) for r in (old, new)]
        what = " ".join(breaker.__doc__.split()).split(":")[0].split(" (")[0].rstrip(".").lower()
        rows.append(f"| {breaker.__name__} ({len(pairs)}): {what} "
                    f"| {', '.join(must)} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """python -m tuner.shapes.judge: old checkers and the judge on shapes-sd's held-out samples over noise seeds,
    and on the same samples of tuned LoRAs (--lora) beside it."""
    import argparse
    import json
    import time
    from pathlib import Path

    from tuner import shapes
    from tuner.prompts import read_prompts
    from tuner.shapes.data import ShapesData, render

    p = argparse.ArgumentParser(prog="python -m tuner.shapes.judge", description=main.__doc__)
    p.add_argument("--captions", type=int, default=128, help="held-out captions (seed 1 of the generator)")
    p.add_argument("--first", type=int, default=0,
                   help="skip this many held-out captions first: a test set apart from the one a run judged")
    p.add_argument("--exclude", help="a prompt file (name or path) whose captions are left out: a run's training "
                                     "prompts, as log.judge_captions leaves them out")
    p.add_argument("--seeds", default="0,1,2,3", help="noise seeds, comma-separated (at least 4 for a spread)")
    p.add_argument("--model", default="shapes-sd", choices=list(shapes.MODELS),
                   help="the shipped shapes model judged (and its LoRAs): shapes-sd (DDIM) or shapes-flow (flow Euler)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--lora", type=Path, action="append", default=[],
                   help="a tuned LoRA folder (pytorch_lora_weights.safetensors) judged on the same samples; repeatable")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=True,
                   help="judge the base model too (--no-base: only the LoRAs, e.g. one process per LoRA)")
    p.add_argument("--broken", type=int, default=400, help="held-out scenes to break on purpose (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = p.parse_args(argv)
    start = time.time()
    scenes = held_out_scenes(args.first, args.captions, set(read_prompts(args.exclude)) if args.exclude else set())
    captions, real = [s.caption for s in scenes], render(scenes)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    base = [(args.model, None)] if args.base else []
    for name, lora in base + [(str(path), path) for path in args.lora]:
        adapter = _adapter(lora, args.device, args.model)
        results[name] = _judge_samples(adapter, scenes, captions, real, seeds, args.steps, args.guidance, args.device)
        print(f"\n{name}, {args.captions} held-out captions from {args.first}, {args.steps} steps, guidance "
              f"{args.guidance}, seeds {args.seeds}:\n\n{seed_table(results[name]['old'], results[name]['judge'])}\n"
              f"pooled: {_pooled_line(results[name]['tallies'])}", flush=True)
    if args.broken:
        table = broken_table(ShapesData(1).scenes(0, args.broken))
        print(f"Held-out scenes {args.broken} broken on purpose:\n\n{table}\n")
    print(f"{time.time() - start:.0f} s")
    if args.out:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    if k not in ("out", "lora")}
        args.out.write_text(json.dumps({"settings": settings, "seeds": args.seeds, **results.get(args.model, {}),
                                        "models": results}, indent=2) + "\n")
    return 0


def _adapter(lora, device: str, model: str = "shapes-sd"):
    """A shipped shapes model, with a tuned LoRA folder loaded through the stock pipeline's load_lora_weights."""
    from tuner import pipelines, shapes

    adapter = pipelines.load_adapter(str(shapes.model_dir(model)), device=torch.device(device), dtype=torch.float32)
    if lora is not None:
        adapter.pipe.load_lora_weights(str(lora), adapter_name="tuned")
    return adapter


def _judge_samples(adapter, scenes, captions, real, seeds, steps, guidance, device) -> dict:
    """Old checks and judge rates per noise seed, and the judge's tallies pooled over the seeds."""
    from tuner.shapes.evaluate import caption_checks

    old, new, verdicts = [], [], []
    for seed in seeds:
        images = sample_shapes_sd(captions, seed, steps, guidance, device=device, adapter=adapter)
        old.append(caption_checks(images, scenes, real))
        each = judge_each(images, captions)
        new.append(rates(each))
        verdicts += each
    return {"old": old, "judge": new, "tallies": {k: list(v) for k, v in tallies(verdicts).items()}}


def _pooled_line(counts: dict) -> str:
    parts = []
    for check, (passes, n) in counts.items():
        low, high = wilson(passes, n)
        parts.append(f"{check} {100 * passes / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {n}")
    return ", ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
