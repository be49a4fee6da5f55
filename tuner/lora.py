"""LoRA on the denoiser (a UNet or a transformer) through peft, and saving it in the diffusers format that the stock
pipelines' `load_lora_weights` reads."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet families' attention projections


def add_lora(denoiser: torch.nn.Module, *, rank: int, alpha: float, target_modules: list[str],
             dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, inject a LoRA into `target_modules`, and return its (fp32) parameters."""
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        init_lora_weights=True)
    try:
        denoiser.add_adapter(config)
    except ValueError as e:
        raise ValueError(f"lora.target_modules={list(target_modules)}: {e}. Module names of this "
                         f"{type(denoiser).__name__} ending in these suffixes are replaced, e.g. to_q, to_k, to_v, "
                         f"to_out.0 (and add_q_proj, to_add_out in the text stream of SD3 / FLUX)") from None
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trained weights stay fp32 under mixed precision
    return params


@contextlib.contextmanager
def folded(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block each LoRA layer's update is folded into its base weight and the adapter is off, so a
    gradient-free denoiser call costs what the plain model costs (peft's unmerged LoRA adds two small matmuls and their
    launches per layer). The base weights are swapped, never changed in place: they come back bit for bit."""
    module = getattr(module, "module", module)  # DDP
    layers = [m for m in module.modules() if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters]
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                originals.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
                layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for weight, data in originals:
            weight.data = data


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that get gradients (LoRA or full), by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters by name (LoRA or full), detached."""
    return {name: p.detach() for name, p in trainable_parameters(module).items()}


def save_lora(denoiser: torch.nn.Module, directory: str | Path, pipeline_class: type) -> Path:
    """Write the denoiser's LoRA as `pytorch_lora_weights.safetensors` (+ alpha/rank metadata) in the layout of
    `pipeline_class.load_lora_weights` (a UNet's under `unet.`, a transformer's under `transformer.`)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = get_peft_model_state_dict(denoiser)
    component = "transformer" if hasattr(pipeline_class, "transformer_name") else "unet"
    if component == "unet":
        state = convert_state_dict_to_diffusers(state)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    metadata = denoiser.peft_config["default"].to_dict()
    directory = Path(directory)
    pipeline_class.save_lora_weights(directory, **{f"{component}_lora_layers": state,
                                                   f"{component}_lora_adapter_metadata": metadata},
                                     safe_serialization=True)
    return directory / LORA_WEIGHTS
