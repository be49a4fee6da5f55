"""Find the files a reward needs: a local path the user gave, else the Hugging Face hub cache/download."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingFileError


def resolve_file(
    source: str | os.PathLike | None,
    *,
    reward: str,
    role: str,
    repo_id: str,
    filename: str,
    revision: str | None = None,
) -> Path:
    """Return a local path for `role` of `reward`: `source` if given (a file, or a folder holding `filename`), else the hub."""
    if source is not None:
        return _local(Path(source), reward=reward, role=role, filename=filename)
    return _from_hub(reward=reward, role=role, repo_id=repo_id, filename=filename, revision=revision)


def _local(path: Path, *, reward: str, role: str, filename: str) -> Path:
    candidate = path / filename if path.is_dir() else path
    if not candidate.is_file():
        raise MissingFileError(
            f"{reward}: the {role} file was not found at {candidate}. "
            f"Pass {role}='/path/to/{filename}' (or a folder holding it) to rewards.load({reward!r}, ...)."
        )
    return candidate


def _from_hub(*, reward: str, role: str, repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as err:  # offline, not cached, missing entry, network: all end the same way for the user
        raise MissingFileError(
            f"{reward}: could not get the {role} file '{filename}' from the Hugging Face repo '{repo_id}' "
            f"(looked in the hub cache {constants.HF_HUB_CACHE}; HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): "
            f"{type(err).__name__}: {err}. Download it with `hf download {repo_id} {filename}`, "
            f"or pass {role}='/path/to/{filename}' to rewards.load({reward!r}, ...)."
        ) from err


def resolve_folder(
    source: str | os.PathLike | None,
    *,
    reward: str,
    role: str,
    repo_id: str,
    required: tuple[str, ...],
    patterns: tuple[str, ...] = ("*.json", "*.txt", "*.model"),
) -> Path:
    """Return a local folder for `role` of `reward` holding `required`: `source` if given, else the hub files of
    `repo_id` matching `patterns` (configs and tokenizer files, never weights)."""
    if source is not None:
        folder = Path(source)
        for name in required:
            _local(folder if folder.is_dir() else folder.parent, reward=reward, role=role, filename=name)
        return folder if folder.is_dir() else folder.parent
    from huggingface_hub import constants, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as err:  # offline, not cached, missing repo, network
        raise MissingFileError(
            f"{reward}: could not get the {role} files ({', '.join(required)}) of the Hugging Face repo '{repo_id}' "
            f"(looked in the hub cache {constants.HF_HUB_CACHE}; HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): "
            f"{type(err).__name__}: {err}. Download them with `hf download {repo_id} --include '*.json' '*.txt' "
            f"'*.model'`, or pass {role}='/path/to/folder' to rewards.load({reward!r}, ...)."
        ) from err
    for name in required:
        _local(folder, reward=reward, role=role, filename=name)
    return folder
