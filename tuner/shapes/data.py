"""Procedural captioned shapes: 64x64 images of one or two coloured shapes on varied backgrounds.

Deterministic from (seed, index): `ShapesData(seed).batch(index, n)` always gives the same images and
captions, made on the fly (no files). Scenes are drawn on the CPU with a `random.Random`, rendered as
anti-aliased signed-distance fields in torch (any device). Captions follow one small grammar:

    a small red circle in the top left corner on a white background
    a blue star left of a large yellow hexagon on a gray striped background

What varies and is NOT captioned, so rewards have something to improve: a rotation jitter of each
shape, the exact position inside its region, and a blur of the whole image in a quarter of the samples.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

import torch

SIZE = 64
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10), "orange": (1.00, 0.55, 0.00), "yellow": (0.98, 0.86, 0.10),
    "green": (0.10, 0.68, 0.20), "cyan": (0.10, 0.80, 0.86), "blue": (0.12, 0.25, 0.90),
    "purple": (0.56, 0.16, 0.76), "pink": (1.00, 0.48, 0.72), "brown": (0.50, 0.30, 0.12),
    "white": (0.97, 0.97, 0.97), "gray": (0.52, 0.52, 0.52), "black": (0.06, 0.06, 0.06),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon")
SIZES = {"small": 6.5, "": 10.0, "large": 15.0}  # circumradius in pixels at 64x64; "" = medium, not captioned
BACKGROUNDS = ("plain", "gradient", "striped")
PLACES = {  # single-shape position phrase -> (x, y) as fractions of the free range
    "in the center": (0.5, 0.5), "at the top": (0.5, 0.0), "at the bottom": (0.5, 1.0),
    "on the left": (0.0, 0.5), "on the right": (1.0, 0.5),
    "in the top left corner": (0.0, 0.0), "in the top right corner": (1.0, 0.0),
    "in the bottom left corner": (0.0, 1.0), "in the bottom right corner": (1.0, 1.0),
}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}
MIN_CONTRAST = 0.35  # smallest RGB distance between a shape and the background (and between two shapes)
BLUR_P, BLUR_SIGMA = 0.25, (0.6, 1.6)
ROTATION_JITTER = 15.0  # degrees, uniform in +-this


@dataclass
class Shape:
    """One shape: kind, colour name, size word, centre (pixels), circumradius (pixels), rotation (radians)."""

    kind: str
    color: str
    size: str
    x: float
    y: float
    radius: float
    angle: float


@dataclass
class Scene:
    """Everything rendered and captioned for one image."""

    shapes: list[Shape]
    background: str
    style: str  # plain, gradient or striped
    style_angle: float  # direction of the gradient or of the stripes (radians)
    stripe_period: float
    blur: float  # gaussian sigma in pixels, 0 = sharp
    relation: str = ""  # two shapes: how shapes[0] stands to shapes[1]; one shape: its place phrase
    caption: str = field(default="")


def _distance(a: str, b: str) -> float:
    return math.dist(COLORS[a], COLORS[b])


def _noun_phrase(s: Shape) -> str:
    words = ([s.size] if s.size else []) + [s.color, s.kind]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _background_phrase(scene: Scene) -> str:
    words = scene.background + ("" if scene.style == "plain" else f" {scene.style}")
    return f"on {'an' if words[0] in 'aeiou' else 'a'} {words} background"


def caption(scene: Scene) -> str:
    """The caption of a scene (one grammar; see the module docstring)."""
    if len(scene.shapes) == 1:
        subject = f"{_noun_phrase(scene.shapes[0])} {scene.relation}"
    else:
        subject = f"{_noun_phrase(scene.shapes[0])} {scene.relation} {_noun_phrase(scene.shapes[1])}"
    return f"{subject} {_background_phrase(scene)}"


def _colors(rng: random.Random, n: int) -> tuple[str, list[str]]:
    """A background colour and n shape colours that stand out from it and from each other."""
    names = list(COLORS)
    while True:
        bg = rng.choice(names)
        picks = rng.sample(names, n)
        if all(_distance(c, bg) >= MIN_CONTRAST for c in picks) and (n == 1 or _distance(*picks) >= MIN_CONTRAST):
            return bg, picks


def _single(rng: random.Random, color: str) -> tuple[list[Shape], str]:
    size = rng.choice(list(SIZES))
    radius = SIZES[size] * rng.uniform(0.9, 1.1)
    place = rng.choice(list(PLACES))
    fx, fy = PLACES[place]
    low, high = radius + 3, SIZE - radius - 3
    jitter = lambda f: min(max(low + f * (high - low) + rng.uniform(-3, 3), low), high)  # noqa: E731
    shape = Shape(rng.choice(SHAPES), color, size, jitter(fx), jitter(fy), radius, 0.0)
    return [shape], place


def _pair(rng: random.Random, colors: list[str]) -> tuple[list[Shape], str]:
    relation = rng.choice(list(RELATIONS))
    dx, dy = RELATIONS[relation]
    direction = dx + dy  # -1: shapes[0] lies at smaller x (or y) than shapes[1]
    sizes = [rng.choice(["small", ""]) if rng.random() < 0.8 else "large" for _ in range(2)]
    if sizes == ["large", "large"]:
        sizes[1] = "small"
    r = [SIZES[s] * rng.uniform(0.9, 1.1) for s in sizes]
    gap = min(r[0] + r[1] + rng.uniform(4, 10), SIZE - 6 - r[0] - r[1])  # centre distance: apart, yet both fit
    # the pair's midpoint along the relation axis, so that both shapes stay 3 pixels inside the image
    lo = max(r[0] + 3 - direction * gap / 2, r[1] + 3 + direction * gap / 2)
    hi = min(SIZE - r[0] - 3 - direction * gap / 2, SIZE - r[1] - 3 + direction * gap / 2)
    mid = rng.uniform(lo, hi)
    across = rng.uniform(max(r) + 3, SIZE - max(r) - 3)
    shapes = []
    for k, sign in ((0, direction), (1, -direction)):
        along = mid + sign * gap / 2
        side = min(max(across + rng.uniform(-2.5, 2.5), r[k] + 3), SIZE - r[k] - 3)
        x, y = (along, side) if dx else (side, along)
        shapes.append(Shape(rng.choice(SHAPES), colors[k], sizes[k], x, y, r[k], 0.0))
    return shapes, relation


def sample_scene(rng: random.Random) -> Scene:
    """Draw one scene (and its caption) from `rng`."""
    n = 1 if rng.random() < 0.5 else 2
    bg, colors = _colors(rng, n)
    shapes, relation = _single(rng, colors[0]) if n == 1 else _pair(rng, colors)
    for s in shapes:
        s.angle = math.radians(rng.uniform(-ROTATION_JITTER, ROTATION_JITTER))
    style = rng.choices(BACKGROUNDS, weights=(0.6, 0.2, 0.2))[0]
    scene = Scene(
        shapes=shapes, background=bg, style=style, style_angle=rng.choice((0.0, 0.5, 0.25, 0.75)) * math.pi,
        stripe_period=rng.uniform(7, 14), blur=rng.uniform(*BLUR_SIGMA) if rng.random() < BLUR_P else 0.0,
        relation=relation,
    )
    scene.caption = caption(scene)
    return scene


# ---------------------------------------------------------------------------------------------- rendering
_STYLE = {name: i for i, name in enumerate(BACKGROUNDS)}
_KIND = {name: i for i, name in enumerate(SHAPES)}
BLUR_RADIUS = 5  # kernel half-width in pixels; covers 3 sigma of the largest blur


def scene_tensors(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Scenes as a batch of plain tensors (two shape slots; kind -1 marks an empty slot), ready to render."""
    b = len(scenes)
    kind, geom, color = torch.full((b, 2), -1), torch.zeros(b, 2, 4), torch.zeros(b, 2, 3)
    for i, scene in enumerate(scenes):
        for k, s in enumerate(scene.shapes):
            kind[i, k] = _KIND[s.kind]
            geom[i, k] = torch.tensor([s.x, s.y, s.radius, s.angle])
            color[i, k] = torch.tensor(COLORS[s.color])
    base = torch.tensor([COLORS[s.background] for s in scenes])
    return {
        "kind": kind, "geometry": geom, "color": color, "base": base,
        "style": torch.tensor([_STYLE[s.style] for s in scenes]),
        "background": torch.tensor([[s.style_angle, s.stripe_period, s.blur] for s in scenes]),
    }


