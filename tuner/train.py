"""The training loop: setup, then one optimizer step per iteration, read top to bottom.

    for step in range(start, steps):
        prompts of this rank -> plan = method.plan(T, gen) -> engine.reward_backward(...) per micro-batch
        -> skip if non-finite -> clip -> optimizer step -> EMA -> log -> eval gallery -> checkpoint

One process per GPU (accelerate); gradients are all-reduced once per optimizer step (under FSDP, reduce-scattered at
each backward: tuner/fsdp.py); only the main process logs and saves. `train_step` is one optimizer step
(benchmarks/multi_gpu.py times it as is).
On CPU with deterministic ops a resumed run reaches the same weights as an uninterrupted one: every
random draw comes from saved generators or from (seed, step, rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list
from tqdm.auto import tqdm

from tuner import checkpoint as ckpt
from tuner import compile_cache, engine, fsdp, lora, memory
from tuner.config import Config, ConfigError, judge_caption_count, to_dict, validate
from tuner.guards import augment as aug, normalize, pretrain, select
from tuner.guards.penalty import BasePenalty
from tuner.logging import RunLogger, gallery, plot_rewards, process_start_time, read_metrics, write_summary
from tuner.memory import ConditioningCache
from tuner.methods import get_method
from tuner.prompts import PromptSampler, load_prompt_sets
from tuner.shapes import judge

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
JUDGE_SEED = 900_000_000  # noise seeds of the ground-truth test: apart from evaluation and selection seeds
# The phases an out-of-memory report names (tuner.memory.OOMGuard).
PHASE_TRIAL = "trial steps of train.batch_size=auto"
PHASE_BACKWARD, PHASE_OPTIMIZER = "sampling, reward and backward", "optimizer step"
PHASE_EVAL, PHASE_SELECT, PHASE_CHECKPOINT = "evaluation gallery", "selection evaluation", "checkpoint"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite reward, loss or gradient."""


class EMA:
    """Exponential moving average of the trained weights (fp32 shadows), swappable into the model."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow towards its weight by (1 - decay)."""
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Inside the block the model holds the EMA weights; the trained ones come back after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of optimizer step `step` (a pure function of the step, so resuming needs no state)."""
    t = cfg.train
    if t.lr_schedule == "constant":
        return t.lr
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant_with_warmup":
        return t.lr
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    if t.lr_schedule == "linear":
        return t.lr * max(0.0, 1 - progress)
    return t.lr * 0.5 * (1 + math.cos(math.pi * progress))  # cosine


# ---------------------------------------------------------------- setup helpers


def resolve_run(cfg: Config) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None); refuses to silently overwrite a run."""
    out = Path(cfg.output_dir)
    if cfg.resume is None:
        if cfg.name is None:
            raise ValueError("resolve_run needs cfg.name (train() fills it in)")
        run = out / cfg.name
        if ckpt.latest(run / "checkpoints") is not None:
            raise ConfigError(f"run folder {run} already holds checkpoints; continue it with resume=latest "
                              f"(--resume latest) or pick another name (name=...)")
        return run, None
    if cfg.resume == "latest":
        if cfg.name is not None:
            runs = [out / cfg.name]
        else:
            runs = sorted((p for p in out.glob("*") if ckpt.latest(p / "checkpoints")), key=lambda p: p.stat().st_mtime)
        found = ckpt.latest(runs[-1] / "checkpoints") if runs else None
        if found is None:
            where = runs[-1] if cfg.name is not None else out
            raise ConfigError(f"resume=latest: no checkpoint found under {where}; start without resume or pass a checkpoint folder.")
        return found.parent.parent, found
    path = Path(cfg.resume)
    if (path / ckpt.META).is_file():
        return path.parent.parent, path
    found = ckpt.latest(path / "checkpoints")
    if found is None:
        raise ConfigError(f"resume={cfg.resume}: neither a checkpoint folder (with {ckpt.META}) nor a run folder with checkpoints.")
    return path, found


