"""MPS: parity with the official evaluation script's formula computed on imscore's MPS modules (imscore 0.0.11, a
copy of the official model code) on the same weights, every difference from imscore's own score measured; the
official pickle read without running any of its code; loading, gradients, and the errors a user can act on.

Files: a tiny configuration of the real architecture with random weights, written in the official whole-model pickle
layout and in imscore's safetensors layout (benchmarks.checkpoints_mps). Images: skimage photographs at several sizes
and aspect ratios, as 8-bit PNG content.
"""

from __future__ import annotations

import builtins
import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from benchmarks import checkpoints_mps as cm
from benchmarks import imscore_models
from rewards import mps
from tests.parity import TARGET_MEAN_DIFF_OVER_STD, assert_rejects_bad_inputs
from tests.test_pickscore import official_processor, parity_images, to_tensor

pytestmark = pytest.mark.skipif(not imscore_models.available(), reason="the MPS oracle runs imscore's modules")

EXTRA_PROMPTS = ["a portrait of a woman with long hair, soft light, detailed face and hands",
                 "a red cup on a wooden table, three apples, word art"]  # words of the condition: some tokens kept


# -- files and models ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return cm.write_mps(tmp_path_factory.mktemp("mps"), cm.MPS_SMALL, seed=0)


def _sources(files: dict) -> dict:
    return {"checkpoint": files["pickle"], "tokenizer": files["tokenizer"]}


@pytest.fixture(scope="module")
def reward(files):
    return rewards.load("mps", **_sources(files))


