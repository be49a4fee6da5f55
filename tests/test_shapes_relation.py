"""The relation reward of the shapes domain: its caption alternatives, its scores and gradient, the discrimination
measure, the training stage that makes its CLIP, and the sweep log's table."""
import dataclasses
import json

import pytest
import torch

import rewards
from rewards.clip_score import SHAPES_CLIP_DIR
from rewards.shapes_relation import alternatives
from tuner.shapes import data
from tuner.shapes.discriminate import margins, measure, pair_scenes

pytestmark = pytest.mark.usefixtures("single_thread")


def _traded(scene: data.Scene) -> data.Scene:
    """The same scene with its two shapes' positions exchanged: it shows the opposite relation."""
    a, b = scene.shapes
    moved = [dataclasses.replace(a, x=b.x, y=b.y), dataclasses.replace(b, x=a.x, y=a.y)]
    return dataclasses.replace(scene, shapes=moved)


def test_alternatives_place_the_same_shapes_otherwise():
    pair = "an orange circle above a small blue star on a white striped background"
    assert alternatives(pair) == ["an orange circle below a small blue star on a white striped background",
                                  "a blue circle above a small orange star on a white striped background"]
    single = "a small cyan square in the bottom right corner on a brown background"
    others = alternatives(single)
    assert len(others) == len(data.PLACES) - 1 and single not in others
    assert "a small cyan square in the top left corner on a brown background" in others
    with pytest.raises(rewards.InputError, match="shapes grammar"):
        alternatives("a photo of a cat")


def test_alternatives_of_generated_captions_are_captions_of_changed_scenes():
    for scene in data.ShapesData(0).scenes(0, 60):
        got = alternatives(scene.caption)
        if len(scene.shapes) == 2:
            assert got == [data.relation_swapped(scene), data.colours_swapped(scene)]
        else:
            assert sorted(got) == sorted(data.caption(dataclasses.replace(scene, relation=p))
                                         for p in data.PLACES if p != scene.relation)


@pytest.fixture(scope="module")
def relation_reward():
    return rewards.load("shapes-relation")


def test_relation_reward_scores_the_captioned_layout_above_the_traded_one(relation_reward):
    scenes = pair_scenes(8, seed=1)
    right, wrong = data.render(scenes), data.render([_traded(s) for s in scenes])
    captions = [s.caption for s in scenes]
    good, bad = relation_reward(right, captions), relation_reward(wrong, captions)
    assert good.shape == (8,) and good.dtype == torch.float32
    assert bool((good <= 0).all()) and bool((bad <= 0).all())  # log-probabilities
    assert bool((good > bad).all()) and float(good.mean()) > -0.1 and float(bad.mean()) < -2


def test_relation_reward_has_a_gradient_that_raises_it(relation_reward):
    scene = pair_scenes(1, seed=1)[0]
    image = data.render([_traded(scene)]).requires_grad_(True)
    score = relation_reward(image, [scene.caption])
    (grad,) = torch.autograd.grad(score.sum(), image)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    with torch.no_grad():
        step = relation_reward((image + 1e-2 * grad / grad.norm()).clamp(0, 1), [scene.caption])
    assert float(step) > float(score.detach())


def test_discrimination_is_perfect_on_rendered_pairs_and_flips_on_traded_ones():
    clip = rewards.load("clip", checkpoint=SHAPES_CLIP_DIR)
    scenes = pair_scenes(16, seed=1)
    figures = measure(clip, scenes, seeds=[], radii=(0.0, 8.0))
    assert figures["rendered"] == {"relation": 1.0, "colours": 1.0, "n": 16}
    assert figures["rendered_attacked_l2_0"]["relation"] == 1.0  # a step of length 0 changes nothing
    assert figures["rendered_attacked_l2_8"]["relation"] <= 0.25  # shapes-clip is not robust (docs/shapes.md)
    traded = margins(clip, data.render([_traded(s) for s in scenes]), scenes)
    assert float((traded["relation"] < 0).float().mean()) >= 0.9  # the picture now shows the swapped caption


def test_discrimination_on_samples_reports_agreement_with_the_judge():
    clip = rewards.load("clip", checkpoint=SHAPES_CLIP_DIR)
    row = measure(clip, pair_scenes(4, seed=1), seeds=[0], steps=4)["samples_seed0"]
    assert set(row) == {"relation", "colours", "n", "agreement", "judged", "judge_relation"} and row["n"] == 4
    assert 0 <= row["judged"] <= 4 and 0 <= row["agreement"] <= 1


