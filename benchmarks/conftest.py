"""pytest options and fixtures of the reward-gradient benchmark (benchmarks/test_reward_gradients.py).

The defaults are the full suite on CUDA; `python -m benchmarks.reward_gradients` sets these options for you.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is written locally; a hub call is a bug
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.gradient_suite import DEFAULT_VARIANTS, VARIANTS, Settings, Suite, plan  # noqa: E402

OPTIONS = {  # name: (help, default)
    "smoke": ("tiny architectures on the CPU, small inputs: checks the suite, measures nothing", None),
    "device": ("device to run on (default cuda; cpu with --reward-smoke)", None),
    "size": ("input side in pixels (default 1024; 64 with --reward-smoke)", None),
    "batches": ("comma-separated batch sizes (default 32,8,1; 2 with --reward-smoke)", None),
    "dtypes": ("comma-separated precisions, bf16 and/or fp32", "bf16,fp32"),
    "names": ("comma-separated rewards (default: all)", None),
    "impls": ("comma-separated implementations, ours and/or imscore", "ours,imscore"),
    "variants": ("comma-separated variants of ours, see benchmarks/gradient_suite.py VARIANTS (default: "
                 f"{','.join(DEFAULT_VARIANTS)}; all with --reward-smoke)", None),
    "everywhere": ("run every variant on every case it applies to, not only the default selection", None),
    "rounds": ("timed rounds per case (default 5; 1 with --reward-smoke)", None),
    "warmup": ("untimed rounds after one first call, which compiles (default 1; 0 with --reward-smoke)", None),
    "budget": ("seconds after --reward-start past which cases are skipped (0: no limit)", "0"),
    "start": ("epoch seconds the run started at (default: now)", None),
    "weights": ("folder for the random-weight checkpoints (reused across runs)", None),
    "jsonl": ("append one JSON line per finished case to this file", None),
    "profile": ("comma-separated case-id prefixes to profile one call of (default hpsv2.1-bf16-b32)", None),
}
FLAGS = {"smoke", "everywhere"}
SMOKE_PROFILE = ("hpsv2.1-fp32-b2-ours",)


def pytest_addoption(parser) -> None:
    group = parser.getgroup("reward gradients")
    for name, (help_text, default) in OPTIONS.items():
        if name in FLAGS:
            group.addoption(f"--reward-{name}", action="store_true", help=help_text)
        else:
            group.addoption(f"--reward-{name}", default=default, help=help_text)


def settings_from(config) -> Settings:
    """Settings from the --reward-* options."""
    opt = lambda name: config.getoption(f"--reward-{name}")  # noqa: E731
    smoke = bool(opt("smoke"))
    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    base = Settings()
    settings = Settings(
        smoke=smoke,
        device=opt("device") or ("cpu" if smoke else "cuda"),
        size=int(opt("size") or (64 if smoke else 1024)),
        batches=tuple(int(b) for b in split(opt("batches") or ("2" if smoke else "32,8,1"))),
        dtypes=split(opt("dtypes")),
        rewards=split(opt("names")) if opt("names") else base.rewards,
        impls=split(opt("impls")),
        variants=split(opt("variants")) if opt("variants") else (tuple(VARIANTS) if smoke else DEFAULT_VARIANTS),
        everywhere=bool(opt("everywhere")),
        rounds=int(opt("rounds") or (1 if smoke else 5)),
        warmup=int(opt("warmup") or (0 if smoke else 1)),
        budget=float(opt("budget")),
        start=float(opt("start") or time.time()),
        weights=Path(opt("weights")) if opt("weights") else base.weights,
        jsonl=Path(opt("jsonl")) if opt("jsonl") else None,
        profile=split(opt("profile")) if opt("profile") is not None else (SMOKE_PROFILE if smoke else base.profile),
        matmul_size=256 if smoke else base.matmul_size,
    )
    settings.check()
    return settings


def pytest_generate_tests(metafunc) -> None:
    if "case" in metafunc.fixturenames:
        cases = plan(settings_from(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def suite(request):
    """The session's files and models (models of one reward and precision at a time)."""
    state = Suite(settings_from(request.config))
    yield state
    state.close()


def pytest_benchmark_update_machine_info(config, machine_info) -> None:
    """GPU and library versions in pytest-benchmark's JSON."""
    from benchmarks.reward_gradients import environment

    machine_info["reward_gradients"] = {**environment(), "smoke": bool(config.getoption("--reward-smoke"))}
