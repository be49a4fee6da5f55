"""ImageReward: parity with the official `image-reward` package (run in its own cached environment), the key
mapping from the original checkpoint, gradients, and the errors a user can act on.

The oracle environment is built once (tests/oracles/build.py, ~1 min cold) and cached; the official
model writes a full-size random-weight ImageReward.pt and scores real photographs with its own score(); ours
loads that file through rewards.load and scores the same PNGs.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from benchmarks.checkpoints import MED_CONFIG, write_vocab
from rewards import imagereward as ir
from tests.parity import (
    TARGET_MEAN_DIFF_OVER_STD, assert_rejects_bad_inputs, measured, module_run, photographs, run_oracle,
    scores_with_taps,
)

SEED = 0
HEAD_STD = 2.0  # head init gain in the random checkpoint (the official 1/769 std makes every score equal)
PROMPTS = [
    "an astronaut in a white space suit, studio portrait",
    "A cup of coffee on a saucer, seen from above!",
    "a cat",
    "black-and-white photo of a cameraman with a tripod, standing on a lawn, highly detailed photograph, 35mm film, "
    "golden hour, sharp focus, trending on artstation",  # longer than 35 tokens: truncated
    "tiny astronaut",
    "coffee (portrait crop)",
]


def _images() -> list[np.ndarray]:
    """The parity photographs."""
    return photographs()


def run_official(job: Path) -> None:
    """Run the official package on `job` in the oracle environment (building that environment first if needed)."""
    run_oracle("run_imagereward.py", job, "ImageReward")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def run_parity(workdir: Path) -> tuple[dict, rewards.Reward, dict]:
    """Official scores from the oracle environment vs ours on the same files; returns (metrics, our reward, paths)."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {"checkpoint": ir.CHECKPOINT_FILE, "config": ir.CONFIG_FILE, "vocab": ir.VOCAB_FILE}
    paths = {role: workdir / name for role, name in paths.items()}
    paths["config"].write_text(json.dumps(MED_CONFIG, indent=2))
    write_vocab(paths["vocab"], PROMPTS)
    arrays = _images()
    pngs = []
    for i, arr in enumerate(arrays):
        pngs.append(workdir / f"image{i}.png")
        Image.fromarray(arr).save(pngs[-1])
    job = {
        "seed": SEED,
        "med_config": str(paths["config"]),
        "vocab_dir": str(workdir),
        "checkpoint": str(paths["checkpoint"]),
        "head_std": HEAD_STD,
        "images": [str(p) for p in pngs],
        "prompts": PROMPTS,
        "out": str(workdir / "official.pt"),
    }
    (workdir / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    run_official(workdir / "job.json")
    oracle_s = time.perf_counter() - t0
    official = torch.load(workdir / "official.pt", weights_only=True)

    t0 = time.perf_counter()
    reward = rewards.load("imagereward", **_sources(paths))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = [torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255 for a in arrays]
    ours = _score_with_taps(reward, images, PROMPTS)
    score_s = time.perf_counter() - t0
    reward.pil_8bit = False  # the float resize, for the figures before the 8-bit path
    ours_float = _score_with_taps(reward, images, PROMPTS)
    reward.pil_8bit = True
    # The same model on the official pipeline's own 224 px crops (PIL-resized, 8-bit): isolates the network from
    # the preprocessing (our resize/crop is the identity on a 224 x 224 input). Scored as ONE float64 batch, so
    # this also checks batching with mixed prompts and the cast to the model dtype.
    crops = (official["pixels"].double() * reward.normalize.std.double() + reward.normalize.mean.double()).clamp(0, 1)
    same_pixels = _score_with_taps(reward, [crops], PROMPTS)
    metrics = {"n_images": len(arrays), "official_score_std": official["scores"].std().item()}
    metrics.update(_compare(ours, official, prefix=""))
    metrics.update(_compare(same_pixels, official, prefix="same_pixels_"))
    metrics.update(_compare(ours_float, official, prefix="float_path_"))
    metrics.update(
        official_scores=official["scores"].tolist(),
        ours_scores=ours["scores"].tolist(),
        float_path_scores=ours_float["scores"].tolist(),
        seconds={"oracle_total": oracle_s, "oracle_build": official["build_s"], "oracle_score": official["score_s"],
                 "ours_load": load_s, "ours_score": score_s},
        oracle_versions=official["versions"],
    )
    return metrics, reward, paths


def _score_with_taps(reward, images: list[torch.Tensor], prompts: list[str]) -> dict:
    """Scores of `images` (a list of batches) plus the ViT tokens and the head's input, in one forward each."""
    taps: dict[str, list] = {"image_embeds": [], "features": []}
    hooks = [
        reward.vision.norm.register_forward_hook(lambda m, i, o: taps["image_embeds"].append(o.double())),
        reward.text.register_forward_hook(lambda m, i, o: taps["features"].append(o.last_hidden_state[:, 0].double())),
    ]
    return scores_with_taps(reward, images, prompts, taps, hooks)


def _compare(ours: dict, official: dict, prefix: str) -> dict:
    diff = (ours["scores"] - official["scores"]).abs()
    spread = official["scores"].std().item()
    image_cos = _cos(ours["image_embeds"], official["image_embeds"])
    feature_cos = _cos(ours["features"], official["features"])
    return {
        f"{prefix}image_tokens_cosine_min": image_cos.min().item(),
        f"{prefix}image_tokens_cosine_mean": image_cos.mean().item(),
        f"{prefix}feature_cosine_min": feature_cos.min().item(),
        f"{prefix}feature_cosine_mean": feature_cos.mean().item(),
        f"{prefix}mean_abs_diff_over_std": diff.mean().item() / spread,
        f"{prefix}max_abs_diff_over_std": diff.max().item() / spread,
        f"{prefix}mean_rel_diff": (diff / official["scores"].abs()).mean().item(),
        f"{prefix}max_abs_diff": diff.max().item(),
    }


def _sources(paths: dict) -> dict:
    return {"checkpoint": paths["checkpoint"], "config": paths["config"], "tokenizer": paths["vocab"]}


def measure_parity() -> dict:
    """Parity numbers for the card (docs/parity.py imports this)."""
    return measured(run_parity)


parity = module_run(run_parity, "imagereward")


# -- parity -------------------------------------------------------------------------------------------------
def test_parity_with_official_package(parity):
    m, _, _ = parity
    assert m["official_score_std"] > 1.0, f"random-weight scores barely spread ({m['official_score_std']:.3g})"
    # End to end with the default 8-bit path (PIL's own arithmetic): equal up to float rounding.
    assert m["image_tokens_cosine_min"] >= 0.999999, m
    assert m["feature_cosine_min"] >= 0.999999, m
    assert m["mean_rel_diff"] < 1e-5, m
    assert m["mean_abs_diff_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m
    # The float resize (pil_8bit=False) differs by PIL's 8-bit rounding only: the targets every reward meets.
    assert m["float_path_image_tokens_cosine_min"] >= 0.9999, m
    assert m["float_path_mean_rel_diff"] < 1e-3, m
    assert m["float_path_mean_abs_diff_over_std"] < 1e-2, m
    # The network alone, on the official pipeline's own pixels: equal up to float32 rounding.
    assert m["same_pixels_image_tokens_cosine_min"] >= 0.999999, m
    assert m["same_pixels_feature_cosine_min"] >= 0.999999, m
    assert m["same_pixels_max_abs_diff_over_std"] < 1e-4, m


# -- key mapping ----------------------------------------------------------------------------------------------
def test_every_original_key_is_loaded_and_nothing_left_at_init(parity):
    _, reward, paths = parity
    original = torch.load(paths["checkpoint"], map_location="cpu", weights_only=True, mmap=True)
    ours = reward.state_dict()
    used = {k: v for k, v in original.items() if k not in ir.UNUSED_KEYS and k != ir.POSITION_IDS}
    converted = ir.convert_checkpoint(original)
    assert sorted(converted) == sorted(ours), "our persistent tensors and the converted checkpoint differ"
    assert len(converted) == len(used), "an original key was dropped or two were merged"
    for key, value in used.items():
        new = ir._convert_key(key)
        assert torch.equal(ours[new].to(value.dtype), value), f"{new} does not hold {key}"
    assert torch.equal(reward.text.embeddings.position_ids[0], torch.arange(original[ir.POSITION_IDS].shape[-1]))
    leftovers = sorted(set(original) - set(used))
    assert leftovers == sorted(ir.UNUSED_KEYS | {ir.POSITION_IDS}), leftovers


def test_mapping_names():
    assert ir._convert_key("blip.visual_encoder.blocks.3.attn.qkv.weight") == "vision.blocks.3.attn.qkv.weight"
    assert ir._convert_key("blip.text_encoder.encoder.layer.0.crossattention.self.key.bias") == (
        "text.encoder.layer.0.crossattention.self.key.bias"
    )
    heads = [ir._convert_key(f"mlp.layers.{i}.weight") for i in (0, 2, 4, 6, 7)]
    assert heads == [f"head.{j}.weight" for j in range(5)]
    assert ir._convert_key("mlp.layers.1.weight") is None


# -- protocol, gradients, cache ---------------------------------------------------------------------------------
def test_protocol_attributes():
    assert "imagereward" in rewards.available()
    assert ir.ImageReward.needs_prompt and ir.ImageReward.input_size == 224
    assert "1.0333" in ir.ImageReward.scale_note


def test_gradients_reach_the_pixels(parity):
    _, reward, _ = parity
    x = torch.rand(1, 3, 180, 260, generator=torch.Generator().manual_seed(1), requires_grad=True)
    reward(x, ["a photo"]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_bfloat16_model_keeps_the_head_in_float32(parity):
    _, reward, paths = parity
    half = rewards.load("imagereward", dtype=torch.bfloat16, **_sources(paths))
    assert half.vision.cls_token.dtype == half.text.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert half.head[0].weight.dtype == torch.float32
    x = torch.rand(2, 3, 224, 300, generator=torch.Generator().manual_seed(3))
    blocks = reward.vision.blocks
    try:  # bf16 matmuls are slow on CPU: compare both models with the ViT cut to its first two blocks
        reward.vision.blocks, half.vision.blocks = blocks[:2], half.vision.blocks[:2]
        with torch.no_grad():
            low, full = half(x, ["a cat", "a dog"]), reward(x, ["a cat", "a dog"])
    finally:
        reward.vision.blocks = blocks
        del half
        gc.collect()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.1 * parity[0]["official_score_std"], (low, full)  # bf16 rounding


def test_prompt_cache_tokenises_each_prompt_once(parity, monkeypatch):
    _, reward, _ = parity
    reward.clear_text_cache()
    calls = []
    encode = reward.encode_text
    monkeypatch.setattr(reward, "encode_text", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    first = reward.text_features(["a cat", "a cat", "a dog"])
    again = reward.text_features(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]
    assert first.shape == (3, 2, ir.MAX_TOKENS) and torch.equal(again[1], first[0])
    assert first[0, 0, 0].item() == reward.tokenizer.cls_token_id  # the first token stays [CLS] as in score()


# -- bad input and bad files -------------------------------------------------------------------------------------
def test_bad_inputs(parity):
    _, reward, _ = parity
    assert_rejects_bad_inputs(reward)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(rewards.MissingFileError, match=r"ImageReward\.pt.*checkpoint="):
        rewards.load("imagereward", checkpoint=tmp_path / "ImageReward.pt", config=tmp_path, tokenizer=tmp_path)
    (tmp_path / "ImageReward.pt").write_bytes(b"x")
    with pytest.raises(rewards.MissingFileError, match=r"med_config\.json.*config="):
        rewards.load("imagereward", checkpoint=tmp_path / "ImageReward.pt", config=tmp_path, tokenizer=tmp_path)


def _small_files(tmp_path: Path, state: dict) -> dict:
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    write_vocab(tmp_path / "vocab.txt", ["a cat"])
    return {"checkpoint": tmp_path / "ImageReward.pt", "config": tmp_path, "tokenizer": tmp_path}


def test_checkpoint_with_foreign_keys_names_them(tmp_path):
    state = {"blip.visual_encoder.cls_token": torch.zeros(1, 1, 1024), "blip.itm_head.weight": torch.zeros(2, 768)}
    files = _small_files(tmp_path, state)
    with pytest.raises(rewards.CheckpointMismatchError, match=r"blip\.itm_head\.weight"):
        rewards.load("imagereward", **files)


def test_checkpoint_with_missing_and_misshaped_keys_names_them(tmp_path):
    state = {"blip.visual_encoder.cls_token": torch.zeros(1, 1, 768), "mlp.layers.7.bias": torch.zeros(1)}
    files = _small_files(tmp_path, state)
    expected = r"missing keys \(head\.0\.bias.*vision\.cls_token: checkpoint \(1, 1, 768\)"
    with pytest.raises(rewards.CheckpointMismatchError, match=expected):
        rewards.load("imagereward", **files)


def test_damaged_position_ids_are_refused():
    good = {ir.POSITION_IDS: torch.arange(512)[None], "blip.text_proj.bias": torch.zeros(256)}
    assert ir.convert_checkpoint(good) == {}  # both read and dropped by name
    with pytest.raises(rewards.CheckpointMismatchError, match="position_ids"):
        ir.convert_checkpoint({ir.POSITION_IDS: torch.arange(512).flip(0)[None]})
