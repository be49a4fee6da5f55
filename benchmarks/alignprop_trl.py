"""Our AlignProp step side by side with TRL 0.23.1's AlignPropTrainer, full-size SD 1.5 (random weights) at 512 px.

    python -m benchmarks.alignprop_trl --out results/          # writes alignprop_trl.json and .md
    python -m benchmarks.alignprop_trl --smoke --out DIR       # tiny SD 1.5 on the CPU: checks the script

A random SD 1.5 is written with `save_pretrained` and TRL loads it through `DefaultDDPOStableDiffusionPipeline`,
as a user would; our side loads the same folder with `tuner.pipelines.load_adapter`. Settings are matched:
T DDIM steps with TRL's eta, CFG scale, batch, LoRA of rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0 (TRL fixes
these), the weight-free `sharpness` reward, bf16 weights with fp32 LoRA, AdamW with TRL's defaults and gradient
clipping at 1.0. Truncation is TRL's fixed mode: steps i >= T - suffix get gradients, a suffix of the chain.
One row per implementation, for each (suffix, batch):

* trl: one `AlignPropTrainer.step` (sample with gradient through the chain, score, backward, clip, AdamW);
* engine: `tuner.engine.reward_backward` with our alignprop Plan for that suffix, then clip and AdamW;
* checkpointed chain: plain autograd through the chain with every UNet call under torch.utils.checkpoint and the
  outputs of untrained steps detached (what TRL's step does), written on our adapter, then clip and AdamW;
* engine-low: the engine in the low-memory mode (`train.memory: low`);
* engine-compiled: the engine with the adapter's blocks compiled (`train.compile: true`), after every other row.

TRL's side runs first and is freed before ours loads, so each peak holds one model. Random weights cost exactly
what trained ones cost; the reward is weight-free, so the numbers isolate the tuner.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.metadata
import json
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import rewards
from benchmarks.sdxl import count_parameters
from benchmarks.tuner_methods import measure
from tuner.engine import reward_backward
from tuner.lora import add_lora
from tuner.methods import Plan, get_method
from tuner.pipelines import Adapter, load_adapter

PROMPT = "a photo of a cat"
TRL_VERSION = "0.23.1"
# Fixed by TRL's DefaultDDPOStableDiffusionPipeline.get_trainable_layers; our side uses the same.
LORA = dict(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
# AlignPropConfig's defaults (train_learning_rate, train_adam_*, train_max_grad_norm), used on every side.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
MAX_GRAD_NORM = 1.0
# Our engine as train.memory=low runs it, and with train.compile's compiled blocks (compiled last: it stays on).
IMPLS = ("trl", "engine", "checkpointed", "engine-low", "engine-compiled")
OURS = IMPLS[1:]
TRL_STEP = [
    "One AlignPropTrainer.step(epoch, global_step) runs train_gradient_accumulation_steps micro-steps; each encodes "
    "train_batch_size prompts, samples images with autograd through the whole DDIM chain (rgb_with_grad), scores "
    "them, backpropagates loss = 10 - mean reward, clips the gradient norm and steps the optimizer.",
    "Every UNet call of the chain (all T, CFG doubling the batch) runs with autograd on under "
    "torch.utils.checkpoint (non-reentrant): no activations are kept and each call that gets a gradient is "
    "recomputed in backward. The trainer does not pass gradient_checkpoint, whose default is on.",
    "Truncation: step i's UNet output is detached when i < truncated_backprop_timestep (fixed mode, default 49: the "
    "last step only) or when i < r with r = random.randint(min, max) drawn anew at every step (random mode, the "
    "default, (0, 50)); so in random mode the trained steps are not a suffix: step i is trained with probability "
    "(i - min + 1) / (max - min + 1), 25 of 50 on average. A detached step still passes the gradient to earlier "
    "latents through the scheduler update, and trained steps pass it through their UNet input as well. "
    "truncated_backprop itself is not in AlignPropConfig; it is always on.",
    "Precision under mixed_precision=bf16: UNet, VAE and text encoder weights are cast to bf16, the LoRA stays fp32, "
    "the UNet forward runs under accelerate's bf16 autocast (Accelerator.prepare wraps it), the VAE (not prepared) "
    "decodes in bf16 without autocast and without checkpointing, the latents of the chain are bf16 (the text "
    "embeddings' dtype), and images go through the pipeline's postprocess (x / 2 + 0.5 clamped to [0, 1]).",
    "Its DDIM step reads alphas_cumprod on the CPU (timestep.cpu()) at every step of the chain.",
    "LoRA: rank 4, alpha 4, gaussian init, on to_q, to_k, to_v, to_out.0; fixed, not a config option.",
    "The reward function is called as reward_fn(images, prompts, prompt_metadata) with images [B,3,H,W] in [0, 1] "
    "and returns (rewards, metadata).",
    "step() writes an accelerate checkpoint when epoch != 0 and epoch % save_freq == 0; the benchmark calls "
    "step(0, 0), so timed steps write nothing. TRL 0.23.1 marks the trainer deprecated.",
]


@dataclass
class Ours:
    """Our side: the adapter, its reward, the LoRA parameters and their optimizer."""

    adapter: Adapter
    reward: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager]

    def update(self) -> None:
        """Clip the gradient, step AdamW and clear the gradients, as TRL's step does."""
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps T, TRL's sample_num_steps (50; smoke 4)")
    ap.add_argument("--suffixes", type=int, nargs="+", default=None,
                    help="trained suffix lengths, rows for each (10 50; smoke 1 4)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="images per step, rows for each (1 4; smoke 1)")
    ap.add_argument("--guidance", type=float, default=5.0, help="CFG scale (TRL's default sample_guidance_scale)")
    ap.add_argument("--eta", type=float, default=1.0, help="DDIM eta (TRL's default sample_eta)")
    ap.add_argument("--iters", type=int, default=2, help="timed steps per row, after one warm-up step")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the engine-compiled rows (the smoke test uses aot_eager)")
    ap.add_argument("--budget", type=float, default=0.0, help="no row starts after this many seconds (0: no limit)")
    ap.add_argument("--weights", type=Path, default=None, help="folder for the random pipeline (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny SD 1.5 on the CPU: checks the script, measures nothing")
    args = ap.parse_args(argv)
    small = args.smoke
    args.steps = args.steps or (4 if small else 50)
    args.suffixes = args.suffixes or ([1, args.steps] if small else [10, args.steps])
    args.batches = args.batches or ([1] if small else [1, 4])
    if not all(1 <= s <= args.steps for s in args.suffixes):
        ap.error(f"every suffix must lie in [1, {args.steps}], got {args.suffixes}")
    return args


def save_random_pipeline(folder: Path, smoke: bool) -> dict:
    """Write a random-weight SD 1.5 (full size, or tiny for --smoke) with save_pretrained; returns its sizes."""
    from benchmarks.sdxl import sd15_random_pipeline
    from tuner.pipelines import tiny_sd15_pipeline

    torch.manual_seed(0)
    if smoke:
        pipe = tiny_sd15_pipeline()
    else:
        with torch.device("cuda"):  # random init on the GPU is fast; the files are fp32 as SD 1.5's are
            pipe = sd15_random_pipeline()
    pipe.save_pretrained(folder)
    sizes = {f"{name}_params": count_parameters(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
    sizes["resolution"] = pipe.unet.config.sample_size * pipe.vae_scale_factor
    del pipe
    _free()
    return sizes


def _free() -> None:
    """Collect garbage and give cached CUDA memory back, so the next peak starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def counting_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Count the module's forward calls inside the block (checkpoint recomputations included)."""
    count = [0]
    handle = module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()


def timed(fn: Callable[[], object], iters: int, unet: torch.nn.Module, device: str) -> dict:
    """One counted warm-up call, then mean seconds over `iters` synchronised calls and their peak memory."""
    resident = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    with counting_calls(unet) as calls:
        fn()
    row = measure(fn, iters, warmup=False)
    return {"s_per_step": row["s_per_iter"], "peak_gib": row["peak_gib"], "resident_gib": resident,
            "unet_calls": calls[0]}


def guarded(fn: Callable[[], object], iters: int, unet: torch.nn.Module, device: str) -> dict:
    """`timed`, with an out-of-memory error recorded as a row instead of ending the run."""
    try:
        return timed(fn, iters, unet, device)
    except torch.OutOfMemoryError:
        return {"s_per_step": None, "peak_gib": None, "oom": True}
    finally:
        _free()


# -- TRL's side ---------------------------------------------------------------------------------------
def trl_version() -> str | None:
    """The installed TRL's version, or None."""
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return None


def trl_reward(reward: torch.nn.Module) -> Callable:
    """Our reward in TRL's signature: (images in [0, 1], prompts, metadata) -> (scores [B], metadata)."""
    return lambda images, prompts, metadata: (reward(images, list(prompts)), {})


def trl_trainer(folder: Path, args: argparse.Namespace, reward: torch.nn.Module):
    """TRL's AlignPropTrainer on the saved pipeline with the matched settings (fixed truncation, bf16)."""
    from accelerate import PartialState
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    PartialState()  # TRL's pipeline logs through accelerate before its trainer creates the Accelerator
    config = AlignPropConfig(
        mixed_precision="bf16", sample_num_steps=args.steps, sample_guidance_scale=args.guidance, sample_eta=args.eta,
        train_batch_size=1, truncated_backprop_rand=False, truncated_backprop_timestep=args.steps - 1, num_epochs=1,
        train_max_grad_norm=MAX_GRAD_NORM, log_with=None,
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(str(folder), use_lora=True)
    trainer = AlignPropTrainer(config, trl_reward(reward), lambda: (PROMPT, {}), pipeline)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)
    return trainer


def trl_rows(folder: Path, args: argparse.Namespace, device: str, reward, record: Callable) -> None:
    """Every (suffix, batch) row of TRL's step, each passed to `record`; the trainer is freed at the end."""
    trainer = trl_trainer(folder, args, reward)
    for suffix, batch in _grid(args):
        trainer.config.train_batch_size = batch
        trainer.config.truncated_backprop_timestep = args.steps - suffix  # steps i >= T - suffix get gradients
        record("trl", suffix, batch, functools.partial(trainer.step, 0, 0), trainer.sd_pipeline.unet)
    trainer.accelerator.free_memory()
    del trainer
    _free()


# -- our side -----------------------------------------------------------------------------------------
def ours(folder: Path, device: str, reward: torch.nn.Module) -> Ours:
    """Our adapter on the same folder: bf16 weights, fp32 LoRA of TRL's rank on TRL's modules, AdamW."""
    adapter = load_adapter(str(folder), device=device, dtype=torch.bfloat16, scheduler="ddim")
    params = add_lora(adapter.denoiser, **LORA)
    optimizer = torch.optim.AdamW(params, **ADAMW)
    return Ours(adapter, reward, params, optimizer, lambda: torch.autocast(device, dtype=torch.bfloat16))


def suffix_plan(steps: int, suffix: int) -> Plan:
    """Our alignprop method's plan with its suffix length pinned: the last `suffix` steps are trained."""
    return get_method("alignprop", min_steps=suffix, max_steps=suffix).plan(steps, torch.Generator().manual_seed(0))


def _generator(side: Ours) -> torch.Generator:
    """The same seeded generator for every step, on the adapter's device."""
    return torch.Generator(side.adapter.device).manual_seed(0)


def engine_step(side: Ours, plan: Plan, batch: int, args: argparse.Namespace, size: int) -> None:
    """One engine step: encode, reward_backward (flat memory, exact gradient), clip, AdamW."""
    prompts = [PROMPT] * batch
    cond = side.adapter.encode_prompts(prompts)
    with side.autocast():
        reward_backward(side.adapter, plan, cond, side.reward, prompts, height=size, width=size,
                        guidance_scale=args.guidance, generator=_generator(side), eta=args.eta)
    side.update()


def checkpointed_chain(adapter: Adapter, plan: Plan, cond, reward, prompts: list[str], *, size: int,
                       guidance: float, eta: float, generator: torch.Generator) -> torch.Tensor:
    """Plain autograd through the chain: every UNet call checkpointed, untrained outputs detached; returns the loss."""
    sched, trained = adapter.scheduler, set(plan.trained)
    sched.set_timesteps(plan.num_steps, device=adapter.device)
    x = adapter.initial_latents(len(prompts), size, size, generator)
    for i, t in enumerate(sched.timesteps):
        eps = checkpoint(adapter.denoise, x, t, cond, guidance, use_reentrant=False)
        eps = eps if i in trained else eps.detach()
        x = sched.step(eps, t, x, eta=eta, generator=generator, return_dict=False)[0]
    loss = -reward(adapter.decode(x, checkpoint=False), prompts).mean()
    loss.backward()
    return loss.detach()


def checkpointed_step(side: Ours, plan: Plan, batch: int, args: argparse.Namespace, size: int) -> None:
    """One step of the checkpointed chain: encode, sample with grad, backward, clip, AdamW."""
    prompts = [PROMPT] * batch
    cond = side.adapter.encode_prompts(prompts)
    with side.autocast():
        checkpointed_chain(side.adapter, plan, cond, side.reward, prompts, size=size, guidance=args.guidance,
                           eta=args.eta, generator=_generator(side))
    side.update()


def low_memory_step(side: Ours, plan: Plan, batch: int, args: argparse.Namespace, size: int) -> None:
    """One engine step in the low-memory mode (block-wise recompute, one image at a time through VAE and reward)."""
    side.adapter.low_memory = True
    try:
        engine_step(side, plan, batch, args, size)
    finally:
        side.adapter.low_memory = False


def our_rows(folder: Path, args: argparse.Namespace, device: str, reward, size: int, record: Callable) -> None:
    """Every (suffix, batch) row of each of our implementations, each passed to `record`; the compiled rows last,
    as compiling changes the adapter for good."""
    side = ours(folder, device, reward)
    steps = {"engine": engine_step, "checkpointed": checkpointed_step, "engine-low": low_memory_step,
             "engine-compiled": engine_step}
    for impl in (i for i in OURS if i in args.impls):
        if impl == "engine-compiled":
            side.adapter.compile(backend=args.compile_backend)
        for suffix, batch in _grid(args):
            step = functools.partial(steps[impl], side, suffix_plan(args.steps, suffix), batch, args, size)
            record(impl, suffix, batch, step, side.adapter.denoiser)


def recorder(args: argparse.Namespace, device: str, deadline: float, info: dict, rows: dict) -> Callable:
    """A function that measures one row (or skips it past the budget) and rewrites the files after it."""
    def record(impl: str, suffix: int, batch: int, fn: Callable[[], object], unet: torch.nn.Module) -> None:
        """Measure `fn` as the row (impl, suffix, batch) and rewrite the files."""
        if time.perf_counter() > deadline:
            rows[_key(impl, suffix, batch)] = {"impl": impl, "suffix": suffix, "batch": batch, "skipped": "budget"}
        else:
            rows[_key(impl, suffix, batch)] = _row(guarded(fn, args.iters, unet, device), impl, suffix, batch)
        write(args.out, info, rows)  # a cut-off run keeps the rows it has

    return record


# -- rows, ratios, files --------------------------------------------------------------------------------
def _grid(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(suffix, batch) of every row, batch by batch."""
    return [(s, b) for b in args.batches for s in args.suffixes]


def _key(impl: str, suffix: int, batch: int) -> str:
    """A row's name."""
    return f"{impl} [suffix {suffix}, batch {batch}]"


def _row(measured: dict, impl: str, suffix: int, batch: int) -> dict:
    """A measured row with its per-image figures."""
    row = {"impl": impl, "suffix": suffix, "batch": batch, **measured}
    if row.get("s_per_step"):
        row["s_per_image"] = row["s_per_step"] / batch
        row["images_per_s"] = batch / row["s_per_step"]
    print(_key(impl, suffix, batch), {k: v for k, v in row.items() if k not in ("impl", "suffix", "batch")}, flush=True)
    return row


def ratios(rows: dict) -> dict:
    """For each (suffix, batch): our rows against TRL's, per-image time and peak memory (ours / TRL)."""
    out = {}
    for trl in rows.values():
        if trl.get("impl") != "trl" or not trl.get("s_per_image"):
            continue
        for impl in OURS:
            mine = rows.get(_key(impl, trl["suffix"], trl["batch"]), {})
            if mine.get("s_per_image"):
                out[_key(impl, trl["suffix"], trl["batch"])] = {
                    "time_ours_over_trl": mine["s_per_image"] / trl["s_per_image"],
                    "peak_ours_over_trl": mine["peak_gib"] / trl["peak_gib"] if trl["peak_gib"] else None,
                }
    return out


def versions() -> dict:
    """Versions of Python and every package the comparison runs on."""
    names = ("torch", "diffusers", "transformers", "peft", "accelerate", "trl")
    found = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return {"python": platform.python_version(), **found}


def meta(args: argparse.Namespace, device: str, sizes: dict, command: str) -> dict:
    """What, where and how: stored next to the rows."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: the numbers mean nothing)",
        "versions": versions(), "date": time.strftime("%Y-%m-%d"),
        "command": f"python -m benchmarks.alignprop_trl {command}",
        "weights": ("random, tiny SD 1.5 architecture" if args.smoke else
                    "random, full-size SD 1.5 architecture (not trained weights)") + ", written with save_pretrained",
        **sizes, "steps": args.steps, "suffixes": args.suffixes, "batches": args.batches, "guidance": args.guidance,
        "eta": args.eta, "iters": args.iters, "lora": LORA, "adamw": ADAMW, "max_grad_norm": MAX_GRAD_NORM,
        "reward": "sharpness (weight-free)", "scheduler": "DDIM, SD 1.5 betas, leading spacing",
        "precision": "bf16 weights, fp32 LoRA; TRL: accelerate mixed_precision=bf16; ours: bf16 autocast on the "
                     "trained calls, the bf16 model plainly on the frozen ones and in the VAE decode",
        "truncation": "TRL's fixed mode: steps i >= T - suffix get gradients (truncated_backprop_rand=False, "
                      "truncated_backprop_timestep=T - suffix); ours: the alignprop Plan of the same suffix",
        "trl_step": TRL_STEP,
    }


def write(out: Path, meta_: dict, rows: dict) -> None:
    """alignprop_trl.json and alignprop_trl.md."""
    out.mkdir(parents=True, exist_ok=True)
    found = ratios(rows)
    (out / "alignprop_trl.json").write_text(json.dumps({"meta": meta_, "rows": rows, "ratios": found}, indent=2))
    (out / "alignprop_trl.md").write_text(markdown(meta_, rows, found))


def markdown(meta_: dict, rows: dict, found: dict) -> str:
    """The table: per-image seconds, images/s, peak GiB and the ratios to TRL."""
    v = meta_["versions"]
    lines = [f"{meta_['device']}; {meta_['weights']}; {meta_['resolution']} px, T={meta_['steps']} DDIM (eta "
             f"{meta_['eta']}), CFG {meta_['guidance']}, LoRA rank {LORA['rank']}, sharpness reward; torch "
             f"{v.get('torch')}, diffusers {v.get('diffusers')}, transformers {v.get('transformers')}, peft "
             f"{v.get('peft')}, accelerate {v.get('accelerate')}, trl {v.get('trl', '-')}; {meta_['date']}; "
             f"`{meta_['command']}`", "",
             "| implementation | suffix | batch | UNet calls | s / step | s / image | images / s | peak GiB | "
             "time ours / TRL | peak ours / TRL |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda k: (rows[k]["batch"], rows[k]["suffix"], IMPLS.index(rows[k]["impl"])))
    lines += [_line(key, rows[key], found.get(key, {})) for key in order]
    return "\n".join(lines) + "\n"


def _line(key: str, r: dict, ratio: dict) -> str:
    """One markdown row."""
    name = key.split(" [")[0]
    if r.get("skipped") or r.get("oom"):
        what = "OOM" if r.get("oom") else f"skipped ({r['skipped']})"
        return f"| {name} | {r.get('suffix', '')} | {r.get('batch', '')} | | {what} | | | | | |"
    cells = [f"{ratio[k]:.2f}" if ratio.get(k) else "" for k in ("time_ours_over_trl", "peak_ours_over_trl")]
    return (f"| {name} | {r['suffix']} | {r['batch']} | {r['unet_calls']} | {r['s_per_step']:.3f} | "
            f"{r['s_per_image']:.3f} | {r['images_per_s']:.3f} | {r['peak_gib']:.2f} | {cells[0]} | {cells[1]} |")


def settings(stack: contextlib.ExitStack, smoke: bool) -> None:
    """Warnings and thread count for the run, restored when `stack` closes; TF32 matmuls on the GPU."""
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' _encode_prompt notice, every TRL step
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if smoke:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)  # tiny models: one thread is faster, and steady on a busy machine
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # TRL's allow_tf32 default, so the same for ours


def main(argv: list[str] | None = None) -> dict:
    """Save the random pipeline, run TRL's rows then ours, write JSON + markdown; returns what was written."""
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if "trl" in args.impls and trl_version() != TRL_VERSION:
        raise SystemExit(f"the comparison needs trl=={TRL_VERSION} (AlignPropTrainer); found {trl_version()}")
    deadline = time.perf_counter() + args.budget if args.budget else float("inf")
    with contextlib.ExitStack() as stack:
        settings(stack, args.smoke)
        folder = args.weights or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sizes = save_random_pipeline(folder, args.smoke)
        reward = rewards.load("sharpness", device=device)
        reward.check_values = False
        command = " ".join(sys.argv[1:] if argv is None else argv)
        info, rows = meta(args, device, sizes, command), {}
        record = recorder(args, device, deadline, info, rows)
        write(args.out, info, rows)
        if "trl" in args.impls:
            trl_rows(folder, args, device, reward, record)
        if set(OURS) & set(args.impls):
            our_rows(folder, args, device, reward, sizes["resolution"], record)
    print((args.out / "alignprop_trl.md").read_text())
    return {"meta": info, "rows": rows, "ratios": ratios(rows)}


if __name__ == "__main__":
    main()
