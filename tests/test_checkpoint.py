"""Checkpoints are atomic, pruned, weights-only, and restore every RNG."""
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from tuner import checkpoint as ckpt


class Payload:
    """Stands for any pickled object that is not plain data."""


def _save(root, step, value, keep=3, fail_after_weights=False):
    tmp = ckpt.begin(root, step)
    ckpt.write_tensors(tmp, "trainable.safetensors", {"w": torch.full((4,), float(value))})
    if fail_after_weights:
        raise OSError("disk full (simulated) half-way through a save")
    ckpt.write_state(tmp, "optimizer.pt", {"state": {0: {"step": torch.tensor(float(step))}}, "lr": 0.1})
    return ckpt.commit(tmp, {"step": step}, keep)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    _save(tmp_path, 1, 1.0)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2, 2.0, fail_after_weights=True)
    last = ckpt.latest(tmp_path)
    assert last.name == "step-00000001" and ckpt.read_meta(last) == {"step": 1}
    assert torch.equal(ckpt.read_tensors(last, "trainable.safetensors")["w"], torch.ones(4))
    assert not (tmp_path / "step-00000002").exists()
    _save(tmp_path, 2, 2.0)  # the next save replaces the leftover temporary folder
    assert ckpt.latest(tmp_path).name == "step-00000002"
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_killed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint."""
    script = textwrap.dedent(f"""
        import sys, torch
        from tuner import checkpoint as ckpt
        root = {str(tmp_path)!r}
        tmp = ckpt.begin(root, 1); ckpt.write_tensors(tmp, "w.safetensors", {{"w": torch.ones(8)}}); ckpt.commit(tmp, {{"step": 1}}, 3)
        tmp = ckpt.begin(root, 2)
        print("saving", flush=True)
        for i in range(10**6):  # keeps writing until killed
            ckpt.write_tensors(tmp, f"part{{i % 50}}.safetensors", {{"w": torch.zeros(1 << 18)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 120
        while len(list((tmp_path / ".tmp-step-00000002").glob("part*"))) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the writer stopped before it was killed"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert torch.equal(ckpt.read_tensors(ckpt.latest(tmp_path), "w.safetensors")["w"], torch.ones(8))


def test_keep_last_n_and_resave_same_step(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    _save(tmp_path, 5, 50.0, keep=2)
    assert ckpt.read_tensors(ckpt.latest(tmp_path), "trainable.safetensors")["w"][0] == 50.0
    assert ckpt.latest(tmp_path / "missing") is None


def test_states_load_weights_only(tmp_path):
    _save(tmp_path, 3, 3.0)
    state = ckpt.read_state(ckpt.latest(tmp_path), "optimizer.pt")
    assert state["state"][0]["step"].item() == 3.0 and state["lr"] == 0.1
    torch.save({"x": Payload()}, tmp_path / "evil.pt")  # an arbitrary object (could run code when unpickled)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        ckpt.read_state(tmp_path, "evil.pt")


def test_rng_states_round_trip_through_a_file(tmp_path):
    gen = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.write_state(tmp_path, "rng.pt", ckpt.rng_state({"train": gen}))

    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist()

    first = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    assert draw() != first
    ckpt.set_rng_state(ckpt.read_state(tmp_path, "rng.pt"), {"train": gen})
    assert draw() == first
