"""Keep-best and early stopping on a guard metric, evaluated on SELECTION prompts and seeds.

Every guards.select_every steps (and once on the base model at step 0) the main process samples one image per
selection prompt (prompt i seeded guards.select_seed + i, as evaluation samples) with the weights the run would save
(EMA if any), scores them with the guard metric and logs `select/score`. The selection prompts are disjoint from
the training prompts and from the evaluation (test) prompts, and their seeds from the evaluation seeds: a model
selected on them is still measured fairly on the evaluation set.

A guard metric is a reward name (rewards.available(); its mean score), `shapes-judge` (tuner.shapes.judge:judge, the
hardened shapes checker), or any `module:function` taking (images [B,3,H,W] in [0,1], captions) and returning a
float, a [B] tensor (averaged) or a dict of floats (guards.select_key picks one; unset, their mean). Higher is
better. It is resolved when the run starts, so a judge written after this module works without changes here.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

JUDGE = "shapes-judge"
JUDGE_TARGET = "tuner.shapes.judge:judge"


def target(name: str) -> str | None:
    """The module:function a metric name stands for, or None for a reward name."""
    if name == JUDGE:
        return JUDGE_TARGET
    return name if ":" in name else None


def check(name: str) -> None:
    """Refuse a metric that cannot be resolved, with what to do instead (before any model loads)."""
    spot = target(name)
    if spot is None:
        import rewards

        if name not in rewards.available():
            raise ValueError(f"{name!r} is neither a reward ({', '.join(rewards.available())}), {JUDGE}, nor a "
                             f"module:function")
        return
    module = spot.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ValueError(f"module {module} of the metric {name!r} is not importable; use a reward name, {JUDGE} "
                         f"or another module:function")


def load_metric(name: str, *, key: str | None = None, device=None, sources: dict | None = None
                ) -> Callable[[torch.Tensor, list[str]], float]:
    """The metric `name` as a function (images, captions) -> float (higher is better)."""
    check(name)
    spot = target(name)
    if spot is None:
        import rewards

        fn = rewards.load(name, device=device, **(sources or {}))
    else:
        module, attr = spot.split(":", 1)
        fn = getattr(importlib.import_module(module), attr)
    return lambda images, captions: as_score(fn(images, captions), key, name)


def as_score(value: Any, key: str | None, name: str) -> float:
    """One number from what a metric returned."""
    if isinstance(value, dict):
        if key is not None:
            if key not in value:
                raise KeyError(f"guard metric {name} returned {sorted(value)}, not guards.select_key={key!r}")
            return float(value[key])
        return sum(float(v) for v in value.values()) / len(value)
    if torch.is_tensor(value):
        return float(value.detach().float().mean())
    return float(value)


@dataclass
class Selection:
    """The best score so far, its step, and the evaluations since it (restored from checkpoints on resume)."""

    best: float = -math.inf
    best_step: int = -1
    since_best: int = 0

    def update(self, step: int, score: float) -> bool:
        """Record an evaluation; True when it is a new best (a NaN never is)."""
        if score > self.best:
            self.best, self.best_step, self.since_best = score, step, 0
            return True
        self.since_best += 1
        return False

    def exhausted(self, patience: int) -> bool:
        """Whether early stopping (patience evaluations without a new best; 0: never) ends the run."""
        return patience > 0 and self.since_best >= patience


def split_prompts(train: list[str], evaluation: list[str], *, file: str | None, num: int, seed: int
                  ) -> tuple[list[str], list[str]]:
    """(training prompts left, selection prompts): `num` held out of the training prompts, or read from `file`;
    refuses any overlap with the training or evaluation prompts."""
    from tuner.prompts import read_prompts, split

    if file is None:
        train, chosen = split(train, num, seed)
    else:
        chosen = read_prompts(file)[:num]
    for other, what in ((train, "training"), (evaluation, "evaluation")):
        shared = sorted(set(chosen) & set(other))
        if shared:
            raise ValueError(f"selection prompts must be disjoint from the {what} prompts; {len(shared)} shared, "
                             f"e.g. {shared[0]!r}")
    return train, chosen
