"""The reward-gradient benchmark's smoke mode, end to end: one command, tiny models on the CPU, JSON + table + plot.

It checks the suite itself (the files it writes, ours and imscore's models on the same weights, timing, FLOP
counts, the report), so a full GPU run has nothing left to find; the numbers it measures mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_REWARDS = {"hpsv2.1", "pickscore", "imagereward", "aesthetic", "clip", "mps", "vqascore"}
EAGER_ONLY = {"vqascore"}  # no fast or compiled variants


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("imscore")
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.reward_gradients", "--smoke", "--out", str(out), "--weights",
           str(out / "weights")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"smoke run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    reports = [p for p in out.glob("reward_gradients-*.json") if not p.name.endswith(".pytest-benchmark.json")]
    assert len(reports) == 1, sorted(p.name for p in out.iterdir())
    return {"data": json.loads(reports[0].read_text()), "out": out, "stem": reports[0].stem}


def test_every_reward_and_implementation_is_measured(run):
    rows = run["data"]["rows"]
    seen = {(r["reward"], r["impl"], r["variant"], r["dtype"]) for r in rows}
    for dtype in ("bf16", "fp32"):
        for reward in MODEL_REWARDS | {"symmetry", "sharpness"}:
            assert (reward, "ours", "eager", dtype) in seen
        for reward in MODEL_REWARDS - {"clip"}:
            assert (reward, "imscore", "eager", dtype) in seen
        for reward in MODEL_REWARDS:
            assert (reward, "ours", "preprocess", "bf16") in seen
            assert reward in EAGER_ONLY or (reward, "ours", "compile", "bf16") in seen
        assert ("hpsv3", "ours", "eager", dtype) in seen  # its peer runs apart: benchmarks.hpsv3_official
    assert {"fast", "tf32", "compile-tf32", "channels-last"} <= {r["variant"] for r in rows}


def test_figures_are_positive_and_flops_counted(run):
    data = run["data"]
    assert data["matmul_peak_tflops"] > 0
    for row in data["rows"]:
        assert row["images_per_s"] > 0 and row["ms_per_image"] > 0, row
        if row["reward"] in MODEL_REWARDS and row["variant"] != "preprocess":
            assert row["gflop_per_image"] > 0.01 and 0 < row["peak_share"], row


def test_imscore_scores_our_weights(run):
    """Same weights, near-identical preprocessing: imscore's scores sit next to ours (a wrong load would not)."""
    for row in run["data"]["rows"]:
        if row["impl"] == "imscore" and row["reward"] != "vqascore":  # imscore's VQAScore is one number per batch
            # MPS: imscore keeps prompt tokens at 0.01 of the batch's best condition match, the eval script (ours) at
            # 0.3 of each image's own (tests/test_mps.py measures both)
            limit = 0.05 if row["dtype"] == "bf16" or row["reward"] == "mps" else 0.01
            assert row["score_rel_diff_vs_ours_eager"] < limit, row


def test_fast_and_compile_keep_our_scores(run):
    for row in run["data"]["rows"]:
        if row["impl"] == "ours" and row["variant"] in ("fast", "compile", "tf32") and row["dtype"] == "fp32":
            assert row["score_rel_diff_vs_ours_eager"] < 1e-3, row


def test_report_table_plot_and_raw_results(run):
    out, stem = run["out"], run["stem"]
    table = (out / f"{stem}.md").read_text()
    assert "random weights" in table and "| hpsv2.1 | bf16 | 2 | imscore | eager |" in table
    assert "Where the time goes" in table  # the profiled case
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((out / f"{stem}.pytest-benchmark.json").read_text())
    assert len(raw["benchmarks"]) == len(run["data"]["rows"]) + 1  # + the matmul peak
    meta = run["data"]["meta"]
    assert meta["torch"] and meta["transformers"] and meta["open_clip"] and "--smoke" in meta["command"]


def _record(impl: str, variant: str, median: float, peak_gib: float, flops: float = 32 * 685e9) -> dict:
    info = {"kind": "reward", "reward": "hpsv2.1", "impl": impl, "variant": variant, "dtype": "bf16", "batch": 32,
            "size": 1024, "flops": flops, "peak_bytes": peak_gib * 2**30, "base_bytes": 2**30,
            "component": "preprocess" if variant == "preprocess" else None}
    return {"stats": {"median": median, "min": median, "rounds": 3}, "extra_info": info}


