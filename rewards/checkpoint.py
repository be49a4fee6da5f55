"""Safe checkpoint reading and strict loading: no checkpoint runs code, no key mismatch passes silently."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointMismatchError, CorruptCheckpointError, UnsafeCheckpointError


def read_json(path: str | Path, *, reward: str, what: str = "file") -> dict:
    """A JSON file of a checkpoint (a config, a processor config, an index) as a dict, or an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpointError(f"{reward}: could not read the {what} {path}: {err}") from err


def read_checkpoint(path: str | Path, *, reward: str) -> dict:
    """Load a .safetensors or pickled torch file to CPU; pickles go through `weights_only=True`."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{reward}: checkpoint {path} is empty; download it again.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, reward=reward)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = [line for line in str(err).splitlines() if "Unsupported global" in line]
        if culprit:
            raise UnsafeCheckpointError(
                f"{reward}: refused to load {path}: it holds pickled objects other than tensors "
                f"(torch.load(weights_only=True) said: {culprit[0].strip()}). "
                "A checkpoint must never run code; convert it to a plain state dict or safetensors."
            ) from err
        raise _corrupt(path, reward, err) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise _corrupt(path, reward, err) from err
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{reward}: {path} holds a {type(obj).__name__}, expected a dict of tensors.")
    return obj


def _read_safetensors(path: Path, *, reward: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise _corrupt(path, reward, err) from err


def _corrupt(path: Path, reward: str, err: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{reward}: could not read checkpoint {path} ({path.stat().st_size} bytes): {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}. The file is truncated or not a torch checkpoint; "
        "download it again."
    )


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: dict, *, reward: str, source: str, assign: bool = False
) -> None:
    """Load `state_dict` into `module`; any missing, unexpected or mis-shaped key is an error that names it."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{reward}: {source} does not fit the model: "
            + "; ".join(
                part
                for part in (
                    _listing("missing keys", missing),
                    _listing("unexpected keys", unexpected),
                    _listing("shape mismatches", shapes),
                )
                if part
            )
            + ". Is this the right checkpoint for this reward?"
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)


def _listing(what: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {what} ({', '.join(items[:limit])}{more})"
