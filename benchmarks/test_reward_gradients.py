"""Reward-gradient benchmark (pytest-benchmark): every reward, ours and imscore's, on the same random weights.

    python -m benchmarks.reward_gradients --out benchmarks/results/        # the usual way: tables and plot too
    python -m pytest benchmarks/test_reward_gradients.py --benchmark-json=out.json -k "hpsv2.1 and b32"

Each case times the pixel gradient d(sum of scores)/d(pixels) of a batch in [0, 1], preprocessing included, with
CUDA synchronisation after each call; see docs/benchmarks.md. Random weights cost exactly what trained ones cost.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks.gradient_suite import (
    DTYPES,
    VARIANTS,
    Case,
    Suite,
    append_jsonl,
    gradient,
    out_of_memory,
    profile_summary,
    relative_difference,
    stats_of,
    synchronize,
    tensor_bytes,
    variant_context,
)


def test_matmul_peak(benchmark, suite: Suite) -> None:
    """bf16 matmul throughput of an n x n x n product (n = 8192): the peak each case's TFLOP/s is compared with."""
    n, device = suite.settings.matmul_size, suite.device
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    iterations = 20 if device.type == "cuda" else 1

    def step() -> None:
        for _ in range(iterations):
            torch.mm(a, b)
        synchronize(device)

    benchmark.pedantic(step, setup=lambda: synchronize(device), rounds=suite.settings.rounds, warmup_rounds=2)
    flops = 2 * n**3 * iterations
    benchmark.extra_info.update(kind="matmul", n=n, iterations=iterations, flops=flops, dtype="bf16")
    _log(suite, "matmul_peak", benchmark)


def test_reward_gradient(benchmark, suite: Suite, case: Case) -> None:
    """Time the pixel gradient of one case; record FLOPs, peak memory and agreement with our eager scores."""
    if suite.out_of_time():
        append_jsonl(suite.settings.jsonl, {"skipped": case.id, "reason": "time budget"})
        pytest.skip(f"time budget of {suite.settings.budget:.0f} s spent")
    error = out_of_memory(lambda: _measure(benchmark, suite, case), suite.release)
    if error:
        pytest.fail(f"{case.id}: {error}", pytrace=False)


def _measure(benchmark, suite: Suite, case: Case) -> None:
    variant, device = VARIANTS[case.variant], suite.device
    start = time.perf_counter()
    fn, module = suite.prepare(case)
    images, prompts = suite.inputs(case)
    load_s = time.perf_counter() - start

    def step() -> None:
        gradient(fn, images, prompts)
        synchronize(device)

    with variant_context(variant):
        start = time.perf_counter()
        scores, grad = gradient(fn, images, prompts)  # compiles, fills the text cache
        synchronize(device)
        first_s = time.perf_counter() - start
        _check(case, scores, grad)
        info = _agreement(suite, case, scores, images, prompts)
        flops = suite.flops(case, fn, images, prompts)
        del scores, grad
        peak, base = _timed(benchmark, suite, step)
        if any(case.id.startswith(p) for p in suite.settings.profile):
            info["profile"] = profile_summary(step, device)
    benchmark.extra_info.update(
        kind="reward", reward=case.reward, impl=case.impl, variant=case.variant, dtype=case.dtype, batch=case.batch,
        size=suite.settings.size, flops=flops, peak_bytes=peak, base_bytes=base, weights_bytes=tensor_bytes(module),
        input_bytes=images.numel() * images.element_size(), load_s=round(load_s, 2), first_call_s=round(first_s, 2),
        component=variant.component, variant_doc=variant.doc, **info,
    )
    _log(suite, case.id, benchmark)


def _log(suite: Suite, name: str, benchmark) -> None:
    append_jsonl(suite.settings.jsonl, {"name": name, "stats": stats_of(benchmark), "extra_info": benchmark.extra_info})


def _timed(benchmark, suite: Suite, step) -> tuple[int | None, int | None]:
    """Run pytest-benchmark's timed rounds; return (peak, baseline) CUDA memory in bytes (None off CUDA)."""
    device = suite.device
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else None
    settings = suite.settings
    benchmark.pedantic(step, setup=lambda: synchronize(device), rounds=settings.rounds, warmup_rounds=settings.warmup)
    return (torch.cuda.max_memory_allocated(device) if cuda else None), base


def _check(case: Case, scores: torch.Tensor, grad: torch.Tensor) -> None:
    assert scores.shape == (case.batch,), f"{case.id}: scores of shape {tuple(scores.shape)}"
    assert torch.isfinite(scores.detach().float()).all(), f"{case.id}: non-finite scores"
    assert grad.dtype == DTYPES[case.dtype] and torch.isfinite(grad.float()).all(), f"{case.id}: bad gradient"
    assert grad.abs().sum() > 0, f"{case.id}: the gradient is zero"


def _agreement(suite: Suite, case: Case, scores: torch.Tensor, images: torch.Tensor, prompts: list[str]) -> dict:
    """Scores and, for every case but our eager one, their distance to our eager scores on the same images; for a
    bf16 case also its distance to our float32 scores, which our bf16 eager case's own distance puts in scale."""
    key = (case.reward, case.dtype, case.batch)
    info = {"score_mean": float(scores.detach().float().mean())}
    if VARIANTS[case.variant].component:
        return info
    fp32 = suite.fp32_reference(case, images, prompts)
    if fp32 is not None:
        info["score_rel_diff_vs_fp32"] = relative_difference(scores, fp32)
    if case.impl == "ours" and case.variant == "eager":
        suite.reference[key] = scores.detach().float().cpu()
    elif key in suite.reference:
        info["score_rel_diff_vs_ours_eager"] = relative_difference(scores, suite.reference[key])
    return info
