"""The shipped small text-to-image model: 64x64 coloured shapes, trained from scratch on a procedural dataset.

    model: shapes-sd        # in a run config; or StableDiffusionPipeline.from_pretrained(tuner.shapes.MODEL_DIR)

`data` makes the captioned images, `models` holds the architectures, `train` trains them (python -m
tuner.shapes.train), `evaluate` measures how well samples follow their captions, `judge` is the hardened
ground-truth judge of that (`judge.judge(images, captions)`: per-check pass rates), `broken` breaks scenes on
purpose to test it. Its CLIP, trained on the
same data, is the reward `shapes-clip`. The model card is docs/shapes.md.
"""
from pathlib import Path

MODEL_NAME = "shapes-sd"
MODEL_DIR = Path(__file__).parent / "model"
