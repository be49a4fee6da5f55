"""benchmarks/whole_run.py on tiny pipelines on the CPU: two whole `tuner.run` processes read back (issue 23)."""
import json

from benchmarks import whole_run


def test_whole_run_smoke_times_two_runs_of_the_shipped_sdxl_config(tmp_path):
    common = ["--smoke", "--weights", str(tmp_path / "w"), "--cache", str(tmp_path / "c")]
    whole_run.main([*common, "--only", "sdxl", "--out", str(tmp_path / "out")])
    (result,) = (tmp_path / "out").glob("whole_run-*.json")
    runs = json.loads(result.read_text())["runs"]
    assert [(r["row"], r["run"], r["rc"], r["error"]) for r in runs] == [("sdxl", "first", 0, None),
                                                                       ("sdxl", "second", 0, None)]
    first, second = runs
    assert first["config"] == "tuner/configs/sdxl_hpsv2.1.yaml" and first["compile_cache"] == "empty"
    assert second["compile_cache"].startswith("the first run's")
    for r in runs:  # the shipped config's batch_size: auto, on the CPU: the smoke run's 2 prompts in one micro-batch
        assert r["auto"].startswith("train.batch_size=auto: micro-batch 2 x 1 accumulated = 2 prompts")
        assert (r["batch_size"], r["grad_accum"], r["steps"], len(r["step_times"])) == (2, 1, 2, 2)
        assert 0 < r["seconds_to_first_step"] < r["wall_s"] and r["s_per_image"] > 0
        assert r["peak_gib_steps"] is None and r["gpu"] is None  # CUDA only
        assert r["warm_up_lines"][0].startswith("warm-up") and "evaluation gallery" in "".join(r["warm_up_lines"])
    table = next((tmp_path / "out").glob("whole_run-*.md")).read_text()
    assert "| sdxl | first | cpu (smoke run" in table and "| 2 x 1 |" in table
    # a second run without a first run's cache on this machine is reported, not run
    whole_run.main([*common, "--cache", str(tmp_path / "fresh"), "--only", "flux", "--runs", "second",
                    "--out", str(tmp_path / "out2")])
    (missing,) = json.loads(next((tmp_path / "out2").glob("*.json")).read_text())["runs"]
    assert missing["rc"] is None and "run --runs first on this machine first" in missing["error"]


def test_a_run_stopped_by_the_budget_keeps_its_warm_up_lines(tmp_path, monkeypatch):
    """A run the budget ends still reports how far it got (the phases it entered, its last error lines)."""
    args = whole_run.parse_args(["--smoke", "--weights", str(tmp_path / "w"), "--cache", str(tmp_path / "c")])
    monkeypatch.setattr(whole_run, "ensure_pipeline", lambda name, a, left: (tmp_path / "model", 0.0))

    def stopped(command, **kwargs):
        raise whole_run.subprocess.TimeoutExpired(
            command, kwargs["timeout"], output=b"loading\nwarm-up 0.4 s: setup\nwarm-up 61.0 s: trial steps\n",
            stderr=b"compiling block 7 of 70\n")

    monkeypatch.setattr(whole_run.subprocess, "run", stopped)
    result = whole_run.run_once("sdxl", "first", args, tmp_path / "hps.pt", seconds_left=100)
    assert result["error"].startswith("stopped: the budget ended after")
    assert result["warm_up_lines"] == ["warm-up 0.4 s: setup", "warm-up 61.0 s: trial steps"]
    assert result["stderr_tail"] == "compiling block 7 of 70" and result["step_times"] == []
    table = whole_run.write(tmp_path / "out", whole_run.meta(args, 1.0), [result]).read_text()
    assert "(last: warm-up 61.0 s: trial steps) |" in table
