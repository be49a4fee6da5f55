"""Every scoring model imscore 0.0.11 offers is a registered reward here, or the coverage table says why not."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import rewards

imscore = pytest.importorskip("imscore")
CARDS = Path(__file__).parents[1] / "docs" / "rewards.md"


def imscore_models() -> set[str]:
    """Classes with a `score` method in imscore's `<family>/model.py` modules (some families are namespace
    packages, which pkgutil does not walk, so the files are listed)."""
    names = set()
    for path in sorted(Path(imscore.__file__).parent.glob("*/model.py")):
        module = importlib.import_module(f"imscore.{path.parent.name}.model")
        names |= {n for n, c in vars(module).items()
                  if inspect.isclass(c) and c.__module__ == module.__name__ and "score" in vars(c)}
    return names


def coverage_rows() -> list[tuple[list[str], str]]:
    """(imscore classes, what the "here" column says) for each row of the cards' coverage table."""
    text = CARDS.read_text()
    section = text[text.index("## Coverage of imscore 0.0.11"):]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first, _, here = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows.append(([t for t in re.findall(r"`([^`]+)`", first) if "/" not in t], here))
    return rows


def test_every_imscore_model_has_a_row():
    listed = {cls for classes, _ in coverage_rows() for cls in classes}
    assert imscore_models() - listed == set()
    assert {"EvalMuse", "CycleReward", "ImageReward", "HPSv3", "MPS", "VQAScore"} <= imscore_models()


def test_each_row_names_registered_rewards_or_says_why_not():
    from rewards.imscore_heads import VARIANTS

    available = set(rewards.available())
    for classes, here in coverage_rows():
        names = [t for t in re.findall(r"`([^`]+)`", here) if "/" not in t and "." not in t]
        if here.startswith("not a model"):
            continue
        if "the same 12 names" in here:  # imscore's rating heads: one registered name per hub repo
            ratings = [n for n in VARIANTS if n.startswith(("imreward-", "ava-rating-"))]
            assert len(ratings) == 12 and set(ratings) <= available
            continue
        assert names and set(names) <= available, (classes, here)