def build_adapter(cfg: Config, device: torch.device, dtype: torch.dtype, pipeline=None):
    """The pipeline adapter of `cfg.model` (tiny pipelines are built in code, seeded; shapes-sd and shapes-flow ship inside), or of
    an in-memory `pipeline` given instead; set to the low-memory mode and to fp8 sampling as cfg.train says."""
    from tuner import fp8

    if cfg.train.fp8_sampling and not fp8.supported(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ConfigError(f"train.fp8_sampling=true needs fp8 matmuls, which {name} lacks (CUDA compute capability "
                          f"8.9 or later: Ada, Hopper, Blackwell); set train.fp8_sampling=false")
    adapter = _adapter(cfg, device, dtype, pipeline)
    if cfg.train.fp8_sampling and adapter.family not in ("sd15", "sdxl"):
        raise ConfigError(f"train.fp8_sampling=true serves the UNet models (SD 1.5, SDXL) only; {cfg.model} is a "
                          f"{adapter.family} model: set train.fp8_sampling=false")
    adapter.low_memory = cfg.train.memory == "low"
    adapter.fp8 = cfg.train.fp8_sampling
    return adapter


def _adapter(cfg: Config, device: torch.device, dtype: torch.dtype, pipeline):
    from tuner import pipelines, shapes

    kwargs = dict(device=device, dtype=dtype, scheduler=cfg.sampling.scheduler,
                  park_denoiser=cfg.train.memory == "low")
    if pipeline is not None:
        if cfg.vae is not None:
            raise ConfigError(f"vae={cfg.vae} cannot replace the VAE of a pipeline passed to train(); "
                              "swap it in the pipeline, or set vae=null")
        return pipelines.adapter_from_pipeline(pipeline, **kwargs)
    if cfg.model in shapes.MODELS:
        return pipelines.load_adapter(str(shapes.model_dir(cfg.model)), vae=cfg.vae, **kwargs)
    if cfg.model in pipelines.TINY_PIPELINES:
        return pipelines.adapter_from_pipeline(pipelines.TINY_PIPELINES[cfg.model](seed=0), **kwargs)
    return pipelines.load_adapter(cfg.model, vae=cfg.vae, t5=cfg.t5, **kwargs)


def reward_dtype(cfg: Config) -> torch.dtype | None:
    """The reward's weight dtype: the run's half precision in low-memory mode, else the reward's default (fp32)."""
    precision = cfg.train.mixed_precision
    return DTYPES[precision] if cfg.train.memory == "low" and precision in ("bf16", "fp16") else None


def build_reward(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The reward (or weighted mixture) named by the configuration, frozen."""
    import rewards

    dtype = reward_dtype(cfg)
    if isinstance(cfg.reward, str):
        reward = rewards.load(cfg.reward, device=device, dtype=dtype, **cfg.reward_sources.get(cfg.reward, {}))
    else:
        reward = rewards.combine(cfg.reward, device=device, dtype=dtype, sources=cfg.reward_sources)
    # Decoded images are clamped to [0, 1] and non-finite rewards are caught by the loop: skip the per-call host sync.
    reward.check_values = False
    return reward


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """AdamW from torch, or 8-bit AdamW from bitsandbytes."""
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def _seed(base: int, *parts: int) -> int:
    return (base * 1_000_003 + sum(p * 7919 ** (i + 1) for i, p in enumerate(parts))) % 2**63


@torch.no_grad()
def evaluate(adapter, denoiser, conds, prompts: list[str], reward, cfg: Config,
             autocast, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Images of the evaluation prompts (prompt i seeded eval_seed + i, or seed + i, whatever the batch), their
    rewards and, for a mixture, the mean of each part, with `denoiser`; log.eval_batch_size prompts per chain."""
    s, trained, fp8 = cfg.sampling, adapter.denoiser, adapter.fp8
    adapter.denoiser = denoiser  # the plain module: no collective calls from the main process alone
    adapter.fp8 = False  # fp8 serves training trajectories; evaluation shows the model in the run's precision
    first = cfg.prompts.eval_seed if seed is None else seed
    gens = [torch.Generator().manual_seed(first + i) for i in range(len(prompts))]
    try:
        with autocast():
            images = engine.sample_each(adapter, conds, generators=gens,
                                        batch_size=cfg.log.eval_batch_size or cfg.train.batch_size,
                                        height=s.height, width=s.width, num_steps=s.num_steps,
                                        guidance_scale=s.guidance_scale, eta=s.eta).float()
    finally:
        adapter.denoiser, adapter.fp8 = trained, fp8
        fsdp.reshard(denoiser)
    with autocast():
        scores = reward(images, prompts).float()
    parts = {f"eval/reward/{k}": float(v.float().mean()) for k, v in getattr(reward, "last_parts", {}).items()}
    return images.cpu(), scores.cpu(), parts


def optimizer_step(accelerator: Accelerator, optimizer, scaler, params: list[torch.nn.Parameter],
                   rewards: torch.Tensor, loss: float, max_grad_norm: float) -> tuple[float, bool, bool, float]:
    """Clip and step unless any rank saw a non-finite reward, loss or gradient; gradients are zeroed either way.

    Returns (grad norm, skipped, counts as non-finite, reward mean over all ranks). Under fp16 a gradient
    overflow alone is the scaler's business (it lowers the scale) and does not count towards max_nonfinite.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    has_grads = any(p.grad is not None for p in params)
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if has_grads else torch.zeros((), device=rewards.device)
    norm = fsdp.full_tensor(norm)  # under FSDP a DTensor, already reduced over the processes
    values_bad = not (torch.isfinite(rewards).all() and math.isfinite(loss))
    local = torch.tensor([float(values_bad), float(not torch.isfinite(norm)), rewards.sum().item(), rewards.numel()],
                         device=rewards.device, dtype=torch.float64)
    values_bad_n, grads_bad_n, reward_sum, count = accelerator.reduce(local, "sum").tolist()  # one collective a step
    values_bad, grads_bad = values_bad_n > 0, grads_bad_n > 0
    skipped = values_bad or grads_bad
    if scaler is not None:
        if not values_bad:
            scaler.step(optimizer)  # skips the update itself when gradients overflowed
        scaler.update()
    elif not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nonfinite = values_bad or (grads_bad and scaler is None)
    return norm.item(), skipped, nonfinite, reward_sum / count


# ---------------------------------------------------------------- processes and one optimizer step


def make_accelerator() -> Accelerator:
    """One process per device (DDP when there are several); autocast is the loop's own, not accelerate's."""
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def make_autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context the step runs under (a null context in fp32)."""
    if precision == "no":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])


def add_trainable(denoiser: torch.nn.Module, cfg: Config, lora_targets: tuple[str, ...] | None = None
                  ) -> list[torch.nn.Parameter]:
    """Make the denoiser trainable as `cfg` says (LoRA or every weight, gradient checkpointing); returns the trained
    parameters. `lora_targets` are the family's defaults when lora.target_modules is unset."""
    if cfg.train.full_finetune:
        denoiser.requires_grad_(True)
        params = list(denoiser.parameters())
    else:
        targets = cfg.lora.target_modules or list(lora_targets or lora.UNET_TARGETS)
        params = lora.add_lora(denoiser, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=targets,
                               dropout=cfg.lora.dropout)
    if cfg.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return params


