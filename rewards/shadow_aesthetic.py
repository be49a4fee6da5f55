"""Aesthetic Shadow v2 (shadowlilac): a ViT image classifier with two labels, "hq" and "lq", for anime-style images.

score = softmax(logits)["hq"], the number the authors' usage (transformers' image-classification pipeline)
reports. The model is transformers' `ViTForImageClassification` with the published config; images follow the
published ViT processor: resized to 1024x1024 (PIL bilinear, aspect ratio not kept), rescaled and normalised with
the repo's mean and std. By default (`pil_8bit=True`) the image is rounded to 8 bits and resized with PIL's 8-bit
arithmetic, as the pipeline sees it; `pil_8bit=False` resizes in floating point.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint, read_json
from .errors import CheckpointMismatchError, CorruptCheckpointError
from .hf_keys import fit_keys
from .hub import resolve_file
from .preprocess import Normalize, resize_bicubic, resize_pil_8bit

NAME = "aesthetic-shadow"
REPO_ID = "RE-N-Y/aesthetic-shadow-v2"  # imscore's copy of shadowlilac/aesthetic-shadow-v2, same files and format
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PIL_FILTERS = {2: "bilinear", 3: "bicubic"}
HIGH_QUALITY = "hq"

PathLike = str | os.PathLike


class ShadowAesthetic(Reward):
    """Probability that an image is high quality ("hq"), from Aesthetic Shadow v2."""

    name = NAME
    needs_prompt = False
    published_scale = 1.0
    scale_note = "softmax probability of the 'hq' label (0-1), as the image-classification pipeline reports it"

    def __init__(self, model: nn.Module, processor: dict, hq_index: int, pil_8bit: bool = True) -> None:
        super().__init__()
        self.model = model
        self.size = (int(processor["size"]["height"]), int(processor["size"]["width"]))
        self.input_size = self.size[0] if self.size[0] == self.size[1] else None
        self.filter = PIL_FILTERS[int(processor.get("resample", 2))]
        self.hq_index = hq_index
        self.pil_8bit = pil_8bit
        self.normalize = Normalize(tuple(processor["image_mean"]), tuple(processor["image_std"]))

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the ViT weights; pixels are cast to it."""
        return self.model.classifier.weight.dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the processor's size (PIL's filter, 8-bit by default), then mean/std (float32)."""
        x = images if images.dtype == torch.float64 else images.float()  # float64 stays (gradient checks)
        x = resize_pil_8bit(x, self.size, filter=self.filter) if self.pil_8bit else resize_bicubic(
            x, self.size, filter=self.filter)
        return (x - self.normalize.mean.to(x.dtype)) / self.normalize.std.to(x.dtype)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's logits [B, labels], float32 (float64 for a float64 model)."""
        logits = self.model(pixel_values=self.preprocess(images).to(self.dtype)).logits
        return logits if logits.dtype == torch.float64 else logits.float()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)[:, self.hq_index]


def load_shadow_aesthetic(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: PathLike | None = None,
    pil_8bit: bool = True,
) -> ShadowAesthetic:
    """Build Aesthetic Shadow v2 from `checkpoint`: its hub folder (config.json, preprocessor_config.json and
    model.safetensors or pytorch_model.bin), or its weights file with the two configs beside it; default: the hub."""
    weights = _weights_file(checkpoint)
    folder = weights.parent if checkpoint is not None else None
    config_path = resolve_file(folder, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename="config.json")
    processor_path = resolve_file(folder, reward=NAME, role="checkpoint", repo_id=REPO_ID,
                                  filename="preprocessor_config.json")
    model, labels = build_vit(config_path, weights)
    processor = _read_json(processor_path)
    hq = [i for i, label in labels.items() if label == HIGH_QUALITY]
    if not hq:
        raise CheckpointMismatchError(f"{NAME}: {config_path} has labels {labels}, no '{HIGH_QUALITY}'; "
                                      "is it Aesthetic Shadow's config?")
    return ShadowAesthetic(model.to(dtype), processor, hq[0], pil_8bit=pil_8bit).to(device)


def build_vit(config_path: Path, weights: Path) -> tuple[nn.Module, dict[int, str]]:
    """transformers' ViTForImageClassification from the config, built on the meta device, weights loaded strictly
    (keys with imscore's `model.` prefix are accepted too)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig.from_json_file(str(config_path))
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    state = read_checkpoint(weights, reward=NAME)
    state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    state = fit_keys(state, set(model.state_dict()))  # the file's names are those of the transformers that wrote it
    load_state_dict_strict(model, state, reward=NAME, source=str(weights), assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{NAME}: tensors {left[:5]} were not loaded; this transformers version adds state")
    return model.eval(), {int(k): v for k, v in config.id2label.items()}


def _weights_file(checkpoint: PathLike | None) -> Path:
    name = WEIGHT_FILES[0]
    if checkpoint is not None and Path(checkpoint).is_dir():
        name = next((n for n in WEIGHT_FILES if (Path(checkpoint) / n).is_file()), name)
    return resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename=name)


def _read_json(path: Path) -> dict:
    config = read_json(path, reward=NAME, what="processor config")
    missing = [k for k in ("size", "image_mean", "image_std") if k not in config]
    if missing or not {"height", "width"} <= set(config.get("size", {})):
        raise CorruptCheckpointError(f"{NAME}: {path} lacks {missing or 'size height/width'}; is it the ViT processor "
                                     "configuration of Aesthetic Shadow?")
    return config