def _polygon_sdf(px: torch.Tensor, py: torch.Tensor, n: int, apothem: torch.Tensor, phase: float) -> torch.Tensor:
    """Signed distance (exact inside, a lower bound outside) to a regular n-gon: max over its edge half-planes."""
    angles = phase + 2 * math.pi * torch.arange(n, device=px.device, dtype=px.dtype) / n
    proj = px[..., None] * angles.cos() + py[..., None] * angles.sin()
    return proj.amax(-1) - apothem


def _star_sdf(px: torch.Tensor, py: torch.Tensor, radius: torch.Tensor, points: int = 5, inner: float = 0.45):
    """Signed distance to a star with a tip pointing up, by folding the plane into one half-wedge."""
    wedge = math.pi / points
    theta = torch.atan2(px, -py).abs() % (2 * wedge)  # 0 at the top tip (image y grows downwards)
    theta = torch.where(theta > wedge, 2 * wedge - theta, theta)
    rho = torch.sqrt(px * px + py * py)
    qx, qy = rho * torch.sin(theta), rho * torch.cos(theta)  # folded point; the tip lies on +y
    ex, ey = inner * radius * math.sin(wedge), inner * radius * math.cos(wedge) - radius  # tip -> inner vertex
    t = ((qx * ex + (qy - radius) * ey) / (ex * ex + ey * ey)).clamp(0, 1)
    dist = torch.sqrt((qx - t * ex) ** 2 + (qy - radius - t * ey) ** 2)
    outside = qx * ey - (qy - radius) * ex < 0  # which side of the edge line the point lies on
    return torch.where(outside, dist, -dist)


