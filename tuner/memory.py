"""GPU memory, what saves it and what a user sees of it.

The low-memory mode's pieces that are not tied to one model family (`train.memory: low`, docs/tuner.md
"Low-memory mode"): block-wise activation checkpointing switched on for a stretch of code, and a cache of the text
conditioning of a fixed prompt set, so the text encoders can leave the GPU. Both keep the computation exact: a
checkpointed block recomputes in backward the same activations it would have kept, and a cached conditioning is
what encoding the batch would give (up to float rounding of the batch size).

What a run reports and does about memory (docs/tuner.md "Memory"): the peak of each step, an out-of-memory error
turned into a message that says where it happened and what would fit, and the micro-batch that `train.batch_size:
auto` picks from trial steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from tuner.compile_cache import user_cache_dir


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


# ---------------------------------------------------------------- what a user sees

GIB = 2**30
AUTO_HEADROOM = 0.92  # the share of the device a trial's allocated peak may reach (the allocator's cache needs the rest)


def tracks_memory(device: torch.device) -> bool:
    """Whether peak memory is measured on `device` (CUDA only; None is reported elsewhere)."""
    return device.type == "cuda" and torch.cuda.is_available()


def reset_peak(device: torch.device) -> None:
    """Start a new peak (torch.cuda.reset_peak_memory_stats); nothing off CUDA."""
    if tracks_memory(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Allocated peak since the last reset_peak (torch.cuda.max_memory_allocated); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) if tracks_memory(device) else None


def device_bytes(device: torch.device) -> int | None:
    """What this process may allocate on `device`: its total memory times the per-process fraction set by
    torch.cuda.set_per_process_memory_fraction (1 unless capped); None off CUDA."""
    if not tracks_memory(device):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()  # the fraction needs one
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
    return int(total * fraction)


def gib(n: int | None) -> float | None:
    """Bytes as GiB, rounded to 0.01 (None stays None)."""
    return None if n is None else round(n / GIB, 2)


SETUP = "setup: loading and preparing the models"


class OutOfMemory(torch.OutOfMemoryError):
    """The device ran out of memory; the message names the step, the phase, the peak and what would fit."""


def fixes(cfg) -> list[str]:
    """The configuration changes that lower this run's peak, each with what it costs."""
    t, out = cfg.train, []
    if t.memory != "low":
        out.append("train.memory=low (the same gradient in about half the memory, about 1.15x the time; "
                   "docs/tuner.md, Low-memory mode)" + ("; it needs train.compile=false" if t.compile else ""))
    if isinstance(t.batch_size, int) and t.batch_size > 1:
        half = t.batch_size // 2
        if t.prompts_per_step is not None:  # the micro-batch must split this process's prompts a step
            smaller = max(d for d in divisors(t.batch_size * t.grad_accum) if d < t.batch_size)
            out.append(f"train.batch_size={smaller} (or auto; the accumulation grows so each step keeps its "
                       f"{t.prompts_per_step} prompts)")
        else:
            out.append(f"train.batch_size={half} train.grad_accum={t.grad_accum * t.batch_size // half} (the same "
                       f"prompts per step{'' if t.batch_size % 2 == 0 else ', about'}), or train.batch_size=auto "
                       f"train.prompts_per_step={t.batch_size * t.grad_accum} with train.grad_accum=1")
    if t.memory != "low" and not t.gradient_checkpointing:
        out.append("train.gradient_checkpointing=true (recomputes the trained calls' activations"
                   + (", needs train.compile=false)" if t.compile else ")"))
    return out


def oom_message(cfg, device: torch.device, step: int, phase: str, checkpoint: Path | None, error: BaseException) -> str:
    """What a user reads when the device runs out of memory: where, how much, the checkpoint, what to change."""
    where = f"at step {step} ({phase})" if step else f"before the first step ({phase})"
    lines = [f"out of {device.type.upper()} memory {where}."]
    total, peak = device_bytes(device), peak_bytes(device)
    if total is not None:
        lines.append(f"Peak allocated since the step began: {gib(peak):.2f} GiB of the {gib(total):.2f} GiB this "
                     f"process may use on {torch.cuda.get_device_name(device)}.")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lines.append(f"torch said: {first[:300]}")
    if checkpoint is not None:
        lines.append(f"The last checkpoint, {checkpoint}, is intact: continue the run with --resume latest "
                     f"(name={cfg.name}) and one of the changes below.")
    else:
        lines.append("No checkpoint was written yet: start again with one of the changes below.")
    options = fixes(cfg)
    lines += ["What would fit:"] + [f"  - {o}" for o in options] if options else \
        ["The configuration has no memory switch left: a card with more memory, a smaller sampling.height / width, "
         "or a lower lora.rank."]
    return "\n".join(lines)


