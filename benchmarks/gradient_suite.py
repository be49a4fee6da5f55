"""Cases, variants and measurements of the reward-gradient benchmark (benchmarks/test_reward_gradients.py runs them).

A case is one reward, implementation (ours or imscore), variant, precision and batch size. Its measurement is the
pixel gradient d(sum of scores)/d(pixels) of a batch of `size` x `size` images in [0, 1], preprocessing included,
timed with CUDA synchronisation around each call; the FLOPs come from FlopCounterMode over one forward+backward.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks import imscore_models
from benchmarks.reward_models import (
    BATCHES,
    KNOWN_REWARDS,
    MODEL_REWARDS,
    ZOO2_REWARDS,
    REWARDS,
    load_ours,
    prompts_for,
    tiny_architectures,
    write_files,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EAGER_ONLY = ("vqascore",)  # rewards.speed has no fast path for these: only eager and the preprocess component
# Too large for a second, float32 copy beside the measured one (7B, 11B): their bf16 cases get no float32 reference.
NO_FP32_REFERENCE = ("hpsv3", "vqascore")


@dataclass(frozen=True)
class Variant:
    """One way of running our reward; `default` says where the default suite runs it (reward, dtype, batch)."""

    name: str
    doc: str
    load: tuple[tuple[str, object], ...] = ()  # rewards.load speed options (fast, compile)
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    cuda_only: bool = False
    tf32: bool = False
    sdpa: str | None = None
    channels_last: bool = False
    component: str | None = None
    any_reward: bool = False  # also for EAGER_ONLY rewards: it restructures and compiles nothing
    default: Callable[[str, str, int], bool] = lambda reward, dtype, batch: True


def _model(reward: str) -> bool:
    return reward in MODEL_REWARDS or reward in ZOO2_REWARDS


def _compile_default(reward: str, dtype: str, batch: int) -> bool:
    """bf16 batch 32 for every model reward; HPSv2.1 also every bf16 batch and fp32 batch 32 (compiling takes time)."""
    if not _model(reward):
        return False
    if reward == "hpsv2.1":
        return dtype == "bf16" or batch == 32
    return dtype == "bf16" and batch == 32


COMPILE = {"dynamic": False}  # one static graph per batch size, as a fixed-batch tuning run gets
VARIANTS = {v.name: v for v in (
    Variant("eager", "rewards.load defaults"),
    Variant("fast", "rewards.load(fast=True): fused-qkv SDPA attention, class-token-only last block",
            (("fast", True),),
            default=lambda r, d, b: _model(r) and r not in ("imagereward", "mps") and (d == "bf16" or b == 32)),
    Variant("compile", "rewards.load(compile=True): fast + torch.compile of each transformer block (static shapes)",
            (("compile", COMPILE),), default=_compile_default),
    Variant("compile-cudagraphs", "compile with mode='reduce-overhead': CUDA graphs replay each block's kernels",
            (("compile", {**COMPILE, "mode": "reduce-overhead"}),), cuda_only=True,
            default=lambda r, d, b: r == "hpsv2.1" and d == "bf16" and b == 1),
    Variant("cudnn", "fast, with cuDNN attention preferred by SDPA", (("fast", True),), dtypes=("bf16",),
            cuda_only=True, sdpa="cudnn", default=lambda r, d, b: _model(r) and b == 32),
    Variant("tf32", "rewards.load defaults, fp32 matmuls on TF32 tensor cores (set_float32_matmul_precision('high'))",
            dtypes=("fp32",), tf32=True, default=lambda r, d, b: _model(r)),
    Variant("compile-tf32", "compile and TF32 matmuls (not in the default run)", (("compile", COMPILE),),
            dtypes=("fp32",), tf32=True, default=lambda r, d, b: r == "hpsv2.1" and b == 32),
    Variant("channels-last", "rewards.load defaults, input batch in channels_last memory format", channels_last=True,
            default=lambda r, d, b: r == "hpsv2.1" and d == "bf16" and b == 32),
    Variant("preprocess", "component: preprocessing alone (resize, crop/pad, normalise) and its backward",
            component="preprocess", default=lambda r, d, b: _model(r) and d == "bf16" and b == 32),
    Variant("max-autotune", "compile with mode='max-autotune-no-cudagraphs' (long autotuning; not in the default run)",
            (("compile", {**COMPILE, "mode": "max-autotune-no-cudagraphs"}),), cuda_only=True,
            default=lambda r, d, b: False),
    Variant("recompute", "rewards.load(recompute=True): each block's activations recomputed in the backward (memory "
            "for time; not in the default run)", (("recompute", True),), any_reward=True,
            default=lambda r, d, b: _model(r) and d == "bf16" and b >= 8),
)}
DEFAULT_VARIANTS = ("eager", "fast", "compile", "compile-cudagraphs", "cudnn", "tf32", "channels-last", "preprocess")


@dataclass(frozen=True)
class Case:
    """One measurement: reward, implementation, variant, precision, batch size."""

    reward: str
    impl: str  # "ours" or "imscore"
    variant: str
    dtype: str
    batch: int

    @property
    def id(self) -> str:
        return f"{self.reward}-{self.dtype}-b{self.batch}-{self.impl}-{self.variant}"


@dataclass
class Settings:
    """What the suite runs (pytest options --reward-*, set by `python -m benchmarks.reward_gradients`)."""

    smoke: bool = False
    device: str = "cuda"
    size: int = 1024
    batches: tuple[int, ...] = (32, 8, 1)
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    rewards: tuple[str, ...] = REWARDS
    impls: tuple[str, ...] = ("ours", "imscore")
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    everywhere: bool = False
    rounds: int = 5
    warmup: int = 1
    budget: float = 0.0  # seconds after `start` past which no new case starts; 0: no limit
    start: float = field(default_factory=time.time)
    weights: Path = Path(tempfile.gettempdir()) / "drtune-reward-bench-weights"
    jsonl: Path | None = None
    profile: tuple[str, ...] = ("hpsv2.1-bf16-b32",)  # id prefixes of the cases to profile
    matmul_size: int = 8192

    def check(self) -> None:
        """Refuse unknown names with the known ones."""
        for kind, given, known in (("reward", self.rewards, KNOWN_REWARDS), ("variant", self.variants, VARIANTS),
                                   ("dtype", self.dtypes, DTYPES), ("impl", self.impls, ("ours", "imscore"))):
            bad = [g for g in given if g not in known]
            if bad:
                raise ValueError(f"unknown {kind} {', '.join(bad)}; known: {', '.join(known)}")


def plan(settings: Settings) -> list[Case]:
    """Every case of the run, grouped by (precision, reward, implementation): each group's models load once, and only
    one implementation's weights are on the device while it is measured (peak memory is its own)."""
    ours = "ours" in settings.impls
    imscore = "imscore" in settings.impls  # without imscore installed, its cases fail and say how to install it
    cases = []
    for dtype, reward in itertools.product(settings.dtypes, settings.rewards):
        batches = _batches(settings, reward)
        for batch in batches if ours else ():
            variants = [v for v in settings.variants if v == "eager" or _runs(settings, v, reward, dtype, batch)]
            cases += [Case(reward, "ours", v, dtype, batch) for v in variants]
        if imscore and reward in imscore_models.IMSCORE_REWARDS:
            cases += [Case(reward, "imscore", "eager", dtype, batch) for batch in batches]
    return cases


