"""benchmarks.flowbp_compare against FlowBP's own code: the gradient check and the timed harness on a tiny SD3.

FlowBP is never committed; these tests run only where its source sits in .flowbp/ (docs/benchmarks.md, FlowBP side by
side, says how to put it there) and are skipped elsewhere (CI); the missing-source message is checked everywhere.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / ".flowbp"


@pytest.mark.usefixtures("single_thread")
@pytest.mark.skipif(not (SOURCE / "flowbp").is_dir(), reason="FlowBP's source is not in .flowbp/")
def test_flowbp_rollout_gradient_matches_the_engine_and_the_harness_runs(tmp_path):
    from benchmarks.flowbp_compare import main

    result = main(["--flowbp", str(SOURCE), "--smoke", "--iters", "1", "--flops", "--batch", "1", "--out",
                   str(tmp_path)])
    check = result["gradient_check"]
    # FlowBP rounds latents and timesteps to bf16 at every step: agreement to bf16 rounding (a few percent), far
    # closer than the engine's gradient for other trained steps of the same chain
    assert check["relative_error"] < 0.08 and check["control_relative_error"] > 3 * check["relative_error"]
    assert check["cosine"] > check["control_cosine"]
    # with FlowBP's bf16 rounding imposed on our adapter, its gradient and the engine's are the same
    assert check["relative_error_with_flowbp_rounding"] < 1e-6
    rows = result["rows"]
    assert set(rows) == {"ours (engine), checkpointing on", "ours (engine), checkpointing off",
                         "FlowBP (its DRTune step)"}
    assert rows["FlowBP (its DRTune step)"]["same_plans_as_ours"]
    assert all(r["images_per_s"] > 0 and r["tflop_per_step"] > 0 and r["batch"] == 1 for r in rows.values())
    assert (tmp_path / "flowbp_compare.md").read_text().count("| ours (engine)") == 2


def test_missing_source_says_where_to_get_it(tmp_path):
    from benchmarks.flowbp_compare import FLOWBP_COMMIT, FlowBPMissing, load_flowbp

    with pytest.raises(FlowBPMissing, match=FLOWBP_COMMIT[:12]):
        load_flowbp(tmp_path)
