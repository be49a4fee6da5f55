"""Run configuration: dataclasses, YAML files, `key=value` overrides and validation.

Every option lives in one dataclass field with its default and a help string; `docs/tuner.md`
renders its table from these fields (`python -m tuner.config`). A configuration is checked
completely (names, types, allowed values) before any model is loaded, so a typo costs seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

TINY_MODELS = ("tiny-sdxl", "tiny-sd15", "tiny-sd3", "tiny-flux", "tiny-flux-schnell")
SHIPPED_MODELS = ("shapes-sd", "shapes-flow")  # trained pipelines inside the package (tuner.shapes.MODELS)
BUILTIN_MODELS = SHIPPED_MODELS + TINY_MODELS
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
FALLBACK_SCHEDULERS = ("auto",)
MEMORY_MODES = ("default", "low")  # train.memory; tuner/memory.py holds the low mode's pieces


class ConfigError(ValueError):
    """A configuration value that was refused; the message names the key and what is allowed."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default (copied if mutable) and a help string for the docs."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SamplingConfig:
    scheduler: str = opt("auto", "Sampling scheduler of training trajectories and galleries: auto (the model family's own: ddim for SD 1.5 / SDXL, flow-euler for SD3 / FLUX), ddim, euler, euler-ancestral, dpm++ (UNet models) or flow-euler (flow-matching models).")
    num_steps: int = opt(50, "Sampling steps T per trajectory.")
    guidance_scale: float = opt(5.0, "Guidance scale: classifier-free guidance for SD 1.5 / SDXL / SD3 (1.0 turns it off); for FLUX.1-dev the value of its guidance embedding (no CFG, one call per step; 3.5 is its usual value); FLUX.1-schnell ignores it.")
    eta: float = opt(0.0, "DDIM eta: 0 is deterministic sampling, >0 adds noise each step.")
    height: int = opt(1024, "Image height in pixels (multiple of 8).")
    width: int = opt(1024, "Image width in pixels (multiple of 8).")
    negative_prompt: str = opt("", "Negative prompt for the unconditional branch of guidance (FLUX.1 takes none).")


@dataclass
class TrainConfig:
    steps: int = opt(1000, "Optimizer steps of the whole run.")
    batch_size: Union[int, str] = opt(1, "Prompts per micro-batch on each process, or auto: the largest that fits the device, found by trial steps (sampling, the reward's backward and the optimizer step; their time counts in the warm-up) before the first step (remembered per configuration and card, so a later run skips them), with train.prompts_per_step kept by accumulation. docs/tuner.md, Memory.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step (leave at 1 when train.prompts_per_step is set: the accumulation then follows from it).")
    prompts_per_step: Union[int, None] = opt(None, "The effective batch: prompts per optimizer step summed over all processes (processes x batch_size x grad_accum). null: whatever batch_size and grad_accum give. Set, the accumulation follows from it and batch_size (prompts_per_step / (processes x batch_size)); needed by batch_size: auto.")
    lr: float = opt(1e-4, "Peak learning rate.")
    lr_schedule: str = opt("constant_with_warmup", "Learning-rate schedule.")
    warmup_steps: int = opt(0, "Linear warm-up steps at the start of the schedule.")
    optimizer: str = opt("adamw", "adamw (torch) or adamw8bit (needs bitsandbytes).")
    adam_beta1: float = opt(0.9, "Adam beta1.")
    adam_beta2: float = opt(0.999, "Adam beta2.")
    adam_eps: float = opt(1e-8, "Adam epsilon.")
    weight_decay: float = opt(0.0, "Decoupled weight decay.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this value (0 turns clipping off).")
    ema_decay: float = opt(0.0, "EMA decay of the trained weights (0 turns EMA off); the EMA is used for galleries and saved.")
    full_finetune: bool = opt(False, "Train every weight of the denoiser (UNet or transformer) instead of a LoRA.")
    gradient_checkpointing: bool = opt(False, "Recompute the denoiser's activations in backward to save memory.")
    memory: str = opt("default", "default, or low: the same gradient in less GPU memory (block-wise recompute of trained denoiser calls and of the VAE decode, one image at a time through VAE and reward, text encoders off the GPU after one encoding of the prompts, the reward in the run's half precision); docs/tuner.md, Low-memory mode.")
    compile: bool = opt(False, "torch.compile the repeated blocks of the denoiser (UNet or transformer) and the VAE decoder (regional compilation; about two minutes of compiling at the start on SDXL, docs/benchmarks.md, Tuning step).")
    compile_cache: Union[str, None] = opt("auto", "Where train.compile keeps compiled code between runs (torch's FX graph, AOTAutograd, autotune and Triton caches): auto, <user cache dir>/drtune-rewards/compile/<torch version, device, model>; a folder (the same key below it); null, torch's own default (a temporary folder). Safe to delete. docs/tuner.md, Speed.")
    fp8_sampling: bool = opt(False, "Run the gradient-free sampling calls' transformer linears as fp8 matmuls (e4m3, row-wise scales; GPUs of compute capability 8.9 and later; SD 1.5 and SDXL); trained calls keep the run's precision. docs/tuner.md, Speed.")
    mixed_precision: Union[str, None] = opt(None, "no, fp16 or bf16; null picks bf16 on GPU and no (fp32) on CPU.")
    seed: int = opt(0, "Seed of the run; each process derives its own generators from it and its rank.")
    max_nonfinite: int = opt(5, "Stop after this many consecutive steps with a non-finite reward, loss or gradient.")


