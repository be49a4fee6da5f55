"""Atomic, resumable checkpoints: weights as safetensors, the rest as weights-only torch files.

A checkpoint is a folder `step-XXXXXXXX` under `<run>/checkpoints`. It is written in a hidden
temporary folder, every file fsynced, then renamed into place in one `os.replace`: a crash or a
kill during a save leaves the previous checkpoints untouched and never a half-written one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
META = "meta.json"


def step_dir(root: str | Path, step: int) -> Path:
    """The folder of the checkpoint taken after `step` optimizer steps."""
    return Path(root) / f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin(root: str | Path, step: int) -> Path:
    """Create (empty) the temporary folder a checkpoint of `step` is written into."""
    tmp = Path(root) / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write a flat dict of tensors as safetensors and fsync it."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / name)
    _fsync(folder / name)


def write_state(folder: Path, name: str, state: Any) -> None:
    """Write a nested state (tensors, numbers, strings, lists, dicts) loadable with weights_only=True, and fsync it."""
    torch.save(state, folder / name)
    _fsync(folder / name)


def commit(tmp: Path, meta: dict[str, Any], keep: int) -> Path:
    """Write meta.json last, fsync, rename the folder into place, and prune to the last `keep`."""
    (tmp / META).write_text(json.dumps(meta, indent=2))
    _fsync(tmp / META)
    _fsync(tmp)
    final = tmp.parent / tmp.name[len(TMP_PREFIX):]
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first
        old = tmp.parent / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint."""
    return json.loads((Path(folder) / META).read_text())


def read_tensors(folder: str | Path, name: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint."""
    return load_file(Path(folder) / name)


def read_state(folder: str | Path, name: str) -> Any:
    """A torch state file of a checkpoint; never runs code."""
    return torch.load(Path(folder) / name, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- random number generators


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG a run draws from: python, numpy, torch CPU, CUDA (if any) and the run's own generators."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in generators.items()},
    }


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what `rng_state` captured (tuples come back from torch.load as tuples or lists)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])