def _imscore(files: dict, dtype: torch.dtype):
    paths = {"checkpoint": files["safetensors"], "config": files["config"], "tokenizer": files["tokenizer"]}
    extra = {"mps_imscore": paths}
    return imscore_models.load("mps", {"extra": extra}, device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def imscore(files):
    model = _imscore(files, torch.float32)
    yield model
    del model
    gc.collect()


def _cases() -> tuple[list[np.ndarray], list[str]]:
    images, prompts = parity_images()
    return images + images[:2], prompts + EXTRA_PROMPTS


# -- the oracle: the evaluation script's formula on imscore's modules --------------------------------------------------
def eval_script_score(model, pixels: torch.Tensor, prompt: str, threshold: float) -> float:
    """eval_overall_mps_on_{imagereward,hpdv2}.py, infer_one_sample (lines 55-78): ONE image, its prompt and the
    "overall" condition through the official modules (imscore's copies), condition mask at `threshold`, class token of
    the cross model, logit_scale.exp() * cosine with the prompt's EOS feature. Pixels stay float32 (the script's
    .half() is a float16 model's input cast; measured separately)."""
    clip, tok = model.mps.model, model.tokenizer
    ids = [tok(t, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
           for t in (prompt, mps.CONDITION)]
    with torch.no_grad():
        text_tokens, text_eos = clip.get_text_features(ids[0])
        condition_tokens, _ = clip.get_text_features(ids[1])
        image_tokens = clip.get_image_features(pixels)
        relevance = (text_tokens[0] @ condition_tokens[0].T).max(dim=1).values  # best condition token per text token
        relevance = relevance / relevance.max()
        additive = torch.zeros_like(relevance).masked_fill(~(relevance > threshold), float("-inf"))
        mask = additive.expand(1, image_tokens.shape[1], -1)
        feature = model.mps.cross_model(image_tokens, text_tokens, mask)[:, 0]
        cosine = F.cosine_similarity(feature.double(), text_eos.double(), dim=-1)
        return (model.mps.logit_scale.double().exp() * cosine).item()


def imscore_score_on(model, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """imscore's own score(), fed already-preprocessed pixels (its torchvision resize/crop/normalise skipped)."""
    process = model._process
    model._process = lambda x: x
    try:
        with torch.no_grad():
            return model.score(pixels, prompts).double()
    finally:
        model._process = process


def measure_parity(spec: dict = cm.MPS_CONFIG, files: dict | None = None, float16: bool = False) -> dict:
    """Ours vs the eval script's formula on imscore's modules, and every difference from imscore measured; full size
    by default (docs/parity.py), written to a temporary folder unless `files` are given. The oracle models are freed
    before ours loads, so at most one float32 model is in memory."""
    if files is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return measure_parity(spec, cm.write_mps(Path(tmp), spec, seed=0), float16)
    images, prompts = _cases()
    processor = official_processor()
    pixels = [processor(images=Image.fromarray(im), return_tensors="pt")["pixel_values"] for im in images]
    out: dict[str, list[float]] = {}
    oracle = _imscore(files, torch.float32)
    for pix, prompt in zip(pixels, prompts):
        out.setdefault("formula", []).append(eval_script_score(oracle, pix, prompt, mps.MASK_THRESHOLD))
        out.setdefault("formula_001", []).append(eval_script_score(oracle, pix, prompt, 0.01))
        out.setdefault("imscore_001", []).append(imscore_score_on(oracle, pix, [prompt]).item())  # one per call
    del oracle
    if float16:  # the official script's precision: the released model is float16 (slow on a CPU at full size)
        half = _imscore(files, torch.float16)
        out["formula_fp16"] = [eval_script_score(half, pix.half(), p, mps.MASK_THRESHOLD)
                               for pix, p in zip(pixels, prompts)]
        del half
    gc.collect()
    reward = rewards.load("mps", **_sources(files))
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            for key, threshold, eight_bit in (("ours", 0.3, True), ("ours_001", 0.01, True),
                                              ("ours_float", 0.3, False)):
                reward.mask_threshold, reward.pil_8bit = threshold, eight_bit
                out.setdefault(key, []).append(reward(to_tensor(image), [prompt]).item())
    del reward
    gc.collect()
    return _summary({k: np.asarray(v, dtype=np.float64) for k, v in out.items()}, len(images))


def _summary(arrays: dict[str, np.ndarray], images: int) -> dict:
    spread = arrays["formula"].std()
    metrics = {"images": images, "formula_std": float(spread),
               "scores": {k: v.round(5).tolist() for k, v in arrays.items()}}
    pairs = (("ours_vs_formula", "ours", "formula"), ("ours_vs_formula_001", "ours_001", "formula_001"),
             ("imscore_vs_formula_001", "imscore_001", "formula_001"), ("threshold_effect", "formula", "formula_001"),
             ("float_path", "ours_float", "formula"), ("official_fp16", "formula_fp16", "formula"))
    for label, a, b in pairs:
        if a in arrays and b in arrays:
            diff = np.abs(arrays[a] - arrays[b])
            metrics[f"{label}_mean_over_std"] = float(diff.mean() / spread)
            metrics[f"{label}_max_over_std"] = float(diff.max() / spread)
    return metrics


@pytest.fixture(scope="module")
def parity(files) -> dict:
    metrics = measure_parity(cm.MPS_SMALL, files, float16=True)
    print(metrics)  # shown with pytest -s
    return metrics


# -- parity ---------------------------------------------------------------------------------------------------------
def test_parity_with_the_eval_script_formula(parity):
    m = parity
    assert m["formula_std"] > 1.0, f"random-weight scores barely spread: {m}"
    assert m["ours_vs_formula_mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m
    assert m["ours_vs_formula_max_over_std"] <= 10 * TARGET_MEAN_DIFF_OVER_STD, m
    assert m["ours_vs_formula_001_mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, m  # imscore's threshold, ours too
    assert m["float_path_mean_over_std"] < 1e-2, m  # pil_8bit=False: PIL's 8-bit rounding only
    # The script itself runs the float16 release in float16 (rotary angles included): float16 rounding away.
    assert 0 < m["official_fp16_mean_over_std"] < 1e-2, m


def test_differences_from_imscore_are_the_ones_explained(parity):
    """imscore's own score (threshold 0.01, as the model's forward and the README) differs from the same formula at
    0.01 only by its float16 cast of the normalised pixels (`image_inputs.half()`, a float16 model's input cast
    that imscore keeps in float32); the eval scripts' threshold 0.3 changes some scores by more."""
    m = parity
    assert 0 < m["imscore_vs_formula_001_max_over_std"] < 1e-2, m
    assert m["threshold_effect_max_over_std"] > 10 * m["imscore_vs_formula_001_max_over_std"], m


def test_imscore_normalises_the_condition_similarity_over_its_batch(reward, imscore):
    """imscore divides by the maximum over the whole batch (the model's forward, written for batches of one prompt);
    the eval script scores one image per call. Ours scores each image alone whatever its batch holds."""
    images, prompts = _cases()
    x = torch.stack([to_tensor(images[0])[0], to_tensor(images[0])[0]])
    pixels = official_processor()(images=[Image.fromarray(images[0])] * 2, return_tensors="pt")["pixel_values"]
    pair = [prompts[0], EXTRA_PROMPTS[0]]
    alone = torch.cat([imscore_score_on(imscore, pixels[i:i + 1], [p]) for i, p in enumerate(pair)])
    together = imscore_score_on(imscore, pixels, pair)
    with torch.no_grad():
        ours_together = reward(x, pair).double()
        ours_alone = torch.cat([reward(x[i:i + 1], [p]).double() for i, p in enumerate(pair)])
    torch.testing.assert_close(ours_together, ours_alone, atol=1e-5, rtol=0)
    assert not torch.allclose(alone, together, atol=1e-6, rtol=0), (alone, together)


# -- loading ---------------------------------------------------------------------------------------------------------
def test_pickle_and_safetensors_hold_the_same_model(reward, files):
    other = rewards.load("mps", checkpoint=files["safetensors"], config=files["config"], tokenizer=files["tokenizer"])
    ours, theirs = reward.state_dict(), other.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(2, 3, 230, 260, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reward(x, ["a cat", "a dog"]), other(x, ["a cat", "a dog"]), atol=0, rtol=0)


def test_every_official_tensor_is_used_once(files, reward):
    state, config = mps.read_official_pickle(files["pickle"])
    assert config["vision_config"]["patch_size"] == 14 and config["text_config"]["hidden_act"] == "gelu"
    ours = reward.state_dict()
    converted, cached = mps.convert_checkpoint(state, source="test")
    assert cached == {} and sorted(converted) == sorted(ours)
    for key, value in state.items():
        new = mps.convert_key(key)
        if new is not None:
            assert torch.equal(ours[new], value.float()), f"{new} does not hold {key}"
    assert mps.convert_key("model.text_model.embeddings.position_ids") is None
    assert mps.convert_key("mps.cross_model.layers.3.1.fn.ff_out.1.weight") == "branch.layers.3.self_ff_out.weight"


def test_a_cached_rotary_table_in_the_pickle_is_what_the_official_code_uses(tmp_path):
    """A used official model caches its rotary table (pos_emb, computed in the training dtype) and never recomputes
    it; the table read from the pickle replaces position * inv_freq."""
    paths = cm.write_mps(tmp_path, cm.MPS_SMALL, seed=0, pos_emb=True)
    state, _ = mps.read_official_pickle(paths["pickle"])
    table = state["cross_model.layers.1.1.fn.pos_emb"].float()
    loaded = rewards.load("mps", **_sources(paths))
    torch.testing.assert_close(loaded.branch.layers[1].rope_cos, table.cos(), atol=0, rtol=0)
    inv_freq = state["cross_model.layers.1.1.fn.rotary_emb.inv_freq"].float()
    fresh = torch.outer(torch.arange(table.shape[0]).float(), inv_freq)
    assert not torch.equal(table[:, : fresh.shape[1]], fresh)  # float16 angles: the cached table is not recomputed


def test_bfloat16(reward, files):
    low = rewards.load("mps", dtype=torch.bfloat16, **_sources(files))
    assert low.clip.logit_scale.dtype == torch.bfloat16 and low.branch.layers[0].rope_cos.dtype == torch.bfloat16
    x = torch.rand(2, 3, 224, 300, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = low(x, ["a cat", "a dog"]), reward(x, ["a cat", "a dog"])
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert (a - b).abs().max() < 1.0, (a, b)  # bf16 rounding, scores of spread ~10


# -- the pickle never runs code -------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _write_payload(path: Path, obj) -> Path:
    torch.save({"model": obj}, path, pickle_module=cm.OFFICIAL_PICKLE)
    return path


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "admitted class called", "admitted function called"])
def test_a_malicious_pickle_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "ran"
    payloads = {  # (payload, what the error names)
        "os.system": (_Payload(os.system, f"touch {marker}"), "GLOBAL posix.system"),
        "builtins.exec": (_Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "GLOBAL exec"),
        "admitted class called": (_Payload(cm.Function(mps.ROOT_CLASS), "x"), f"tried to call {mps.ROOT_CLASS}"),
        "admitted function called": (_Payload(cm.Function("torch._C._nn.gelu"), "x"),
                                     "tried to call torch._C._nn.gelu"),
    }
    payload, named = payloads[kind]
    path = _write_payload(tmp_path / "MPS_overall_checkpoint.pth", payload)
    with pytest.raises(rewards.UnsafeCheckpointError, match="refused to load") as err:
        rewards.load("mps", checkpoint=path, tokenizer=tmp_path)
    assert named in str(err.value) and "never runs code" in str(err.value)
    assert not marker.exists()


def test_the_stand_ins_admit_nothing_else():
    names = {name for _, name in mps._stand_ins()}
    assert names == set(mps.PICKLED_CLASSES) | set(mps.PICKLED_FUNCTIONS)
    assert not any(n.startswith(("builtins", "os", "posix", "subprocess", "sys")) for n in names)
    for stand_in, _ in mps._stand_ins():
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            stand_in("argument")


# -- gradients ------------------------------------------------------------------------------------------------------
def test_gradients_reach_the_pixels_and_match_the_float_path(reward, files):
    """Straight-through 8-bit rounding: the default path's gradient is the float path's, as for the other rewards."""
    floats = rewards.load("mps", pil_8bit=False, **_sources(files))
    images, _ = parity_images()
    x = to_tensor(images[3])  # rocket 427x640: downscaling, odd crop margin
    grads = []
    for model in (reward, floats):
        pixels = x.clone().requires_grad_(True)
        model(pixels, ["a rocket on the launch pad at dusk"]).sum().backward()
        grads.append(pixels.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    cosine = F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert cosine > 0.9995, cosine


# -- protocol, cache, errors ------------------------------------------------------------------------------------------
def test_protocol_attributes(reward):
    assert "mps" in rewards.available() and rewards.needs_prompt("mps")
    assert reward.name == "mps" and reward.input_size == 224 and reward.mask_threshold == 0.3
    assert reward.clip.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-3)
    assert not any(p.requires_grad for p in reward.parameters())


def test_prompts_are_encoded_once(reward, monkeypatch):
    calls = []
    encode = reward.encode_text
    monkeypatch.setattr(reward, "encode_text", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    reward.clear_text_cache()
    x = torch.rand(3, 3, 224, 224)
    reward(x, ["x", "y", "x"])
    reward(x, ["y", "x", "x"])
    assert calls == [["x", "y"]]


def test_bad_inputs(reward):
    assert_rejects_bad_inputs(reward)
    with pytest.raises(TypeError, match="accepts: checkpoint, config, tokenizer, pil_8bit"):
        rewards.load("mps", weights="x")


def test_missing_files_say_where_and_how(files, tmp_path):
    with pytest.raises(rewards.MissingFileError, match=r"model\.safetensors.*checkpoint="):
        rewards.load("mps", checkpoint=tmp_path, tokenizer=files["tokenizer"])
    with pytest.raises(rewards.MissingFileError, match=r"config\.json.*config="):
        rewards.load("mps", checkpoint=files["safetensors"], config=tmp_path, tokenizer=files["tokenizer"])
    with pytest.raises(rewards.MissingFileError, match=r"vocab\.json.*tokenizer="):
        rewards.load("mps", checkpoint=files["pickle"], tokenizer=tmp_path)


def test_wrong_or_damaged_files(files, tmp_path):
    plain = tmp_path / "state_dict.pth"
    torch.save({"cross_model.layers.0.0.fn.to_q.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(rewards.CheckpointMismatchError, match="not the official whole"):
        rewards.load("mps", checkpoint=plain, tokenizer=files["tokenizer"])
    cut = tmp_path / "cut.pth"
    cut.write_bytes(Path(files["pickle"]).read_bytes()[:5000])
    with pytest.raises(rewards.CorruptCheckpointError, match="download it again"):
        rewards.load("mps", checkpoint=cut, tokenizer=files["tokenizer"])
    from safetensors.torch import load_file, save_file

    state = load_file(str(files["safetensors"]))
    del state["mps.cross_model.layers.1.0.fn.to_kv.weight"]
    state["mps.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(rewards.CheckpointMismatchError, match=r"branch\.layers\.1\.cross_kv\.weight.*extra\.weight"):
        rewards.load("mps", checkpoint=tmp_path, config=files["config"], tokenizer=files["tokenizer"])
    del state["mps.cross_model.layers.0.0.fn.to_q.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(rewards.CheckpointMismatchError, match=r"lacks branch\.layers\.0\.cross_q\.weight"):
        rewards.load("mps", checkpoint=tmp_path, config=files["config"], tokenizer=files["tokenizer"])


# -- the CLI, mixtures, the tuner --------------------------------------------------------------------------------------
def test_cli_scores_like_the_reward(reward, files, tmp_path, capsys):
    from rewards import cli

    images, prompts = parity_images()
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    out = tmp_path / "scores.csv"
    args = ["score", str(tmp_path / "a.png"), "--reward", "mps", "--prompt", prompts[0], "--out", str(out),
            "--source", f"mps.checkpoint={files['pickle']}", "--source", f"mps.tokenizer={files['tokenizer']}"]
    assert cli.main(args) == 0, capsys.readouterr().err
    import csv

    row = next(csv.DictReader(out.open()))
    with torch.no_grad():
        expected = reward(to_tensor(images[0]), [prompts[0]]).item()
    assert float(row["mps"]) == pytest.approx(expected, abs=1e-4)


def test_mixture(reward):
    mix = rewards.combine([(reward, 1.0), ("sharpness", 0.5)])
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    total = mix(x, ["a cat", "a dog"])
    total.sum().backward()
    torch.testing.assert_close(mix.last_parts["mps"], reward(x.detach(), ["a cat", "a dog"]))
    assert torch.isfinite(x.grad).all()


def test_tuner_check_accepts_mps(files, capsys):
    from tuner.run import main

    assert main(["--check", "reward=mps", f"reward_sources.mps.checkpoint={files['pickle']}"]) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert main(["--check", "reward={mps: 1.0, sharpness: 0.05}"]) == 0
