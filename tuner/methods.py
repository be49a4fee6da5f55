"""Tuning methods as small policies: each draws a Plan saying which sampling steps get gradients.

The trajectory engine (tuner.engine) executes any Plan; a new method is a new `plan()` here.
Step indices are 0-based in sampling order: step 0 denoises pure noise, step T-1 is the last.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Plan:
    """Which steps of one sampling chain are trained and along which paths the gradient flows."""

    num_steps: int  # T, the scheduler steps of a full chain
    stop: int  # last step that runs; T-1 = whole chain
    predict_x0: bool  # at `stop`, x0 is predicted in one step from (x_stop, eps_stop); else x0 = latent after `stop`
    trained: tuple[int, ...]  # steps whose denoiser call gets parameter gradients (sorted)
    detach_input: bool  # stop-gradient on the denoiser input x_t at every step
    grad_from: int  # the adjoint flows through steps >= grad_from only; 0 = whole chain
    renoise: int = 0  # DRaFT-LV: re-noise the final latent n times and redo the last step (0 = off)

    def __post_init__(self) -> None:
        T = self.num_steps
        problems = []
        if T < 1:
            problems.append(f"num_steps must be >= 1, got {T}")
        if not 0 <= self.stop < T:
            problems.append(f"stop must be in [0, {T - 1}], got {self.stop}")
        if not self.trained:
            problems.append("trained is empty: at least one step must get gradients")
        if list(self.trained) != sorted(set(self.trained)):
            problems.append(f"trained must be sorted and unique, got {self.trained}")
        if self.trained and not self.grad_from <= self.trained[0] <= self.trained[-1] <= self.stop:
            problems.append(f"trained steps {self.trained} must lie in [grad_from={self.grad_from}, stop={self.stop}]")
        if self.renoise < 0:
            problems.append(f"renoise must be >= 0, got {self.renoise}")
        if self.renoise and (self.predict_x0 or self.stop != T - 1 or self.trained != (T - 1,)):
            problems.append("renoise plans run the whole chain and train only its last step (predict_x0=False)")
        if problems:
            raise ValueError("invalid Plan: " + "; ".join(problems))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] drawn from `generator` (CPU or CUDA)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator, device=generator.device).item())


def _positive(method: str, **values: int) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{method}: option {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Method:
    """Base policy: draws one Plan per sampled trajectory."""

    name = "method"

    def plan(self, num_steps: int, generator: torch.Generator) -> Plan:
        raise NotImplementedError

    def check_fits(self, num_steps: int) -> None:
        """Refuse a chain of `num_steps` steps that the method's plans cannot fit (e.g. K trained steps in fewer)."""
        for option, needed in self._steps_needed().items():
            if needed > num_steps:
                raise ValueError(f"{self.name}: {option}={needed} needs at least {needed} sampling steps, but the chain "
                                 f"has num_steps={num_steps}; lower {option} or raise sampling.num_steps")

    def _steps_needed(self) -> dict[str, int]:
        """Each option that counts steps, with the chain length it needs."""
        return {}

    @classmethod
    def options(cls) -> list[str]:
        """Names of the options this method accepts."""
        return [f.name for f in fields(cls)]


def _early_stop(num_steps: int, m: int, generator: torch.Generator) -> int:
    """A stop step drawn uniformly from the last m steps (all steps if the chain is shorter)."""
    return _randint(max(num_steps - m, 0), num_steps - 1, generator)


def spaced_steps(num_run: int, k: int, generator: torch.Generator) -> tuple[int, ...]:
    """k steps equally spaced over range(num_run) with a uniform random offset (all if num_run <= k)."""
    if num_run <= k:
        return tuple(range(num_run))
    stride = num_run // k
    offset = _randint(0, stride - 1, generator)
    return tuple(offset + stride * i for i in range(k))


def last_steps(num_run: int, k: int) -> tuple[int, ...]:
    """The last k steps of range(num_run) (all if num_run <= k)."""
    return tuple(range(max(num_run - k, 0), num_run))


SPACINGS = ("equal", "last")  # DRTune's trained steps: equally spaced (the paper) or the last K