def _batches(settings: Settings, reward: str) -> tuple[int, ...]:
    """The run's batch sizes for `reward`: its own list (BATCHES) in a default full run, else those of the run that
    its largest batch admits."""
    own = BATCHES.get(reward)
    if own is None or settings.smoke:
        return settings.batches
    if settings.batches == Settings().batches:
        return own
    return tuple(b for b in settings.batches if b <= max(own))


def _runs(settings: Settings, name: str, reward: str, dtype: str, batch: int) -> bool:
    v = VARIANTS[name]
    if name == "eager" or dtype not in v.dtypes or (v.cuda_only and settings.device != "cuda"):
        return False
    if not _model(reward) or (reward in EAGER_ONLY and not (v.component or v.any_reward)):
        return False
    return settings.everywhere or v.default(reward, dtype, 32 if settings.smoke else batch)  # smoke: as at batch 32


# -- the session: files, models, inputs --------------------------------------------------------------------------
class Suite:
    """Session state: the written files, the models of the current (reward, precision) group, inputs, FLOP counts."""

    def __init__(self, settings: Settings) -> None:
        settings.check()
        self.settings = settings
        self.device = torch.device(settings.device)
        self._stack = contextlib.ExitStack()
        if settings.smoke:
            self._stack.enter_context(tiny_architectures())
        if settings.smoke and self.device.type == "cpu":
            torch.set_num_threads(1)  # tiny models: one thread is faster, and steady on a busy machine
        self.files = write_files(settings.weights, tiny=settings.smoke, rewards=settings.rewards)
        self.group: tuple[str, str, str] | None = None  # (reward, dtype, impl) whose models are loaded
        self.models: dict[tuple, object] = {}
        self.inputs_cache: dict[tuple, tuple] = {}
        self.flops_cache: dict[tuple, int] = {}
        self.reference: dict[tuple, torch.Tensor] = {}
        self.fp32_scores: dict[tuple, torch.Tensor | None] = {}
        self.compiled = False
        _raise_recompile_limit()

    def close(self) -> None:
        """Free the models and leave the tiny-architecture context."""
        self.release()
        self._stack.close()

    def out_of_time(self) -> bool:
        return self.settings.budget > 0 and time.time() - self.settings.start > self.settings.budget

    def release(self) -> None:
        """Drop the current group's models (and compiled graphs) and return their memory."""
        self.models.clear()
        self.group = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.compiled:
            torch._dynamo.reset()
            self.compiled = False

    def prepare(self, case: Case) -> tuple[Callable[[torch.Tensor, list[str]], torch.Tensor], torch.nn.Module]:
        """(the function whose pixel gradient the case times, the module holding its weights)."""
        if self.group != (case.reward, case.dtype, case.impl):
            self.release()
            self.group = (case.reward, case.dtype, case.impl)
        variant = VARIANTS[case.variant]
        if case.impl == "imscore":
            model = self._model(("imscore",), lambda: imscore_models.load(case.reward, self.files, device=self.device,
                                                                          dtype=DTYPES[case.dtype]))
            return (lambda x, p: imscore_models.score(model, x, p)), model
        reward = self._ours(case, variant.load)
        if variant.component == "preprocess":
            return (lambda x, p: reward.preprocess(x).float().reshape(len(x), -1).sum(1)), reward  # HPSv3: patch rows
        return reward, reward

    def _model(self, key: tuple, build: Callable[[], object]):
        if key not in self.models:
            self.models[key] = build()
        return self.models[key]

    def _ours(self, case: Case, options: tuple) -> torch.nn.Module:
        eager = self._model(("ours",), lambda: load_ours(case.reward, self.files, device=self.settings.device,
                                                         dtype=DTYPES[case.dtype]))
        if not options:
            return eager
        return self._model(("ours", repr(options)), lambda: derive(eager, **self._options(options)))

    def _options(self, options: tuple) -> dict:
        opts = dict(options)
        self.compiled |= bool(opts.get("compile"))
        if self.settings.smoke and "compile" in opts:  # CPU smoke runs trace with dynamo + AOTAutograd, no codegen
            opts["compile"] = {**opts["compile"], "backend": "aot_eager"}
        return opts

    def inputs(self, case: Case) -> tuple[torch.Tensor, list[str]]:
        """A batch of random images in [0, 1] (the same for every case of a precision and size) and its prompts."""
        key = (case.dtype, case.batch)
        if key not in self.inputs_cache:
            gen = torch.Generator(self.device).manual_seed(case.batch)
            shape = (case.batch, 3, self.settings.size, self.settings.size)
            images = torch.rand(shape, generator=gen, device=self.device).to(DTYPES[case.dtype])
            self.inputs_cache = {key: (images, prompts_for(case.batch))}  # one batch alive at a time
        images, prompts = self.inputs_cache[key]
        if VARIANTS[case.variant].channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images.detach().requires_grad_(True), prompts

    def fp32_reference(self, case: Case, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        """Our eager float32 scores of a low-precision case's images (the same values, upcast): the yardstick a
        low-precision variant's rounding is judged by. None for float32 cases and rewards too large for a copy."""
        if case.dtype == "fp32" or case.reward in NO_FP32_REFERENCE or not _model(case.reward):
            return None
        key = (case.reward, case.batch)
        if key not in self.fp32_scores:
            model = load_ours(case.reward, self.files, device=self.settings.device, dtype=torch.float32)
            with torch.no_grad():
                self.fp32_scores[key] = model(images.detach().float(), prompts).float().cpu()
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self.fp32_scores[key]

    def flops(self, case: Case, fn, images: torch.Tensor, prompts: list[str]) -> int:
        """FLOPs of one forward+backward (FlopCounterMode, eager), shared by variants of the same computation."""
        variant = VARIANTS[case.variant]
        structure = variant.component or ("fast" if variant.load else "default")
        key = (case.reward, case.impl, structure, case.batch)
        if key not in self.flops_cache:
            self.flops_cache[key] = count_flops(fn, images, prompts)
        return self.flops_cache[key]


def derive(reward: torch.nn.Module, **options) -> torch.nn.Module:
    """A copy of `reward` sharing its weights, sped up with `rewards.speed.optimize(**options)`: what
    `rewards.load(..., **options)` returns, without loading the checkpoint again."""
    from rewards.speed import optimize

    shared = itertools.chain(reward.parameters(), reward.buffers(), [getattr(reward, "tokenizer", None)])
    clone = copy.deepcopy(reward, memo={id(t): t for t in shared if t is not None})
    return optimize(clone, **options)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in itertools.chain(module.parameters(), module.buffers())}
    return sum(storages.values())


