"""Pieces of the low-memory mode (`train.memory: low`, docs/tuner.md "Low-memory mode") that are not tied to one
model family: block-wise activation checkpointing switched on for a stretch of code, and a cache of the text
conditioning of a fixed prompt set, so the text encoders can leave the GPU.

Both keep the computation exact: a checkpointed block recomputes in backward the same activations it would have
kept, and a cached conditioning is what encoding the batch would give (up to float rounding of the batch size).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch.utils.checkpoint import checkpoint


def outermost(root: torch.nn.Module, kinds: tuple[type, ...]) -> Iterator[torch.nn.Module]:
    """Submodules of `root` of a class in `kinds`, not descending into a match (so none is inside another)."""
    for child in root.children():
        if isinstance(child, kinds):
            yield child
        else:
            yield from outermost(child, kinds)


class _Recomputed:
    """A module's forward run under non-reentrant checkpointing whenever autograd records."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def checkpointed(root: torch.nn.Module, kinds: tuple[type, ...]) -> Iterator[None]:
    """Inside the block, each outermost submodule of `root` of a class in `kinds` keeps only its inputs for
    backward and recomputes its activations there; after it, the modules are as they were."""
    missing = object()
    patched = []
    try:
        for module in outermost(root, kinds):
            patched.append((module, module.__dict__.get("forward", missing)))
            module.forward = _Recomputed(module.forward)
        yield
    finally:
        for module, before in patched:
            if before is missing:
                del module.forward
            else:
                module.forward = before


class ConditioningCache:
    """The text conditioning of a fixed prompt set, encoded once and kept on the CPU.

    By default each prompt is encoded alone (chunk=1), so its embedding never depends on which other prompts were
    drawn with it: a resumed run, which draws a different set, sees the very same numbers.

    All prompts share one negative prompt, stored once. `cache(prompts)` gives the batch's conditioning on the
    adapter's device without touching the text encoders, which may then leave the GPU.
    """

    NEGATIVE = ("negative_embeds", "negative_pooled")

    def __init__(self, adapter, prompts: list[str], negative_prompt: str, chunk: int = 1):
        self.device = adapter.device
        self.rows: dict[str, Any] = {}
        self.negative: Any = None
        distinct = list(dict.fromkeys(prompts))
        for start in range(0, len(distinct), chunk):
            part = distinct[start:start + chunk]
            cond = adapter.encode_prompts(part, [negative_prompt] * len(part)).to("cpu")
            if self.negative is None:
                self.negative = cond[0]
            for i, prompt in enumerate(part):
                self.rows[prompt] = dataclasses.replace(cond[i], **{k: None for k in self.NEGATIVE})

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, prompts: list[str]) -> Any:
        """The conditioning of `prompts` (each one of the cached set), on the adapter's device."""
        unknown = [p for p in prompts if p not in self.rows]
        if unknown:
            raise KeyError(f"prompt {unknown[0]!r} was not encoded when the cache was built; build the "
                           f"ConditioningCache with every prompt the run draws")
        rows = [self.rows[p] for p in prompts]
        values = {}
        for f in dataclasses.fields(rows[0]):
            if f.name in self.NEGATIVE:
                value = getattr(self.negative, f.name)
                values[f.name] = None if value is None else value.expand(len(rows), *value.shape[1:])
            else:
                parts = [getattr(r, f.name) for r in rows]
                values[f.name] = None if parts[0] is None else torch.cat(parts)
        return dataclasses.replace(rows[0], **values).to(self.device)


__all__ = ["checkpointed", "outermost", "ConditioningCache"]
