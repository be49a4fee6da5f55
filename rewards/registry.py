"""Reward registry: names map to lazily imported factories, so `import rewards` stays light."""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass

import torch

from .base import Reward
from .errors import UnknownRewardError


@dataclass(frozen=True)
class Entry:
    """Where a reward's factory lives; imported only when the reward is loaded."""

    target: str  # "module:function"
    needs_prompt: bool  # known without importing the factory (the CLI checks prompts before loading)
    kwargs: tuple[tuple[str, object], ...] = ()
    dtype: torch.dtype | None = None  # the weights' dtype when load() is given none (float32 if unset)


_REGISTRY: dict[str, Entry] = {}


def register(name: str, target: str, *, needs_prompt: bool, dtype: torch.dtype | None = None, **kwargs) -> None:
    """Register factory `target` ("rewards.module:function") under `name`, with fixed keyword arguments and the
    default weight dtype (float32 if None)."""
    _REGISTRY[name] = Entry(target, needs_prompt, tuple(kwargs.items()), dtype)


def needs_prompt(name: str) -> bool:
    """Whether reward `name` scores images against prompts (no model is loaded to tell)."""
    return _entry(name).needs_prompt


def available() -> list[str]:
    """Names of all registered rewards."""
    return list(_REGISTRY)


def load(
    name: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    fast: bool = False,
    compile: bool | dict = False,
    recompute: bool = False,
    **sources,
) -> Reward:
    """Build reward `name` from local files given in `sources` (else the hub), frozen, on `device` in `dtype`.

    `fast=True` and `compile=True` (or a dict of torch.compile options) speed up the gradient; `recompute=True`
    trades time for memory (activation checkpointing of each block); see rewards.speed."""
    entry = _entry(name)
    module_name, func_name = entry.target.split(":")
    factory = getattr(importlib.import_module(module_name), func_name)
    _check_sources(name, factory, sources, fixed=dict(entry.kwargs))
    device = torch.device(device) if device is not None else torch.device("cpu")
    reward = factory(device=device, dtype=dtype or entry.dtype or torch.float32, **dict(entry.kwargs), **sources)
    if reward.needs_prompt != entry.needs_prompt:
        raise RuntimeError(f"reward {name!r} is registered with needs_prompt={entry.needs_prompt} but is {reward.needs_prompt}")
    reward.eval().requires_grad_(False)
    if fast or compile or recompute:
        from .speed import optimize

        optimize(reward, fast=fast, compile=compile, recompute=recompute)
    return reward


def _entry(name: str) -> Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownRewardError(f"unknown reward {name!r}.{hint} Available: {', '.join(available())}")


def _check_sources(name: str, factory, sources: dict, fixed: dict) -> None:
    params = inspect.signature(factory).parameters
    skip = {"device", "dtype", *fixed}  # options the registry entry fixes (e.g. HPS's version) are not the user's
    allowed = [p for p in params if p not in skip and params[p].kind == inspect.Parameter.KEYWORD_ONLY]
    unknown = [key for key in sources if key not in allowed]
    if unknown:
        raise TypeError(
            f"rewards.load({name!r}) got unexpected option(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(allowed) or 'no options'}"
        )
