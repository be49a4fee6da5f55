"""HPSv3: parity with the official `hpsv3` package (run in the shared oracle environment), the key mapping from the
official HPSv3.safetensors, gradients, the prompt cache, and the errors a user can act on.

A small Qwen2-VL of the real architecture (14 px patches, 2 x 2 merge, two frames, M-RoPE, Qwen2 decoder) is
described by local base files (config.json, a small byte-level BPE tokenizer with Qwen2-VL's special tokens, the
chat template, the processor config); the official package writes random base weights and its own random-weight
HPSv3.safetensors from them, and scores real photographs with `HPSv3RewardInferencer.reward` (and with its
`differentiable=True` path). Ours loads the same files through rewards.load and scores the same PNGs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from benchmarks import hpsv3_files as files
from rewards import hpsv3 as h3
from tests.parity import (
    TARGET_MEAN_DIFF_OVER_STD, assert_rejects_bad_inputs, measured, module_run, photographs, run_oracle,
)

SEED = 0
HEAD_GAIN = 2.0  # head init gain in the random checkpoint, so that random-weight scores spread
INIT_STD = 0.2  # weights std of the random base model: sharper attention, so the prompt moves the score too
PROMPTS = [
    "an astronaut in a white space suit, studio portrait",
    "A cup of coffee on a saucer, seen from above!",
    "a cat",
    "black-and-white photo of a cameraman with a tripod, standing on a lawn, 35mm film, golden hour",
    "tiny astronaut",
    "coffee (portrait crop) {with braces}",
]


def _images() -> list[np.ndarray]:
    """The parity photographs."""
    return photographs()


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255


def write_base(folder: Path) -> dict:
    """The small base model's files; its vocabulary is padded like the real one (152064 rows for 151657 tokens)."""
    corpus = [h3.INSTRUCTION + h3.REQUEST, *PROMPTS]
    length = files.write_tokenizer(folder, corpus)
    return files.write_qwen2vl_base(folder, files.tiny_qwen2vl(length + 32, initializer_range=INIT_STD), corpus)


def run_official(job: Path) -> None:
    """Run the official package on `job` in the oracle environment (building that environment first if needed)."""
    run_oracle("run_hpsv3.py", job, "HPSv3")


def _differences(ours: torch.Tensor, official: torch.Tensor, prefix: str) -> dict:
    diff = (ours.double() - official).abs()
    spread = official.std().item()
    return {f"{prefix}mean_abs_diff_over_std": diff.mean().item() / spread,
            f"{prefix}max_abs_diff_over_std": diff.max().item() / spread,
            f"{prefix}mean_rel_diff": (diff / official.abs()).mean().item()}


