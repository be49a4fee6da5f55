"""`python -m rewards score` (console script `drtune-rewards`): score image files with one or more rewards."""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import RewardError, UnknownRewardError
from .registry import _entry, available, needs_prompt

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

PROMPTS_HELP = """\
prompts for prompt rewards, from FILE:
  *.csv   columns 'path' and 'prompt' (header row required)
  *.json  an object {"path": "prompt", ...}
  other   plain text, one prompt per line, matched to the images in sorted path order
          (the number of lines must equal the number of images found)
Paths in a CSV/JSON file are taken relative to the current folder, else to the file's own folder."""


class UsageError(Exception):
    """A command-line mistake, reported before any model is loaded."""


@dataclass
class Results:
    """Scores per image (in scoring order) and the files that could not be read."""

    rewards: list[str]
    rows: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# -- argument parsing -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The `score` command's parser."""
    parser = argparse.ArgumentParser(prog="drtune-rewards", description="Differentiable reward models: scoring CLI.")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser(
        "score",
        help="score image files or folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score images (files, or folders searched recursively for "
        + ", ".join(sorted(IMAGE_EXTENSIONS))
        + ") with one or more rewards; writes one row per image and prints a summary.",
        epilog=PROMPTS_HELP,
    )
    score.add_argument("paths", nargs="+", help="image files or folders")
    score.add_argument("--reward", required=True, help=f"comma-separated names from: {', '.join(available())}")
    group = score.add_mutually_exclusive_group()
    group.add_argument("--prompt", help="one prompt for every image")
    group.add_argument("--prompts", type=Path, metavar="FILE", help="prompts per image (see below)")
    score.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    score.add_argument("--out", type=Path, help="write rows to a .csv or .json file (default: CSV on stdout)")
    score.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    score.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="model dtype (default: the reward's, bfloat16 for vqascore, float32 for the others)")
    score.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME.ROLE=PATH",
        help="a local file (or option) for a reward, e.g. hpsv2.1.checkpoint=HPS_v2.1_compressed.pt or "
        "sharpness.size=128 (repeatable)",
    )
    return parser


def parse_rewards(text: str) -> list[str]:
    """Split and check the --reward list; unknown names raise with close matches."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--reward needs at least one reward name")
    for name in names:
        try:
            _entry(name)
        except UnknownRewardError as err:  # its message suggests close names
            raise UsageError(str(err)) from None
    if len(set(names)) != len(names):
        raise UsageError(f"--reward lists a reward twice: {text}")
    return names


def parse_sources(items: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, object]]:
    """Turn NAME.ROLE=VALUE items into {name: {role: value}}; the role is the part after the last dot."""
    sources: dict[str, dict[str, object]] = {name: {} for name in names}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, role = key.rpartition(".")
        if not sep or not dot or not name or not role or not value:
            raise UsageError(f"--source {item!r}: expected NAME.ROLE=PATH, e.g. hpsv2.1.checkpoint=/path/to/file.pt")
        if name not in sources:
            raise UsageError(f"--source {item!r}: reward {name!r} is not in --reward ({', '.join(names)})")
        params = _source_params(name)
        if params is not None and role not in params:
            raise UsageError(f"--source {item!r}: {name} accepts {', '.join(params) or 'no files'}, not {role!r}")
        sources[name][role] = _typed(value, params[role].default, item) if params is not None else value
    return sources


def _typed(value: str, default: object, item: str) -> object:
    """A numeric or boolean option (e.g. sharpness.size=128) takes its default's type; paths stay strings."""
    try:
        if isinstance(default, bool):
            return {"true": True, "1": True, "false": False, "0": False}[value.lower()]
        if isinstance(default, (int, float)):
            return type(default)(value)
    except (KeyError, ValueError):
        raise UsageError(f"--source {item!r}: expected a {type(default).__name__} value") from None
    return value


def _factory(name: str):
    """The reward's factory function, or None if its module cannot be imported here."""
    module_name, func_name = _entry(name).target.split(":")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError):
        return None


