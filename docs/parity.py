"""Regenerate the measured parity numbers in docs/rewards.md: `python docs/parity.py [reward ...]`.

Each reward's parity test module exposes `measure_parity() -> dict`, which builds the full-size
architecture with random weights, writes an official-format checkpoint, and scores skimage photographs
through the official code and through this package. This script prints those measurements as a table.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = {
    "hpsv2": "tests.test_hps",
    "clip": "tests.test_clip_score",
    "pickscore": "tests.test_pickscore",
    "aesthetic": "tests.test_aesthetic",
    "imagereward": "tests.test_imagereward",
    "mps": "tests.test_mps",
    "vqascore": "tests.test_vqascore",
    "hpsv3": "tests.test_hpsv3",
}


def main(names: list[str]) -> None:
    """Measure each requested reward's disagreement with its official implementation and print it."""
    import torch

    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in names or list(MODULES):
        result = importlib.import_module(MODULES[name]).measure_parity()
        print(f"\n## {name}\n```json\n{json.dumps(result, indent=2, default=float)}\n```")


if __name__ == "__main__":
    main(sys.argv[1:])
