"""A weighted sum of rewards that is itself a reward and reports each part's score."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .base import Reward
from .errors import InputError


class Mixture(Reward):
    """sum_i w_i * r_i(images, prompts); `last_parts` holds each part's detached scores from the last call."""

    name = "mixture"

    def __init__(self, parts: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        super().__init__()
        if not parts:
            raise InputError("combine() needs at least one reward")
        self.labels = list(parts)  # reward names may hold dots ("hpsv2.1"), which module names may not
        self.parts = nn.ModuleList(parts.values())
        self.weights = {k: float(weights[k]) for k in parts}
        self.needs_prompt = any(p.needs_prompt for p in self.parts)
        self.name = " + ".join(f"{w:g}*{k}" for k, w in self.weights.items())
        self.last_parts: dict[str, torch.Tensor] = {}
        for part in self.parts:
            part.check_values = False  # the mixture checks once for all parts

    def part(self, label: str) -> Reward:
        """The part reward named `label`."""
        return self.parts[self.labels.index(label)]

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        total, parts = None, {}
        for key, reward in zip(self.labels, self.parts):
            value = reward(images, prompts)
            parts[key] = value.detach()
            total = self.weights[key] * value if total is None else total + self.weights[key] * value
        self.last_parts = parts
        return total


def combine(
    weights: Mapping[str, float] | Sequence[tuple[Reward | str, float]],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    sources: Mapping[str, Mapping[str, str]] | None = None,
) -> Mixture:
    """Weighted sum of rewards given as {name: weight} or [(reward, weight), ...]; `sources[name]` are its files."""
    from .registry import load

    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    sources = dict(sources or {})
    parts, w = {}, {}
    for key, weight in items:
        reward = load(key, device=device, dtype=dtype, **sources.pop(key, {})) if isinstance(key, str) else key
        label = key if isinstance(key, str) else reward.name
        if label in parts:
            raise InputError(f"combine(): reward {label!r} given twice")
        parts[label], w[label] = reward, weight
    if sources:
        raise InputError(f"combine(): sources given for {', '.join(sources)}, which are not in the mixture")
    return Mixture(parts, w)
