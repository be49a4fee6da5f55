"""What a user runs: memory in the logs, out-of-memory errors that end a run cleanly, train.batch_size=auto, and the
persistent compile cache (issue 23). Tiny SDXL runs on the CPU; CUDA-only figures are checked for their absence."""
import json

import pytest
import torch

from tests.tuner_fixtures import BASE
import tuner.train as T
from tuner import checkpoint as ckpt
from tuner import compile_cache, memory
from tuner.config import ConfigError, load_config, validate
from tuner.logging import read_metrics
from tuner.memory import OutOfMemory, choose_batch_size, divisors

FAST = ["model=tiny-sdxl", "sampling.num_steps=4", "method_options={num_trained: 2, early_stop_range: 2}",
        "log.progress=false", "prompts.num_eval=2", "log.tensorboard=false"]
# 4 steps, a checkpoint and an evaluation gallery every 2, two prompts a micro-batch
RUN = ["train.steps=4", "train.batch_size=2", "checkpoint.every=2", "checkpoint.keep=5", "log.eval_every=2",
       "train.ema_decay=0.8"]

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(folder, name, *overrides):
    return validate(load_config(BASE, [f"output_dir={folder}", f"name={name}", *FAST, *overrides]))


class Brightness(torch.nn.Module):
    """A small differentiable reward; its `oom_at`-th training call runs out of memory (evaluation runs without grad)."""

    def __init__(self, oom_at=None):
        super().__init__()
        self.calls, self.oom_at = 0, oom_at

    def forward(self, images, prompts):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.oom_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return -(images - 0.7).pow(2).mean(dim=(1, 2, 3))