def test_targets_compare_our_best_variant_with_imscore():
    from benchmarks.reward_gradients import goals, rows_from

    matmul = {"stats": {"median": 1.0, "min": 1.0, "rounds": 3},
              "extra_info": {"kind": "matmul", "flops": 800e12, "n": 8192}}
    records = [matmul, _record("ours", "eager", 0.087, 20.0), _record("ours", "compile", 0.045, 18.0),
               _record("ours", "preprocess", 0.001, 5.0, flops=0), _record("imscore", "eager", 0.094, 19.0)]
    rows, peak = rows_from(records)
    assert peak == pytest.approx(800.0)
    compiled = next(r for r in rows if r["variant"] == "compile")
    assert compiled["ms_per_image"] == pytest.approx(45 / 32) and compiled["tflops"] == pytest.approx(487.1, rel=1e-3)
    assert compiled["speedup_vs_imscore"] == pytest.approx(0.094 / 0.045)
    assert next(r for r in rows if r["variant"] == "preprocess")["speedup_vs_imscore"] is None  # a component
    (target,) = goals(rows, peak)
    assert target["best_variant"] == "compile" and target["meets_2x_no_more_memory"] is True
    assert target["meets_58pct_peak"] is True  # 487 of 800 TFLOP/s
    slower = [r for r in records if r["extra_info"].get("variant") != "compile"]
    (target,) = goals(*rows_from(slower))
    assert target["best_variant"] == "eager" and target["meets_2x_no_more_memory"] is False
    assert target["meets_58pct_peak"] is False


def test_a_variant_further_from_float32_than_eager_does_not_count():
    from benchmarks.reward_gradients import ROUNDING_TOLERANCE, goals, rows_from

    def rec(variant: str, median: float, vs_fp32: float) -> dict:
        record = _record("ours", variant, median, 10.0)
        record["extra_info"]["score_rel_diff_vs_fp32"] = vs_fp32
        return record

    records = [rec("eager", 0.09, 0.2), rec("fast", 0.06, 0.2 * ROUNDING_TOLERANCE),
               rec("compile", 0.04, 0.2 * ROUNDING_TOLERANCE * 1.01)]
    rows, peak = rows_from(records)
    assert {r["variant"]: r["counts"] for r in rows} == {"eager": True, "fast": True, "compile": False}
    (target,) = goals(rows, peak)
    assert target["best_variant"] == "fast"  # the faster compiled variant rounds too far from float32


def test_bf16_rows_carry_their_distance_to_float32(run):
    rows = [r for r in run["data"]["rows"] if r["impl"] == "ours" and r["dtype"] == "bf16" and not r["component"]]
    measured = [r for r in rows if r["reward"] not in ("hpsv3", "vqascore", "symmetry", "sharpness")]
    assert measured and all(r["score_rel_diff_vs_fp32"] is not None for r in measured)
    assert all(0 < r["score_rel_diff_vs_fp32"] < 0.1 for r in measured)  # bf16 rounding of tiny models: small, not 0
    assert all(r["score_rel_diff_vs_fp32"] is None for r in run["data"]["rows"] if r["dtype"] == "fp32")


def test_an_out_of_memory_case_frees_its_tensors_before_the_next_case():
    """HPSv3 at batch 32 once left every later case out of memory: the failed case's traceback kept its tensors."""
    import gc
    import weakref

    import torch

    from benchmarks.gradient_suite import out_of_memory

    alive = []

    def case() -> None:
        activations = torch.ones(1024)
        alive.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    def release() -> None:
        gc.collect()
        alive.append(alive[0]() is None)

    assert out_of_memory(case, release) == "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"
    assert alive[1] is True, "the case's tensors were still referenced when the device memory was released"
    assert out_of_memory(lambda: None, release) is None and len(alive) == 2
    with pytest.raises(ValueError):
        out_of_memory(lambda: (_ for _ in ()).throw(ValueError("not a memory error")), release)


def test_flops_are_counted_with_grouped_key_value_heads_repeated(monkeypatch):
    """HPSv3's decoder (Qwen2) groups key/value heads; torch's SDPA FLOP formula rejects unequal head counts on the
    GPU, so the count runs with the heads repeated: same output, every SDPA call with equal head counts."""
    import torch
    from transformers.integrations import sdpa_attention

    from benchmarks.gradient_suite import _gqa_repeated

    heads_seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        heads_seen.append((q.shape[1], k.shape[1]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    layer = torch.nn.Module()
    layer.num_key_value_groups, layer.is_causal = 4, False
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 1, 6, 8, generator=g), torch.randn(2, 1, 6, 8, generator=g)
    grouped, _ = sdpa_attention.sdpa_attention_forward(layer, q, k, v, None)
    with _gqa_repeated():
        repeated, _ = sdpa_attention.sdpa_attention_forward(layer, q, k, v, None)
    assert heads_seen == [(4, 1), (4, 4)]
    torch.testing.assert_close(repeated, grouped)