def _raise_recompile_limit() -> None:
    """One graph per block type, shape and dtype across the whole suite exceeds dynamo's default limit of 8."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))


# -- measuring ---------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def out_of_memory(run: Callable[[], None], release: Callable[[], None]) -> str | None:
    """Run `run`; on a device out-of-memory error return its first line, after `release` and with the error's
    traceback (whose frames hold the case's tensors) already gone, so the cases after it start on a clean device."""
    try:
        run()
        return None
    except torch.OutOfMemoryError as error:
        message = (str(error).strip() or "out of memory").splitlines()[0]
    release()
    return f"out of memory ({message})"


def gradient(fn, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, d(sum of scores)/d(images))."""
    scores = fn(images, prompts)
    (grad,) = torch.autograd.grad(scores.sum(), images)
    return scores, grad


def count_flops(fn, images: torch.Tensor, prompts: list[str]) -> int:
    """FLOPs that FlopCounterMode counts over one forward+backward, compiled code run eagerly."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels = images.detach().requires_grad_(True)  # FlopCounterMode's module hooks need backward(), not autograd.grad
    with _force_eager(), _gqa_repeated(), FlopCounterMode(display=False) as counter:
        fn(pixels, prompts).sum().backward()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _gqa_repeated():
    """transformers' SDPA attention with grouped key/value heads repeated to the query's count, not passed with
    enable_gqa (FlopCounterMode's attention formula rejects unequal head counts; the FLOPs are the same)."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        yield
        return
    original = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


def _force_eager():
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


@contextlib.contextmanager
def variant_context(variant: Variant) -> Iterator[None]:
    """TF32 matmuls and the SDPA backend preference of a variant, restored afterwards."""
    with contextlib.ExitStack() as stack:
        if variant.tf32:
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            stack.callback(torch.set_float32_matmul_precision, before)
        if variant.sdpa == "cudnn":
            stack.enter_context(_prefer_cudnn_attention())
        yield


def _prefer_cudnn_attention():
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order[:1])


def relative_difference(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """max |scores - reference| / mean |reference|."""
    a, b = scores.detach().float().cpu(), reference.float().cpu()
    return float((a - b).abs().max() / b.abs().mean().clamp_min(1e-12))


# -- profiles ----------------------------------------------------------------------------------------------------
CATEGORIES = (  # first match wins; applied to lower-cased kernel names
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|cutlass|xmma|sm90|wgmma|cublas|matmul|addmm|_mm_|\bmm\b|bmm|nvjet"),
    ("resize", r"upsample|interp|_aa_"),
    ("layernorm", r"layer_norm|layernorm"),
    ("gelu", r"gelu"),
    ("triton (fused)", r"triton"),
    ("convolution", r"conv|implicit_convolve|cudnn"),
    ("copy / cast", r"copy|cast|contiguous|transpose|permute|cat"),
    ("elementwise / reduction", r"elementwise|vectorized|reduce|add|mul|sum|mean"),
)


def profile_summary(step: Callable[[], None], device: torch.device, top: int = 15) -> dict:
    """Device time per kernel category and the top kernels of one call of `step` (CPU time on CPU runs)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            step()
        rows = [(e.key, _self_time_us(e, device)) for e in prof.key_averages() if _is_kernel(e, device)]
    except Exception as err:  # a profile is information: it never fails the case it describes
        return {"error": f"{type(err).__name__}: {err}"}
    rows = [(name, us) for name, us in rows if us > 0]
    total = sum(us for _, us in rows) or 1.0
    categories: dict[str, float] = {}
    for name, us in rows:
        categories[_category(name)] = categories.get(_category(name), 0.0) + us
    rows.sort(key=lambda r: -r[1])
    return {
        "total_ms": total / 1e3,
        "categories_pct": {k: round(100 * v / total, 1) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top": [{"kernel": name[:120], "ms": round(us / 1e3, 3), "pct": round(100 * us / total, 1)}
                for name, us in rows[:top]],
    }


def _is_kernel(event, device: torch.device) -> bool:
    """Device kernels on CUDA (their time is not also counted through the ops that launched them); aten ops on CPU."""
    if device.type != "cuda":
        return event.key.startswith("aten::")
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


def _self_time_us(event, device: torch.device) -> float:
    if device.type != "cuda":
        return float(getattr(event, "self_cpu_time_total", 0.0))
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def _category(name: str) -> str:
    lower = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, lower)), "other")


# -- records -----------------------------------------------------------------------------------------------------
def stats_of(benchmark) -> dict | None:
    """The timing statistics pytest-benchmark collected (None when benchmarks are disabled)."""
    metadata = getattr(benchmark, "stats", None)
    stats = getattr(metadata, "stats", None)
    if stats is None:
        return None
    keys = ("min", "max", "mean", "median", "stddev", "rounds")
    return {**{k: getattr(stats, k) for k in keys}, "data": list(stats.data)}


def append_jsonl(path: Path | None, record: dict) -> None:
    """Append one record to the run's JSONL log (kept even if the run is killed before pytest-benchmark writes)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