def _box_sdf(px, py, hx, hy):
    qx, qy = px.abs() - hx, py.abs() - hy
    return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)


def shape_sdf(kind: str, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of shape `kind` with circumradius r, centred and unrotated."""
    if kind == "circle":
        return torch.sqrt(px * px + py * py) - 0.85 * r
    if kind == "ring":
        return (torch.sqrt(px * px + py * py) - 0.72 * r).abs() - 0.22 * r
    if kind == "square":
        return _polygon_sdf(px, py, 4, 0.72 * r, 0.0)
    if kind == "diamond":  # a rhombus, taller than wide: a square turned 45 degrees and squeezed sideways
        return _polygon_sdf(px / 0.7, py, 4, r / math.sqrt(2), math.pi / 4) * 0.7
    if kind == "triangle":  # pointing up: edge normals at 90, 210 and 330 degrees (y down)
        return _polygon_sdf(px, py + 0.15 * r, 3, 0.55 * r, math.pi / 2)
    if kind == "hexagon":
        return _polygon_sdf(px, py, 6, 0.85 * r, 0.0)
    if kind == "star":
        return _star_sdf(px, py, 1.05 * r)
    if kind == "cross":
        arm, half = 0.9 * r, 0.3 * r
        return torch.minimum(_box_sdf(px, py, arm, half), _box_sdf(px, py, half, arm))
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")


def _backgrounds(t: dict[str, torch.Tensor], gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W]: plain colour, a gradient to a darker (or lighter) tone, or stripes of the two tones."""
    base = t["base"][:, :, None, None]
    other = torch.where(base.mean(1, keepdim=True) > 0.3, base * 0.6, base + 0.25)
    angle, period = t["background"][:, 0, None, None], t["background"][:, 1, None, None]
    u = (gx * angle.cos() + gy * angle.sin()) / SIZE
    low, high = u.amin((1, 2), keepdim=True), u.amax((1, 2), keepdim=True)
    gradient = (u - low) / (high - low)
    stripes = (torch.sin(2 * math.pi * u * SIZE / period) > 0).to(u.dtype)
    style = t["style"][:, None, None]
    w = torch.where(style == _STYLE["gradient"], gradient, torch.where(style == _STYLE["striped"], stripes, 0.0))
    return base + (other - base) * w[:, None]


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable gaussian blur (sigma 0 leaves the image as it is), replicate padding."""
    b, c, h, w = images.shape
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-0.5 * (offsets / sigma.clamp(min=1e-3)[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, taps]
    x = torch.nn.functional.pad(images.reshape(1, b * c, h, w), (BLUR_RADIUS,) * 4, mode="replicate")
    x = torch.nn.functional.conv2d(x, k[:, None, None, :], groups=b * c)
    x = torch.nn.functional.conv2d(x, k[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def render_tensors(t: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Images [B,3,64,64] in [0,1] of `scene_tensors` output: background, then each shape anti-aliased over 1 px."""
    t = {k: v.to(device) for k, v in t.items()}
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    image = _backgrounds(t, gx[None], gy[None])
    for k in range(t["kind"].shape[1]):
        x, y, r, angle = (t["geometry"][:, k, j, None, None] for j in range(4))
        dx, dy = gx - x, gy - y
        px, py = angle.cos() * dx + angle.sin() * dy, -angle.sin() * dx + angle.cos() * dy  # rotate by -angle
        kind = t["kind"][:, k, None, None]
        d = torch.full_like(px, float("inf"))
        for i, name in enumerate(SHAPES):
            d = torch.where(kind == i, shape_sdf(name, px, py, r), d)
        alpha = (0.5 - d).clamp(0, 1)[:, None]
        image = image * (1 - alpha) + t["color"][:, k, :, None, None] * alpha
    sigma = t["background"][:, 2]
    if bool((sigma > 0).any()):
        image = torch.where((sigma > 0)[:, None, None, None], blur(image, sigma), image)
    return image.clamp(0, 1)


def render(scenes: list[Scene], device: torch.device | str = "cpu") -> torch.Tensor:
    """Images [B,3,64,64] in [0,1] of a list of scenes."""
    return render_tensors(scene_tensors(scenes), device)


class ShapesData:
    """The dataset: item `index` of seed `seed` is always the same scene. Seed 0 trains, seed 1 is held out."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def scenes(self, index: int, n: int) -> list[Scene]:
        """Scenes index .. index + n - 1."""
        return [sample_scene(random.Random(f"shapes-{self.seed}-{i}")) for i in range(index, index + n)]

    def batch(self, index: int, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[str]]:
        """Images [n, 3, 64, 64] in [0, 1] and their captions."""
        scenes = self.scenes(index, n)
        return render(scenes, device), [s.caption for s in scenes]


def vocabulary() -> list[str]:
    """Every word a caption can use (the text encoder's tokenizer holds each as one token)."""
    words = {"a", "an", "on", "background", *SHAPES, *COLORS, *(s for s in SIZES if s), *BACKGROUNDS}
    for phrase in [*PLACES, *RELATIONS]:
        words.update(phrase.split())
    words.discard("plain")
    return sorted(words)


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def relation_swapped(scene: Scene) -> str:
    """The caption of a two-shape scene with the opposite relation (left of <-> right of, above <-> below)."""
    return caption(dataclasses.replace(scene, relation=OPPOSITE[scene.relation]))


def colours_swapped(scene: Scene) -> str:
    """The caption of a two-shape scene with its shapes' colours exchanged (the same caption if they match)."""
    first, second = (dataclasses.replace(s) for s in scene.shapes)
    first.color, second.color = second.color, first.color
    return caption(dataclasses.replace(scene, shapes=[first, second]))


def mismatched_caption(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(caption with exactly one fact changed, which fact): a hard negative for contrastive training and tests.

    Facts: a shape's colour, kind or size, the place (one shape) or relation (two shapes, flipped), the
    background colour, and for two shapes the swap of their colours.
    """
    shapes = [dataclasses.replace(s) for s in scene.shapes]
    other = dataclasses.replace(scene, shapes=shapes)
    choices = ["color", "kind", "size", "where", "background"] + (["swap"] if len(shapes) == 2 else [])
    if len(shapes) == 2 and shapes[0].color == shapes[1].color:
        choices.remove("swap")
    fact = rng.choice(choices)
    target = rng.choice(shapes)
    if fact == "color":
        target.color = rng.choice([c for c in COLORS if c not in (target.color, scene.background)])
    elif fact == "kind":
        target.kind = rng.choice([k for k in SHAPES if k != target.kind])
    elif fact == "size":
        target.size = rng.choice([s for s in SIZES if s != target.size])
    elif fact == "where":
        other.relation = OPPOSITE[scene.relation] if len(shapes) == 2 else rng.choice(
            [p for p in PLACES if p != scene.relation])
    elif fact == "background":
        used = {s.color for s in shapes}
        other.background = rng.choice([c for c in COLORS if c != scene.background and c not in used])
    else:
        shapes[0].color, shapes[1].color = shapes[1].color, shapes[0].color
    return caption(other), fact
