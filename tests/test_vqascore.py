"""VQAScore: parity with the official `t2v-metrics` 3.0 package (run in the shared oracle environment), the key
mapping from the original checkpoint, gradients, the prompt cache, and the errors a user can act on.

The official package builds a tiny CLIP-FlanT5 (CLIP vision at 336 px, 3 layers; FlanT5 2+2 layers, 64 wide) with
its own classes, saves it as the release is saved (config.json + pickled shards and their index), trains a small
SentencePiece tokenizer with T5's special tokens and scores real photographs with its own forward; ours loads the
same files through rewards.load and scores the same PNGs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import vqascore as vq
from rewards.preprocess import quantize_8bit, resize_bicubic
from tests.parity import (
    TARGET_MEAN_DIFF_OVER_STD, assert_rejects_bad_inputs, measured, module_run, photographs, run_oracle,
    scores_with_taps,
)

SEED = 0
PROMPTS = [
    "an astronaut in a white space suit, studio portrait",
    "A cup of coffee on a saucer, seen from above!",
    "a cat",
    "black-and-white photo of a cameraman with a tripod, standing on a lawn",
    "tiny astronaut",
    "coffee (portrait crop)",
    "a rocket launch",  # words the tokenizer was not trained on, in part
]
CORPUS_PROMPTS = PROMPTS[:-1] + ["a photo of a dog", "an astronaut riding a horse", "a bowl of soup"]
T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
          relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
          tie_word_embeddings=False, layer_norm_epsilon=1e-6, dropout_rate=0.1, decoder_start_token_id=0,
          pad_token_id=0, eos_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
              patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)
GAINS = {"lm_head": 0.5, "mm_projector": 2.0}
ANSWER_GAIN, ANSWER_LEAN = 8.0, 2.0  # "Yes" and "</s>" logits vary most and lean high: scores spread in (0, 1)


def _images() -> list[np.ndarray]:
    """The parity photographs, and a 336 x 336 crop that needs no resize."""
    from skimage import data

    return [*photographs(), data.rocket()[:336, :336]]


def _corpus() -> list[str]:
    """What the small tokenizer is trained on: the conversation around each prompt, and the answers."""
    texts = [vq.question(p).replace(vq.IMAGE_TOKEN, " ") for p in CORPUS_PROMPTS]
    return texts * 4 + ["Yes", "yes", "No", "no", "Yes, it does.", "yes or no"] * 20


def run_official(job: Path) -> None:
    """Run the official package on `job` in the oracle environment (building that environment first if needed)."""
    run_oracle("run_vqascore.py", job, "VQAScore")


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255


def run_parity(workdir: Path) -> tuple[dict, rewards.Reward, dict]:
    """Official scores from the oracle environment vs ours on the same files; returns (metrics, reward, paths)."""
    workdir.mkdir(parents=True, exist_ok=True)
    arrays = _images()
    pngs = []
    for i, arr in enumerate(arrays):
        pngs.append(workdir / f"image{i}.png")
        Image.fromarray(arr).save(pngs[-1])
    job = {"seed": SEED, "folder": str(workdir), "t5": T5, "vision": VISION, "gains": GAINS, "answer_gain": ANSWER_GAIN,
           "answer_lean": ANSWER_LEAN, "corpus": _corpus(),
           "vocab_size": 200, "extra_rows": 28, "shard_size": "100KB", "images": [str(p) for p in pngs],
           "prompts": PROMPTS, "out": str(workdir / "official.pt")}
    (workdir / "job.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    run_official(workdir / "job.json")
    oracle_s = time.perf_counter() - t0
    official = torch.load(workdir / "official.pt", weights_only=True)
    paths = {k: Path(v) for k, v in official["paths"].items()}

    t0 = time.perf_counter()
    reward = rewards.load("vqascore", dtype=torch.float32, **sources(paths))
    load_s = time.perf_counter() - t0
    images = [to_tensor(a) for a in arrays]
    t0 = time.perf_counter()
    ours = _scores(reward, images, PROMPTS)
    score_s = time.perf_counter() - t0
    reward.pil_8bit = False
    ours_float = _scores(reward, images, PROMPTS)
    reward.pil_8bit = True
    # The network alone on the official pipeline's own 336 px pixels, as ONE batch of mixed prompts (padding).
    mean, std = reward.normalize.mean.double(), reward.normalize.std.double()
    crops = (official["pixels"].double() * std + mean).clamp(0, 1)
    same_pixels = _scores(reward, [crops], PROMPTS)
    metrics = {"n_images": len(arrays), "official_score_std": official["scores"].std().item()}
    for prefix, result in (("", ours), ("float_path_", ours_float), ("same_pixels_", same_pixels)):
        metrics.update(_compare(result, official, prefix))
    metrics.update(
        official_scores=official["scores"].tolist(), ours_scores=ours["scores"].tolist(),
        float_path_scores=ours_float["scores"].tolist(),
        seconds={"oracle_total": oracle_s, "oracle_build": official["build_s"], "oracle_score": official["score_s"],
                 "ours_load": load_s, "ours_score": score_s},
        oracle_versions=official["versions"],
    )
    return metrics, reward, paths


def sources(paths: dict) -> dict:
    return {"checkpoint": paths["model"], "tokenizer": paths["tokenizer"], "vision": paths["vision"]}


def _scores(reward, batches: list[torch.Tensor], prompts: list[str]) -> dict:
    """Scores of `batches` (a list of image batches) and the projected image tokens, in one forward each."""
    taps: dict[str, list] = {"pixels": [], "tokens": []}
    hooks = [reward.vision.register_forward_pre_hook(lambda m, a, k: taps["pixels"].append(k["pixel_values"].double()),
                                                     with_kwargs=True),
             reward.projector.register_forward_hook(lambda m, i, o: taps["tokens"].append(o.double()))]
    return scores_with_taps(reward, batches, prompts, taps, hooks)


def _compare(ours: dict, official: dict, prefix: str) -> dict:
    diff = (ours["scores"] - official["scores"]).abs()
    spread = official["scores"].std().item()
    cos = torch.nn.functional.cosine_similarity(ours["tokens"].flatten(1), official["image_tokens"].double().flatten(1))
    return {
        f"{prefix}pixels_max_abs_diff": (ours["pixels"] - official["pixels"].double()).abs().max().item(),
        f"{prefix}image_tokens_cosine_min": cos.min().item(),
        f"{prefix}mean_abs_diff_over_std": diff.mean().item() / spread,
        f"{prefix}max_abs_diff_over_std": diff.max().item() / spread,
        f"{prefix}mean_rel_diff": (diff / official["scores"].abs()).mean().item(),
        f"{prefix}max_abs_diff": diff.max().item(),
    }


def measure_parity() -> dict:
    """Parity numbers for the card."""
    return measured(run_parity)


parity = module_run(run_parity, "vqascore")


# -- parity -------------------------------------------------------------------------------------------------
def test_parity_with_official_package(parity):
    m, _, _ = parity
    scores = np.array(m["official_scores"])
    assert ((scores > 0) & (scores < 1)).all(), scores
    assert m["official_score_std"] > 0.05, f"random-weight scores barely spread ({m['official_score_std']:.3g})"
    # End to end with the default 8-bit path (pad, PIL's own arithmetic): the official pixels exactly.
    assert m["pixels_max_abs_diff"] < 1e-6, m
    assert m["image_tokens_cosine_min"] >= 0.999999, m
    assert m["mean_abs_diff_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m
    assert m["mean_rel_diff"] < 1e-5, m
    # The float resize (pil_8bit=False) differs by PIL's 8-bit rounding only (random weights magnify it).
    assert m["float_path_image_tokens_cosine_min"] >= 0.999, m
    assert m["float_path_mean_abs_diff_over_std"] < 0.05, m
    # The network alone, one padded batch of mixed prompts on the official pixels.
    assert m["same_pixels_mean_abs_diff_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m
    assert m["same_pixels_max_abs_diff_over_std"] < 1e-4, m


def test_score_is_the_geometric_mean_of_the_answer_tokens(parity):
    """exp(-mean cross-entropy over "Yes", "</s>"): the square root of the two teacher-forced probabilities."""
    _, reward, _ = parity
    x = to_tensor(_images()[2])
    with torch.no_grad():
        embeds, mask = reward.encoder_inputs(reward.image_tokens(x), ["a cat"])
        probs = reward.answer_log_probs(embeds, mask).exp()[0]
        score = reward(x, ["a cat"])[0]
    assert len(reward.answer_ids) == 2 and reward.answer_ids[1] == reward.eos_id
    torch.testing.assert_close(score, probs.prod().sqrt(), rtol=1e-6, atol=0)


# -- key mapping and files ------------------------------------------------------------------------------------------
def test_every_original_tensor_is_loaded(parity):
    _, reward, paths = parity
    original = {}
    for shard in sorted(paths["model"].glob("pytorch_model-*.bin")):
        original.update(torch.load(shard, weights_only=True))
    assert len(list(paths["model"].glob("pytorch_model-*.bin"))) > 1, "the test checkpoint should be sharded"
    assert set(vq.EMBEDDING_ALIASES) <= set(original)  # one tensor under four names
    ours = dict(reward.named_parameters())
    layers = reward.vision.config.num_hidden_layers
    assert layers == VISION["num_hidden_layers"] - 1  # the selected layer is the second to last
    used = set()
    for key, value in original.items():
        new = vq.convert_key(key, layers)
        assert new is not None, key
        if not new:
            assert f"encoder.layers.{layers}." in key or "position_ids" in key, key
            continue
        used.add(new)
        expected = value[: ours[new].shape[0]] if new in vq.VOCAB_ROWS else value
        assert torch.equal(ours[new], expected), f"{new} does not hold {key}"
    assert used == set(ours), sorted(set(ours) ^ used)
    assert ours["t5.lm_head.weight"].shape[0] == reward.vocab < original["lm_head.weight"].shape[0]


def test_checkpoint_without_vision_tower_reads_clip_weights(parity, tmp_path):
    """A release saved without its frozen CLIP tower: the tower comes from the CLIP folder's weights instead."""
    _, reward, paths = parity
    from safetensors.torch import load_file, save_file

    state = {}
    for shard in sorted(paths["model"].glob("pytorch_model-*.bin")):
        loaded = torch.load(shard, weights_only=True)
        state.update({k: v.clone() for k, v in loaded.items() if not k.startswith(vq.VISION_PREFIX)})
    state = {k: v for k, v in state.items() if k not in vq.EMBEDDING_ALIASES[1:]}  # safetensors: one name each
    folder = tmp_path / "no-vision"
    folder.mkdir()
    shutil.copy(paths["model"] / "config.json", folder)
    save_file(state, str(folder / "model.safetensors"))
    other = rewards.load("vqascore", dtype=torch.float32, checkpoint=folder, tokenizer=paths["tokenizer"],
                         vision=paths["vision"])
    clip = load_file(str(paths["vision"] / "model.safetensors"))
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(dict(other.named_parameters())["vision." + key.removeprefix("vision_model.")], clip[key])
    assert torch.equal(other.t5.lm_head.weight, reward.t5.lm_head.weight)