def test_relation_stage_writes_a_folder_the_reward_loads(tmp_path):
    from tuner.shapes.train import main

    assert main([f"--out={tmp_path}", "--stage=relation", "--workers=0", "--relation-steps=2",
                 "--relation-batch=4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "logs" / "relation.jsonl").read_text().splitlines()]
    assert rows[-1]["done"] == 2 and rows[1]["init"] == "shipped shapes-clip" and "loss" in rows[2]
    reward = rewards.load("shapes-relation", checkpoint=tmp_path / "relation")
    images, captions = data.ShapesData(1).batch(0, 2)
    assert reward(images, captions).shape == (2,)


def test_relation_reward_runs_on_the_shipped_shapes_clip_by_default(relation_reward):
    clip = rewards.load("shapes-clip")
    assert all(torch.equal(a, b) for a, b in zip(relation_reward.model.state_dict().values(),
                                                clip.model.state_dict().values()))


def test_sweep_table_lists_the_base_model_once_and_each_setting(tmp_path):
    from benchmarks.shapes_relation import table

    tally = {"colors": [9, 10], "background": [10, 10], "place": [4, 5], "relation": [3, 5], "all": [7, 10]}
    rows = [{"name": n, "overrides": [f"train.lr={n}"], "captions": 5, "seeds": 2, "before": tally,
             "after": {**tally, "relation": [r, 5]}, "seconds": 1} for n, r in (("a", 4), ("b", 5))]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = table(log).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| base model (5 x 2 seeds)") and "| 60.0 |" in lines[2]
    assert "| 80.0 |" in lines[3] and "| 100.0 |" in lines[4]


def test_relation_config_validates_and_its_caption_sets_are_disjoint():
    from benchmarks.shapes_relation import CONFIG
    from tuner.config import load_config, validate
    from tuner.prompts import read_prompts
    from tuner.shapes.judge import held_out_captions

    cfg = validate(load_config(str(CONFIG), []))
    assert cfg.reward == "shapes-relation" and cfg.log.judge_captions == 128 and cfg.log.judge_seeds == 2
    train, gallery, select = (set(read_prompts(f)) for f in ("shapes_pairs", "shapes_pairs_gallery",
                                                              "shapes_pairs_select"))
    test = set(held_out_captions(cfg.log.judge_captions, exclude=train))
    assert (len(train), len(gallery), len(select)) == (240, 6, 32)
    assert not (train & gallery or train & select or train & test or gallery & select or gallery & test or select & test)
    pairs = {s.caption for s in data.ShapesData(0).scenes(0, 1000) if len(s.shapes) == 2}
    assert train <= pairs  # the training seed's two-shape captions


def test_blurred_relation_reward_scores_the_blurred_image_and_resists_the_one_step_attack():
    from scipy.ndimage import gaussian_filter

    from rewards.shapes_relation import low_pass
    from tuner.shapes.discriminate import attacked

    sharp, blurred = rewards.load("shapes-relation"), rewards.load("shapes-relation", blur=2)
    scenes = pair_scenes(32, seed=1)
    images, captions = data.render(scenes), [s.caption for s in scenes]
    oracle = torch.from_numpy(gaussian_filter(images.numpy(), sigma=(0, 0, 2, 2), mode="mirror", truncate=3.0))
    torch.testing.assert_close(blurred(images, captions), sharp(oracle, captions), atol=1e-4, rtol=0)
    traded = data.render([_traded(s) for s in scenes])
    assert bool((blurred(images, captions) > blurred(traded, captions)).all())
    clip = rewards.load("shapes-clip")
    kept = {b: attacked(lambda x, p, b=b: clip(low_pass(x, b), p), scenes, radius=2.0)
            for b in (0.0, 2.0)}
    assert kept[2.0] > kept[0.0] + 0.3, kept
    with pytest.raises(rewards.InputError, match="blur"):
        rewards.load("shapes-relation", blur=-1)


def test_reward_sources_take_numeric_load_options():
    from benchmarks.shapes_relation import CONFIG
    from tuner.config import load_config, validate

    cfg = validate(load_config(str(CONFIG), ["reward_sources={shapes-relation: {blur: 2}}"]))
    assert cfg.reward_sources == {"shapes-relation": {"blur": 2.0}}


def test_selftrain_keeps_the_samples_the_reward_calls_right():
    from benchmarks.shapes_selftrain import kept_by_reward

    scenes = pair_scenes(16, seed=1)
    images = torch.cat([data.render(scenes), data.render([_traded(s) for s in scenes])])
    kept = kept_by_reward(images, [s.caption for s in scenes] * 2, keep=0.9)
    assert bool(kept[:16].all()) and not bool(kept[16:].any())


def test_selftrain_table_lists_each_logged_run(tmp_path):
    from benchmarks.shapes_selftrain import flipped, table

    log = tmp_path / "log.jsonl"
    row = {"source": "none", "trained": "nothing", "steps": 0, "lr": 1e-3, "guidance": 5.0, "flip_relations": True,
           "after": {"colors": [3, 4], "background": [4, 4], "place": [1, 2], "relation": [1, 4], "all": [2, 4]},
           "seconds": 7}
    log.write_text(json.dumps(row) + "\n")
    lines = table(log).splitlines()
    assert len(lines) == 3
    assert lines[2].endswith("| relation flipped | - | 75.0 | 100.0 | 50.0 | 25.0 | 50.0 | 7 |")
    pair = "a red circle left of a blue square on a white background"
    assert flipped(pair) == "a red circle right of a blue square on a white background"
    single = "a red circle in the top left corner on a white background"
    assert flipped(single) == single


def test_selftrain_fine_tune_trains_the_text_encoder_and_restores_the_frozen_encoding():
    import argparse

    from benchmarks.shapes_selftrain import batches, fine_tune
    from tuner import pipelines, shapes

    adapter = pipelines.load_adapter(str(shapes.MODEL_DIR), device=torch.device("cpu"), dtype=torch.float32)
    args = argparse.Namespace(full=False, text_encoder=True, lr=1e-3, steps=1)
    draw, info = batches("rendered", adapter, [], args)
    before = {k: v.clone() for k, v in adapter.pipe.text_encoder.state_dict().items()}
    fine_tune(adapter, draw, args)
    after = adapter.pipe.text_encoder.state_dict()
    assert info == {} and any(not torch.equal(before[k], after[k]) for k in before)
    assert "encode_prompts" not in vars(adapter)
    assert adapter.encode_prompts(["a red circle left of a blue square on a white background"]).prompt_embeds \
        .requires_grad is False
