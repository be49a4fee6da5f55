"""Scenes broken on purpose: each keeps its caption while the picture stops following it in one known way.

A judge of shapes images must fail the named checks on every such image (tests/test_shapes_judge.py, and the
table in docs/shapes.md). Each breaker takes a scene and a `random.Random` and returns the broken scene, or
None where it does not apply (moving needs one shape, swapping two). The caption is never changed.
"""
from __future__ import annotations

import dataclasses
import math
import random

from tuner.shapes.data import COLORS, MIN_CONTRAST, PLACES, SIZE, Scene

_NEIGHBOURS = {0.0: (0.5,), 0.5: (0.0, 1.0), 1.0: (0.5,)}


def _copy(scene: Scene) -> Scene:
    return dataclasses.replace(scene, shapes=[dataclasses.replace(s) for s in scene.shapes])


def moved(scene: Scene, rng: random.Random) -> Scene | None:
    """One shape moved to a neighbouring place (one axis one step along the grid), jittered as the generator
    jitters a place."""
    if len(scene.shapes) != 1:
        return None
    out = _copy(scene)
    shape = out.shapes[0]
    fx, fy = PLACES[scene.relation]
    axis = rng.randrange(2)
    step = rng.choice(_NEIGHBOURS[(fx, fy)[axis]])
    target = (step, fy) if axis == 0 else (fx, step)
    low, high = shape.radius + 3, SIZE - shape.radius - 3
    shape.x, shape.y = (min(max(low + f * (high - low) + rng.uniform(-3, 3), low), high) for f in target)
    return out


def swapped(scene: Scene, rng: random.Random) -> Scene | None:
    """Two shapes that trade places (each kept inside the image): the captioned relation reversed. None where a
    large shape would not fit the small one's place."""
    if len(scene.shapes) != 2:
        return None
    out = _copy(scene)
    a, b = out.shapes
    a.x, a.y, b.x, b.y = b.x, b.y, a.x, a.y
    for s in (a, b):
        s.x, s.y = (min(max(v, s.radius + 3), SIZE - s.radius - 3) for v in (s.x, s.y))
    return out if math.dist((a.x, a.y), (b.x, b.y)) >= a.radius + b.radius else None


def sideways(scene: Scene, rng: random.Random) -> Scene | None:
    """Two shapes set apart on the other axis, still 1-4 px in the captioned order on the relation's axis."""
    if len(scene.shapes) != 2:
        return None
    out = _copy(scene)
    a, b = out.shapes
    horizontal = scene.relation in ("left of", "right of")
    sign = -1 if scene.relation in ("left of", "above") else 1  # where shapes[0] lies from shapes[1]
    gap = a.radius + b.radius + rng.uniform(4, 8)
    mid_x, mid_y = (a.x + b.x) / 2, (a.y + b.y) / 2
    small = sign * rng.uniform(1, 4) / 2
    side = rng.choice((-1, 1)) * gap / 2
    if horizontal:  # apart vertically, a little apart horizontally in the captioned order
        a.x, a.y, b.x, b.y = mid_x + small, mid_y + side, mid_x - small, mid_y - side
    else:
        a.x, a.y, b.x, b.y = mid_x + side, mid_y + small, mid_x - side, mid_y - small
    for s in (a, b):
        s.x, s.y = (min(max(v, s.radius + 3), SIZE - s.radius - 3) for v in (s.x, s.y))
    return out


def recoloured(scene: Scene, rng: random.Random) -> Scene | None:
    """One shape in another colour that stands out from the old one, the background and the other shape."""
    out = _copy(scene)
    target = rng.choice(out.shapes)
    others = [s.color for s in out.shapes if s is not target]
    avoid = [target.color, scene.background, *others]
    choices = [c for c in COLORS if all(math.dist(COLORS[c], COLORS[o]) >= MIN_CONTRAST for o in avoid)]
    target.color = rng.choice(choices)
    return out


def background(scene: Scene, rng: random.Random) -> Scene | None:
    """The background replaced by a striped or gradient one of a captioned shape's colour."""
    out = _copy(scene)
    out.background = rng.choice(out.shapes).color
    out.style = rng.choice(("striped", "gradient"))
    return out


def fed(scene: Scene, rng: random.Random) -> Scene | None:
    """A captioned shape removed, and the background made a striped or gradient one of its colour."""
    out = background(scene, rng)
    out.shapes = [s for s in out.shapes if s.color != out.background]
    return out


# breaker -> the checks that must fail on its images
BREAKERS = {
    moved: ("place",),
    swapped: ("relation",),
    sideways: ("relation",),
    recoloured: ("colors",),
    background: ("background",),
    fed: ("colors", "background"),
}
