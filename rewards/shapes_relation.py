"""shapes-relation: does a shapes image put its shapes where its caption says? A contrast of captions under a CLIP.

The score is the log-probability, under the CLIP's own softmax (logit_scale x cosine), of the image's caption among
the captions that say the same things with the shapes placed otherwise:

- two shapes ("a red circle left of a blue square ..."): the caption with the opposite relation ("... right of ...")
  and the caption with the two colours exchanged (the shapes trade places);
- one shape ("a red circle in the top left corner ..."): the caption at each of the other eight places.

It is 0 when the CLIP is sure the layout is the captioned one and falls as it prefers another, and it saturates once
the layout is right: tuning on it pushes images whose shapes stand wrong, not the pixels of those already right.
The CLIP is the shipped shapes-clip (it already tells every rendered pair from its relation- and colour-swapped
caption, and agrees with the ground-truth judge on shapes-sd's samples: docs/shapes.md), or any open_clip folder of
the shapes domain (`checkpoint`), such as the one `python -m tuner.shapes.train --stage relation` fine-tunes from it
with these hard negatives on noisy, blurred and adversarially perturbed views. Captions must follow the shapes
grammar (tuner/shapes/data.py).

`blur` (Gaussian sigma in pixels of the input image, default 0: none) shows the CLIP only a low-pass view: a layout
survives it, while the fine pixel patterns that fool a CLIP (docs/shapes.md, "Can the CLIP tell a relation apart?")
do not, so tuning on the blurred score has to move shapes rather than paint over them.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import openclip
from .clip_score import SHAPES_CLIP_DIR, ClipScore, _load_folder
from .errors import InputError


def _grammar() -> tuple[list[str], list[str], dict[str, str]]:
    from tuner.shapes.data import COLORS, OPPOSITE, PLACES

    return list(COLORS), list(PLACES), OPPOSITE


def _articles(words: list[str]) -> list[str]:
    """'a' or 'an' before each word as its first letter asks (after a colour or size word changed)."""
    return [("an" if words[i + 1][0] in "aeiou" else "a") if w in ("a", "an") and i + 1 < len(words) else w
            for i, w in enumerate(words)]


def alternatives(caption: str) -> list[str]:
    """The captions that say what `caption` says with its shapes placed otherwise (see the module docstring);
    InputError for a caption outside the shapes grammar."""
    colours, places, opposite = _grammar()
    text = " ".join(caption.split())
    for relation, other in opposite.items():
        marker = f" {relation} a"
        if marker in text:
            first, rest = text.split(marker, 1)
            flipped = f"{first} {other} a{rest}"
            words = text.split()
            tail = len(words) - 1 - words[::-1].index("on")  # the background phrase starts at the last "on"
            at = [i for i, w in enumerate(words[:tail]) if w in colours]
            if len(at) != 2:
                break
            words[at[0]], words[at[1]] = words[at[1]], words[at[0]]
            return [flipped, " ".join(_articles(words))]
    for place in places:
        if f" {place} on " in text:
            return [text.replace(f" {place} on ", f" {p} on ", 1) for p in places if p != place]
    raise InputError(f"shapes-relation: {caption!r} is not a caption of the shapes grammar (one shape and its place, "
                     f"or two shapes and their relation; tuner/shapes/data.py)")


def low_pass(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """`images` under a Gaussian blur of `sigma` pixels (reflected borders); unchanged for sigma 0."""
    if sigma <= 0:
        return images
    from kornia.filters import gaussian_blur2d

    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(images, (size, size), (sigma, sigma), border_type="reflect")


class RelationScore(ClipScore):
    """log P(caption | image) among the caption and its differently placed alternatives, under a shapes CLIP."""

    name = "shapes-relation"
    scale_note = "log-probability in (-inf, 0]: 0 = the captioned layout, log(1/3) = no preference among a pair's 3"

    blur: float = 0.0

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        image = openclip.image_features(self.model, self.preprocess(low_pass(images, self.blur))).float()
        options = [[p, *alternatives(p)] for p in prompts]
        text = self.text_features([c for group in options for c in group])
        scale = self.model.logit_scale.exp().float()
        out, start = [], 0
        for i, group in enumerate(options):
            logits = scale * text[start:start + len(group)] @ image[i]
            out.append(torch.log_softmax(logits, dim=0)[0])
            start += len(group)
        return torch.stack(out)


def load_shapes_relation(*, device: torch.device, dtype: torch.dtype, checkpoint: str | os.PathLike | None = None,
                         pil_8bit: bool = True, blur: float = 0.0) -> RelationScore:
    """The relation reward on the shipped shapes CLIP, or on the shapes open_clip folder `checkpoint`; `blur`: the
    Gaussian sigma (pixels) of the low-pass view the CLIP sees (see the module docstring)."""
    blur = float(blur)
    if blur < 0:
        raise InputError(f"shapes-relation: blur must be a sigma in pixels >= 0, got {blur}")
    folder = Path(checkpoint) if checkpoint is not None else SHAPES_CLIP_DIR
    reward = _load_folder(folder, device, dtype, pil_8bit, cls=RelationScore)
    reward.blur = blur
    return reward
