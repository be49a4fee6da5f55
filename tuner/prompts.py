"""Prompt files, the train/eval split, and per-process prompt sampling.

Sampling is a pure function of (step, micro-batch, rank): every process runs the same number of
iterations whatever the prompt count (the list is cycled epoch by epoch), and a resumed run draws
exactly the prompts the uninterrupted run would have drawn without any saved sampler state.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuner.config import PromptConfig

PROMPT_DIR = Path(__file__).parent / "configs" / "prompts"


def shipped_lists() -> list[str]:
    """Names of the prompt lists shipped with the tuner."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


def resolve(name_or_path: str) -> Path:
    """A prompt file path: an existing path, or the name of a shipped list (with or without .txt)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = PROMPT_DIR / (name_or_path if name_or_path.endswith(".txt") else name_or_path + ".txt")
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"prompt file {name_or_path!r} not found (looked at {path.resolve()} and {shipped}); "
        f"give a text file with one prompt a line or a shipped list: {', '.join(shipped_lists())}"
    )


def read_prompts(name_or_path: str) -> list[str]:
    """Prompts of a file: one a line; blank lines and lines starting with # are skipped."""
    path = resolve(name_or_path)
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one a line; # starts a comment)")
    return prompts


def split(prompts: list[str], num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Hold out `num_eval` prompts (a seeded choice) for evaluation; the rest train."""
    if num_eval >= len(prompts):
        raise ValueError(
            f"num_eval={num_eval} would leave no training prompt out of {len(prompts)}; "
            "lower prompts.num_eval or give a separate prompts.eval_file"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:num_eval])
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in held]


def load_prompt_sets(cfg: PromptConfig) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts) as the configuration asks."""
    prompts = read_prompts(cfg.file)
    if cfg.eval_file is None:
        return split(prompts, cfg.num_eval, cfg.eval_seed)
    return prompts, read_prompts(cfg.eval_file)[: cfg.num_eval]


class PromptSampler:
    """Draws each process's prompts for (step, micro-batch) from epoch-wise shuffles shared by all ranks."""

    def __init__(self, prompts: list[str], batch_size: int, *, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.prompts, self.batch_size, self.grad_accum = list(prompts), batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._epoch, self._order = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._order = list(range(len(self.prompts)))
            random.Random(f"{self.seed}-{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order

    def batch(self, step: int, micro: int = 0) -> list[str]:
        """The prompts this process uses at optimizer step `step`, micro-batch `micro`."""
        n, out = len(self.prompts), []
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, n)
            out.append(self.prompts[self._permutation(epoch)[offset]])
        return out
