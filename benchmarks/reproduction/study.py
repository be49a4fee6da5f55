"""The study's cells and how one cell runs: train with tuner.train, then score the result on held-out prompts.

A cell is one training run: a method variant (method + options), a reward and a seed, under a profile's shared
settings (same iterations, images per step, sampler, learning rate for every method). Running a cell trains it,
records the gradient norm each trained sampling step contributes, times it, measures its peak memory, and
scores the final weights on the held-out prompts with every reward, so side effects on the rewards it was not
tuned for are measured too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REWARDS = ("symmetry", "sharpness", "shapes-clip")
LOW_LEVEL = ("symmetry", "sharpness")
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "reproduction"
RUNS = ROOT / "runs" / "reproduction"


@dataclass(frozen=True)
class Settings:
    """What every cell of a profile shares (equal iterations and images per step for every method)."""

    steps: int = 60  # optimizer steps
    batch_size: int = 4  # images (prompts) per step
    num_steps: int = 20  # DDIM steps T per trajectory
    lr: float = 2e-3
    warmup_steps: int = 5
    max_grad_norm: float = 1.0
    guidance_scale: float = 5.0
    prompts: str = "shapes"  # all captions: symmetry has room to grow (centered ones start near 0.95)
    num_eval: int = 16  # prompts held out of training: in-loop eval and the final held-out scores
    heldout_seeds: tuple[int, ...] = (0, 1)  # noise seeds of the final held-out images (every prompt, each seed)
    eval_every: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    drtune_k: int = 5  # the paper's K
    early_stop: int = 5  # m of DRTune and ReFL: ReFL's last 10 of 40 steps, scaled to T
    k_sweep: tuple[int, ...] = (1, 2, 5, 10, 20)
    early_stop_sweep: tuple[int, ...] = (1, 3, 5, 10, 20)
    ablation_rewards: tuple[str, ...] = LOW_LEVEL
    hacking_steps: int = 120  # long DRTune runs (twice the steps): what each reward's optimum looks like
    centered_prompts: str = "shapes_centered"  # the "centered" group: symmetry where captions allow it
    cost_steps: int = 20  # per-method cost, run alone (--workers 1)
    grid_prompts: int = 8  # images per row of the sample grids
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)  # the fair test: every method at each (log-spaced)
    fair_rewards: tuple[str, ...] = ("symmetry", "sharpness", "shapes-clip")
    guard_lr: float = 3e-3  # the guards group: DRTune where it hacks, with each guard
    judge_captions: int = 0  # held-out captions the ground-truth judge scores before and after each run (0: off)
    judge_seeds: int = 2  # noise seeds per judge caption
    eval_batch_size: int = 0  # images per chain in the tuner's evaluations (0: batch_size); images do not depend on it


@dataclass(frozen=True)
class Cell:
    """One training run of the study."""

    label: str  # the method variant as tables show it, e.g. "DRaFT K=5"
    method: str
    options: tuple[tuple[str, Any], ...]
    reward: str
    seed: int
    steps: int
    prompts: str | None = None  # None: the profile's prompts
    groups: tuple[str, ...] = field(default=(), compare=False)
    lr: float | None = None  # None: the profile's learning rate
    guards: tuple[tuple[str, Any], ...] = ()  # guards.* options of the tuner (tuples for lists)

    @property
    def id(self) -> str:
        """A file-name-safe unique name: variant, reward, prompts, steps, seed."""
        opts = "-".join(f"{_ABBREV.get(k, k)}{_short(v)}" for k, v in self.options)
        where = f"__{self.prompts}" if self.prompts else ""
        lr = f"__lr{self.lr:g}" if self.lr is not None else ""
        guards = "".join(f"__{_ABBREV.get(k, k)}{_short(v)}" for k, v in self.guards)
        return (f"{self.method}{'-' + opts if opts else ''}__{self.reward}{where}__n{self.steps}{lr}{guards}"
                f"__s{self.seed}")

    def method_options(self) -> dict[str, Any]:
        """The options as the tuner's method_options."""
        return dict(self.options)