class OOMGuard:
    """Knows which phase of the run is under way (`at`, `phase`) and, around the run (`watch`), turns a
    torch.OutOfMemoryError into OutOfMemory with a message a user can act on. `cfg` is the run's configuration as
    resolved so far; `checkpoints` the folder the run's checkpoints go to (None before it is known)."""

    def __init__(self, cfg, device: torch.device, checkpoints: Path | None,
                 latest: Callable[[Path], Path | None], started: float | None = None):
        self.cfg, self.device, self.checkpoints, self.latest = cfg, device, checkpoints, latest
        self.where = (SETUP, 0)
        self.started = time.time() if started is None else started  # seconds since the epoch
        self.warm_up: list[tuple[str, int, float]] = [(SETUP, 0, round(time.time() - self.started, 1))]
        self.echo = False  # print each warm-up phase as it begins

    def at(self, name: str, step: int) -> None:
        """From here on the run is in phase `name` of optimizer step `step` (1-based; 0 before the first). Until the
        first step ends, each new phase is recorded (and printed, with `echo`) with its seconds from the start."""
        if (name, step) != self.where and step <= 1:
            seconds = round(time.time() - self.started, 1)
            self.warm_up.append((name, step, seconds))
            if self.echo:
                print(f"warm-up {seconds:.1f} s: {name}" + (f" (step {step})" if step else ""), flush=True)
        self.where = (name, step)

    @contextlib.contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        """The block is phase `name` of step `step` (for callers that take a context, such as train_step)."""
        self.at(name, step)
        yield

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Around the run: an out-of-memory error leaves it as OutOfMemory, naming the phase it happened in."""
        try:
            yield
        except OutOfMemory:
            raise
        except torch.OutOfMemoryError as e:
            name, step = self.where
            found = self.latest(self.checkpoints) if self.checkpoints is not None else None
            raise OutOfMemory(oom_message(self.cfg, self.device, step, name, found, e)) from None


# ---------------------------------------------------------------- train.batch_size: auto


def divisors(n: int) -> list[int]:
    """The micro-batches that split `n` prompts evenly, smallest first."""
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_batch_size(candidates: list[int], probe: Callable[[int], int | None], budget: int,
                      resident: int) -> tuple[int, list[tuple[int, int | None]]]:
    """The largest candidate micro-batch whose trial step peaks within `budget` bytes; returns it and the trials
    as (size, peak bytes or None for out of memory).

    The smallest candidate is tried first: its peak above `resident` (what was allocated before the trials) bounds
    each prompt's share from above, since part of it (optimizer state, gradients) does not grow with the batch. So
    the largest size predicted to fit is tried next, and smaller ones only if it does not fit.
    """
    trials: list[tuple[int, int | None]] = []
    smallest = candidates[0]
    peak = probe(smallest)
    trials.append((smallest, peak))
    if peak is None or peak > budget:
        return smallest, trials  # nothing smaller to try: the run itself will report what would fit
    per_prompt = max(peak - resident, 1) / smallest
    predicted = [c for c in candidates[1:] if peak + (c - smallest) * per_prompt <= budget]
    for size in reversed(predicted):
        got = probe(size)
        trials.append((size, got))
        if got is not None and got <= budget:
            return size, trials
    return smallest, trials



# ---------------------------------------------------------------- train.batch_size: auto, remembered per card
MEMO_ENV = "DRTUNE_AUTO_BATCH_MEMO"  # the memo file; set empty to turn the memo off
# Fields that cannot change a trial step's memory: a run that differs only in these reuses the choice.
MEMO_IGNORED = {"name", "output_dir", "resume", "log", "checkpoint", "prompts"}
MEMO_IGNORED_TRAIN = {"steps", "lr", "lr_schedule", "warmup_steps", "seed", "max_nonfinite", "compile_cache"}


def memo_path() -> Path | None:
    """Where train.batch_size=auto remembers its choices: $DRTUNE_AUTO_BATCH_MEMO (empty: nowhere), else
    <user cache dir>/drtune-rewards/auto_batch.json."""
    setting = os.environ.get(MEMO_ENV)
    if setting is None:
        return user_cache_dir() / "drtune-rewards" / "auto_batch.json"
    return Path(setting).expanduser() if setting else None


def memo_key(config: dict, device: torch.device, world: int) -> str:
    """A hash of what decides the trial steps' peaks: the configuration (less MEMO_IGNORED), the card and the memory
    this process may use, the number of processes and the torch version."""
    kept = {k: v for k, v in config.items() if k not in MEMO_IGNORED}
    kept["train"] = {k: v for k, v in kept.get("train", {}).items() if k not in MEMO_IGNORED_TRAIN}
    card = torch.cuda.get_device_name(device) if tracks_memory(device) else device.type
    what = {"config": kept, "card": card, "bytes": device_bytes(device), "world": world, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remembered(key: str) -> dict | None:
    """The choice recorded under `key` ({"batch": ..., "trials": ...}), or None (none, memo off, unreadable)."""
    path = memo_path()
    try:
        return json.loads(path.read_text()).get(key) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None


def remember(key: str, batch: int, trials: str) -> None:
    """Record a choice (best effort: a memo that cannot be written only costs the next run its trials)."""
    path = memo_path()
    if path is None:
        return
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {"batch": batch, "trials": trials, "when": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


__all__ = ["checkpointed", "outermost", "ConditioningCache", "OutOfMemory", "OOMGuard", "choose_batch_size",
           "memo_path", "memo_key", "remembered", "remember",
           "divisors", "peak_bytes", "reset_peak", "device_bytes", "fixes", "oom_message"]
