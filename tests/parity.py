"""The parity numbers every reward's test reports against its official implementation."""

from __future__ import annotations

import gc
import importlib.util
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

ParityRun = Callable[[Path], tuple[dict, Any, dict]]  # workdir -> (metrics, our reward, paths of the files)

TARGET_MEAN_DIFF_OVER_STD = 1e-4  # 8-bit path (the default) vs the official scorer on 8-bit photographs
ORACLES = Path(__file__).parent / "oracles"


def summarize(official: np.ndarray, ours: np.ndarray, cosines: np.ndarray, float_path=None, **extra) -> dict:
    """The parity numbers every reward reports: feature cosine, score differences absolute and relative; with
    `float_path` (our scores with `pil_8bit=False`), the same differences for the float resize."""
    diff = np.abs(ours - official)
    spread = float(official.std())
    result = {
        "images": int(len(official)),
        "image_feature_cosine_min": float(cosines.min()),
        "image_feature_cosine_mean": float(cosines.mean()),
        "official_score_mean": float(official.mean()),
        "official_score_std": spread,
        "score_abs_diff_mean": float(diff.mean()),
        "score_abs_diff_max": float(diff.max()),
        "score_abs_diff_mean_over_std": float(diff.mean() / spread),
        "score_abs_diff_max_over_std": float(diff.max() / spread),
        "score_rel_diff_mean": float((diff / np.abs(official)).mean()),
    }
    if float_path is not None:
        result.update(float_path_differences(official, np.asarray(float_path)))
    return {**result, **extra}


def float_path_differences(official: np.ndarray, ours_float: np.ndarray) -> dict:
    """Score differences of the float resize (`pil_8bit=False`) from the official scores, relative to their spread."""
    diff = np.abs(ours_float - official)
    spread = float(official.std())
    return {
        "float_path_score_abs_diff_mean": float(diff.mean()),
        "float_path_score_abs_diff_mean_over_std": float(diff.mean() / spread),
        "float_path_score_abs_diff_max_over_std": float(diff.max() / spread),
        "float_path_score_rel_diff_mean": float((diff / np.abs(official)).mean()),
    }


def measured(run: ParityRun) -> dict:
    """`run`'s parity numbers, made in a temporary folder with the reward freed after (the cards' figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics, reward, _ = run(Path(tmp))
        del reward
        gc.collect()
    return metrics


def module_run(run: ParityRun, name: str):
    """A module-scoped fixture giving `run`'s (metrics, reward, paths), made once for all tests of the module."""
    @pytest.fixture(scope="module")
    def parity(tmp_path_factory):
        metrics, reward, paths = run(tmp_path_factory.mktemp(name))
        yield metrics, reward, paths
        del reward
        gc.collect()
    return parity


def photographs() -> list[np.ndarray]:
    """Real photographs (scikit-image's) at several sizes and aspect ratios, uint8 HxWx3."""
    from PIL import Image
    from skimage import data

    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    tiny = np.asarray(Image.fromarray(data.astronaut()).resize((160, 120), Image.LANCZOS))
    return [
        data.astronaut(),  # 512 x 512
        data.coffee(),  # 400 x 600, landscape
        data.chelsea(),  # 300 x 451, landscape, odd width
        camera[:, 100:400],  # 512 x 300, portrait
        tiny,  # 120 x 160, smaller than 224
        data.coffee()[:, 150:350],  # 400 x 200, portrait, narrower than 224
    ]


def oracle_python() -> Path:
    """The shared oracle environment's interpreter (tests/oracles/build.py), built on first use; raises
    OracleBuildError with pip's output if the environment cannot be built."""
    spec = importlib.util.spec_from_file_location("oracles_build", ORACLES / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.build()


def run_oracle(script: str, job: Path, name: str) -> None:
    """Run tests/oracles/`script` on `job` in the oracle environment; fail with its output if it fails."""
    proc = subprocess.run([str(oracle_python()), str(ORACLES / script), str(job)], capture_output=True, text=True)
    assert proc.returncode == 0, f"the official {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def scores_with_taps(reward, batches: list, prompts: list[str], taps: dict[str, list], hooks: list) -> dict:
    """Scores of `batches` (image batches, `prompts` in order) without gradients, float64, with what `hooks` (handles
    of hooks that append to `taps`) caught, concatenated; the hooks are removed after."""
    scores, start = [], 0
    try:
        with torch.no_grad():
            for batch in batches:
                scores.append(reward(batch, prompts[start : start + len(batch)]).double())
                start += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {"scores": torch.cat(scores), **{k: torch.cat(v) for k, v in taps.items()}}


def assert_rejects_bad_inputs(reward) -> None:
    """The errors every prompt-conditioned reward gives a user: no prompts, a wrong count, a wrong shape, a range
    of [0, 255] instead of [0, 1]."""
    from rewards import InputError

    x = torch.rand(2, 3, 64, 64)
    cases = ((lambda: reward(x), "needs one prompt"), (lambda: reward(x, ["a"]), "got 1 prompts for 2 images"),
             (lambda: reward(x[0], ["a"]), r"\[B,3,H,W\]"), (lambda: reward(x * 255, ["a", "b"]), r"\[0,1\]"))
    for call, match in cases:
        with pytest.raises(InputError, match=match):
            call()


def assert_gradient_matches_central_difference(reward, size: tuple[int, int], prompts: list[str] | None,
                                               atol: float = 1e-9) -> torch.Tensor:
    """float64 `score` (before the protocol's float32 output) of a seeded [1,3,*size] image: the autograd pixel
    gradient along a random direction against a central difference (step 1e-5, relative 1e-5); returns the
    gradient."""
    gen = torch.Generator().manual_seed(0)
    x = (0.2 + 0.6 * torch.rand(1, 3, *size, generator=gen, dtype=torch.float64)).requires_grad_(True)
    direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    reward.score(x, prompts).sum().backward()
    eps = 1e-5
    with torch.no_grad():
        fd = (reward.score(x + eps * direction, prompts) - reward.score(x - eps * direction, prompts)).sum() / (2 * eps)
    analytic = (x.grad * direction).sum()
    assert torch.allclose(analytic, fd, rtol=1e-5, atol=atol), (analytic.item(), fd.item())
    return x.grad