@dataclass(frozen=True)
class DRTune(Method):
    """DRTune (Wu et al., ECCV 2024): stop-gradient on the denoiser input, K spaced trained steps, early stop.

    num_trained (K) = 5: the paper's default number of trained steps.
    early_stop_range (m) = 10: the stop step is uniform in the last m steps and x0 is predicted in one
    step there. Our choice, matching ReFL's range (its last 10 of 40 steps), since we could not confirm the
    paper's number here. The K trained steps are equally spaced over the steps that run (0..stop), with a
    random offset; if fewer than K steps run (a stop early in a short chain), all of them are trained. K larger than
    the whole chain (FLUX.1-schnell's 4 steps, say) is refused: no plan of the method could train K steps.
    Ablations (the paper's defaults are on): detach_input = False lets the gradient flow through the denoiser
    input of the trained steps (no stop-gradient); spacing = "last" trains the last K steps that run instead
    of K equally spaced ones. first_steps = n (ours, default off) spaces the K trained steps over the first n steps
    only, where a layout is decided: the chain still runs to the stop step, the later steps untrained.
    """

    num_trained: int = 5
    early_stop_range: int = 10
    detach_input: bool = True
    spacing: str = "equal"
    first_steps: int | None = None
    name = "drtune"

    def __post_init__(self) -> None:
        _positive(self.name, num_trained=self.num_trained, early_stop_range=self.early_stop_range,
                  first_steps=self.first_steps)
        if not isinstance(self.detach_input, bool):
            raise ValueError(f"drtune: option detach_input must be true or false, got {self.detach_input!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"drtune: option spacing must be one of {SPACINGS}, got {self.spacing!r}")

    def _steps_needed(self) -> dict[str, int]:
        return {"num_trained": self.num_trained}

    def plan(self, num_steps: int, generator: torch.Generator) -> Plan:
        self.check_fits(num_steps)
        stop = _early_stop(num_steps, self.early_stop_range, generator)
        if self.spacing == "equal":
            trained = spaced_steps(min(stop + 1, self.first_steps or stop + 1), self.num_trained, generator)
        else:
            trained = last_steps(stop + 1, self.num_trained)
        return Plan(num_steps, stop, True, trained, detach_input=self.detach_input, grad_from=trained[0])


@dataclass(frozen=True)
class ReFL(Method):
    """ReFL (Xu et al. 2023, ImageReward): sample without grad to a random late step, train that one step.

    early_stop_range = 10: the paper picks t in [30, 40) of 40 steps, i.e. uniformly in the last 10 steps;
    x0 is predicted in one step from there.
    """

    early_stop_range: int = 10
    name = "refl"

    def __post_init__(self) -> None:
        _positive(self.name, early_stop_range=self.early_stop_range)

    def plan(self, num_steps: int, generator: torch.Generator) -> Plan:
        stop = _early_stop(num_steps, self.early_stop_range, generator)
        return Plan(num_steps, stop, True, (stop,), detach_input=True, grad_from=stop)


@dataclass(frozen=True)
class DRaFT(Method):
    """DRaFT-K (Clark et al. 2023): full backprop through the last K steps of the whole chain.

    k = 1: the paper's recommended DRaFT-1 (it reports K=1 as the most efficient and stable).
    """

    k: int = 1
    name = "draft"

    def __post_init__(self) -> None:
        _positive(self.name, k=self.k)

    def _steps_needed(self) -> dict[str, int]:
        return {"k": self.k}

    def plan(self, num_steps: int, generator: torch.Generator) -> Plan:
        self.check_fits(num_steps)
        trained = tuple(range(num_steps - self.k, num_steps))
        return Plan(num_steps, num_steps - 1, False, trained, detach_input=False, grad_from=trained[0])


@dataclass(frozen=True)
class DRaFTLV(Method):
    """DRaFT-LV (Clark et al. 2023): re-noise the final latent n times and backprop through the last step.

    n = 2: our reading of the paper's setting (it uses a small n; n=2 keeps the cost at two extra
    UNet+VAE+reward passes). Each re-noised sample is decoded and scored; the loss averages them.
    """

    n: int = 2
    name = "draft-lv"

    def __post_init__(self) -> None:
        _positive(self.name, n=self.n)

    def plan(self, num_steps: int, generator: torch.Generator) -> Plan:
        last = num_steps - 1
        return Plan(num_steps, last, False, (last,), detach_input=False, grad_from=last, renoise=self.n)


@dataclass(frozen=True)
class AlignProp(Method):
    """AlignProp (Prabhudesai et al. 2023): backprop through a suffix of random length of the whole chain.

    The suffix length is drawn uniformly in [min_steps, max_steps] once per trajectory (randomized truncated
    backpropagation). min_steps = 1 (a suffix must train something); max_steps = None means the whole
    chain, as AlignProp's truncation range spans all 50 of its steps.
    """

    min_steps: int = 1
    max_steps: int | None = None
    name = "alignprop"

    def __post_init__(self) -> None:
        _positive(self.name, min_steps=self.min_steps, max_steps=self.max_steps)
        if self.max_steps is not None and self.max_steps < self.min_steps:
            raise ValueError(f"alignprop: max_steps ({self.max_steps}) must be >= min_steps ({self.min_steps})")

    def _steps_needed(self) -> dict[str, int]:
        return {"min_steps": self.min_steps}

    def plan(self, num_steps: int, generator: torch.Generator) -> Plan:
        self.check_fits(num_steps)
        high = num_steps if self.max_steps is None else min(self.max_steps, num_steps)
        length = _randint(self.min_steps, high, generator)
        trained = tuple(range(num_steps - length, num_steps))
        return Plan(num_steps, num_steps - 1, False, trained, detach_input=False, grad_from=trained[0])


METHODS: dict[str, type[Method]] = {m.name: m for m in (DRTune, ReFL, DRaFT, DRaFTLV, AlignProp)}


def get_method(name: str, **options) -> Method:
    """Build a method by name; unknown names and options raise ValueError listing what is accepted."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        raise ValueError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options: {cls.options()}")
    return cls(**options)


__all__ = ["Plan", "Method", "DRTune", "ReFL", "DRaFT", "DRaFTLV", "AlignProp", "METHODS", "get_method",
           "spaced_steps", "last_steps"]