@dataclass
class LoraConfig:
    rank: int = opt(8, "LoRA rank r.")
    alpha: float = opt(8.0, "LoRA alpha (the update is scaled by alpha / rank).")
    dropout: float = opt(0.0, "LoRA dropout.")
    target_modules: Union[list[str], None] = opt(None, "Module names (suffixes) of the denoiser that get a LoRA; null: its attention projections (to_q, to_k, to_v, to_out.0; SD3 / FLUX also the text stream's add_q_proj, add_k_proj, add_v_proj, to_add_out).")


@dataclass
class PromptConfig:
    file: str = opt("simple_animals", "Training prompts: a text file (one prompt a line, # comments) or a shipped list name.")
    eval_file: Union[str, None] = opt(None, "Evaluation prompts file; null holds num_eval prompts out of `file`.")
    num_eval: int = opt(4, "Evaluation prompts held out (or taken from eval_file).")
    eval_seed: int = opt(1234, "Seed of the evaluation images; prompt i uses eval_seed + i.")


@dataclass
class LogConfig:
    every: int = opt(1, "Write training metrics every this many steps.")
    eval_every: int = opt(100, "Evaluation gallery and eval reward every this many steps (and at the end).")
    tensorboard: bool = opt(True, "Write TensorBoard events under the run folder (tb/).")
    wandb: bool = opt(False, "Log to Weights & Biases (needs wandb installed).")
    wandb_project: str = opt("drtune", "Weights & Biases project name.")
    progress: bool = opt(True, "Show a progress bar with reward and step time.")
    judge_captions: int = opt(0, "Shapes models only (other models have no ground truth; the run says it skips the test): held-out captions (tuner.shapes.judge, dataset seed 1, none of the training prompts) the ground-truth judge scores before and after tuning, with 95% intervals in the summary. 0 turns it off.")
    judge_seeds: int = opt(2, "Noise seeds per held-out caption of the ground-truth test (log.judge_captions).")
    eval_batch_size: int = opt(0, "Images per sampling chain in evaluations (gallery, held-out test, selection, normalisation statistics); 0: train.batch_size. Each image has its own seed, so only the speed changes (and float rounding of another batch size).")


@dataclass
class CheckpointConfig:
    every: int = opt(100, "Save a resumable checkpoint every this many steps (and at the end).")
    keep: int = opt(3, "Keep the last this many checkpoints.")


