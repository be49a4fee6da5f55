"""The KL-style penalty toward the base model: at each trained denoiser call, weight * mean((out - out_base)^2).

`out` is the tuned model's guided output of that call (epsilon or flow velocity, with its guidance), `out_base` the
base model's at the same (x_t, t, conditioning), computed without gradient: the base output is a fixed target. The
engine adds the term at the call it already recomputes (engine.reward_backward's step_term), so the penalty costs
one gradient-free denoiser call per trained call and no extra graph. The penalty is the sum over the trained calls
of the plan (DRaFT-LV's n re-noised calls count as one).

The base model is the tuned one with its LoRA switched off (peft's disable_adapters), or, under full fine-tuning,
a frozen copy of the denoiser made before training (one more denoiser's weights in memory).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DDP


class BasePenalty:
    """A step term for engine.reward_backward: weight * mean squared distance to the base model's output."""

    def __init__(self, weight: float, base: torch.nn.Module | None = None):
        self.weight, self.base = weight, base
        self.total = 0.0  # sum of the unweighted penalties since the last reset (reported per step)

    @classmethod
    def for_denoiser(cls, weight: float, denoiser: torch.nn.Module, full_finetune: bool) -> "BasePenalty":
        """A penalty toward `denoiser` as it is now: LoRA off for a LoRA run, else a frozen copy (call before training)."""
        if not full_finetune:
            return cls(weight)
        base = copy.deepcopy(_plain(denoiser)).requires_grad_(False).eval()
        return cls(weight, base)

    @contextlib.contextmanager
    def base_model(self, adapter) -> Iterator[None]:
        """Inside the block adapter.denoise runs the base model (a plain module: no DDP hooks on a gradient-free call)."""
        tuned = adapter.denoiser
        module = _plain(tuned)
        if self.base is None and not getattr(module, "_hf_peft_config_loaded", False):
            raise ValueError("the base-model penalty needs a LoRA to switch off, or a frozen copy (full fine-tuning)")
        adapter.denoiser = module if self.base is None else self.base
        if self.base is None:
            module.disable_adapters()
        try:
            yield
        finally:
            if self.base is None:
                module.enable_adapters()
            adapter.denoiser = tuned

    def __call__(self, adapter, x: torch.Tensor, t, out: torch.Tensor, cond, guidance_scale: float) -> torch.Tensor:
        with torch.no_grad(), self.base_model(adapter):
            target = adapter.denoise(x.detach(), t, cond, guidance_scale)
        value = (out - target.to(out.dtype)).pow(2).mean()
        self.total += float(value.detach())
        return self.weight * value

    def pop(self) -> float:
        """The unweighted penalty summed since the last pop, and reset."""
        total, self.total = self.total, 0.0
        return total