_ABBREV = {"num_trained": "K", "early_stop_range": "m", "detach_input": "sg", "spacing": "", "min_steps": "min",
           "max_steps": "max", "kl_weight": "kl", "pretrain_weight": "pt", "pretrain_data": "ptdata",
           "augment": "aug", "normalize": "norm", "select_every": "sel", "select_metric": "by", "keep_best": "best"}


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return {True: "T", False: "F"}[value]
    return "+".join(map(str, value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class Profile:
    """A named study: shared settings and the cell groups it runs."""

    name: str
    settings: Settings
    groups: tuple[str, ...]
    methods: tuple[str, ...] | None = None  # main-comparison labels to keep (None = all)
    rewards: tuple[str, ...] = REWARDS
    guards: tuple[str, ...] | None = None  # labels of GUARDS the guards group runs (None = all)


GROUPS = ("methods", "stopgrad", "k", "spacing", "early_stop", "centered", "hacking", "cost", "fair", "guards")
# The guards group (issue 22): DRTune at Settings.guard_lr with each guard of docs/tuner.md alone. keep-best selects
# by the ground-truth judge on its own selection captions and seeds: an oracle selection, the most it can give.
GUARDS = {
    "no guard": (),
    "KL 1.0": (("kl_weight", 1.0),),
    "pretraining loss 1.0": (("pretrain_weight", 1.0), ("pretrain_data", "shapes")),
    "augment crop+shift+noise": (("augment", ("crop", "shift", "noise")),),
    "normalize": (("normalize", "total"),),
    "keep-best (judge)": (("select_every", 10), ("select_metric", "shapes-judge"), ("keep_best", True)),
}
FULL = Settings()
CPU = Settings(steps=20, batch_size=2, num_steps=10, warmup_steps=2, num_eval=8, heldout_seeds=(0,), drtune_k=3,
               early_stop=3, k_sweep=(1, 2, 3, 5, 10), early_stop_sweep=(1, 3, 5, 10), hacking_steps=80, cost_steps=10)
PROFILES = {
    "full": Profile("full", FULL, GROUPS[:7]),  # cost runs alone: --groups cost --workers 1
    # The fair test of the paper's claim (issue 22): every method at each learning rate, scored by the checkers too.
    "fair": Profile("fair", dataclasses.replace(FULL, judge_captions=128, eval_batch_size=64), ("fair", "guards"),
                    rewards=FULL.fair_rewards),
    "pilot": Profile("pilot", CPU, ("methods", "stopgrad")),
    # The CI test (tests/test_reproduction.py): the pilot's DRTune and ReFL on symmetry; the in-loop evaluation
    # only at the start and the end (it draws on its own generators: the runs and held-out scores are the same).
    "ci": Profile("ci", dataclasses.replace(CPU, eval_every=20), ("methods",), methods=("DRTune", "ReFL"),
                  rewards=("symmetry",)),
    # The fair test's CI run (tests/test_reproduction_fair.py): DRTune at two rates, one guard, a tiny judge.
    "fair-ci": Profile("fair-ci", dataclasses.replace(CPU, steps=4, eval_every=4, lrs=(1e-3, 1e-2), guard_lr=1e-2,
                                                      seeds=(0,), judge_captions=4, judge_seeds=1, num_eval=4),
                       ("fair", "guards"), methods=("DRTune",), rewards=("symmetry",),
                       guards=("no guard", "KL 1.0")),
}


def variants(s: Settings) -> dict[str, tuple[str, dict[str, Any]]]:
    """The main comparison's method variants: label -> (method, options)."""
    m, k = s.early_stop, s.drtune_k
    return {
        "DRTune": ("drtune", {"num_trained": k, "early_stop_range": m}),
        "ReFL": ("refl", {"early_stop_range": m}),
        "DRaFT K=1": ("draft", {"k": 1}),
        "DRaFT K=5": ("draft", {"k": 5}),
        "DRaFT-LV": ("draft-lv", {"n": 2}),
        "AlignProp": ("alignprop", {}),
    }


def drtune_variant(s: Settings, label: str, **changes: Any) -> tuple[str, str, dict[str, Any]]:
    """(label, "drtune", options): the study's DRTune with `changes` to its options."""
    opts = {"num_trained": s.drtune_k, "early_stop_range": s.early_stop, "detach_input": True, "spacing": "equal"}
    opts.update(changes)
    return label, "drtune", opts


def group_variants(group: str, p: Profile) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, options) of a group's variants."""
    s = p.settings
    if group in ("methods", "centered", "fair"):
        keep = p.methods or tuple(variants(s))
        return [(label, *variants(s)[label]) for label in keep]
    if group == "cost":
        return [(label, *spec) for label, spec in variants(s).items()] + [drtune_variant(s, "DRTune, no stop-gradient",
                                                                                  detach_input=False)]
    if group == "stopgrad":  # at the study's K, and with every step that runs trained (the longest gradient paths)
        t = s.num_steps
        return [drtune_variant(s, "DRTune"), drtune_variant(s, "DRTune, no stop-gradient", detach_input=False),
                drtune_variant(s, f"DRTune K={t}", num_trained=t),
                drtune_variant(s, f"DRTune K={t}, no stop-gradient", num_trained=t, detach_input=False)]
    if group == "k":
        return [drtune_variant(s, f"DRTune K={k}", num_trained=k) for k in s.k_sweep]
    if group == "spacing":
        return [drtune_variant(s, "DRTune, equally spaced"), drtune_variant(s, "DRTune, last K", spacing="last")]
    if group == "early_stop":
        return [drtune_variant(s, f"DRTune m={m}", early_stop_range=m) for m in s.early_stop_sweep]
    if group == "hacking":
        return [drtune_variant(s, "DRTune, long")]
    if group == "guards":
        return [drtune_variant(s, "DRTune")]
    raise ValueError(f"unknown group {group!r}; groups: {GROUPS}")


# Method options added after results were recorded, left out of ids and rows at these (default) values so that
# earlier results keep matching their cells.
LATER_OPTIONS = {"first_steps": None}
_ABSENT = object()


def canonical_options(method: str, options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Options with the method's defaults filled in, so equal runs get equal ids whatever the group."""
    from tuner.methods import get_method

    full = dataclasses.asdict(get_method(method, **options))
    return tuple(sorted((k, v) for k, v in full.items() if LATER_OPTIONS.get(k, _ABSENT) != v))


def cells(p: Profile, groups: tuple[str, ...] | None = None) -> list[Cell]:
    """Every cell of the profile, most important first (all seeds of one group before the next group);
    a run shared by several groups appears once, listing them all."""
    s, out = p.settings, {}
    for group in groups or p.groups:
        rewards = {"k": s.ablation_rewards, "spacing": s.ablation_rewards, "early_stop": s.ablation_rewards,
                   "centered": ("symmetry",), "cost": ("symmetry",)}.get(group, p.rewards)
        steps = {"hacking": s.hacking_steps, "cost": s.cost_steps}.get(group, s.steps)
        seeds = s.seeds[:1] if group == "cost" else s.seeds
        prompts = s.centered_prompts if group == "centered" else None
        for seed in seeds:
            for reward in rewards:
                for lr, guard, guards in _rates_and_guards(group, p):
                    for label, method, opts in group_variants(group, p):
                        cell = Cell(label + guard, method, canonical_options(method, opts), reward, seed, steps,
                                    prompts, (group,), lr, guards)
                        seen = out.get(cell.id)
                        out[cell.id] = cell if seen is None else dataclasses.replace(seen, groups=seen.groups + (group,))
    return list(out.values())


def _rates_and_guards(group: str, p: Profile) -> list[tuple[float | None, str, tuple[tuple[str, Any], ...]]]:
    """(learning rate, label suffix, guards) of a group's runs: the fair test's rates, the guards group's guards."""
    s = p.settings
    if group == "fair":
        return [(lr, "", ()) for lr in s.lrs]
    if group == "guards":
        return [(s.guard_lr, f", {label}", GUARDS[label]) for label in p.guards or GUARDS]
    return [(None, "", ())]


# ---------------------------------------------------------------- one cell


def config(cell: Cell, s: Settings, runs: Path):
    """The tuner configuration of a cell (validated)."""
    from tuner.config import from_dict, validate

    eval_every = max(1, min(s.eval_every, cell.steps))
    return validate(from_dict({
        "name": cell.id, "output_dir": str(runs), "model": "shapes-sd",
        "method": cell.method, "method_options": cell.method_options(), "reward": cell.reward,
        "sampling": {"scheduler": "ddim", "num_steps": s.num_steps, "guidance_scale": s.guidance_scale,
                     "height": 64, "width": 64},
        "train": {"steps": cell.steps, "batch_size": s.batch_size, "lr": cell.lr or s.lr,
                  "warmup_steps": s.warmup_steps, "max_grad_norm": s.max_grad_norm, "seed": cell.seed},
        "guards": {k: list(v) if isinstance(v, tuple) else v for k, v in cell.guards},
        "lora": {"rank": 8, "alpha": 8.0},
        "prompts": {"file": cell.prompts or s.prompts, "num_eval": s.num_eval},
        "log": {"eval_every": eval_every, "tensorboard": False, "progress": False,
                "judge_captions": s.judge_captions, "judge_seeds": s.judge_seeds, "eval_batch_size": s.eval_batch_size},
        "checkpoint": {"every": cell.steps, "keep": 1},
    }))


class StepGradNorms:
    """An engine step_hook: the norm of the parameter gradient each trained sampling step contributes.

    Parameter hooks add up the squared gradient norm of each backward; the engine calls this object right after
    the backward of trained step i, which files the sum under i. Under fp16 the norms include the loss scale.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.records: list[tuple[int, float]] = []
        self._squares: list[torch.Tensor] = []
        for p in params:
            p.register_hook(self._add)

    def _add(self, grad: torch.Tensor) -> None:
        self._squares.append(grad.detach().float().pow(2).sum())

    def __call__(self, step: int) -> None:
        total = torch.stack(self._squares).sum().sqrt().item() if self._squares else 0.0
        self.records.append((step, total))
        self._squares = []

    def summary(self) -> dict[str, dict[str, float]]:
        """Per sampling-step index: how often it was trained and the mean, median and max norm."""
        by_step: dict[int, list[float]] = {}
        for step, norm in self.records:
            by_step.setdefault(step, []).append(norm)
        return {str(i): {"n": len(v), "mean": statistics.fmean(v), "median": statistics.median(v), "max": max(v)}
                for i, v in sorted(by_step.items())}


def _load_rewards(device: torch.device) -> dict[str, torch.nn.Module]:
    import rewards

    return {name: rewards.load(name, device=device) for name in REWARDS}


@torch.no_grad()
def heldout(cfg, s: Settings, run_dir: Path | None,
            device: torch.device) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Every reward of the images of the held-out prompts (each heldout seed), with the run's final weights
    (run_dir None: the base model). Returns (scores per reward, per image) and the images [N,3,H,W]."""
    from tuner import checkpoint as ckpt
    from tuner import engine
    from tuner.prompts import load_prompt_sets
    from tuner.train import DTYPES, build_adapter

    precision = cfg.train.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    adapter = build_adapter(cfg, device, DTYPES[precision])
    if run_dir is not None:
        _load_trained(adapter, cfg, ckpt.latest(run_dir / "checkpoints"))
    _, prompts = load_prompt_sets(cfg.prompts)
    cond = adapter.encode_prompts(prompts, [cfg.sampling.negative_prompt] * len(prompts))
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "no")
    images = []
    for seed in s.heldout_seeds:
        with autocast:
            images.append(engine.sample(adapter, cond, height=64, width=64, num_steps=cfg.sampling.num_steps,
                                        guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta,
                                        generator=torch.Generator().manual_seed(seed)).float())
    images = torch.cat(images)
    all_prompts = prompts * len(s.heldout_seeds)
    scores = {name: r(images, all_prompts).float().cpu().tolist() for name, r in _load_rewards(device).items()}
    return scores, images.cpu()


def _load_trained(adapter, cfg, checkpoint_dir: Path) -> None:
    """The run's final LoRA (its EMA when it kept one) on the adapter's denoiser."""
    from tuner import lora
    from tuner.train import load_trained

    targets = cfg.lora.target_modules or list(adapter.lora_targets)
    lora.add_lora(adapter.denoiser, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=targets)
    ema = (checkpoint_dir / "ema.safetensors").is_file()
    load_trained(adapter.denoiser, checkpoint_dir, "ema.safetensors" if ema else "trainable.safetensors")


def _train_stats(run_dir: Path, max_grad_norm: float) -> dict[str, Any]:
    """Per-step time, optimizer-step gradient norms and the eval curve (with training seconds) from metrics.jsonl."""
    from tuner.logging import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if "reward" in r]
    times = [r["step_time"] for r in train]
    norms = [r["grad_norm"] for r in train if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"])]
    elapsed, curve = 0.0, []
    for r in rows:
        if "reward" in r:
            elapsed += r["step_time"]
        if "eval/reward" in r:
            curve.append([r["step"], r["eval/reward"], round(elapsed, 3)])
    tenth = max(1, len(train) // 10)
    return {
        "train_reward_first": statistics.fmean(r["reward"] for r in train[:tenth]),
        "train_reward_last": statistics.fmean(r["reward"] for r in train[-tenth:]),
        "eval_curve": curve,  # [step, eval reward (tuned reward, held-out prompts), training seconds so far]
        "step_time_median": statistics.median(times), "step_time_mean": statistics.fmean(times),
        "train_seconds": sum(times),
        "grad_norm": {"mean": statistics.fmean(norms), "median": statistics.median(norms), "max": max(norms),
                      "clipped_share": sum(n > max_grad_norm for n in norms) / len(norms)} if norms else None,
        "skipped_steps": int(sum(r.get("skipped", 0) or 0 for r in train)),
    }


def _peak_memory(device: torch.device) -> dict[str, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_cuda_mib": cuda, "peak_rss_mib": round(rss, 1)}


def environment() -> dict[str, Any]:
    """Where a result was measured."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {"device": gpu or f"cpu ({platform.processor() or platform.machine()})", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "commit": commit}


def run_cell(cell: Cell, s: Settings, runs: Path) -> dict[str, Any]:
    """Train one cell, then score it on the held-out prompts; returns its result row (images alongside)."""
    from tuner.train import train

    cfg = config(cell, s, runs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    probes: list[StepGradNorms] = []

    def make_probe(params: list[torch.nn.Parameter]) -> StepGradNorms:
        probes.append(StepGradNorms(params))
        return probes[-1]

    shared_before, before = judge_before_file(cfg, runs), runs / cell.id / "ground_truth_before.json"
    if cfg.log.judge_captions and shared_before.is_file():
        before.parent.mkdir(parents=True, exist_ok=True)
        before.write_text(shared_before.read_text())  # the tuner then skips the base model's test
    summary = train(cfg, make_step_hook=make_probe)
    trained_s = time.perf_counter() - started
    if cfg.log.judge_captions and not shared_before.is_file():
        partial = shared_before.with_suffix(f".{os.getpid()}.tmp")  # whole or absent: cells start in parallel
        partial.write_text(before.read_text())
        os.replace(partial, shared_before)
    run_dir = Path(summary["run_dir"])
    scores, images = heldout(cfg, s, run_dir, device)
    row = {
        "id": cell.id, "label": cell.label, "groups": list(cell.groups), "method": cell.method,
        "options": cell.method_options(), "reward": cell.reward, "seed": cell.seed, "steps": cell.steps,
        "prompts": cell.prompts, "lr": cell.lr or s.lr, "guards": dict(cell.guards),
        "ground_truth": summary.get("ground_truth"),
        "settings": dataclasses.asdict(s), "status": "ok",
        "heldout": {k: statistics.fmean(v) for k, v in scores.items()}, "heldout_per_image": scores,
        "wall_seconds": round(trained_s, 2), **_train_stats(run_dir, s.max_grad_norm),
        "grad_per_step": probes[0].summary() if probes else {}, **_peak_memory(device), **environment(),
    }
    return {"row": row, "images": images}


def judge_before_file(cfg, runs: Path) -> Path:
    """Where the base model's held-out judge tallies of a configuration are kept for every cell that shares them:
    they depend only on the model, sampler, prompts, judge settings, evaluation batch and device, not on the cell."""
    key = {"model": [cfg.model, cfg.vae, cfg.t5], "sampling": dataclasses.asdict(cfg.sampling), "prompts": dataclasses.asdict(cfg.prompts),
           "judge": [cfg.log.judge_captions, cfg.log.judge_seeds, cfg.log.eval_batch_size or cfg.train.batch_size],
           "precision": cfg.train.mixed_precision, "cuda": torch.cuda.is_available()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return runs / f"judge-before-{digest}.json"


def base_id(prompts: str | None = None) -> str:
    """The id of the base model's row for a prompt list (None: the profile's)."""
    return f"base__{prompts}" if prompts else "base"


def run_base(s: Settings, runs: Path, prompts: str | None = None) -> dict[str, Any]:
    """The base model's held-out scores (the reference every gain is measured from)."""
    cell = Cell("base", "drtune", (), "symmetry", 0, 1, prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scores, images = heldout(config(cell, s, runs), s, None, device)
    row = {"id": base_id(prompts), "label": "base", "groups": ["base"], "status": "ok", "prompts": prompts,
           "settings": dataclasses.asdict(s),
           "heldout": {k: statistics.fmean(v) for k, v in scores.items()}, "heldout_per_image": scores,
           **_peak_memory(device), **environment()}
    return {"row": row, "images": images}


def write_row(path: Path, row: dict[str, Any]) -> None:
    """Append one result line, flushed to disk (a run killed later keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Result rows of a results file (the last row of an id wins)."""
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["id"]] = row
    return list(rows.values())