def weights(run_dir, name="trainable.safetensors"):
    return ckpt.read_tensors(ckpt.latest(run_dir / "checkpoints"), name)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run the cut-and-resumed ones must reach, and its summary."""
    folder, threads = tmp_path_factory.mktemp("whole"), torch.get_num_threads()
    torch.set_num_threads(1)  # as the function-scoped single_thread fixture does for the runs compared with this one
    torch.manual_seed(0)
    try:
        summary = T.train(tiny(folder, "whole", *RUN), reward_fn=Brightness())
    finally:
        torch.set_num_threads(threads)
    return folder / "whole", summary


def test_memory_fields_are_absent_on_the_cpu_and_the_warm_up_is_timed(whole):
    run, summary = whole
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "reward" in r]
    assert len(rows) == 4 and not any("peak_gib" in r for r in rows)  # CUDA only
    assert summary["gpu"] is summary["peak_gib_steps"] is summary["peak_gib_session"] is None
    assert (summary["batch_size"], summary["grad_accum"], summary["prompts_per_step"]) == (2, 1, 2)
    # process start (this pytest process, minutes ago at most) to the end of the first step, loading included
    assert summary["seconds_to_first_step"] > summary["seconds_this_session"] / 4 > 0
    # where that time went: the phases in the order they began, ending with the first step's own
    phases = [(p["phase"], p["step"]) for p in summary["warm_up_phases"]]
    assert phases[0] == (memory.SETUP, 0) and phases[-2:] == [(T.PHASE_BACKWARD, 1), (T.PHASE_OPTIMIZER, 1)]
    assert (T.PHASE_EVAL, 0) in phases  # the gallery before tuning
    times = [p["from_start_s"] for p in summary["warm_up_phases"]]
    assert times == sorted(times) and times[-1] <= summary["seconds_to_first_step"]


def _optimizer_oom(monkeypatch, at):
    real, calls = T.optimizer_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "optimizer_step", step)


def _failing_nth(monkeypatch, module, name, at):
    real, calls = getattr(module, name), []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, call)


# (phase named in the message, step it fails at, how to make it fail); the checkpoint of step 2 must survive
PHASES = {
    "sampling, reward and backward": (3, lambda mp: None),  # the reward's 3rd training call (below)
    "optimizer step": (3, lambda mp: _optimizer_oom(mp, 3)),
    "evaluation gallery": (4, lambda mp: _failing_nth(mp, T, "evaluate", 3)),  # before, step 2, step 4
    "checkpoint": (4, lambda mp: _failing_nth(mp, T.lora, "trainable_state", 2)),  # mid-save of step 4
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_out_of_memory_in_each_phase_ends_cleanly_and_resumes_to_the_same_weights(tmp_path, monkeypatch, whole,
                                                                                   phase):
    step, inject = PHASES[phase]
    with monkeypatch.context() as mp:
        inject(mp)
        reward = Brightness(oom_at=3 if phase.startswith("sampling") else None)
        with pytest.raises(OutOfMemory) as caught:
            T.train(tiny(tmp_path, "cut", *RUN), reward_fn=reward)
    message = str(caught.value)
    assert isinstance(caught.value, torch.OutOfMemoryError)  # code that catches torch's error still catches it
    assert f"at step {step} ({phase})" in message and "(simulated)" in message
    kept = tmp_path / "cut" / "checkpoints" / "step-00000002"
    assert f"{kept}, is intact" in message and "--resume latest" in message
    for fix in ("train.memory=low", "train.batch_size=1 train.grad_accum=2", "train.gradient_checkpointing=true"):
        assert fix in message
    assert ckpt.latest(tmp_path / "cut" / "checkpoints") == kept
    if phase == "checkpoint":  # the half-written folder is there, and ignored
        assert (tmp_path / "cut" / "checkpoints" / ".tmp-step-00000004").is_dir()
    assert same(ckpt.read_tensors(kept, "trainable.safetensors"),
                ckpt.read_tensors(whole[0] / "checkpoints" / "step-00000002", "trainable.safetensors"))
    summary = T.train(tiny(tmp_path, "cut", *RUN, "resume=latest"), reward_fn=Brightness())
    assert summary["resumed_from_step"] == 2
    for name in ("trainable.safetensors", "ema.safetensors"):
        assert same(weights(tmp_path / "cut", name), weights(whole[0], name)), name
    assert not list((tmp_path / "cut" / "checkpoints").glob(".tmp-*"))


def test_the_command_line_prints_the_out_of_memory_message(tmp_path, monkeypatch, capsys):
    from tuner.run import main

    _optimizer_oom(monkeypatch, 1)
    args = ["--config", str(BASE), f"output_dir={tmp_path}", "name=cli", *FAST, "train.steps=2", "log.eval_every=100"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of CPU memory at step 1 (optimizer step).")
    assert "No checkpoint was written yet" in err and "Traceback" not in err


def test_oom_message_on_cuda_names_the_peak_and_the_device(monkeypatch):
    cfg = validate(load_config(BASE, ["train.batch_size=4", "train.grad_accum=2", "train.compile=true"]))
    monkeypatch.setattr(memory, "device_bytes", lambda device: 80 * 2**30)
    monkeypatch.setattr(memory, "peak_bytes", lambda device: int(61.5 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    text = memory.oom_message(cfg, torch.device("cuda", 0), 7, "optimizer step", None, RuntimeError("boom"))
    assert text.startswith("out of CUDA memory at step 7 (optimizer step).")
    assert "61.50 GiB of the 80.00 GiB this process may use on NVIDIA H100 80GB HBM3" in text
    assert "train.batch_size=2 train.grad_accum=4" in text  # the same 8 prompts a step
    assert "needs train.compile=false" in text
    fixed = validate(load_config(BASE, ["train.batch_size=3", "train.prompts_per_step=6"]))
    fixed = T.fixed_layout(fixed, world=1)  # 3 x 2: the next micro-batch that splits 6 prompts is 2
    assert "train.batch_size=2 (or auto; the accumulation grows so each step keeps its 6 prompts)" in \
        memory.oom_message(fixed, torch.device("cuda", 0), 1, "checkpoint", None, RuntimeError("boom"))


# ---------------------------------------------------------------- train.batch_size: auto


def test_device_bytes_reads_a_cap_for_the_bare_cuda_device(monkeypatch):
    """torch.cuda.get_per_process_memory_fraction takes an index and refuses torch.device("cuda") (seen on the GPU
    machine: the OOM message itself failed under a cap); device_bytes must pass the current index."""
    def fraction(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        assert device == 3
        return 0.25

    class Properties:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", fraction)
    assert memory.device_bytes(torch.device("cuda")) == 20 * 2**30
    assert memory.device_bytes(torch.device("cuda", 3)) == 20 * 2**30


def test_choose_batch_size_takes_the_largest_divisor_that_fits():
    """A device whose trial peaks are 10 GiB resident + 1 GiB of state + 9.5 GiB a prompt, with 80 GiB to use."""
    def probe(b):
        peak = (11 + 9.5 * b) * 2**30
        return None if peak > 80 * 2**30 else int(peak)

    budget = int(0.92 * 80 * 2**30)
    size, trials = choose_batch_size(divisors(16), probe, budget, resident=10 * 2**30)
    assert divisors(16) == [1, 2, 4, 8, 16] and size == 4 and [b for b, _ in trials] == [1, 4]
    size, trials = choose_batch_size(divisors(6), probe, budget, resident=10 * 2**30)
    assert size == 6 and [b for b, _ in trials] == [1, 6]  # 68 GiB <= 73.6
    # a peak that grows faster than linearly: the predicted size fails and the next smaller one is tried
    size, trials = choose_batch_size([1, 2, 3, 6], lambda b: None if b > 2 else b * b * 2**30, 8 * 2**30, 0)
    assert size == 2 and trials == [(1, 2**30), (6, None), (3, None), (2, 4 * 2**30)]
    assert choose_batch_size([1, 2], lambda b: None, 100, 0) == (1, [(1, None)])


def _mock_probe(monkeypatch, record):
    """fit_probe runs the real trial step (which must leave no trace) but reports peaks of 1000 + 100 b bytes of a
    1250-byte budget, so b = 2 is the largest that fits."""
    def fake(parts, denoiser, step, generators, per_process):
        def probe(b):
            record.append(b)
            T.trial_peak(parts, denoiser, b, step, generators, per_process)
            return 1000 + 100 * b
        return probe, 1250, 1000

    monkeypatch.setattr(T, "fit_probe", fake)


def test_auto_batch_trains_what_the_fixed_batch_with_accumulation_trains(tmp_path, monkeypatch, capsys):
    common = ["train.steps=2", "log.eval_every=100", "checkpoint.every=100", "train.ema_decay=0.5"]
    fixed = T.train(tiny(tmp_path, "fixed", *common, "train.batch_size=2", "train.grad_accum=2"), reward_fn=Brightness())
    record = []
    _mock_probe(monkeypatch, record)
    auto = T.train(tiny(tmp_path, "auto", *common, "train.batch_size=auto", "train.prompts_per_step=4"),
                   reward_fn=Brightness())
    assert record == [1, 2]  # the smallest, then the largest predicted to fit (4 is predicted not to)
    line = capsys.readouterr().out
    assert "train.batch_size=auto: micro-batch 2 x 2 accumulated = 4 prompts a step" in line
    assert (auto["batch_size"], auto["grad_accum"], auto["prompts_per_step"]) == (2, 2, 4)
    assert (fixed["batch_size"], fixed["grad_accum"], fixed["prompts_per_step"]) == (2, 2, 4)
    for name in ("trainable.safetensors", "ema.safetensors"):
        assert same(weights(tmp_path / "auto", name), weights(tmp_path / "fixed", name)), name
    written = load_config(tmp_path / "auto" / "config.yaml")
    assert (written.train.batch_size, written.train.grad_accum, written.train.prompts_per_step) == (2, 1, 4)
    # resuming reuses the checkpoint's micro-batch without new trials
    record.clear()
    again = T.train(tiny(tmp_path, "auto", *common, "train.steps=3", "train.batch_size=auto", "train.prompts_per_step=4",
                         "resume=latest"), reward_fn=Brightness())
    assert record == [] and again["batch_size"] == 2 and "as the checkpoint resumed from used" in capsys.readouterr().out


def test_auto_batch_remembers_its_choice_for_the_same_configuration_on_the_same_card(tmp_path, monkeypatch, capsys):
    """A second run of a configuration skips the trial steps (warm-up); a change that can move memory runs them."""
    monkeypatch.setenv(memory.MEMO_ENV, str(tmp_path / "memo.json"))
    record = []
    _mock_probe(monkeypatch, record)
    common = ["log.eval_every=100", "checkpoint.every=100", "train.batch_size=auto", "train.prompts_per_step=4"]
    T.train(tiny(tmp_path, "first", "train.steps=1", *common), reward_fn=Brightness())
    assert record == [1, 2] and "trial steps 1 ->" in capsys.readouterr().out
    record.clear()  # another run of it, longer and with another learning rate: the same memory
    again = T.train(tiny(tmp_path, "second", "train.steps=2", "train.lr=3e-4", *common), reward_fn=Brightness())
    out = capsys.readouterr().out
    assert record == [] and again["batch_size"] == 2 and "trial steps skipped" in out and "memo.json" in out
    T.train(tiny(tmp_path, "third", "train.steps=1", "lora.rank=2", *common), reward_fn=Brightness())
    assert record == [1, 2]  # a LoRA of another rank: tried again
    monkeypatch.setenv(memory.MEMO_ENV, "")  # off
    assert memory.memo_path() is None and memory.remembered("any") is None


def test_auto_batch_stops_before_the_first_step_when_nothing_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "fit_probe", lambda *args: (lambda b: None, 1250, 1000))
    with pytest.raises(OutOfMemory, match=r"before the first step \(trial steps of train.batch_size=auto\)"
                                          r"(.|\n)*micro-batch 1 ran out of memory(.|\n)*train.memory=low"):
        T.train(tiny(tmp_path, "none", "train.steps=1", "train.batch_size=auto", "train.prompts_per_step=2"),
                reward_fn=Brightness())
    assert not (tmp_path / "none" / "gallery").exists()  # stopped before the base model's gallery


def test_auto_batch_off_cuda_takes_the_whole_step_in_one_micro_batch(tmp_path):
    summary = T.train(tiny(tmp_path, "cpu", "train.steps=1", "log.eval_every=100", "train.batch_size=auto",
                           "train.prompts_per_step=2"), reward_fn=Brightness())
    assert (summary["batch_size"], summary["grad_accum"]) == (2, 1)


@pytest.mark.parametrize("overrides, pattern", [
    (["train.batch_size=auto"], "needs them: set train.prompts_per_step"),
    (["train.batch_size=big"], "'train.batch_size': 'big' is not known"),
    (["train.batch_size=0"], "'train.batch_size': must be > 0"),
    (["train.prompts_per_step=4", "train.grad_accum=2"], "give one of them"),
    (["train.prompts_per_step=6", "train.batch_size=4"], "do not split into micro-batches"),
])
def test_batch_options_are_refused_before_any_model_loads(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(load_config(BASE, overrides))


def test_prompts_per_step_sets_the_accumulation():
    cfg = validate(load_config(BASE, ["train.prompts_per_step=8", "train.batch_size=2"]))
    assert T.fixed_layout(cfg, world=2).train.grad_accum == 2  # 8 prompts = 2 processes x 2 x 2
    with pytest.raises(ConfigError, match="does not split over the 3 processes"):
        T.fixed_layout(cfg, world=3)


# ---------------------------------------------------------------- compile cache


def test_compile_cache_folder_is_keyed_and_set_only_inside_the_run(tmp_path, monkeypatch):
    from tests.tuner_fixtures import tiny_adapter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    sdxl, sd15 = tiny_adapter("sdxl", dtype=torch.float32), tiny_adapter("sd15", dtype=torch.float32)
    folder = compile_cache.resolve("auto", sdxl, torch.device("cpu"))
    assert folder.parent == tmp_path / "cache" / "drtune-rewards" / "compile"
    assert folder.name.startswith(f"torch-{torch.__version__.replace('+', '-')}-cpu-sdxl-")
    assert compile_cache.resolve("auto", sdxl, torch.device("cpu")) == folder  # stable
    assert compile_cache.resolve("auto", sd15, torch.device("cpu")) != folder
    assert compile_cache.resolve(str(tmp_path / "mine"), sdxl, torch.device("cpu")).parent == tmp_path / "mine"
    assert compile_cache.resolve(None, sdxl, torch.device("cpu")) is None
    import torch._inductor.config as inductor

    with compile_cache.persistent(folder):
        import os

        assert os.environ[compile_cache.ENV] == str(folder) and folder.is_dir() and inductor.fx_graph_cache
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        assert cache_dir() == str(folder)  # where inductor and Triton write
    assert compile_cache.ENV not in os.environ


def test_summary_json_holds_the_memory_fields(whole):
    run, _ = whole
    summary = json.loads((run / "summary.json").read_text())
    assert {"peak_gib_steps", "peak_gib_session", "gpu", "gpu_memory_gib", "seconds_to_first_step",
            "batch_size", "grad_accum", "prompts_per_step"} <= set(summary)
