"""Reward normalisation by the base model's score statistics, and the reward the engine sees under the guards.

Statistics: before the first step the base model (LoRA off, or the untouched weights of a full fine-tune) samples
guards.normalize_samples images, image i from training prompt i (cycling the training list in its file order) with
seed guards.normalize_seed + i, exactly as evaluation samples; the reward scores them, and the mean and standard
deviation (unbiased) of the total and of each part of a mixture are kept as float64 in the run folder
(reward_stats.safetensors). A resumed run reads that file, so it uses the same numbers bit for bit.

guards.normalize=total optimises (r - mean) / std of the total reward; =parts optimises sum_k w_k (r_k - mean_k) /
std_k over a mixture's parts (each part in units of its own base spread, so the weights compare parts fairly; a
single reward is its own only part).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATS_FILE = "reward_stats.safetensors"
MODES = ("none", "total", "parts")


def statistics(scores: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean and unbiased std (float64) of the total scores and of each part's, keyed mean/total, std/part/<label>."""
    out = {}
    for label, values in {"total": scores, **{f"part/{k}": v for k, v in parts.items()}}.items():
        values = values.detach().double().reshape(-1).cpu()
        std = values.std()
        if values.numel() < 2 or not bool(std > 0):
            raise ValueError(f"reward normalisation: the base model's {label} scores over {values.numel()} images "
                             f"have no spread (std {float(std)}); raise guards.normalize_samples or turn it off")
        out[f"mean/{label}"], out[f"std/{label}"] = values.mean(), std
    return out


def save_stats(run_dir: str | Path, stats: dict[str, torch.Tensor]) -> Path:
    """Write the statistics into the run folder."""
    path = Path(run_dir) / STATS_FILE
    save_file({k: v.reshape(1) for k, v in stats.items()}, path)
    return path


def load_stats(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The statistics a run stored (float64 scalars)."""
    return {k: v.reshape(()) for k, v in load_file(Path(run_dir) / STATS_FILE).items()}


class GuardedReward(torch.nn.Module):
    """images -> augmentation (if any) -> reward -> normalisation (if any); `last_parts` holds the raw part scores
    and, when normalised, the raw total as `unnormalized`."""

    def __init__(self, reward, *, augment=None, stats: dict[str, torch.Tensor] | None = None, mode: str = "none"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"normalisation mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode != "none" and stats is None:
            raise ValueError(f"normalisation mode {mode!r} needs the base model's statistics")
        self.reward, self.augment, self.stats, self.mode = reward, augment, stats or {}, mode
        self.needs_prompt = getattr(reward, "needs_prompt", True)
        self.last_parts: dict[str, torch.Tensor] = {}

    def _normal(self, values: torch.Tensor, label: str) -> torch.Tensor:
        mean, std = self.stats[f"mean/{label}"], self.stats[f"std/{label}"]
        return (values - mean.to(values.device, values.dtype)) / std.to(values.device, values.dtype)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if self.augment is not None:
            images = self.augment(images)
        labels = getattr(self.reward, "labels", None)
        if self.mode == "parts" and labels is not None:
            return self._by_parts(images, prompts)
        scores = self.reward(images, prompts)
        self.last_parts = dict(getattr(self.reward, "last_parts", {}))
        if self.mode == "none":
            return scores
        self.last_parts["unnormalized"] = scores.detach()
        return self._normal(scores, "total")

    def _by_parts(self, images: torch.Tensor, prompts) -> torch.Tensor:
        mixture, total, raw = self.reward, 0.0, {}
        for label, part in zip(mixture.labels, mixture.parts):
            value = part(images, prompts)
            raw[label] = value.detach()
            total = total + mixture.weights[label] * self._normal(value, f"part/{label}")
        self.last_parts = {**raw, "unnormalized": sum(mixture.weights[k] * v for k, v in raw.items())}
        return total