def _source_params(name: str) -> dict[str, inspect.Parameter] | None:
    """The keyword-only factory parameters a user may set (files and options), or None if unknown here."""
    factory = _factory(name)
    if factory is None:
        return None
    fixed = {"device", "dtype", *(key for key, _ in _entry(name).kwargs)}  # set by load() or the registry
    params = inspect.signature(factory).parameters.items()
    return {p: v for p, v in params if v.kind == v.KEYWORD_ONLY and p not in fixed}




# -- images and prompts -----------------------------------------------------------------------------
def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files given directly plus image files under given folders (recursive), deduplicated, sorted."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.add(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return sorted(found, key=str)


def read_prompts(file: Path, images: Sequence[Path]) -> list[str]:
    """One prompt per image from a text, CSV or JSON file (format in PROMPTS_HELP)."""
    if not file.is_file():
        raise UsageError(f"--prompts {file}: no such file")
    if file.suffix.lower() in (".csv", ".json"):
        return _mapped_prompts(file, images)
    lines = file.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != len(images):
        raise UsageError(
            f"--prompts {file}: {len(lines)} lines for {len(images)} images; a text file needs one prompt per "
            "image in sorted path order (or use a CSV/JSON mapping path -> prompt)"
        )
    return lines


def _mapped_prompts(file: Path, images: Sequence[Path]) -> list[str]:
    if file.suffix.lower() == ".json":
        try:
            mapping = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise UsageError(f"--prompts {file}: not valid JSON ({err})") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise UsageError(f"--prompts {file}: a JSON prompts file must be an object {{path: prompt}}")
    else:
        with file.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"path", "prompt"} <= set(reader.fieldnames):
                raise UsageError(f"--prompts {file}: a CSV prompts file needs the header columns 'path' and 'prompt'")
            mapping = {row["path"]: row["prompt"] for row in reader}
    by_path: dict[Path, str] = {}
    for key, prompt in mapping.items():
        for candidate in (Path(key), file.parent / key):
            by_path.setdefault(candidate.resolve(), prompt)
    missing = [str(p) for p in images if p.resolve() not in by_path]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UsageError(f"--prompts {file}: no prompt for {', '.join(missing[:3])}{more}")
    return [by_path[p.resolve()] for p in images]


def group_by_size(images: Sequence[Path], skipped: list[tuple[str, str]]) -> dict[tuple[int, int], list[int]]:
    """Indices of readable images grouped by (width, height), from the headers only; others go to `skipped`."""
    from PIL import Image

    groups: dict[tuple[int, int], list[int]] = {}
    for i, path in enumerate(images):
        try:
            with Image.open(path) as img:
                size = img.size
        except Exception as err:  # any unreadable file is skipped, never fatal
            _skip(skipped, path, err)
            continue
        groups.setdefault(size, []).append(i)
    return groups


