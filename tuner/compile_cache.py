"""Persistent compile caches for `train.compile`, so a second run of the same model skips most of the compiling.

torch.compile keeps what it builds (inductor's FX graph cache, AOTAutograd's cache, the autotuning results and the
Triton kernels) under one folder, TORCHINDUCTOR_CACHE_DIR, by default a per-user folder in the system's temporary
directory, which a reboot or a fresh machine empties. A run with `train.compile: true` points that folder, for its
own duration, at `train.compile_cache`: by default `<user cache dir>/drtune-rewards/compile/<key>`, where the key
names the torch version, the device and a hash of what is compiled (the denoiser's and the VAE's class and
configuration, their dtype), so entries of different models or torch builds never mix and each can be deleted alone.
Deleting the folder is always safe: the next run compiles again and refills it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

AUTO = "auto"
ENV = "TORCHINDUCTOR_CACHE_DIR"


def user_cache_dir() -> Path:
    """The user's cache folder: $XDG_CACHE_HOME, else ~/.cache (on Windows %LOCALAPPDATA%)."""
    base = os.environ.get("XDG_CACHE_HOME") or (os.environ.get("LOCALAPPDATA") if os.name == "nt" else None)
    return Path(base) if base else Path.home() / ".cache"


def default_root() -> Path:
    """Where `train.compile_cache: auto` keeps compiled code."""
    return user_cache_dir() / "drtune-rewards" / "compile"


def _config_of(module: Any) -> dict:
    config = getattr(module, "config", None)
    return dict(config) if config is not None else {}


def cache_key(adapter, device: torch.device) -> str:
    """torch version, device and a hash of what is compiled: the denoiser's and the VAE's class, configuration and
    dtype (the compiled blocks and their shapes follow from those)."""
    denoiser = getattr(adapter.denoiser, "module", adapter.denoiser)
    what = {name: [type(m).__name__, _config_of(m), str(next(m.parameters()).dtype)]
            for name, m in (("denoiser", denoiser), ("vae", adapter.vae))}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    card = "".join(c if c.isalnum() else "-" for c in where).strip("-").lower()
    return f"torch-{torch.__version__.replace('+', '-')}-{card}-{adapter.family}-{digest}"


def resolve(setting: str | None, adapter, device: torch.device) -> Path | None:
    """The cache folder of `train.compile_cache` (auto, a folder, or null: torch's own default, returned as None)."""
    if setting is None:
        return None
    root = default_root() if setting == AUTO else Path(setting).expanduser()
    return root / cache_key(adapter, device)


@contextlib.contextmanager
def persistent(folder: Path | None) -> Iterator[Path | None]:
    """Inside the block, torch.compile reads and writes its caches under `folder` (created), with the local FX graph,
    AOTAutograd and autotune caches on; after it, the previous folder is back. None changes nothing."""
    if folder is None:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(ENV)
    os.environ[ENV] = str(folder)
    patches = contextlib.ExitStack()
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        patches.enter_context(inductor_config.patch(fx_graph_cache=True, autotune_local_cache=True))
        if hasattr(functorch_config, "enable_autograd_cache"):
            patches.enter_context(functorch_config.patch(enable_autograd_cache=True))
        with patches:
            yield folder
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
