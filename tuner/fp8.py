"""fp8 matmuls for the gradient-free sampling calls (`train.fp8_sampling`).

Most UNet calls of a trajectory are frozen: they run under no_grad with the LoRA folded in, and only their
output latents matter. Inside `fp8_linears(unet)` the linear layers of the UNet's transformers run as e4m3
matmuls with row-wise scales (one per output channel of the weight, one per token of the input, both computed
from the current values), accumulating in fp32 and writing bf16. The weights are quantized when the block is
entered (after `tuner.lora.folded`, so the LoRA is part of them) and the original layers come back on exit. The
trained calls never run inside it, so every gradient is the run's own precision.

Left in the model's precision: convolutions, norms, attention itself, and the cross-attention key/value
projections of the text tokens (77 rows per prompt: too few for fp8 to pay).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_SKIPPED = (".attn2.to_k", ".attn2.to_v")  # text-token projections of cross-attention


def supported(device: torch.device | str) -> bool:
    """Whether torch runs scaled fp8 matmuls there: CUDA compute capability >= 8.9 (Ada, Hopper and later) or the
    CPU (emulated, for tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale in e4m3, scale) with one fp32 scale per row: the row's largest magnitude maps to e4m3's 448."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """A frozen copy of an nn.Linear whose matmul runs in e4m3 with row-wise scales (gradient-free calls only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight, persistent=False)  # [out, in]
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous(), persistent=False)  # [1, out]
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        y = torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def targets(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every linear layer inside the module's transformers that fp8 serves: both
    dimensions multiples of 16 (the fp8 kernels' rule), cross-attention's text projections left out."""
    module = getattr(module, "module", module)  # DDP
    found = []
    for name, parent in module.named_modules():
        for attr, child in parent.named_children():
            full = f"{name}.{attr}".removesuffix(".base_layer")  # peft's LoRA layer keeps the original as base_layer
            if (type(child) is nn.Linear and "attentions." in full and not full.endswith(_SKIPPED)
                    and ".lora_" not in full  # peft's own factors: unused while folded, trained otherwise
                    and child.in_features % 16 == 0 and child.out_features % 16 == 0):
                found.append((parent, attr, child))
    return found


@contextlib.contextmanager
def fp8_linears(module: nn.Module) -> Iterator[int]:
    """Inside the block the module's eligible linears (`targets`) run in fp8, quantized from their current weights;
    after it the original layers are back, unchanged. Yields how many layers were swapped."""
    swapped = []
    try:
        with torch.no_grad():
            for parent, attr, layer in targets(module):
                setattr(parent, attr, Fp8Linear(layer))
                swapped.append((parent, attr, layer))
        yield len(swapped)
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)


__all__ = ["Fp8Linear", "fp8_linears", "quantize_rows", "supported", "targets"]