@dataclass
class GuardsConfig:
    kl_weight: float = opt(0.0, "Weight of the KL-style penalty: at each trained denoiser call, the mean squared distance between the tuned and the base model's guided outputs (base: LoRA off; full fine-tuning keeps a frozen copy, one more denoiser in memory); summed over the plan's trained calls. 0 turns it off.")
    pretrain_weight: float = opt(0.0, "Weight of the pretraining (denoising) loss on image-caption pairs (ReFL): epsilon target for UNets, velocity noise - x0 for flow models, one batch per micro-batch. 0 turns it off.")
    pretrain_data: Union[str, None] = opt(None, "Image-caption pairs of the pretraining loss: shapes (the shapes generator) or a diffusers imagefolder (images + metadata.jsonl with file_name and text).")
    pretrain_batch_size: int = opt(1, "Image-caption pairs per micro-batch for the pretraining loss.")
    normalize: str = opt("none", "Reward normalisation by the base model's score statistics: none, total ((r - mean) / std of the total reward) or parts (each part of a mixture by its own statistics, then weighted).")
    normalize_samples: int = opt(16, "Base-model images the statistics are sampled from: image i from training prompt i (cycled, file order) with seed normalize_seed + i; stored in the run folder (reward_stats.safetensors) and reused on resume.")
    normalize_seed: int = opt(90000, "Seed of the first normalisation image.")
    augment: list[str] = opt([], "Differentiable augmentations before the reward, applied in this order: crop, flip, shift, noise (any subset; empty turns them off).")
    augment_crop: float = opt(0.8, "Smallest side of a random crop as a fraction of the image (resized back).")
    augment_shift: float = opt(0.1, "Largest shift as a fraction of the image side (whole pixels, border repeated).")
    augment_noise: float = opt(0.03, "Standard deviation of the Gaussian pixel noise.")
    augment_seed: int = opt(0, "Seed of the augmentations' generator (each process derives its own; saved in checkpoints).")
    select_every: int = opt(0, "Evaluate the guard metric on the selection prompts every this many steps (and on the base model at step 0); 0 turns selection off.")
    select_metric: Union[str, None] = opt(None, "The guard metric: a reward name, shapes-judge (tuner.shapes.judge:judge, the ground-truth shapes checker) or module:function returning a float, a [B] tensor or a dict of floats; higher is better.")
    select_key: Union[str, None] = opt(None, "Which entry of a metric's dict to use; null: the mean of its entries.")
    select_prompts: Union[str, None] = opt(None, "Selection prompts file; null holds select_num prompts out of the training prompts. Must be disjoint from training and evaluation prompts.")
    select_num: int = opt(4, "Selection prompts used (held out or read from select_prompts).")
    select_seed: int = opt(4321, "Seed of the selection images (prompt i: select_seed + i); must not overlap the evaluation seeds.")
    keep_best: bool = opt(False, "Save the best selection-scored weights (run/best) and make them the final LoRA or model.")
    early_stop_patience: int = opt(0, "Stop after this many selection evaluations without a new best; 0 never stops early.")


@dataclass
class Config:
    name: Union[str, None] = opt(None, "Run name; the run writes to output_dir/name. null: model-method-time.")
    output_dir: str = opt("runs", "Folder that holds the runs.")
    model: str = opt("shapes-sd", "Diffusers repo id or local folder (SDXL, SD 1.5, SD3 / SD3.5 or FLUX.1); shapes-sd or shapes-flow (the shipped small trained models of 64x64 shapes: a Stable-Diffusion UNet, an SD3-style flow-matching transformer); or tiny-sdxl / tiny-sd15 / tiny-sd3 / tiny-flux / tiny-flux-schnell (random, built in code, for tests).")
    t5: bool = opt(True, "SD3 only: load the T5-XXL text encoder; false leaves it out (diffusers' text_encoder_3=None: its embeddings are zeros), saving 4.7B parameters.")
    vae: Union[str, None] = opt(None, "Optional VAE repo id or folder replacing the model's VAE.")
    method: str = opt("drtune", "Tuning method: drtune, refl, draft, draft-lv or alignprop.")
    method_options: dict[str, Any] = opt({}, "Options of the method, e.g. {num_trained: 5, early_stop_range: 10} for drtune.")
    reward: Union[str, dict[str, float]] = opt("hpsv2.1", "Reward name, or a weighted mixture {name: weight}.")
    reward_sources: dict[str, dict[str, Union[str, bool, float]]] = opt(
        {}, "Local files and load options per reward, e.g. {hpsv2.1: {checkpoint: path}}, {shapes-relation: {blur: 2}}.")
    resume: Union[str, None] = opt(None, "Resume from a checkpoint folder, a run folder, or latest.")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)


