"""The shipped shapes model: its procedural data, its tokenizer, the pipeline and CLIP it ships, its training script."""
import json
import math
import random
import subprocess
import sys

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

import rewards
from rewards.clip_score import SHAPES_CLIP_DIR
from tuner import shapes
from tuner.shapes import data, models
from tuner.shapes.evaluate import caption_checks, clip_accuracy, generate

pytestmark = pytest.mark.usefixtures("single_thread")


def _scene(kind: str, radius: float = 15.0) -> data.Scene:
    shape = data.Shape(kind, "white", "large", 32.0, 32.0, radius, 0.0)
    return data.Scene([shape], "black", "plain", 0.0, 10.0, 0.0, "in the center")


def test_dataset_is_deterministic_and_captions_describe_scenes():
    images, captions = data.ShapesData(0).batch(100, 16)
    again, captions_again = data.ShapesData(0).batch(100, 16)
    other, _ = data.ShapesData(1).batch(100, 16)
    assert torch.equal(images, again) and captions == captions_again
    assert not torch.equal(images, other)
    assert images.shape == (16, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    for scene in data.ShapesData(0).scenes(0, 200):
        words = scene.caption.split()
        assert all(s.color in words and s.kind in words for s in scene.shapes)
        assert scene.background in words[words.index("on", len(words) - 5):]


@pytest.mark.parametrize("kind, area", [("circle", math.pi * (0.85 * 15) ** 2), ("square", (2 * 0.72 * 15) ** 2),
                                        ("hexagon", 2 * math.sqrt(3) * (0.85 * 15) ** 2)])
def test_rendered_shapes_cover_their_geometric_area(kind, area):
    image = data.render([_scene(kind)])[0][0]
    black, white = data.COLORS["black"][0], data.COLORS["white"][0]
    covered = float(((image - black) / (white - black)).sum())  # anti-aliased edge pixels count by their share
    assert covered == pytest.approx(area, rel=0.02)


def test_rendered_star_and_triangle_are_upright_and_mirror_symmetric():
    for kind in ("star", "triangle", "cross", "diamond"):
        image = data.render([_scene(kind)])[0]
        assert torch.allclose(image, image.flip(-1), atol=1e-4), kind  # centred and unrotated: mirror symmetric
    rows = data.render([_scene("triangle")])[0][0].sum(-1)
    covered = torch.nonzero(rows > rows.min() + 0.5).flatten()
    top, bottom = int(covered[0]), int(covered[-1])
    assert rows[top + 3] < rows[bottom - 3] / 3  # pointing up: narrow at the top, wide at the bottom


def test_every_caption_word_is_one_token_and_other_text_still_tokenizes():
    tok = models.tokenizer()
    for word in data.vocabulary():
        assert len(tok(word).input_ids) == 3, word  # <start> word <end>
    ids = tok("a red circle, zebra!").input_ids
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredcircle,zebra!"


@pytest.mark.parametrize("folder", [shapes.MODEL_DIR / "tokenizer", SHAPES_CLIP_DIR])
def test_shipped_tokenizer_files_match_the_code_and_the_legacy_files(folder):
    tok = models.tokenizer()
    captions = [s.caption for s in data.ShapesData(3).scenes(0, 50)]
    want = tok(captions).input_ids
    assert CLIPTokenizer.from_pretrained(str(folder))(captions).input_ids == want
    legacy = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))  # what transformers 4 reads
    assert legacy(captions).input_ids == want


def test_mismatched_caption_changes_exactly_one_fact():
    rng = random.Random(0)
    facts = set()
    for scene in data.ShapesData(1).scenes(0, 300):
        negative, fact = data.mismatched_caption(scene, rng)
        facts.add(fact)
        assert negative != scene.caption
        if fact == "swap":  # the same words in another order (articles follow the colours)
            content = lambda c: sorted(w for w in c.split() if w not in ("a", "an"))  # noqa: E731
            assert content(negative) == content(scene.caption)
    assert facts == {"color", "kind", "size", "where", "background", "swap"}


def test_shipped_safetensors_fit_the_budget():
    files = [*shapes.MODEL_DIR.glob("*/*.safetensors"), *SHAPES_CLIP_DIR.glob("*.safetensors")]
    assert len(files) == 4
    assert sum(f.stat().st_size for f in files) <= 25_000_000


def test_shipped_pipeline_loads_with_stock_diffusers_and_follows_captions():
    pipe = StableDiffusionPipeline.from_pretrained(shapes.MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    scenes = data.ShapesData(1).scenes(0, 12)
    images = generate(pipe, [s.caption for s in scenes], "cpu", steps=20)
    real = data.render(scenes)
    own = caption_checks(images, scenes, real)
    shuffled = scenes[1:] + scenes[:1]
    other = caption_checks(images, shuffled, data.render(shuffled))
    # measured on 128 held-out captions (docs/shapes.md): colours 1.0 and background 1.0; shuffled 0.16 / 0.11
    assert own["colors"] >= 0.75 and own["background"] >= 0.9
    assert other["colors"] <= 0.5 and other["background"] <= 0.5


def test_shipped_clip_prefers_the_true_caption_and_matches_open_clip():
    reward = rewards.load("shapes-clip")
    assert reward.name == "shapes-clip" and reward.needs_prompt and reward.input_size == 64
    scenes = data.ShapesData(1).scenes(0, 256)
    images = data.render(scenes)
    accuracy = clip_accuracy(reward, images, scenes)
    assert accuracy["all"] >= 0.9  # held-out images against their caption with one fact changed (measured 0.98)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{SHAPES_CLIP_DIR}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{SHAPES_CLIP_DIR}")
    captions = [s.caption for s in scenes[:32]]
    with torch.no_grad():
        pixels = torch.stack([preprocess(data_to_pil(image)) for image in images[:32]])
        want = (model.eval().encode_image(pixels, normalize=True) * model.encode_text(tokenizer(captions), normalize=True)).sum(-1)
    got = reward(images[:32], captions)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)  # the oracle scores 8-bit PIL images; so does the reward


def data_to_pil(image: torch.Tensor):
    from tuner.logging import to_pil

    return to_pil(image)


def test_training_script_runs_every_stage_and_writes_stock_loadable_folders(tmp_path):
    small = ["--workers=0", "--vae-steps=2", "--vae-batch=4", "--clip-steps=2", "--clip-batch=4", "--unet-steps=2",
             "--unet-batch=4"]
    from tuner.shapes.train import main

    for stage in ("vae", "clip", "unet"):
        assert main([f"--out={tmp_path}", f"--stage={stage}", *small]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.vae.config.scaling_factor > 0 and pipe.unet.config.sample_size == models.LATENT_SIZE
    assert rewards.load("clip", checkpoint=tmp_path / "clip").input_size == 64
    for stage in ("vae", "clip", "unet"):
        rows = [json.loads(line) for line in (tmp_path / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        assert rows[-1]["done"] == 2 and "loss" in rows[1]


def test_tuner_run_without_the_tuner_extra_names_the_extra():
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['peft'] = None; "
            "from tuner.run import main; sys.exit(main([]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "drtune-rewards[tuner]" in done.stderr and "diffusers" in done.stderr and "peft" in done.stderr
