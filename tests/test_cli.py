"""The `python -m rewards score` CLI on photographs written by the test, with the weight-free rewards."""

from __future__ import annotations

import csv
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from rewards import cli
from rewards.lowlevel import sharpness_score


def symmetry_oracle(path: Path) -> float:
    """1 - mean |x - mirror(x)| straight from the decoded file, in numpy."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return float(1.0 - np.abs(x - x[:, ::-1]).mean())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Photos of several sizes (two of equal size), a subfolder, a garbage file, a truncated PNG and a text file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    Image.fromarray(data.astronaut()).resize((200, 200)).save(root / "astronaut.png")
    Image.fromarray(data.coffee()).resize((150, 100)).save(root / "coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()).resize((120, 90)).save(root / "sub" / "chelsea.png")
    Image.fromarray(data.rocket()).resize((200, 200)).save(root / "sub" / "rocket.png")
    Image.fromarray(np.stack([data.camera()] * 3, -1)).resize((64, 160)).save(root / "camera.bmp")
    (root / "broken.png").write_bytes(b"this is not an image")
    whole = io.BytesIO()
    Image.fromarray(data.astronaut()).save(whole, format="PNG")
    (root / "truncated.png").write_bytes(whole.getvalue()[:2000])  # header fine, pixel data cut off
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


GOOD = ["astronaut.png", "camera.bmp", "coffee.jpg", "sub/chelsea.png", "sub/rocket.png"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_csv_rows_match_oracle_and_bad_files_are_skipped(folder, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    code, stdout, stderr = run(["score", str(folder), "--reward", "symmetry,sharpness", "--out", str(out)], capsys)
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).relative_to(folder).as_posix() for r in rows] == GOOD  # sorted path order
    assert list(rows[0]) == ["path", "symmetry", "sharpness"]
    for row in rows:
        assert float(row["symmetry"]) == pytest.approx(symmetry_oracle(Path(row["path"])), abs=1e-5)
        assert 0.0 < float(row["sharpness"]) < 1.0
    for name in ("broken.png", "truncated.png"):
        assert f"skipping {folder / name}" in stderr
        assert str(folder / name) in stdout  # the summary lists skipped files
    assert "scored 5 image(s), skipped 2" in stdout
    assert "notes.txt" not in stdout + stderr


def test_json_output_and_summary(folder, tmp_path, capsys):
    out = tmp_path / "scores.json"
    args = ["score", str(folder), "--reward", "symmetry", "--out", str(out), "--batch-size", "1"]
    code, stdout, _ = run(args, capsys)
    assert code == 0
    payload = json.loads(out.read_text())
    values = np.array([row["symmetry"] for row in payload["rows"]])
    assert len(values) == 5
    stats = payload["summary"]["rewards"]["symmetry"]
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["std"] == pytest.approx(values.std(ddof=1))
    assert (stats["min"], stats["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
    assert {Path(s["path"]).name for s in payload["skipped"]} == {"broken.png", "truncated.png"}
    assert all(s["error"] for s in payload["skipped"])


def test_batch_size_does_not_change_scores(folder, tmp_path, capsys):
    results = []
    for batch in ("1", "3"):
        out = tmp_path / f"b{batch}.csv"
        args = ["score", str(folder), "--reward", "sharpness", "--batch-size", batch, "--out", str(out)]
        assert run(args, capsys)[0] == 0
        results.append([float(r["sharpness"]) for r in csv.DictReader(out.open())])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_prompt_reward_without_prompts_fails_before_any_file_is_resolved(folder, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the CLI resolved or loaded a model before checking prompts")

    import huggingface_hub

    import rewards.hub
    import rewards.registry

    monkeypatch.setattr(rewards.registry, "load", forbidden)
    monkeypatch.setattr(rewards.hub, "resolve_file", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    code, _, stderr = run(["score", str(folder), "--reward", "pickscore"], capsys)
    assert code == 2
    assert "pickscore needs a prompt per image" in stderr and "--prompt" in stderr


def test_prompts_text_file_must_have_one_line_per_image(folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo\n" * 3)
    code, _, stderr = run(["score", str(folder), "--reward", "symmetry", "--prompts", str(prompts)], capsys)
    assert code == 2 and "3 lines for 7 images" in stderr  # 7 files with image extensions, readable or not


def test_prompts_csv_and_json_mappings(folder, tmp_path, capsys):
    images = sorted(cli.find_images([folder]), key=str)
    mapping = {str(p.relative_to(folder)): f"prompt for {p.stem}" for p in images}
    (folder / "prompts.json").write_text(json.dumps(mapping))  # keys relative to the file's own folder
    out = tmp_path / "p.csv"
    code, _, _ = run(
        ["score", str(folder), "--reward", "symmetry", "--prompts", str(folder / "prompts.json"), "--out", str(out)],
        capsys,
    )
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["prompt"] for r in rows] == [f"prompt for {Path(r['path']).stem}" for r in rows]

    table = tmp_path / "prompts.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "prompt"])
        writer.writerows([str(p), "x"] for p in images[:-1])  # the last image has no prompt
    code, _, stderr = run(["score", str(folder), "--reward", "symmetry", "--prompts", str(table)], capsys)
    assert code == 2 and "no prompt for" in stderr and images[-1].name in stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward", "symetry"], "Did you mean 'symmetry'"),
        (["--reward", "symmetry", "--source", "symmetry.checkpoint=x.pt"], "symmetry accepts no files"),
        (["--reward", "symmetry", "--source", "sharpness.size=3"], "not in --reward"),
        (["--reward", "symmetry", "--source", "nodots"], "expected NAME.ROLE=PATH"),
        (["--reward", "sharpness", "--source", "sharpness.size=big"], "expected a int value"),
        (["--reward", "hpsv2.1", "--prompt", "x", "--source", "hpsv2.1.version=v2.0"], "accepts checkpoint, not"),
        (["--reward", "symmetry", "--out", "scores.txt"], "use a .csv or .json"),
        (["--reward", "symmetry", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_usage_errors(folder, capsys, args, message):
    code, _, stderr = run(["score", str(folder), *args], capsys)
    assert code == 2 and message in stderr


def test_options_and_dtype_reach_the_reward(folder, tmp_path, capsys):
    """sharpness.size=128 arrives as an int; bfloat16 scores stay close to float32 ones."""
    image = folder / "astronaut.png"
    results = {}
    for extra in ([], ["--source", "sharpness.size=128"], ["--dtype", "bfloat16"]):
        out = tmp_path / "o.csv"
        assert run(["score", str(image), "--reward", "sharpness", "--out", str(out), *extra], capsys)[0] == 0
        results[" ".join(extra)] = float(next(csv.DictReader(out.open()))["sharpness"])
    x = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32) / 255.0
    at_128 = sharpness_score(torch.from_numpy(x).permute(2, 0, 1)[None], size=128).item()
    assert results["--source sharpness.size=128"] == pytest.approx(at_128, rel=1e-5)
    assert results["--source sharpness.size=128"] != pytest.approx(results[""], rel=1e-3)
    assert results["--dtype bfloat16"] == pytest.approx(results[""], rel=1e-5)  # inputs stay float32 for this reward


def test_missing_path_is_an_error(tmp_path, capsys):
    code, _, stderr = run(["score", str(tmp_path / "nowhere"), "--reward", "symmetry"], capsys)
    assert code == 2 and "no such file or folder" in stderr


def test_python_dash_m_writes_csv_to_stdout(folder, capsys, monkeypatch):
    image = folder / "astronaut.png"
    argv = ["rewards", "score", str(image), "--reward", "symmetry", "--prompt", "an astronaut"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("rewards", run_name="__main__", alter_sys=True)  # what `python -m rewards` runs
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert rows[0]["prompt"] == "an astronaut"
    assert float(rows[0]["symmetry"]) == pytest.approx(symmetry_oracle(image), abs=1e-5)
    assert "scored 1 image(s)" in captured.err


def test_pil_8bit_option_is_a_boolean_of_the_pil_rewards_only():
    """pickscore, aesthetic, clip and imagereward reproduce PIL's 8-bit resize unless told pil_8bit=false;
    HPS has no such option (its official transform resizes floats)."""
    for name in ("pickscore", "aesthetic", "clip", "imagereward"):
        assert cli.parse_sources([f"{name}.pil_8bit=false"], [name]) == {name: {"pil_8bit": False}}
        assert cli._source_params(name)["pil_8bit"].default is True
    with pytest.raises(cli.UsageError, match="expected a bool value"):
        cli.parse_sources(["clip.pil_8bit=maybe"], ["clip"])
    with pytest.raises(cli.UsageError, match="accepts checkpoint, not 'pil_8bit'"):
        cli.parse_sources(["hpsv2.1.pil_8bit=false"], ["hpsv2.1"])