def run_parity(workdir: Path) -> tuple[dict, rewards.Reward, dict]:
    """Official scores from the oracle environment vs ours on the same files; returns (metrics, our reward, paths)."""
    base = workdir / "base"
    write_base(base)
    arrays = _images()
    pngs = []
    for i, arr in enumerate(arrays):
        pngs.append(workdir / f"image{i}.png")
        Image.fromarray(arr).save(pngs[-1])
    paths = {"checkpoint": workdir / files.HPSV3_FILE, "base": base}
    job = {"seed": SEED, "base": str(base), "checkpoint": str(paths["checkpoint"]), "yaml": str(workdir / "hpsv3.yaml"),
           "head_gain": HEAD_GAIN, "images": [str(p) for p in pngs], "prompts": PROMPTS, "out": str(workdir / "out.pt")}
    (workdir / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    run_official(workdir / "job.json")
    oracle_s = time.perf_counter() - t0
    official = torch.load(workdir / "out.pt", weights_only=True)

    t0 = time.perf_counter()
    reward = rewards.load("hpsv3", **paths)
    load_s = time.perf_counter() - t0
    images = [_to_tensor(a) for a in arrays]
    t0 = time.perf_counter()
    with torch.no_grad():
        outputs = torch.cat([reward.outputs(x, [p]) for x, p in zip(images, PROMPTS)]).double()
    score_s = time.perf_counter() - t0
    reward.pil_8bit = False
    with torch.no_grad():
        float_path = torch.cat([reward(x, [p]) for x, p in zip(images, PROMPTS)])
    reward.pil_8bit = True
    inputs = [_inputs(reward, x, p) for x, p in zip(images, PROMPTS)]
    metrics = {
        "n_images": len(arrays),
        "official_score_std": official["mu"].std().item(),
        "ids_equal": all(torch.equal(i, o) for (i, _), o in zip(inputs, official["input_ids"])),
        "pixels_max_abs_diff": max((p - o).abs().max().item() for (_, p), o in zip(inputs, official["pixel_values"])),
        "sigma_max_abs_diff": (outputs[:, 1] - official["sigma"]).abs().max().item(),
        **_differences(outputs[:, 0], official["mu"], ""),
        **_differences(float_path, official["mu"], "float_path_"),
        **_differences(official["diff_mu"], official["mu"], "official_differentiable_"),
        "official_differentiable_grad_norms": official["diff_grad_norm"].tolist(),
        **_differences(official["mu_bf16"], official["mu"], "official_bf16_vs_float32_"),
        "official_scores": official["mu"].tolist(),
        "official_bf16_scores": official["mu_bf16"].tolist(),
        "ours_scores": outputs[:, 0].tolist(),
        "seconds": {"oracle_total": oracle_s, "oracle_build": official["build_s"], "oracle_score": official["score_s"],
                    "ours_load": load_s, "ours_score": score_s},
        "oracle_versions": official["versions"],
    }
    return metrics, reward, paths


def _inputs(reward, images: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids and pixel patches our model sees for one image."""
    patches, (gh, gw) = reward.preprocess(images), reward.grid(images)
    ids, _, _ = reward._sequence(reward.text_features([prompt]), gh * gw // 4)
    return ids[0], patches


def measure_parity() -> dict:
    """Parity numbers for the card."""
    return measured(run_parity)


parity = module_run(run_parity, "hpsv3")


# -- parity -------------------------------------------------------------------------------------------------------
def test_parity_with_official_package(parity):
    m, _, _ = parity
    assert m["official_score_std"] > 0.5, f"random-weight scores barely spread ({m['official_score_std']:.3g})"
    assert m["ids_equal"], "the token ids differ from the official processor's"
    assert m["pixels_max_abs_diff"] < 1e-6, m  # the 8-bit path gives the official PIL pixels
    assert m["mean_abs_diff_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m
    assert m["mean_rel_diff"] < 1e-5, m
    assert m["sigma_max_abs_diff"] < 1e-4, m
    # The float resize (pil_8bit=False) differs by PIL's 8-bit rounding only.
    assert 0 < m["float_path_mean_abs_diff_over_std"] < 1e-2, m
    # The package's differentiable path (torchvision bicubic on floats) lands off its own official score.
    assert m["official_differentiable_mean_abs_diff_over_std"] > 10 * m["mean_abs_diff_over_std"], m
    assert all(np.isfinite(m["official_differentiable_grad_norms"])), m


def test_images_and_prompts_both_move_the_score(parity):
    _, reward, _ = parity
    x = torch.cat([_to_tensor(a[:300, :300]) for a in _images()[:3]])
    with torch.no_grad():
        by_image = reward(x, ["a cat"] * 3)
        by_prompt = reward(x[:1].expand(3, -1, -1, -1), PROMPTS[:3])
    spread = parity[0]["official_score_std"]
    assert by_image.std() > 0.05 * spread and by_prompt.std() > 0.05 * spread, (by_image, by_prompt)


def test_a_batch_scores_as_its_images_alone(parity):
    """Prompts of different lengths are right-padded as the official processor pads; padding changes nothing."""
    _, reward, _ = parity
    x = torch.cat([_to_tensor(a[:280, :364]) for a in _images()[:3]])
    prompts = [PROMPTS[3], "a cat", PROMPTS[0]]
    with torch.no_grad():
        batch = reward(x, prompts)
        alone = torch.cat([reward(x[i : i + 1], [p]) for i, p in enumerate(prompts)])
    torch.testing.assert_close(batch, alone, atol=1e-5 * parity[0]["official_score_std"], rtol=0)


# -- key mapping --------------------------------------------------------------------------------------------------
def test_every_official_key_is_loaded(parity):
    from safetensors.torch import load_file

    _, reward, paths = parity
    original = load_file(str(paths["checkpoint"]))
    ours = reward.state_dict()
    converted = h3.convert_checkpoint(original)
    assert sorted(converted) == sorted(ours)
    assert sorted(set(original) - {k for k in original if h3.convert_key(k)}) == sorted(h3.UNUSED_KEYS)
    for key, value in original.items():
        if key not in h3.UNUSED_KEYS:
            assert torch.equal(ours[h3.convert_key(key)], value), key


def test_mapping_names():
    assert h3.convert_key("visual.blocks.3.attn.qkv.weight") == "vision.blocks.3.attn.qkv.weight"
    assert h3.convert_key("model.layers.0.self_attn.q_proj.bias") == "text.layers.0.self_attn.q_proj.bias"
    assert [h3.convert_key(f"rm_head.{i}.weight") for i in (0, 3, 5)] == [f"head.{j}.weight" for j in range(3)]
    assert h3.convert_key("rm_head.2.weight") is None and h3.convert_key("lm_head.weight") is None


def test_smart_resize_sizes():
    assert h3.smart_resize(512, 512) == (448, 448)
    assert h3.smart_resize(400, 600) == (364, 532)
    assert h3.smart_resize(10, 10) == (448, 448)  # upscaled to the pixel budget
    assert h3.smart_resize(1024, 1024) == (448, 448)
    with pytest.raises(rewards.InputError, match="aspect ratio"):
        h3.smart_resize(10, 2100)


# -- gradients, dtype, cache ------------------------------------------------------------------------------------
def test_8bit_gradient_is_the_float_resize_gradient(parity, monkeypatch):
    """Straight-through rounding: the default path's pixel gradient is the float resize's Jacobian applied to the
    network's gradient at the rounded pixels (equal up to float rounding), close to the float path's own gradient
    (taken at the unrounded pixels), and nothing reaches the weights."""
    from rewards import preprocess

    _, reward, _ = parity
    # 300 x 451 -> 392 x 560 (both passes upscale); levels kept within 26..230, away from the per-pass clips,
    # whose masks may differ between the float and the fixed-point sums (as in tests/test_preprocess.py)
    x = _to_tensor((_images()[2] * 0.8 + 25.5).round().astype(np.uint8))

    def gradient() -> torch.Tensor:
        pixels = x.clone().requires_grad_(True)
        reward(pixels, ["a cat"]).sum().backward()
        return pixels.grad

    default = gradient()
    reward.pil_8bit = False
    float_path = gradient()
    reward.pil_8bit = True

    def float_jacobian_at_rounded(images, size):
        floats = preprocess.resize_bicubic(images, size)
        return floats + (preprocess.resize_pil_8bit(images, size) - floats).detach()

    monkeypatch.setattr(h3, "resize_pil_8bit", float_jacobian_at_rounded)
    reference = gradient()
    assert torch.isfinite(default).all() and default.abs().sum() > 0
    assert (default - reference).abs().max() <= 1e-5 * reference.abs().max(), (default - reference).abs().max()
    assert torch.nn.functional.cosine_similarity(default.flatten(), float_path.flatten(), dim=0) > 0.99
    assert all(p.grad is None for p in reward.parameters())


def test_bfloat16_matches_the_official_bfloat16_scorer(parity):
    """In bf16 the official model casts everything but its head, rotary frequencies included, and (transformers 4)
    computes the vision rotary angles in bf16: ours does the same and lands on its scores; with transformers 5's
    float32 rotary it would be 10x further off."""
    m, _, paths = parity
    half = rewards.load("hpsv3", dtype=torch.bfloat16, **paths)
    assert half.text.embed_tokens.weight.dtype == half.vision.get_dtype() == torch.bfloat16
    assert half.head[0].weight.dtype == torch.float32 and half.text.rotary_emb.inv_freq.dtype == torch.bfloat16
    images = [_to_tensor(a) for a in _images()]

    def scores() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([half(x, [p]) for x, p in zip(images, PROMPTS)]).double()

    official = torch.tensor(m["official_bf16_scores"], dtype=torch.float64)
    spread = official.std()
    ours = scores()
    assert ours.dtype == torch.float64 and torch.isfinite(ours).all()
    diff = (ours - official).abs().mean() / spread
    for rotary in (half.vision.rotary_pos_emb, half.text.rotary_emb):
        for name, buffer in rotary.named_buffers():
            setattr(rotary, name, buffer.float())
    float_rotary = (scores() - official).abs().mean() / spread
    assert diff <= TARGET_MEAN_DIFF_OVER_STD and float_rotary > 10 * diff, (diff, float_rotary)


def test_prompt_cache_tokenises_each_prompt_once(parity, monkeypatch):
    _, reward, _ = parity
    reward.clear_text_cache()
    calls = []
    encode = reward.encode_text
    monkeypatch.setattr(reward, "encode_text", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    first = reward.text_features(["a cat", "a cat", "a dog"])
    again = reward.text_features(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]
    assert torch.equal(again[1], first[0]) and (first[0] == -1).sum() == 1  # one slot for the image


# -- bad input and bad files -------------------------------------------------------------------------------------
def test_bad_inputs(parity):
    _, reward, _ = parity
    assert_rejects_bad_inputs(reward)
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(rewards.InputError, match="special tokens"):
        reward(x[:1], ["a cat <|Reward|>"])


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(rewards.MissingFileError, match=r"HPSv3\.safetensors.*checkpoint="):
        rewards.load("hpsv3", checkpoint=tmp_path / "HPSv3.safetensors", base=tmp_path)
    (tmp_path / "HPSv3.safetensors").write_bytes(b"x")
    with pytest.raises(rewards.MissingFileError, match=r"config\.json.*base="):
        rewards.load("hpsv3", checkpoint=tmp_path / "HPSv3.safetensors", base=tmp_path)


def test_checkpoint_with_foreign_and_missing_keys_names_them(parity, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, paths = parity
    state = load_file(str(paths["checkpoint"]))
    state["rm_head.7.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(rewards.CheckpointMismatchError, match=r"rm_head\.7\.weight"):
        rewards.load("hpsv3", checkpoint=tmp_path / "foreign.safetensors", base=paths["base"])
    del state["rm_head.7.weight"], state["visual.merger.ln_q.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(rewards.CheckpointMismatchError, match=r"missing keys \(vision\.merger\.ln_q\.bias"):
        rewards.load("hpsv3", checkpoint=tmp_path / "missing.safetensors", base=paths["base"])



# -- the command line, mixtures, the tuner ---------------------------------------------------------------------------
def test_cli_scores_files_as_the_official_package(parity, tmp_path, capsys):
    """`python -m rewards score --reward hpsv3` on the parity PNGs gives the official scores."""
    import csv

    from rewards import cli

    m, _, paths = parity
    pngs = sorted(Path(paths["checkpoint"]).parent.glob("image*.png"))
    table = tmp_path / "prompts.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "prompt"), *((str(p), PROMPTS[int(p.stem[5:])]) for p in pngs)])
    out = tmp_path / "scores.csv"
    code = cli.main(["score", *map(str, pngs), "--reward", "hpsv3", "--prompts", str(table), "--out", str(out),
                     "--device", "cpu", "--source", f"hpsv3.checkpoint={paths['checkpoint']}",
                     "--source", f"hpsv3.base={paths['base']}"])
    capsys.readouterr()
    assert code == 0
    scores = {Path(r["path"]).name: float(r["hpsv3"]) for r in csv.DictReader(out.open())}
    ours = torch.tensor([scores[f"image{i}.png"] for i in range(len(PROMPTS))], dtype=torch.float64)
    official = torch.tensor(m["official_scores"], dtype=torch.float64)
    assert (ours - official).abs().mean() <= TARGET_MEAN_DIFF_OVER_STD * official.std(), (ours, official)


def test_mixture_adds_the_weighted_score(parity):
    _, reward, paths = parity
    mix = rewards.combine({"hpsv3": 0.5, "symmetry": 1.0}, sources={"hpsv3": paths})
    x = _to_tensor(_images()[5])
    with torch.no_grad():
        expected = 0.5 * reward(x, ["a cat"]) + rewards.load("symmetry")(x)
        torch.testing.assert_close(mix(x, ["a cat"]), expected, atol=1e-5, rtol=0)


def test_tuner_configs_with_hpsv3_validate():
    from tuner import config as C

    cfg = C.validate(C.load_config(C.CONFIG_DIR / "sdxl_hpsv3.yaml"))
    assert cfg.reward == "hpsv3" and cfg.method == "drtune"
    assert cfg == C.from_dict(C.to_dict(cfg))
    mixed = C.validate(C.load_config(C.CONFIG_DIR / "sdxl_hpsv3.yaml", ["reward={hpsv3: 1.0, sharpness: 0.05}"]))
    assert mixed.reward == {"hpsv3": 1.0, "sharpness": 0.05}



def test_benchmark_peer_runs_the_official_differentiable_path(tmp_path):
    """`python -m benchmarks.hpsv3_official --smoke`: the official package's differentiable path on the benchmark's
    files, in the oracle environment; its scores sit next to ours on the same images (a wrong load would not)."""
    import sys

    from benchmarks.reward_models import hpsv3_sources, prompts_for

    jsonl = tmp_path / "official.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.hpsv3_official", "--smoke", "--weights", str(tmp_path / "weights"),
           "--jsonl", str(jsonl)]
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    info = record["extra_info"]
    assert (info["impl"], info["variant"], info["dtype"], info["batch"]) == ("official", "differentiable", "fp32", 2)
    assert record["stats"]["median"] > 0
    sources = hpsv3_sources(tmp_path / "weights", tiny=True)
    reward = rewards.load("hpsv3", **sources)
    gen = torch.Generator().manual_seed(2)  # the peer's images: batch 2, 64 x 64, seeded by the batch size
    images = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ours = reward(images, prompts_for(2)).mean().item()
    assert abs(ours - info["score_mean"]) < 0.01 * abs(ours), (ours, info["score_mean"])



def test_full_size_benchmark_files_fit_the_model(tmp_path):
    """The benchmark's 7B layout (no weights written): the base files give Qwen2-VL's special-token ids, and the
    official key set and shapes convert onto our full-size model exactly."""
    from benchmarks.reward_models import PROMPTS as BENCH_PROMPTS

    config = files.write_qwen2vl_base(tmp_path, None, [h3.INSTRUCTION + h3.REQUEST, *BENCH_PROMPTS], merges=50)
    assert config.pop("tokenizer_length") + 1 == files.HPSV3_VOCAB_ROWS
    tokenizer = h3.load_tokenizer(tmp_path)
    assert tokenizer.convert_tokens_to_ids([h3.REWARD_TOKEN, h3.IMAGE_PAD]) == [151657, config["image_token_id"]]
    assert config["image_token_id"] == files.QWEN2VL_7B["image_token_id"] == 151655
    shapes = files.official_shapes(config, files.HPSV3_VOCAB_ROWS)
    ours = h3.convert_checkpoint({k: torch.empty(0) for k in shapes})
    text, vision = h3.build_configs(config, files.HPSV3_VOCAB_ROWS)
    with torch.device("meta"):
        model = h3.HPSv3(text, vision, tokenizer, files.CHAT_TEMPLATE, (0.5,) * 3, (0.5,) * 3)
    own = {k: v.shape for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(own)
    assert all(own[h3.convert_key(k)] == s for k, s in shapes.items() if k not in h3.UNUSED_KEYS)
    assert sum(s.numel() for s in own.values()) == 7_748_610_610  # vision 0.68B + decoder 7.07B + head 3.7M


if __name__ == "__main__":
    print(json.dumps(measure_parity(), indent=1))


def test_official_benchmark_records_an_out_of_memory_case_and_goes_on(monkeypatch):
    """At batch 8 the official path ran out of memory on an 80 GB card; that case is a record, not the end."""
    from benchmarks import hpsv3_official

    def fails(model, job, dtype, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.\nmore")

    monkeypatch.setattr(hpsv3_official, "time_case", fails)
    record = hpsv3_official.time_case_or_oom(None, {}, "bf16", 8)
    assert record == {"failed": "hpsv3-bf16-b8-official-differentiable", "when": "call",
                      "error": "out of memory (CUDA out of memory. Tried to allocate 4.00 GiB.)"}
