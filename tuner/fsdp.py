"""Full fine-tuning under FSDP2 (accelerate's FSDP plugin, `fsdp_version: 2`): what the loop does differently when
the denoiser's weights, gradients and optimizer state are sharded over the processes.

accelerate shards the denoiser block by block (tuner/configs/accelerate/fsdp2.yaml: the model's _no_split_modules)
and swaps the optimizer's parameters for the sharded ones. Then every parameter is a DTensor holding 1/N of the
weight, and:

- every backward reduce-scatters its gradients at once (`deferred_sync` defers nothing), so gradients stay sharded;
  deferring as DDP does would keep a full, unsharded gradient on every process until the last backward;
- a forward gathers each block's weights from all processes, so every process runs the evaluation calls together
  (the main one alone would wait forever), and reshards after them (`reshard`);
- every process calls the denoiser as many times at each step, so the ranks share each step's plan (trained steps,
  early stop; tuner.train.plan_generator), while prompts and noise stay each rank's own;
- checkpoints and the final weights hold the full tensors, gathered here (all processes call) and written by the
  main process; a resumed run scatters them back.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether the module's parameters are sharded (FSDP2 DTensors)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def reshard(module: torch.nn.Module) -> None:
    """Put a sharded module's weights back into their shards after forwards with no backward (evaluation): FSDP2
    keeps the root unit's weights gathered after a forward, awaiting a backward that will not come, and until they
    are resharded the module's parameters are not the ones the optimizer holds."""
    if is_sharded(module) and hasattr(module, "reshard"):
        module.reshard()


def deferred_sync(accelerator, module: torch.nn.Module):
    """Context in which a backward keeps its gradients local until the last one (DDP's no_sync); under FSDP every
    backward reduce-scatters at once, so the gradients never exist unsharded."""
    if is_sharded(module):
        return contextlib.nullcontext()
    return accelerator.no_sync(module)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process calls it), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole, detached, on the CPU (every process calls it, in the same order)."""
    return {name: full_tensor(t.detach()).cpu() for name, t in tensors.items()}


@torch.no_grad()
def load_into(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into `targets` (sharded or not): each process keeps its own shard."""
    for name, value in values.items():
        target = targets[name]
        if isinstance(target, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.copy_(value)


def shard_like(values: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors laid out as `like` is (sharded where it is), e.g. EMA shadows read back from a checkpoint."""
    out = {}
    for name, value in values.items():
        ref = like[name]
        value = value.to(ref.device, ref.dtype)
        out[name] = distribute_tensor(value, ref.device_mesh, ref.placements) if isinstance(ref, DTensor) else value
    return out


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with whole tensors on the CPU, keyed by parameter name: every process calls it, the main
    one gets it (the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, _inner(optimizer), options=options)


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Scatter a state written by `optimizer_state` into the sharded optimizer: the main process's copy is broadcast
    (the others may pass what they hold, e.g. the empty dict `optimizer_state` gave them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(module, _inner(optimizer), state, options=options)


def check_config(cfg, accelerator) -> None:
    """Refuse, before any model loads, what FSDP does not serve here: LoRA (it fits one GPU: run DDP), FSDP1, and
    what the sharded loop does not support yet."""
    from tuner.config import ConfigError, judge_caption_count

    if getattr(accelerator, "distributed_type", None) is None or accelerator.distributed_type.name != "FSDP":
        return
    if not accelerator.is_fsdp2:
        raise ConfigError("the tuner runs FSDP2 only: set fsdp_version: 2 in the accelerate config "
                          "(tuner/configs/accelerate/fsdp2.yaml)")
    if not cfg.train.full_finetune:
        raise ConfigError("FSDP shards a full fine-tune (train.full_finetune=true); a LoRA run fits one GPU: launch it "
                          "without the FSDP config (DDP), or set train.full_finetune=true")
    g, t = cfg.guards, cfg.train
    unsupported = {"guards.kl_weight": g.kl_weight > 0, "guards.select_every": bool(g.select_every),
                   "guards.normalize": g.normalize != "none", "train.compile": t.compile,
                   "train.fp8_sampling": t.fp8_sampling, "train.memory=low": t.memory == "low",
                   "log.judge_captions": bool(judge_caption_count(cfg))}
    named = [k for k, on in unsupported.items() if on]
    if named:
        raise ConfigError(f"{', '.join(named)}: not supported under FSDP yet (the KL penalty's frozen copy would be "
                          "whole on every process; selection and normalisation sample on the main process alone; "
                          "low-memory mode and compile are untested with sharding: train.gradient_checkpointing=true "
                          "saves the activations instead); turn them off or run without the FSDP config")
