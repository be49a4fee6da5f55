"""The multi-GPU scaling benchmark: its smoke mode on two CPU processes (torchrun, gloo), its all-reduce accounting
on GPU-like profiler events, and its scaling report."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import multi_gpu as mg

ROOT = Path(__file__).resolve().parents[1]


def _launch_smoke(out: Path) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "benchmarks.multi_gpu", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "multi_gpu-n2-smoke.json").read_text())


def test_smoke_two_processes(tmp_path):
    record = _launch_smoke(tmp_path)
    meta, summary, ranks = record["meta"], record["summary"], record["ranks"]
    assert meta["processes"] == 2 and meta["backend"] == "gloo" and meta["smoke"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert "random weights" in meta["weights"] and "torch.distributed.run" in meta["command"]
    # the ranks trained on different samples, and still hold the same weights, which did change
    assert ranks[0]["timed"][0]["rewards"] != ranks[1]["timed"][0]["rewards"]
    assert summary["weights_bitwise_equal"] is True
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert summary["weights_changed"] is True and summary["skipped_steps"] == 0
    assert all(p["allreduce_s"] > 0 and p["allreduce_calls"] >= 2 for r in ranks for p in r["profiled"])
    assert summary["allreduce_s_per_step"] > 0 and 0 < summary["allreduce_share_of_step"] < 1
    assert summary["images_per_s"] > 0 and summary["s_per_step"] > 0
    assert summary["images_per_s"] == pytest.approx(2 * summary["images_per_s_per_gpu"])
    assert "random weights" in (tmp_path / "multi_gpu-n2-smoke.md").read_text()


def _event(name: str, start: float, end: float, device=torch.autograd.DeviceType.CUDA):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_allreduce_stats_counts_nccl_allreduce_kernels_and_their_unhidden_part():
    events = [
        _event("ampere_bf16_gemm", 0, 10), _event("elementwise_kernel", 20, 30),
        _event("ncclDevKernel_AllReduce_Sum_f32_RING_LL(x)", 5, 25),  # 10 us of it beside no compute kernel
        _event("ncclKernel_AllReduce_RING_LL_Sum_double", 40, 42),  # alone
        _event("ncclDevKernel_Broadcast_RING_LL(x)", 50, 60),  # not an all-reduce
        _event("nccl:all_reduce", 0, 100, torch.autograd.DeviceType.CPU),  # host side: not counted on GPU
    ]
    stats = mg.allreduce_stats(events, on_gpu=True)
    assert stats["allreduce_calls"] == 2
    assert stats["allreduce_s"] == pytest.approx(22e-6)
    assert stats["allreduce_alone_s"] == pytest.approx(12e-6)
    assert set(stats["nccl_kernels"]) == {e.name for e in events[2:5]}
    assert mg.allreduce_stats(events[5:], on_gpu=True)["allreduce_s"] is None  # no kernel recorded: unknown, not 0
    cpu = mg.allreduce_stats([_event("gloo:all_reduce", 1, 4, torch.autograd.DeviceType.CPU)], on_gpu=False)
    assert cpu["allreduce_calls"] == 1 and cpu["allreduce_s"] == pytest.approx(3e-6)


def _run(n: int, per_gpu: float, batch: int = 1) -> dict:
    meta = {"weights": mg.WEIGHTS, "per_gpu_batch": batch, "grad_accum": 1, "method": "drtune K=5",
            "reward": "sharpness", "resolution": 1024, "sampling_steps": 50, "guidance": 7.5, "lora_rank": 64,
            "precision": "bf16", "processes": n, "smoke": False,
            "command": f"accelerate launch --num_processes {n} -m benchmarks.multi_gpu"}
    summary = {"images_per_s": n * per_gpu, "images_per_s_per_gpu": per_gpu, "s_per_step": batch / per_gpu,
               "allreduce_s_per_step": 0.01 if n > 1 else 0.0, "allreduce_alone_s_per_step": 0.001,
               "allreduce_share_of_step": 0.001, "peak_gib_max": 30.0, "weights_bitwise_equal": True}
    return {"meta": meta, "summary": summary, "ranks": [{"device": "NVIDIA H200"}] * n}


def test_scaling_report_efficiency_and_verdict(tmp_path):
    for n, per_gpu in ((1, 0.10), (2, 0.095), (4, 0.085)):
        (tmp_path / f"multi_gpu-n{n}.json").write_text(json.dumps(_run(n, per_gpu)))
    report = mg.scaling_report([tmp_path], tmp_path / "report")
    assert [r["gpus"] for r in report["rows"]] == [1, 2, 4]
    assert [r["efficiency"] for r in report["rows"]] == pytest.approx([1.0, 0.95, 0.85])
    assert report["verdict"].startswith("goal not met") and "N = 4" in report["verdict"]
    assert "85.0%" in (tmp_path / "report" / "scaling.md").read_text()

    (tmp_path / "multi_gpu-n4.json").write_text(json.dumps(_run(4, 0.092)))
    assert mg.scaling_report([tmp_path], tmp_path / "report")["verdict"].startswith("goal met")
    (tmp_path / "multi_gpu-n4.json").write_text(json.dumps(_run(4, 0.2, batch=2)))
    assert "per_gpu_batch" in mg.scaling_report([tmp_path], tmp_path / "report")["verdict"]


def test_uncovered_intervals():
    assert mg.uncovered([(0, 10)], []) == 10
    assert mg.uncovered([(0, 10), (5, 12)], [(2, 3), (8, 20)]) == pytest.approx(7)
    assert mg.uncovered([(0, 1), (4, 6)], [(0, 5)]) == pytest.approx(1)
