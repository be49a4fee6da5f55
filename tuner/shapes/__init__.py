"""The shipped small text-to-image models: 64x64 coloured shapes, trained from scratch on a procedural dataset.

    model: shapes-sd        # in a run config; or StableDiffusionPipeline.from_pretrained(tuner.shapes.MODEL_DIR)
    model: shapes-flow      # the SD3-style flow-matching one: StableDiffusion3Pipeline.from_pretrained(FLOW_DIR)

`data` makes the captioned images, `models` holds the architectures, `train` trains them (python -m
tuner.shapes.train), `evaluate` measures how well samples follow their captions, `judge` is the hardened
ground-truth judge of that (`judge.judge(images, captions)`: per-check pass rates), `broken` breaks scenes on
purpose to test it, `discriminate` measures whether a reward tells a pair's relation from the swapped one. Its
CLIP, trained on the same data, is the reward `shapes-clip`. The model card is docs/shapes.md.
"""
from pathlib import Path

MODEL_NAME = "shapes-sd"
MODEL_DIR = Path(__file__).parent / "model"
FLOW_NAME = "shapes-flow"
FLOW_DIR = Path(__file__).parent / "flow_model"
MODELS = {MODEL_NAME: MODEL_DIR, FLOW_NAME: FLOW_DIR}  # name in a run config -> the pipeline folder it ships as
FLOW_TRAINING = ("python -m tuner.shapes.train --out build/shapes --stage flow --flow-time-limit 330 --workers 12, "
                 "then python -m tuner.shapes.train --out build/shapes --install")


def model_dir(name: str) -> Path:
    """The installed pipeline folder of a shipped model; a FileNotFoundError that says how to make it if absent."""
    folder = MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{name}'s weights are not installed ({folder} has no model_index.json). Train them on one GPU (about 6 "
            f"minutes) and install them into the package: {FLOW_TRAINING} (docs/shapes.md, shapes-flow)")
    return folder