def test_mapping_names():
    assert vq.convert_key("vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", 23) == (
        "vision.encoder.layers.0.mlp.fc1.weight")
    assert vq.convert_key("vision_tower.vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight", 23) == ""
    assert vq.convert_key("mm_projector.2.bias", 23) == "projector.2.bias"
    assert {vq.convert_key(k, 23) for k in vq.EMBEDDING_ALIASES} == {"t5.shared.weight"}
    assert vq.convert_key("decoder.block.0.layer.1.EncDecAttention.q.weight", 23) == (
        "t5.decoder.block.0.layer.1.EncDecAttention.q.weight")
    assert vq.convert_key("itm_head.weight", 23) is None


# -- protocol, gradients, cache ---------------------------------------------------------------------------------
def test_protocol_attributes(parity):
    _, reward, _ = parity
    assert "vqascore" in rewards.available() and rewards.needs_prompt("vqascore")
    assert reward.input_size == 336 and "probability" in reward.scale_note
    question = vq.question("a cat")
    assert question.endswith('USER: <image>\nDoes this figure show "a cat"? Please answer yes or no. ASSISTANT: ')


def test_gradients_reach_the_pixels_and_are_the_float_paths(parity, monkeypatch):
    """Straight-through rounding: the default path's pixel gradient is the float preprocessing's backward applied to
    the network's gradient at the 8-bit pixels (to float rounding); the float path's own gradient is close."""
    _, reward, _ = parity
    x = quantize_8bit(to_tensor(_images()[3]))  # 512 x 300: padded, downscaled
    prompt = ["a cameraman"]
    pixels = x.clone().requires_grad_(True)
    reward(pixels, prompt).sum().backward()
    default = pixels.grad
    assert torch.isfinite(default).all() and default.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())

    network_input = reward.preprocess(x).detach().requires_grad_(True)
    with monkeypatch.context() as patch:
        patch.setattr(reward, "preprocess", lambda images: network_input)
        (upstream,) = torch.autograd.grad(reward(x, prompt).sum(), network_input)
    pixels = x.clone().requires_grad_(True)
    square = vq.pad_square(pixels, vq.PAD_LEVELS)
    float_input = reward.normalize(resize_bicubic(square, (reward.input_size,) * 2))
    (expected,) = torch.autograd.grad((float_input * upstream).sum(), pixels)
    close = torch.isclose(default, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    assert close.float().mean() > 0.995, close.float().mean()  # the rest: pixels where a pass's clip to [0, 255]
    cosine = torch.nn.functional.cosine_similarity(default.flatten(), expected.flatten(), dim=0)  # acts on one
    assert cosine > 0.99999, cosine  # path's intermediate (8-bit vs float) and not on the other's

    reward.pil_8bit = False
    try:
        pixels = x.clone().requires_grad_(True)
        reward(pixels, prompt).sum().backward()
    finally:
        reward.pil_8bit = True
    cosine = torch.nn.functional.cosine_similarity(default.flatten(), pixels.grad.flatten(), dim=0)
    assert cosine > 0.99, cosine  # the network evaluated at float instead of 8-bit pixels


def test_bfloat16_by_default_near_float32(parity):
    _, reward, paths = parity
    half = rewards.load("vqascore", **sources(paths))  # bf16 unless asked otherwise: 11B parameters
    assert half.t5.lm_head.weight.dtype == half.vision.pre_layrnorm.weight.dtype == torch.bfloat16
    assert half.normalize.mean.dtype == torch.float32  # bf16 would move the CLIP mean by ~1e-3
    x8 = quantize_8bit(torch.rand(1, 3, 40, 50, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(half.preprocess(x8), reward.preprocess(x8), rtol=0, atol=0)
    x = to_tensor(_images()[1])
    with torch.no_grad():
        low, full = half(x, ["a cup"]), reward(x, ["a cup"])
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - full).abs().max() < 0.3 * parity[0]["official_score_std"], (low, full)  # bf16 rounding


def test_prompt_cache_encodes_each_prompt_once(parity, monkeypatch):
    _, reward, _ = parity
    reward.clear_text_cache()
    calls = []
    encode = reward.encode_text
    monkeypatch.setattr(reward, "encode_text", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    first = reward.question_tokens(["a cat", "a cat", "a dog"])
    again = reward.question_tokens(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]
    assert torch.equal(again[1], first[0]) and first[0][-1].item() == reward.eos_id
    assert reward.head_ids[-1] == reward.eos_id  # each chunk around the image marker ends with </s>


# -- bad input and bad files -------------------------------------------------------------------------------------
def test_bad_inputs(parity):
    _, reward, _ = parity
    assert_rejects_bad_inputs(reward)
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(rewards.InputError, match="image marker"):
        reward(x, ["a", "an <image> of a cat"])


def test_missing_files_say_where_and_how(tmp_path, parity):
    _, _, paths = parity
    with pytest.raises(rewards.MissingFileError, match=r"config\.json.*checkpoint="):
        rewards.load("vqascore", checkpoint=tmp_path, tokenizer=paths["tokenizer"])
    shutil.copy(paths["model"] / "config.json", tmp_path)
    with pytest.raises(rewards.MissingFileError, match=r"no weights found.*checkpoint="):
        rewards.load("vqascore", checkpoint=tmp_path, tokenizer=paths["tokenizer"])
    with pytest.raises(rewards.MissingFileError, match=r"tokenizer\.json.*tokenizer="):
        rewards.load("vqascore", checkpoint=paths["model"], tokenizer=tmp_path)


def test_foreign_and_missing_keys_are_named(tmp_path, parity):
    _, _, paths = parity
    from safetensors.torch import save_file

    shutil.copy(paths["model"] / "config.json", tmp_path)
    save_file({"mm_projector.0.weight": torch.zeros(64, 32), "itm_head.weight": torch.zeros(2, 2),
               "lm_head.weight": torch.zeros(3, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(rewards.CheckpointMismatchError, match=r"itm_head\.weight.*lm_head\.weight: 3 rows"):
        rewards.load("vqascore", checkpoint=tmp_path, **{k: v for k, v in sources(paths).items() if k != "checkpoint"})


def test_mixture_and_cli(parity, tmp_path):
    _, reward, paths = parity
    mix = rewards.combine({"vqascore": 1.0, "sharpness": 0.05}, dtype=torch.float32,
                          sources={"vqascore": sources(paths)})
    x = to_tensor(_images()[4])
    with torch.no_grad():
        expected = reward(x, ["a cat"]) + 0.05 * rewards.load("sharpness")(x)
        torch.testing.assert_close(mix(x, ["a cat"]), expected)
    from rewards.cli import main

    out = tmp_path / "scores.csv"
    image = paths["model"].parent / "image4.png"
    argv = ["score", "--reward", "vqascore", "--prompt", "a cat", "--device", "cpu", "--dtype", "float32",
            "--out", str(out), str(image)] + [f"--source=vqascore.{k}={v}" for k, v in sources(paths).items()]
    assert main(argv) == 0
    row = out.read_text().splitlines()[1].split(",")
    assert float(row[-1]) == pytest.approx(float(expected[0] - 0.05 * rewards.load("sharpness")(x)[0]), rel=1e-5)


def test_weights_found_from_an_index_or_a_file(parity):
    _, _, paths = parity
    index = paths["model"] / "pytorch_model.bin.index.json"
    shards = vq.weight_files(paths["model"], paths["model"] / "config.json")
    assert shards == vq.weight_files(index, paths["model"] / "config.json") and len(shards) > 1
    assert vq.weight_files(shards[0], paths["model"] / "config.json") == [shards[0]]


def test_benchmark_peer_loads_the_same_weights(tmp_path):
    """imscore's VQAScore on the benchmark's files: on a 336 px 8-bit image (no pad, no resize) it equals ours
    exactly once the class token it passes on as a 577th image token is dropped (the official drops it)."""
    pytest.importorskip("imscore")
    from benchmarks import imscore_models
    from benchmarks import reward_models as rm

    with rm.tiny_architectures():
        files = rm.write_files(tmp_path, tiny=True, rewards=("vqascore",))
        ours = rm.load_ours("vqascore", files, device="cpu", dtype=torch.float32)
        theirs = imscore_models.load("vqascore", files, device="cpu", dtype=torch.float32)
    x = quantize_8bit(torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)))
    prompt = [rm.PROMPTS[0]]
    with torch.no_grad():
        mine, peer = ours(x, prompt), imscore_models.score(theirs, x, prompt)
        theirs.mm_projector.insert(0, _DropClassToken())
        peer_patch_tokens = imscore_models.score(theirs, x, prompt)
    assert not torch.equal(mine, peer)
    torch.testing.assert_close(peer_patch_tokens, mine, rtol=1e-6, atol=0)


class _DropClassToken(torch.nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:]


def test_tuner_accepts_vqascore(capsys):
    from tuner.run import main

    assert main(["--check", "reward=vqascore"]) == 0
    assert main(["--check", "reward={vqascore: 1.0, sharpness: 0.05}"]) == 0
    assert main(["--check", "reward=vqascor"]) == 2  # the check does read reward names
    assert "Did you mean 'vqascore'" in capsys.readouterr().err