# ---------------------------------------------------------------- building from dicts


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (converting only lossless spellings) or refuse it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is none of the allowed forms: {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping {{name: value}}, got {value!r}")
        return {_coerce(k, args[0], f"{key} (a key)"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" Did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Known keys here: {', '.join(sorted(known))}.")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}': expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in hints:
            raise _unknown(prefix + str(k), list(hints))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v or {}, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain data (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from plain data, refusing unknown keys and wrong types."""
    return _build(Config, data or {})


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file into plain data."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (looked at {path.resolve()}).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, found {type(data).__name__}.")
    return data


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one `dotted.key=value` override (value parsed as YAML) to plain config data."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4).")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): the type check below decides
    data = copy.deepcopy(data)
    node, cls, parts = data, Config, key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(".".join(parts[: i + 1]), list(hints))
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            if i == len(parts) - 1:
                raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. {key}.{next(iter(_hints(tp)))}=...")
            node[part] = dict(node.get(part) or {})
            node, cls = node[part], tp
            continue
        rest = parts[i + 1:]
        if not rest:
            node[part] = value
        elif typing.get_origin(tp) is dict or any(typing.get_origin(a) is dict for a in typing.get_args(tp)):
            node[part] = _set_in_mapping(node.get(part), rest, value, tp)
        else:
            raise _unknown(key, list(hints))
        return data
    return data


def _set_in_mapping(current: Any, rest: list[str], value: Any, tp: Any) -> dict:
    """Set `a.b.c=v` inside a mapping field; reward names may hold dots, so nesting is read from the type."""
    mapping = dict(current) if isinstance(current, dict) else {}
    dict_tp = tp if typing.get_origin(tp) is dict else next(a for a in typing.get_args(tp) if typing.get_origin(a) is dict)
    inner = typing.get_args(dict_tp)[1] if typing.get_args(dict_tp) else Any
    if typing.get_origin(inner) is dict and len(rest) >= 2:
        outer_key, inner_key = ".".join(rest[:-1]), rest[-1]
        mapping[outer_key] = {**(mapping.get(outer_key) or {}), inner_key: value}
    else:
        mapping[".".join(rest)] = value
    return mapping


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (the embedded default.yaml when none) <- key=value overrides."""
    data = read_yaml(path if path is not None else DEFAULT_CONFIG)
    from_dict(data)  # report errors of the file itself before those of the overrides
    for item in overrides:
        data = apply_override(data, item)
    return from_dict(data)


# ---------------------------------------------------------------- semantic checks


def _one_of(key: str, value: Any, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"config key '{key}': {value!r} is not known. Allowed: {', '.join(allowed)}.{hint}")


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"config key '{key}': must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def scheduler_names() -> tuple[str, ...]:
    """Scheduler names the pipeline adapters accept."""
    from tuner import pipelines

    return tuple(getattr(pipelines, "SCHEDULER_NAMES", FALLBACK_SCHEDULERS))


def reward_names(reward: str | dict[str, float]) -> list[str]:
    """The reward names a `reward` value uses."""
    return [reward] if isinstance(reward, str) else list(reward)


def judge_caption_count(cfg: Config) -> int:
    """Held-out captions of the run's ground-truth test: log.judge_captions on a shapes model, else 0 (the judge
    reads shapes images only, so a run that keeps the default's setting on another model skips the test)."""
    return cfg.log.judge_captions if cfg.model in SHIPPED_MODELS else 0


def validate(cfg: Config) -> Config:
    """Refuse a configuration that cannot run, before any model loads; returns it unchanged."""
    from tuner import methods

    _one_of("method", cfg.method, methods.METHODS)
    try:
        method = methods.get_method(cfg.method, **cfg.method_options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'method_options' for method {cfg.method!r}: {e}") from None
    try:
        method.check_fits(cfg.sampling.num_steps)
    except ValueError as e:
        raise ConfigError(f"config keys 'method_options' and 'sampling.num_steps': {e}") from None
    _check_rewards(cfg)
    _one_of("sampling.scheduler", cfg.sampling.scheduler, scheduler_names())
    s, t = cfg.sampling, cfg.train
    for key, value in (("sampling.num_steps", s.num_steps), ("sampling.height", s.height), ("sampling.width", s.width),
                       ("train.steps", t.steps), ("train.grad_accum", t.grad_accum),
                       ("train.max_nonfinite", t.max_nonfinite), ("lora.rank", cfg.lora.rank),
                       ("log.every", cfg.log.every), ("log.eval_every", cfg.log.eval_every),
                       ("checkpoint.every", cfg.checkpoint.every), ("checkpoint.keep", cfg.checkpoint.keep),
                       ("lora.alpha", cfg.lora.alpha), ("train.adam_eps", t.adam_eps)):
        _positive(key, value)
    for key, value in (("train.lr", t.lr), ("train.warmup_steps", t.warmup_steps), ("train.weight_decay", t.weight_decay),
                       ("train.max_grad_norm", t.max_grad_norm), ("sampling.eta", s.eta), ("prompts.num_eval", cfg.prompts.num_eval),
                       ("sampling.guidance_scale", s.guidance_scale)):
        _positive(key, value, zero_ok=True)
    for key, value in (("sampling.height", s.height), ("sampling.width", s.width)):
        if value % 8:
            raise ConfigError(f"config key '{key}': must be a multiple of 8 (the VAE downsamples by 8), got {value}")
    for key, value in (("train.ema_decay", t.ema_decay), ("lora.dropout", cfg.lora.dropout),
                       ("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"config key '{key}': must be in [0, 1), got {value}")
    _check_batch(t)
    _positive("log.judge_seeds", cfg.log.judge_seeds)
    _positive("log.judge_captions", cfg.log.judge_captions, zero_ok=True)
    _positive("log.eval_batch_size", cfg.log.eval_batch_size, zero_ok=True)
    if t.mixed_precision is not None:
        _one_of("train.mixed_precision", t.mixed_precision, MIXED_PRECISIONS)
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _one_of("train.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("train.memory", t.memory, MEMORY_MODES)
    if t.memory == "low" and t.gradient_checkpointing:
        raise ConfigError("config key 'train.gradient_checkpointing': train.memory=low already recomputes the trained "
                          "UNet calls block by block; set train.gradient_checkpointing=false (or train.memory=default).")
    if t.compile and (t.memory == "low" or t.gradient_checkpointing):
        raise ConfigError("config key 'train.compile': compiled blocks do not combine with recomputed ones "
                          "(train.memory=low or train.gradient_checkpointing); turn one of them off.")
    if t.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("config key 'train.optimizer': adamw8bit needs bitsandbytes, which is not installed. "
                          "Install it (pip install bitsandbytes, CUDA only) or use train.optimizer=adamw.")
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("config key 'log.wandb': wandb is not installed. Install it (pip install wandb) or set log.wandb=false.")
    if not t.full_finetune and cfg.lora.target_modules is not None and not cfg.lora.target_modules:
        raise ConfigError("config key 'lora.target_modules': empty; name at least one module (e.g. to_q), leave it null "
                          "for the model's attention projections, or set train.full_finetune=true.")
    _check_guards(cfg)
    _check_model("model", cfg.model, allow_tiny=True)
    if cfg.vae is not None:
        _check_model("vae", cfg.vae, allow_tiny=False)
    from tuner import prompts

    try:
        prompts.load_prompt_sets(cfg.prompts)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config section 'prompts': {e}") from None
    return cfg


def _check_batch(t: TrainConfig) -> None:
    """train.batch_size (a positive integer or auto), train.prompts_per_step and train.grad_accum together."""
    if isinstance(t.batch_size, str):
        _one_of("train.batch_size", t.batch_size, ["auto"])
        if t.prompts_per_step is None:
            raise ConfigError("config key 'train.batch_size': auto keeps the prompts of an optimizer step fixed and "
                              "needs them: set train.prompts_per_step (e.g. 16), or give a number as train.batch_size.")
    else:
        _positive("train.batch_size", t.batch_size)
    if t.prompts_per_step is None:
        return
    _positive("train.prompts_per_step", t.prompts_per_step)
    if t.grad_accum != 1:
        raise ConfigError(f"config keys 'train.prompts_per_step' and 'train.grad_accum': give one of them; with "
                          f"prompts_per_step={t.prompts_per_step} the accumulation follows from it (set grad_accum=1).")
    if isinstance(t.batch_size, int) and t.prompts_per_step % t.batch_size:
        raise ConfigError(f"config key 'train.prompts_per_step': {t.prompts_per_step} prompts do not split into "
                          f"micro-batches of train.batch_size={t.batch_size}; pick a multiple of it, or batch_size=auto.")


def _check_rewards(cfg: Config) -> None:
    import rewards

    known = list(rewards.available())
    names = reward_names(cfg.reward)
    if not names:
        raise ConfigError("config key 'reward': the mixture is empty; give at least one {name: weight}.")
    for name in names:
        _one_of(f"reward ({name!r})" if isinstance(cfg.reward, dict) else "reward", name, known)
    if isinstance(cfg.reward, dict):
        for name, w in cfg.reward.items():
            if not math.isfinite(w):
                raise ConfigError(f"config key 'reward.{name}': the weight must be a finite number, got {w}")
    for name in cfg.reward_sources:
        if name not in names and name != cfg.guards.select_metric:
            raise ConfigError(f"config key 'reward_sources.{name}': {name!r} is not one of the rewards in use ({', '.join(names)}).")


def _check_guards(cfg: Config) -> None:
    """The guards.* options: values, and what each needs (data, a metric, disjoint selection seeds)."""
    from tuner.guards import augment, normalize, select

    g = cfg.guards
    for key in ("kl_weight", "pretrain_weight", "augment_shift", "augment_noise"):
        _positive(f"guards.{key}", getattr(g, key), zero_ok=True)
    for key in ("pretrain_batch_size", "select_num"):
        _positive(f"guards.{key}", getattr(g, key))
    for key in ("select_every", "early_stop_patience"):
        _positive(f"guards.{key}", getattr(g, key), zero_ok=True)
    _one_of("guards.normalize", g.normalize, normalize.MODES)
    if g.normalize != "none" and g.normalize_samples < 2:
        raise ConfigError(f"config key 'guards.normalize_samples': needs at least 2 images for a spread, got {g.normalize_samples}")
    for name in g.augment:
        _one_of("guards.augment", name, augment.OPS)
    if not 0 < g.augment_crop <= 1:
        raise ConfigError(f"config key 'guards.augment_crop': must be in (0, 1], got {g.augment_crop}")
    if g.pretrain_weight > 0:
        if g.pretrain_data is None:
            raise ConfigError("config key 'guards.pretrain_data': guards.pretrain_weight > 0 needs image-caption pairs: "
                              "shapes, or a diffusers imagefolder (images + metadata.jsonl)")
        if g.pretrain_data != "shapes" and not (Path(g.pretrain_data).expanduser() / "metadata.jsonl").is_file():
            raise ConfigError(f"config key 'guards.pretrain_data': {g.pretrain_data} holds no metadata.jsonl (the "
                              "diffusers imagefolder layout); give such a folder or shapes")
    selecting = g.select_every > 0 or g.keep_best or g.early_stop_patience > 0
    if selecting and (g.select_every == 0 or g.select_metric is None):
        raise ConfigError("config keys 'guards.select_every' and 'guards.select_metric': keep_best and early stopping "
                          "evaluate a guard metric every guards.select_every steps; set both (e.g. "
                          "guards.select_every=50 guards.select_metric=clip)")
    if g.select_metric is not None:
        try:
            select.check(g.select_metric)
        except ValueError as e:
            raise ConfigError(f"config key 'guards.select_metric': {e}") from None
    if selecting:
        from tuner import prompts

        try:
            train, evaluation = prompts.load_prompt_sets(cfg.prompts)
            select.split_prompts(train, evaluation, file=g.select_prompts, num=g.select_num, seed=g.select_seed)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config keys 'guards.select_prompts' / 'guards.select_num': {e}") from None
        p = cfg.prompts
        if g.select_seed < p.eval_seed + p.num_eval and p.eval_seed < g.select_seed + g.select_num:
            raise ConfigError(f"config key 'guards.select_seed': selection seeds {g.select_seed}..{g.select_seed + g.select_num - 1} "
                              f"overlap the evaluation seeds {p.eval_seed}..{p.eval_seed + p.num_eval - 1}; pick another")


_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def _check_model(key: str, value: str, allow_tiny: bool) -> None:
    if allow_tiny and value in SHIPPED_MODELS:
        from tuner import shapes

        try:
            shapes.model_dir(value)
        except FileNotFoundError as e:
            raise ConfigError(f"config key '{key}': {e}") from None
        return
    if allow_tiny and value in BUILTIN_MODELS:
        return
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"config key '{key}': {value} is a file; give a diffusers folder (with model_index.json) or a repo id.")
        return
    if value.startswith((".", "/", "~")) or not _REPO_ID.match(value):
        extra = f" or one of {', '.join(BUILTIN_MODELS)}" if allow_tiny else ""
        raise ConfigError(f"config key '{key}': {value!r} is neither an existing folder nor a Hugging Face repo id (owner/name){extra}.")


# ---------------------------------------------------------------- documentation


def options(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every option as (dotted key, type, default, help), in declaration order."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += options(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def markdown_table() -> str:
    """The options table of docs/tuner.md."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help in options():
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
        lines.append(f"| `{key}` | {tp} | `{shown}` | {help.replace('|', '/')} |")
    return "\n".join(lines)


def method_options_table() -> str:
    """The table of each method's options and defaults (the keys of `method_options`)."""
    from tuner.methods import METHODS

    lines = ["| method | option | default |", "|---|---|---|"]
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            default = "required" if f.default is dataclasses.MISSING else f"`{f.default}`"
            lines.append(f"| `{name}` | `{f.name}` | {default} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
    print("\n## Method options\n\nThe keys `method_options` takes for each method (their meaning: tuner/methods.py):\n")
    print(method_options_table())