def prepare_denoiser(accelerator: Accelerator, denoiser: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """(denoiser wrapped for this process group, optimizer, trained parameters): DDP when there are several
    processes; under accelerate's FSDP2 plugin the denoiser is sharded in place and the optimizer's parameters are
    swapped for the sharded ones. The optimizer stays torch's own otherwise (the loop steps it itself)."""
    if getattr(accelerator, "is_fsdp2", False):
        denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
        return denoiser, optimizer, list(lora.trainable_parameters(denoiser).values())
    with warnings.catch_warnings():  # ranks run different numbers of forwards: buffers must never sync in forward
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        wrapped = accelerator.prepare(denoiser)
    return wrapped, optimizer, [p for group in optimizer.param_groups for p in group["params"]]


def plan_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator a sharded (FSDP) run draws the plan of (step, micro-batch) from, the same on every process: a
    sharded forward is a collective, so every process must call the denoiser as many times, at the same early stop."""
    return torch.Generator().manual_seed(_seed(seed, step, micro, 3))


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """Seed torch's global streams for this rank and return its training generator: from here on, every rank
    draws its own samples."""
    torch.manual_seed(_seed(seed, rank))
    return torch.Generator().manual_seed(_seed(seed, rank, 1))


@dataclasses.dataclass
class StepParts:
    """What one optimizer step uses; `adapter.denoiser` is the prepared (DDP) denoiser."""

    cfg: Config
    accelerator: Accelerator
    adapter: Any
    method: Any
    reward: torch.nn.Module
    sampler: PromptSampler
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    params: list[torch.nn.Parameter]
    generator: torch.Generator
    autocast: Callable[[], contextlib.AbstractContextManager]
    conditioning: Callable[[list[str]], Any]  # prompts -> Conditioning (prompt_conditioning)
    step_hook: Callable[[int], None] | None = None
    penalty: BasePenalty | None = None  # guards.kl_weight: the engine's step term
    pretrain: Callable[[int, int], torch.Tensor] | None = None  # guards.pretrain_weight: (step, micro) -> loss
    # FSDP: (step, micro) -> the generator of that micro-batch's plan, shared by the ranks; None: each rank's own
    plans_from: Callable[[int, int], torch.Generator] | None = None


@dataclasses.dataclass
class StepResult:
    """What one optimizer step reports; loss is as if unscaled, -(mean reward) of this rank."""

    outs: list[engine.StepOutput]
    plans: list[Any]
    lr: float
    loss: float
    grad_norm: float
    skipped: bool
    nonfinite: bool
    reward_mean: float
    extra: dict[str, float] = dataclasses.field(default_factory=dict)  # the guards' loss terms (unweighted)


def train_step(parts: StepParts, step: int,
               phase: Callable[[str], contextlib.AbstractContextManager] | None = None) -> StepResult:
    """Optimizer step `step`: the engine's reward_backward per micro-batch (gradients all-reduced once, at the
    last backward of the last micro-batch), then optimizer_step. `phase(name)`, if given, wraps each of the two
    (the loop's out-of-memory report names the phase)."""
    phase = phase or (lambda name: contextlib.nullcontext())
    lr = lr_at(step, parts.cfg)
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    with phase(PHASE_BACKWARD):
        outs, plans, extra, loss_scale = accumulate(parts, step)
    rewards_local = torch.cat([o.rewards.float().reshape(-1) for o in outs]).to(parts.accelerator.device)
    loss_local = sum(o.loss for o in outs) / len(outs) / loss_scale  # as if unscaled: -(mean reward)
    with phase(PHASE_OPTIMIZER):
        grad_norm, skipped, nonfinite, reward_mean = optimizer_step(
            parts.accelerator, parts.optimizer, parts.scaler, parts.params, rewards_local, loss_local,
            parts.cfg.train.max_grad_norm)
    return StepResult(outs, plans, lr, loss_local, grad_norm, skipped, nonfinite, reward_mean, extra)


def accumulate(parts: StepParts, step: int) -> tuple[list[engine.StepOutput], list[Any], dict[str, float], float]:
    """The micro-batches of optimizer step `step`, their gradients accumulated into .grad; returns their outputs,
    plans, the guards' loss terms and the loss scale of one micro-batch."""
    cfg, acc, denoiser, gen = parts.cfg, parts.accelerator, parts.adapter.denoiser, parts.generator
    t, s = cfg.train, cfg.sampling
    loss_scale = (parts.scaler.get_scale() if parts.scaler is not None else 1.0) / t.grad_accum
    outs, plans, pretrain_sum = [], [], 0.0
    for micro in range(t.grad_accum):
        prompts = parts.sampler.batch(step, micro)
        cond = parts.conditioning(prompts)
        plan_gen = gen if parts.plans_from is None else parts.plans_from(step, micro)
        plans.append(parts.method.plan(s.num_steps, plan_gen))
        if parts.pretrain is not None:  # its own graph, built and freed before the reward's
            with fsdp.deferred_sync(acc, denoiser), parts.autocast():
                loss = parts.pretrain(step, micro)
                (loss * (cfg.guards.pretrain_weight * loss_scale)).backward()
            pretrain_sum += float(loss.detach())
        # earlier micro-batches accumulate locally; the engine syncs on the last backward of the last one
        sync = fsdp.deferred_sync(acc, denoiser) if micro < t.grad_accum - 1 else contextlib.nullcontext()
        with sync, parts.autocast():
            outs.append(engine.reward_backward(
                parts.adapter, plans[-1], cond, parts.reward, prompts, height=s.height, width=s.width,
                guidance_scale=s.guidance_scale, generator=gen, loss_scale=loss_scale,
                no_sync=lambda: fsdp.deferred_sync(acc, denoiser), eta=s.eta, step_hook=parts.step_hook,
                step_term=parts.penalty))
    extra = {}
    if parts.penalty is not None:
        extra["kl_penalty"] = parts.penalty.pop() / t.grad_accum
    if parts.pretrain is not None:
        extra["pretrain_loss"] = pretrain_sum / t.grad_accum
    return outs, plans, extra, loss_scale


# ---------------------------------------------------------------- micro-batches: train.batch_size, prompts_per_step, auto


def process_prompts(cfg: Config, world: int) -> int | None:
    """Prompts per optimizer step on each process when train.prompts_per_step is set (else None)."""
    total = cfg.train.prompts_per_step
    if total is None:
        return None
    if total % world:
        raise ConfigError(f"train.prompts_per_step={total} does not split over the {world} processes; give a "
                          f"multiple of {world}")
    return total // world


def with_layout(cfg: Config, batch: int, accum: int) -> Config:
    """`cfg` with micro-batch `batch` and `accum` micro-batches a step."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch, grad_accum=accum))


def fixed_layout(cfg: Config, world: int) -> Config | None:
    """`cfg` with a number as micro-batch and the accumulation that gives train.prompts_per_step; None when
    train.batch_size is auto (the trial steps decide)."""
    per = process_prompts(cfg, world)
    batch = cfg.train.batch_size
    if per is None:
        return cfg
    if batch == "auto":
        return None
    if per % batch:
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} gives {per} prompts a step to each of "
                          f"the {world} processes, which micro-batches of train.batch_size={batch} do not split; "
                          f"pick another batch_size (or auto)")
    return with_layout(cfg, batch, per // batch)


def fit_probe(parts: StepParts, denoiser: torch.nn.Module, step: int, generators: dict[str, torch.Generator],
              per_process: int) -> tuple[Callable[[int], int | None], int, int] | None:
    """(probe, budget bytes, resident bytes) for tuner.memory.choose_batch_size: probe(b) is the allocated peak of a
    trial optimizer step at micro-batch b, or None when it ran out of memory; None off CUDA (no memory statistics)."""
    device = parts.accelerator.device
    total = memory.device_bytes(device)
    if total is None:
        return None

    def probe(batch: int) -> int | None:
        return trial_peak(parts, denoiser, batch, step, generators, per_process)

    return probe, int(total * memory.AUTO_HEADROOM), torch.cuda.memory_allocated(device)


def trial_peak(parts: StepParts, denoiser: torch.nn.Module, batch: int, step: int,
               generators: dict[str, torch.Generator], per_process: int) -> int | None:
    """The allocated peak of one optimizer step at micro-batch `batch` (sampling, reward, backward, AdamW step with
    its state), or None when it ran out of memory. It runs on the plain denoiser (no collective calls, so each
    process tries alone); weights, optimizer state and every random stream are put back after."""
    device = parts.accelerator.device
    weights = [p.detach().to("cpu", copy=True) for p in parts.params]
    optimizer_state = _on_cpu(parts.optimizer.state_dict())
    streams = ckpt.rng_state(generators)
    wrapped, parts.adapter.denoiser = parts.adapter.denoiser, denoiser
    sampler = parts.sampler
    trial = dataclasses.replace(
        parts, cfg=with_layout(parts.cfg, batch, 1), step_hook=None,
        sampler=PromptSampler(sampler.prompts, batch, grad_accum=per_process // batch, rank=sampler.rank,
                              world_size=sampler.world_size, seed=sampler.seed))
    memory.reset_peak(device)
    try:
        accumulate(trial, step)
        parts.optimizer.step()
        peak = memory.peak_bytes(device)
    except torch.OutOfMemoryError:
        peak = None
    finally:
        parts.optimizer.zero_grad(set_to_none=True)
        parts.adapter.denoiser = wrapped
        with torch.no_grad():
            for p, w in zip(parts.params, weights):
                p.copy_(w)
        parts.optimizer.load_state_dict(optimizer_state)
        ckpt.set_rng_state(streams, generators)
        if parts.penalty is not None:
            parts.penalty.pop()
        gc.collect()
        if memory.tracks_memory(device):
            torch.cuda.empty_cache()
    return peak


def _on_cpu(state: Any) -> Any:
    """A deep copy of a (nested) state with every tensor on the CPU."""
    if torch.is_tensor(state):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return state


def trial_batch(per: int, found: tuple[Callable[[int], int | None], int, int]) -> tuple[int, str]:
    """The largest divisor of `per` whose trial step fits (see memory.choose_batch_size), and how it was chosen."""
    probe, budget, resident = found
    batch, trials = memory.choose_batch_size(memory.divisors(per), probe, budget, resident)
    if trials[0][1] is None:  # not even the smallest fits: say so now, not after the first gallery
        raise torch.OutOfMemoryError(f"the trial step at micro-batch {trials[0][0]} ran out of memory")
    shown = ", ".join(f"{b} -> " + ("out of memory" if p is None else f"{memory.gib(p):.1f} GiB") for b, p in trials)
    return batch, (f"trial steps {shown}; a micro-batch may peak at {memory.gib(budget):.1f} GiB, "
                   f"{memory.AUTO_HEADROOM:.0%} of what this process may use")


def auto_batch(cfg: Config, parts: StepParts, denoiser: torch.nn.Module, step: int,
               generators: dict[str, torch.Generator], saved: dict[str, Any] | None) -> tuple[Config, str]:
    """Resolve train.batch_size=auto: the micro-batch of the checkpoint resumed from, else the one a run of the same
    configuration on the same card chose (tuner.memory's memo), else the largest divisor of this process's prompts
    a step whose trial step fits (every process takes the smallest choice of any process); returns `cfg` with it
    and the accumulation, and the line the run logs."""
    acc = parts.accelerator
    per = process_prompts(cfg, acc.num_processes)
    tic = time.perf_counter()
    if saved and saved.get("batch_size") and per % saved["batch_size"] == 0:
        batch, how = saved["batch_size"], "as the checkpoint resumed from used"
    else:
        found = fit_probe(parts, denoiser, step, generators, per)
        key = memory.memo_key(to_dict(cfg), acc.device, acc.num_processes)
        memo = memory.remembered(key) if found is not None else None
        if found is None:
            batch, how = per, f"no memory statistics on {acc.device.type}: the whole step in one micro-batch"
        elif memo is not None and per % memo["batch"] == 0:
            batch, how = memo["batch"], (f"as a run of this configuration on this card chose on {memo['when']}: "
                                         f"{memo['trials']}; trial steps skipped, delete {memory.memo_path()} to "
                                         f"run them again")
        else:
            batch, how = trial_batch(per, found)
            memory.remember(key, batch, how)
        batch = int(acc.gather(torch.tensor([batch], device=acc.device)).min().item())
    line = (f"train.batch_size=auto: micro-batch {batch} x {per // batch} accumulated = {per} prompts a step on each "
            f"of {acc.num_processes} process(es) ({how}; {time.perf_counter() - tic:.0f} s)")
    return with_layout(cfg, batch, per // batch), line


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(root: Path, step: int, *, accelerator: Accelerator, denoiser, ema: EMA | None, optimizer, scaler,
                    generators: dict[str, torch.Generator], meta: dict[str, Any], keep: int) -> None:
    """All ranks write their RNG states into one temporary folder; the main process writes the rest and commits
    (under FSDP every rank first helps gather the whole weights, EMA and optimizer state)."""
    if accelerator.is_main_process:
        ckpt.begin(root, step)
    accelerator.wait_for_everyone()
    tmp = root / f"{ckpt.TMP_PREFIX}{ckpt.PREFIX}{step:08d}"
    ckpt.write_state(tmp, f"rng-{accelerator.process_index}.pt", ckpt.rng_state(generators))
    sharded = fsdp.is_sharded(denoiser)
    trained = trained_state(denoiser)
    shadow = fsdp.full_state(ema.shadow) if ema is not None and sharded else getattr(ema, "shadow", None)
    optim = fsdp.optimizer_state(denoiser, optimizer) if sharded else optimizer.state_dict()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.write_tensors(tmp, "trainable.safetensors", trained)
        if shadow is not None:
            ckpt.write_tensors(tmp, "ema.safetensors", shadow)
        ckpt.write_state(tmp, "optimizer.pt", {"optimizer": optim, "sharded": sharded,
                                               "scaler": scaler.state_dict() if scaler is not None else None})
        ckpt.commit(tmp, meta, keep)
    accelerator.wait_for_everyone()


def trained_state(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights by name, whole (under FSDP gathered: every rank calls it)."""
    state = lora.trainable_state(denoiser)
    return fsdp.full_state(state) if fsdp.is_sharded(denoiser) else state


def load_trained(denoiser: torch.nn.Module, folder: Path, name: str = "trainable.safetensors") -> None:
    """Copy a checkpoint's trained weights (`name`: trainable.safetensors, or ema.safetensors for the EMA) into the
    denoiser, whose trained parameters (LoRA or full) must be the same set; sharded ones keep their own shard."""
    params = dict(denoiser.named_parameters())
    saved = ckpt.read_tensors(folder, name)
    expected = set(lora.trainable_state(denoiser))
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
        raise ConfigError(f"checkpoint {folder} does not match this run's trained weights (missing e.g. {missing}, "
                          f"unexpected e.g. {extra}); resume with the model, lora.* and train.full_finetune it was written with.")
    fsdp.load_into(params, saved)


def load_checkpoint(folder: Path, *, rank: int, denoiser, ema: EMA | None, optimizer, scaler,
                    generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Restore weights, EMA, optimizer, scaler and this rank's RNGs; returns the checkpoint's meta."""
    meta = ckpt.read_meta(folder)
    load_trained(denoiser, folder)
    if ema is not None:
        if (folder / "ema.safetensors").is_file():
            ema.shadow = fsdp.shard_like(ckpt.read_tensors(folder, "ema.safetensors"), ema.shadow)
        else:
            ema.shadow = {n: p.detach().float().clone() for n, p in ema.params.items()}
    state = ckpt.read_state(folder, "optimizer.pt")
    if state.get("sharded", False) != fsdp.is_sharded(denoiser):
        raise ConfigError(f"checkpoint {folder} was written {'with' if state.get('sharded') else 'without'} FSDP; "
                          "resume it the same way (the optimizer state is laid out differently)")
    if fsdp.is_sharded(denoiser):
        fsdp.load_optimizer_state(denoiser, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng = folder / f"rng-{rank}.pt"
    if rng.is_file():
        ckpt.set_rng_state(ckpt.read_state(folder, rng.name), generators)
    else:  # resumed on more processes than saved: new ranks start fresh, deterministic streams
        for i, (_, g) in enumerate(sorted(generators.items())):
            g.manual_seed(_seed(meta["step"], rank, i + 2))
    return meta


# ---------------------------------------------------------------- guards (tuner/guards, docs/tuner.md "Reward hacking and its guards")


def pretrain_loss(cfg: Config, adapter, rank: int, world: int) -> Callable[[int, int], torch.Tensor] | None:
    """guards.pretrain_weight: (step, micro) -> the denoising loss of that micro-batch's pairs, a pure function of
    them (its own generator seeded by (seed, step, rank, micro)), so resuming needs no state; None when off."""
    g, t, s = cfg.guards, cfg.train, cfg.sampling
    if g.pretrain_weight <= 0:
        return None
    pairs = pretrain.PairSource(g.pretrain_data, batch_size=g.pretrain_batch_size, height=s.height, width=s.width,
                                grad_accum=t.grad_accum, rank=rank, world_size=world, seed=t.seed)

    def loss(step: int, micro: int) -> torch.Tensor:
        images, captions = pairs.batch(step, micro)
        generator = torch.Generator().manual_seed(_seed(t.seed, step, rank, micro, 5))
        return pretrain.denoising_loss(adapter, images, captions, num_steps=s.num_steps, generator=generator,
                                       height=s.height, width=s.width)

    return loss


def reward_statistics(cfg: Config, run_dir: Path, adapter, denoiser, reward, train_prompts: list[str], autocast,
                      accelerator: Accelerator, resumed: bool) -> dict[str, torch.Tensor]:
    """guards.normalize: the base model's score statistics, sampled once by the main process into the run folder
    (tuner/guards/normalize.py says how) and read from there by every process, also on resume."""
    g, path = cfg.guards, run_dir / normalize.STATS_FILE
    if accelerator.is_main_process and not path.is_file():
        if resumed and cfg.train.full_finetune:
            raise ConfigError(f"guards.normalize: {path} is missing and a resumed full fine-tune no longer holds the "
                              "base weights; restart the run, or set guards.normalize=none")
        prompts = [train_prompts[i % len(train_prompts)] for i in range(g.normalize_samples)]
        conds = adapter.encode_prompts(prompts, [cfg.sampling.negative_prompt] * len(prompts))
        with _model_weights(denoiser, None, base=True):
            _, scores, _ = evaluate(adapter, denoiser, conds, prompts, reward, cfg, autocast, seed=g.normalize_seed)
        normalize.save_stats(run_dir, normalize.statistics(scores, getattr(reward, "last_parts", {})))
    accelerator.wait_for_everyone()
    return normalize.load_stats(run_dir)


def save_best(run_dir: Path, step: int, score: float, denoiser, ema: EMA | None) -> None:
    """guards.keep_best: the weights the run would save now (EMA if any), atomically, as run/best/step-N."""
    root = run_dir / "best"
    tmp = ckpt.begin(root, step)
    with _model_weights(denoiser, ema):
        ckpt.write_tensors(tmp, "trainable.safetensors", lora.trainable_state(denoiser))
    ckpt.commit(tmp, {"step": step, "score": score}, keep=1)


# ---------------------------------------------------------------- the run


def prompt_conditioning(adapter, sampler: PromptSampler | list[PromptSampler], steps: range,
                        cfg: Config) -> Callable[[list[str]], Any]:
    """How the loop gets a micro-batch's text conditioning: encoded when drawn; or, in low-memory mode and for the
    families that cache prompts (SD3, FLUX: T5-XXL), from a cache of every prompt this process draws in `steps`
    (with each of several samplers: the micro-batch layouts train.batch_size=auto may pick), encoded once, after
    which the text encoders leave the GPU."""
    negative = cfg.sampling.negative_prompt
    if cfg.train.memory != "low" and not adapter.cache_prompts:
        return lambda prompts: adapter.encode_prompts(prompts, [negative] * len(prompts))
    samplers = sampler if isinstance(sampler, list) else [sampler]
    drawn = [p for one in samplers for step in steps for micro in range(one.grad_accum) for p in one.batch(step, micro)]
    cache = ConditioningCache(adapter, drawn, negative)
    adapter.offload_text_encoders()
    return cache


def train(cfg: Config, *, reward_fn: torch.nn.Module | None = None, pipeline=None,
          make_step_hook: Callable[[list[torch.nn.Parameter]], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Run (or resume) reward fine-tuning as `cfg` says; returns the run summary.

    `reward_fn` replaces cfg.reward. `pipeline`, a diffusers pipeline in memory, replaces loading cfg.model (which
    then only names the run). `make_step_hook(trained parameters)`, called once they exist, returns the
    engine's step_hook (called after each trained step's backward; e.g. per-step gradient norms).
    """
    validate(cfg)  # cheap, and before any model loads (the command line has checked it already)
    accelerator = make_accelerator()
    fsdp.check_config(cfg, accelerator)
    guard = memory.OOMGuard(cfg, accelerator.device, None, ckpt.latest, started=process_start_time())
    guard.echo = accelerator.is_main_process
    with contextlib.ExitStack() as stack, guard.watch():
        return _train(cfg, accelerator, guard, stack, reward_fn, pipeline, make_step_hook)


def _train(cfg: Config, accelerator: Accelerator, guard: memory.OOMGuard, stack: contextlib.ExitStack,
           reward_fn, pipeline, make_step_hook) -> dict[str, Any]:
    """train()'s body: `guard` names the phase an out-of-memory error happens in, `stack` closes what is open."""
    # --- setup: processes, run folder, precision, micro-batches
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    precision = cfg.train.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    if cfg.name is None and cfg.resume is None:
        stamp = [datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")]
        broadcast_object_list(stamp)  # every rank writes to the same folder
        cfg = dataclasses.replace(cfg, name=f"{Path(cfg.model).name}-{cfg.method}-{stamp[0]}")
    run_dir, resume_from = resolve_run(cfg)
    cfg = dataclasses.replace(cfg, name=run_dir.name, train=dataclasses.replace(cfg.train, mixed_precision=precision))
    requested = cfg.train  # what config.yaml records (train.batch_size=auto filled in with its choice)
    layout = fixed_layout(cfg, world)  # None: train.batch_size=auto, resolved by trial steps once the models exist
    auto, cfg = layout is None, layout or cfg
    guard.cfg, guard.checkpoints = cfg, run_dir / "checkpoints"
    t, s = cfg.train, cfg.sampling
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    weight_dtype = DTYPES[precision] if not t.full_finetune else torch.float32
    autocast = make_autocast(device, precision)

    # --- models, prompts, method; every prompt encoded before the denoiser takes its place on the device
    adapter = build_adapter(cfg, device, weight_dtype, pipeline)
    g = cfg.guards
    train_prompts, eval_prompts = load_prompt_sets(cfg.prompts)
    if g.select_every:
        train_prompts, select_prompts = select.split_prompts(train_prompts, eval_prompts, file=g.select_prompts,
                                                             num=g.select_num, seed=g.select_seed)
    method = get_method(cfg.method, **cfg.method_options)
    eval_conds = adapter.encode_prompts(eval_prompts, [s.negative_prompt] * len(eval_prompts))
    judge_captions = judge.held_out_captions(judge_caption_count(cfg), exclude=train_prompts) if main else []
    if main and cfg.log.judge_captions and not judge_captions:
        print(f"log.judge_captions: the ground-truth judge reads shapes images only; no held-out test for {cfg.model}",
              flush=True)
    judge_conds = adapter.encode_prompts(judge_captions, [s.negative_prompt] * len(judge_captions)) \
        if judge_captions else None
    truth = judge.run_metrics(cfg.model, eval_prompts) or (lambda images: {})  # ground truth on shapes models

    def make_sampler(batch: int, accum: int) -> PromptSampler:
        return PromptSampler(train_prompts, batch, grad_accum=accum, rank=rank, world_size=world, seed=t.seed)

    per = process_prompts(cfg, world)
    layouts = ([make_sampler(b, per // b) for b in memory.divisors(per)] if auto
               else [make_sampler(t.batch_size, t.grad_accum)])
    resume_step = ckpt.read_meta(resume_from)["step"] if resume_from is not None else 0
    conditioning = prompt_conditioning(adapter, layouts, range(resume_step, t.steps), cfg)
    # Low-memory mode has moved the text encoders off the device by now: the denoiser takes their place (T5-XXL and
    # FLUX.1-dev's transformer together fill a 32 GiB card).
    adapter.place_denoiser()
    denoiser = adapter.denoiser
    params = add_trainable(denoiser, cfg, adapter.lora_targets)
    # a full fine-tune's KL penalty copies the denoiser here, before it is compiled or wrapped
    penalty = BasePenalty.for_denoiser(g.kl_weight, denoiser, t.full_finetune) if g.kl_weight > 0 else None
    if t.compile:
        stack.enter_context(compile_cache.persistent(compile_cache.resolve(t.compile_cache, adapter, device)))
        adapter.compile()  # after the LoRA exists: its layers are part of the compiled blocks

    # --- optimizer, EMA, processes, generators, resume
    optimizer = build_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if scaler is not None:
        scaler.scale(torch.ones((), device=device))  # creates the scale; the engine applies it through loss_scale
    adapter.denoiser, optimizer, params = prepare_denoiser(accelerator, denoiser, optimizer)
    sharded = fsdp.is_sharded(denoiser)  # FSDP2 shards in place: denoiser is the sharded module
    step_hook = make_step_hook(params) if make_step_hook is not None else None
    evaluates = main or sharded  # a sharded forward needs every process
    ema = EMA(lora.trainable_parameters(denoiser), t.ema_decay) if t.ema_decay > 0 else None
    gen = rank_generator(t.seed, rank)
    generators = {"train": gen}
    augment = None
    if g.augment:
        augment = aug.Augment(g.augment, crop=g.augment_crop, shift=g.augment_shift, noise=g.augment_noise,
                              seed=_seed(g.augment_seed, rank))
        generators["augment"] = augment.generator
    start, streak, selection, meta = 0, 0, select.Selection(), {}
    if resume_from is not None:
        meta = load_checkpoint(resume_from, rank=rank, denoiser=denoiser, ema=ema, optimizer=optimizer, scaler=scaler,
                               generators=generators)
        start, streak = meta["step"], meta["nonfinite_streak"]
        selection = select.Selection(**meta.get("selection", {}))

    # Loaded once the prompts are encoded: low-memory mode has moved the text encoders off the GPU by now.
    reward = reward_fn if reward_fn is not None else build_reward(cfg, device)
    step_parts = StepParts(cfg, accelerator, adapter, method, reward, layouts[-1], optimizer, scaler, params, gen,
                           autocast, conditioning, step_hook, penalty, pretrain_loss(cfg, adapter, rank, world))
    if auto:
        guard.at(PHASE_TRIAL, 0)
        cfg, line = auto_batch(cfg, step_parts, denoiser, start, generators, meta.get("layout"))
        guard.cfg, t = cfg, cfg.train
        guard.at(memory.SETUP, 0)
        if main:
            print(line, flush=True)
    sampler = make_sampler(t.batch_size, t.grad_accum)
    logger = RunLogger(run_dir, enabled=main, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                       wandb_project=cfg.log.wandb_project, config=to_dict(cfg),
                       resume_step=start if resume_from is not None else None)
    gallery_dir = run_dir / "gallery"
    stack.callback(logger.close)
    if main:
        written = dataclasses.replace(cfg, train=dataclasses.replace(requested, batch_size=t.batch_size))
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(written), sort_keys=False))
        gallery_dir.mkdir(parents=True, exist_ok=True)
    before_file = gallery_dir / "before.safetensors"
    if evaluates:
        if resume_from is not None and before_file.is_file():
            before = ckpt.read_tensors(gallery_dir, before_file.name)["images"]
        else:
            guard.at(PHASE_EVAL, 0)
            with _model_weights(denoiser, ema, base=True):
                before, before_rewards, parts = evaluate(adapter, denoiser, eval_conds, eval_prompts, reward, cfg, autocast)
            if main:
                ckpt.write_tensors(gallery_dir, before_file.name, {"images": before})
                logger.log(0, {"eval/reward": before_rewards.mean(), **parts, **truth(before)})
    if main:
        truth_file = run_dir / "ground_truth_before.json"
        if judge_captions and not truth_file.is_file():
            guard.at(PHASE_EVAL, 0)
            with _model_weights(denoiser, ema, base=True):
                tallies = ground_truth(cfg, adapter, denoiser, reward, autocast, judge_captions, judge_conds)
            truth_file.write_text(json.dumps(tallies))
    accelerator.wait_for_everyone()
    stats = None
    if g.normalize != "none":
        stats = reward_statistics(cfg, run_dir, adapter, denoiser, reward, train_prompts, autocast, accelerator,
                                  resume_from is not None)
    train_reward = reward
    if augment is not None or stats is not None:
        train_reward = normalize.GuardedReward(reward, augment=augment, stats=stats, mode=g.normalize)

    def run_selection(done: int) -> bool:
        """Score the selection prompts (main process), log, keep the best; whether early stopping ends the run."""
        guard.at(PHASE_SELECT, done)
        if main:
            with _model_weights(denoiser, ema):
                images, _, _ = evaluate(adapter, denoiser, select_conds, select_prompts, reward, cfg, autocast,
                                        seed=g.select_seed)
            with torch.no_grad():
                score = metric(images.to(device), select_prompts)
            logger.log(done, {"select/score": score})
            if selection.update(done, score) and g.keep_best:
                save_best(run_dir, done, score, denoiser, ema)
        stop = [selection.exhausted(g.early_stop_patience)]
        broadcast_object_list(stop)
        return stop[0]

    if g.select_every:
        metric = select.load_metric(g.select_metric, key=g.select_key, device=device,
                                    sources=cfg.reward_sources.get(g.select_metric, {}))
        select_conds = adapter.encode_prompts(select_prompts, [s.negative_prompt] * len(select_prompts))
        if resume_from is None:
            run_selection(0)  # the base model is a candidate too

    # --- the loop
    shared_plans = (lambda step, micro: plan_generator(t.seed, step, micro)) if sharded else None
    step_parts = dataclasses.replace(  # the trial steps' parts, with the layout chosen and the guarded reward
        step_parts, cfg=cfg, reward=train_reward, sampler=sampler, plans_from=shared_plans,
        pretrain=pretrain_loss(cfg, adapter, rank, world) if auto else step_parts.pretrain)
    bar = tqdm(total=t.steps, initial=start, disable=not (main and cfg.log.progress), desc=f"{cfg.method}")
    stack.callback(bar.close)
    last, t_start, stopped_at = {}, time.perf_counter(), None
    peaks = {"session": 0, "steps": None, "first_step_s": None}  # bytes; seconds from process start
    for step in range(start, t.steps):
        tic = time.perf_counter()
        done = step + 1
        peaks["session"] = max(peaks["session"], memory.peak_bytes(device) or 0)  # setup, evaluation, checkpoints
        memory.reset_peak(device)
        r = train_step(step_parts, step, phase=lambda name: guard.phase(name, done))  # skips a non-finite step on
        if not r.skipped and ema is not None:  # every rank alike; else clip and update
            ema.update()
        streak = streak + 1 if r.nonfinite else 0
        peak = memory.peak_bytes(device)
        if peaks["first_step_s"] is None:
            peaks["first_step_s"] = round(time.time() - process_start_time(), 1)
        if peak is not None:
            peaks["steps"] = max(peaks["steps"] or 0, peak)

        # log (metrics averaged over ranks; the peak is this process's), eval gallery, checkpoint
        metrics = {"reward": r.reward_mean, "loss": r.loss, "grad_norm": r.grad_norm, "lr": r.lr,
                   "step_time": time.perf_counter() - tic, "skipped": float(r.skipped), **r.extra}
        if peak is not None:
            metrics["peak_gib"] = memory.gib(peak)
        for key in r.outs[0].parts:
            metrics[f"reward/{key}"] = torch.cat([o.parts[key].float().reshape(-1) for o in r.outs]).mean().item()
        if done % cfg.log.every == 0 or r.skipped or done == t.steps:
            logger.log(done, metrics)
        bar.update(1)
        shown = {"peak": f"{memory.gib(peak):.1f}G"} if peak is not None else {}
        bar.set_postfix(reward=f"{r.reward_mean:.4g}", s_per_step=f"{metrics['step_time']:.2f}", **shown)
        if streak >= t.max_nonfinite:
            bar.close()
            logger.close()
            kept = ckpt.latest(run_dir / "checkpoints")
            raise NonFiniteError(
                f"{streak} consecutive steps (up to step {done}) had a non-finite reward, loss or gradient; stopped. "
                f"The last good checkpoint is {kept or 'none (no checkpoint was written yet)'}. Check the reward "
                f"on these images, lower train.lr, or raise train.max_nonfinite.")
        stop = bool(g.select_every) and done % g.select_every == 0 and run_selection(done)
        if evaluates and (done % cfg.log.eval_every == 0 or done == t.steps or stop):
            guard.at(PHASE_EVAL, done)
            with _model_weights(denoiser, ema):
                now, now_rewards, parts = evaluate(adapter, denoiser, eval_conds, eval_prompts, reward, cfg, autocast)
            last = {"eval_reward": now_rewards.mean().item()}
            if main:
                path = gallery_dir / f"step-{done:08d}.png"
                gallery(before, now, eval_prompts, f"step {done}").save(path)
                logger.image("gallery", path, done)
                logger.log(done, {"eval/reward": now_rewards.mean(), **parts, **truth(now)})
        if done % cfg.checkpoint.every == 0 or done == t.steps or stop:
            guard.at(PHASE_CHECKPOINT, done)
            save_checkpoint(run_dir / "checkpoints", done, accelerator=accelerator, denoiser=denoiser, ema=ema,
                            optimizer=optimizer, scaler=scaler, generators=generators, keep=cfg.checkpoint.keep,
                            meta={"step": done, "nonfinite_streak": streak, "world_size": world, "lr": r.lr,
                                  "model": cfg.model, "method": cfg.method,
                                  "selection": dataclasses.asdict(selection),
                                  "layout": {"batch_size": t.batch_size, "grad_accum": t.grad_accum}})
        if stop:
            stopped_at = done
            break
    bar.close()

    # --- final weights, reward curve, summary
    summary = {}
    best = ckpt.latest(run_dir / "best") if g.keep_best else None
    final_dir = run_dir / ("unet" if hasattr(adapter.pipe, "unet") else "transformer")
    if sharded:  # every process gathers the final (EMA) weights; the main one writes them below
        with _model_weights(denoiser, ema):
            final_state = trained_state(denoiser)
    if main:
        if best is not None:  # the best selection-scored weights become the final ones (EMA already applied)
            load_trained(denoiser, best)
            _, final_rewards, _ = evaluate(adapter, denoiser, eval_conds, eval_prompts, reward, cfg, autocast)
        with _model_weights(denoiser, ema if best is None and not sharded else None):
            if sharded:
                final = _save_state(denoiser, final_state, final_dir)
            elif t.full_finetune:
                final = _save_denoiser(denoiser, final_dir)
            else:
                final = lora.save_lora(denoiser, run_dir / "lora", adapter.pipeline_class)
        truth_after = None
        if judge_captions:
            with _model_weights(denoiser, ema if best is None else None):
                truth_after = ground_truth(cfg, adapter, denoiser, reward, autocast, judge_captions, judge_conds)
        rows = read_metrics(run_dir / "metrics.jsonl")
        plot_rewards(rows, run_dir / "reward_curve.png")
        summary = _summary(cfg, rows, run_dir, final, time.perf_counter() - t_start, start, world, params, last)
        peaks["session"] = max(peaks["session"], memory.peak_bytes(device) or 0)
        summary.update(_memory_summary(cfg, device, world, peaks))
        if start == 0:  # where the time to the first step went (a resumed run starts at a later step)
            summary["warm_up_phases"] = [{"phase": n, "step": k, "from_start_s": v} for n, k, v in guard.warm_up]
        if truth_after is not None:
            summary.update(_ground_truth_summary(cfg, json.loads(truth_file.read_text()), truth_after))
        if g.select_every:
            summary["selection"] = {"best_step": selection.best_step, "best_score": selection.best,
                                    "stopped_early_at": stopped_at,
                                    "final_weights_from_step": ckpt.read_meta(best)["step"] if best else None,
                                    "eval_reward_of_final_weights": final_rewards.mean().item() if best else None}
        write_summary(run_dir, summary)
    logger.close()
    accelerator.wait_for_everyone()
    return summary


@contextlib.contextmanager
def _model_weights(denoiser, ema: EMA | None, base: bool = False):
    """The weights galleries and saved files use: the base model (adapters off), else EMA if any, else current."""
    if base and getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser.disable_adapters()
        try:
            yield
        finally:
            denoiser.enable_adapters()
    elif ema is not None and not base:
        with ema.applied():
            yield
    else:
        yield


def _save_denoiser(denoiser, folder: Path) -> Path:
    denoiser.save_pretrained(folder)
    return folder


def ground_truth(cfg: Config, adapter, denoiser, reward, autocast, captions: list[str], conds) -> dict[str, list[int]]:
    """The judge's (passes, images) of each check over the held-out captions, log.judge_seeds noise seeds each."""
    verdicts = []
    for k in range(cfg.log.judge_seeds):
        images, _, _ = evaluate(adapter, denoiser, conds, captions, reward, cfg, autocast,
                                seed=JUDGE_SEED + k * len(captions))
        verdicts += judge.judge_each(images, captions)
    return {check: list(tally) for check, tally in judge.tallies(verdicts).items()}


def _ground_truth_summary(cfg: Config, before: dict, after: dict) -> dict[str, Any]:
    """Rates with 95% intervals, before and after, for the summary."""
    def table(tallies: dict) -> dict:
        return {check: judge.rate_with_interval(*tally) for check, tally in tallies.items()}
    return {"ground_truth": {"captions": cfg.log.judge_captions, "seeds": cfg.log.judge_seeds,
                             "before": table(before), "after": table(after)}}


def _judged(rows: list[dict]) -> dict[str, dict[str, float]]:
    """The shapes judge's rates at the first and the last evaluation (runs on a shapes model), else nothing."""
    judged = [{k.removeprefix("eval/judge/"): v for k, v in r.items() if k.startswith("eval/judge/")} for r in rows]
    judged = [j for j in judged if j]
    return {"judge_before": judged[0], "judge_after": judged[-1]} if judged else {}


def _memory_summary(cfg: Config, device: torch.device, world: int, peaks: dict[str, Any]) -> dict[str, Any]:
    """The micro-batches, GPU memory and warm-up of this session (GPU figures None off CUDA)."""
    t, total = cfg.train, memory.device_bytes(device)
    return {
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "prompts_per_step": world * t.batch_size * t.grad_accum,
        "gpu": torch.cuda.get_device_name(device) if total is not None else None,
        "gpu_memory_gib": memory.gib(total),
        "peak_gib_steps": memory.gib(peaks["steps"]), "peak_gib_session": memory.gib(peaks["session"]) if total else None,
        "seconds_to_first_step": peaks["first_step_s"],
    }


def _save_state(denoiser, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """A gathered (FSDP) denoiser as from_pretrained reads it: its config and one safetensors file of `state` and of
    its persistent buffers (FSDP leaves those whole on every process)."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    buffers = {k: v for k, v in denoiser.state_dict().items() if k not in state}
    denoiser.save_config(folder)
    ckpt.write_tensors(folder, SAFETENSORS_WEIGHTS_NAME, {**buffers, **state})
    return folder


def _summary(cfg: Config, rows: list[dict], run_dir: Path, final: Path, seconds: float, start: int, world: int,
             params: list, last: dict) -> dict[str, Any]:
    train_rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    evals = [(r["step"], r["eval/reward"]) for r in rows if r.get("eval/reward") is not None]
    tenth = max(1, len(train_rewards) // 10)
    return {
        "name": cfg.name, "model": cfg.model, "method": cfg.method, "reward": cfg.reward, "memory": cfg.train.memory,
        "steps": cfg.train.steps, "resumed_from_step": start, "processes": world,
        "trained_parameters": sum(p.numel() for p in params),
        "eval_reward_before": evals[0][1] if evals else None,
        "eval_reward_after": last.get("eval_reward", evals[-1][1] if evals else None),
        "train_reward_first_10pct": sum(train_rewards[:tenth]) / tenth if train_rewards else None,
        "train_reward_last_10pct": sum(train_rewards[-tenth:]) / tenth if train_rewards else None,
        "skipped_steps": int(sum(r.get("skipped", 0) or 0 for r in rows)),
        **_judged(rows),
        "seconds_this_session": round(seconds, 1),
        "final_weights": str(final), "run_dir": str(run_dir),
    }