def load_image(path: Path) -> torch.Tensor:
    """An image file as float [3,H,W] in [0,1] (RGB, no EXIF rotation, like the official PIL pipelines)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _skip(skipped: list[tuple[str, str]], path: Path, err: BaseException) -> None:
    reason = f"{type(err).__name__}: {err}"
    skipped.append((str(path), reason))
    print(f"drtune-rewards: skipping {path}: {reason}", file=sys.stderr)


# -- scoring ------------------------------------------------------------------------------------------
def score_images(
    models: dict[str, torch.nn.Module],
    images: Sequence[Path],
    prompts: Sequence[str] | None,
    batch_size: int,
    device: torch.device,
) -> Results:
    """Score readable images in batches of equal size; unreadable files are reported and skipped."""
    from tqdm import tqdm

    results = Results(list(models))
    groups = group_by_size(images, results.skipped)
    with tqdm(total=sum(map(len, groups.values())), unit="img", desc="scoring", disable=None) as bar:
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                _score_batch(models, images, prompts, indices[start : start + batch_size], device, results)
                bar.update(len(indices[start : start + batch_size]))
    order = {str(p): i for i, p in enumerate(images)}
    results.rows.sort(key=lambda row: order[row["path"]])
    return results


def _score_batch(models, images, prompts, indices, device, results: Results) -> None:
    tensors, kept = [], []
    for i in indices:
        try:
            tensors.append(load_image(images[i]))
            kept.append(i)
        except Exception as err:  # a header that opens but whose data is truncated
            _skip(results.skipped, images[i], err)
    if not kept:
        return
    batch = torch.stack(tensors).to(device)
    batch_prompts = [prompts[i] for i in kept] if prompts is not None else None
    with torch.inference_mode():
        scores = {name: model(batch, batch_prompts).cpu().tolist() for name, model in models.items()}
    for j, i in enumerate(kept):
        row = {"path": str(images[i])}
        if prompts is not None:
            row["prompt"] = prompts[i]
        row.update({name: scores[name][j] for name in models})
        results.rows.append(row)


def summarize(results: Results) -> dict:
    """Count, mean, std, min and max of each reward over the scored images, plus the skipped files."""
    stats = {}
    for name in results.rewards:
        values = [row[name] for row in results.rows]
        n = len(values)
        mean = sum(values) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
        stats[name] = {
            "mean": mean,
            "std": std,
            "min": min(values) if n else math.nan,
            "max": max(values) if n else math.nan,
        }
    return {"count": len(results.rows), "rewards": stats, "skipped": [path for path, _ in results.skipped]}


# -- output -------------------------------------------------------------------------------------------
def write_rows(results: Results, out: Path | None, summary: dict) -> None:
    """Rows to `out` (.csv or .json) or as CSV to stdout."""
    if out is not None and out.suffix.lower() == ".json":
        payload = {"rows": results.rows, "skipped": [{"path": p, "error": e} for p, e in results.skipped]}
        payload["summary"] = summary
        out.write_text(json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return
    columns = ["path"] + (["prompt"] if results.rows and "prompt" in results.rows[0] else []) + results.rewards
    handle = out.open("w", newline="", encoding="utf-8") if out is not None else sys.stdout
    try:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results.rows)
    finally:
        if out is not None:
            handle.close()


def _finite(obj):
    """Replace NaN (e.g. the std of one image) by null so the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def format_summary(summary: dict) -> str:
    """The human-readable summary printed after scoring."""
    lines = [f"scored {summary['count']} image(s), skipped {len(summary['skipped'])}"]
    width = max(len(name) for name in summary["rewards"])
    for name, s in summary["rewards"].items():
        lines.append(
            f"  {name:<{width}}  mean {s['mean']:.6g}  std {s['std']:.6g}  min {s['min']:.6g}  max {s['max']:.6g}"
        )
    lines += [f"  skipped: {path}" for path in summary["skipped"]]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------------------
def run_score(args: argparse.Namespace) -> int:
    """Check everything that needs no model, then load the rewards, score, write and summarize."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--out {args.out}: use a .csv or .json file name")
    names = parse_rewards(args.reward)
    sources = parse_sources(args.source, names)
    with_prompts = [n for n in names if needs_prompt(n)]
    if with_prompts and args.prompt is None and args.prompts is None:
        verb = "needs" if len(with_prompts) == 1 else "need"
        raise UsageError(f"{', '.join(with_prompts)} {verb} a prompt per image: pass --prompt TEXT or --prompts FILE")
    images = find_images(args.paths)
    if not images:
        raise UsageError(f"no image files found in {' '.join(map(str, args.paths))}")
    prompts = read_prompts(args.prompts, images) if args.prompts is not None else None
    prompts = [args.prompt] * len(images) if args.prompt is not None else prompts
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from .registry import load

    dtype = DTYPES[args.dtype] if args.dtype else None
    models = {name: load(name, device=device, dtype=dtype, **sources[name]) for name in names}
    results = score_images(models, images, prompts, args.batch_size, device)
    summary = summarize(results)
    write_rows(results, args.out, summary)
    print(format_summary(summary), file=sys.stdout if args.out is not None else sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for usage errors, 1 for reward errors)."""
    args = build_parser().parse_args(argv)
    try:
        return run_score(args)
    except UsageError as err:
        print(f"drtune-rewards: error: {err}", file=sys.stderr)
        return 2
    except RewardError as err:
        print(f"drtune-rewards: error: {err}", file=sys.stderr)
        return 1
