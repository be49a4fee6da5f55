"""CLIP text-image alignment with any open_clip model: the cosine of the normalised image and prompt embeddings.

Preprocessing follows the model's open_clip preprocess config (that of its pretrained tag): resize the
shortest side and center crop (or squash, or longest side and pad), with its interpolation and mean/std.
By default (`pil_8bit=True`) the image is rounded to 8 bits and resized with PIL's 8-bit arithmetic, as
open_clip's PIL transform sees it; `pil_8bit=False` resizes in floating point instead.
CLIPScore (Hessel et al., 2021) reports 2.5 * max(cos, 0) and later papers 100 * cos; the clamp has no
gradient below zero, so this reward returns the plain cosine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import openclip
from .base import Reward
from .hub import resolve_file
from .preprocess import (
    Normalize,
    center_crop,
    longest_side_size,
    pad_to_square,
    resize_bicubic,
    resize_pil_8bit,
    shortest_side_size,
)

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
SHAPES_CLIP_DIR = Path(__file__).parent / "weights" / "shapes-clip"


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str, pil_8bit: bool = False) -> torch.Tensor:
    """Resize like PIL with open_clip's interpolation names ('bicubic' or 'bilinear'), antialiased;
    with `pil_8bit`, exactly as PIL resizes the image's 8-bit version."""
    if pil_8bit:
        return resize_pil_8bit(images, size, interpolation)
    # a non-negative (bilinear) kernel never overshoots [0, 1]: nothing to clamp
    return resize_bicubic(images, size, clamp=interpolation != "bilinear", filter=interpolation)


def clip_geometry(
    images: torch.Tensor, size: int, resize_mode: str, interpolation: str, fill: float, pil_8bit: bool = False
) -> torch.Tensor:
    """open_clip's eval geometry: 'shortest' (resize + center crop), 'longest' (resize + pad) or 'squash'."""
    h, w = images.shape[-2:]
    if resize_mode == "shortest":
        resized = resize(images, shortest_side_size(h, w, size), interpolation, pil_8bit)
        return center_crop(resized, size, offset="round")
    if resize_mode == "longest":
        return pad_to_square(resize(images, longest_side_size(h, w, size), interpolation, pil_8bit), size, fill)
    if resize_mode == "squash":
        return resize(images, (size, size), interpolation, pil_8bit)
    raise ValueError(f"unknown open_clip resize_mode {resize_mode!r} (expected shortest, longest or squash)")


class ClipScore(Reward):
    """Cosine similarity of open_clip image and prompt embeddings."""

    name = "clip"
    needs_prompt = True
    published_scale = 100.0
    scale_note = (
        "cosine of the L2-normalised image and prompt embeddings, in [-1, 1]; papers print 100 x cosine, "
        "CLIPScore (Hessel et al.) prints 2.5 x max(cosine, 0)"
    )

    def __init__(
        self, model: torch.nn.Module, tokenizer, preprocess_cfg: dict, description: str = "", pil_8bit: bool = True
    ) -> None:
        super().__init__()
        size = preprocess_cfg["size"]
        if not isinstance(size, int):
            if size[0] != size[1]:
                raise ValueError(f"clip: non-square input size {size} is not supported")
            size = size[0]
        self.model = model
        self.tokenizer = tokenizer
        self.input_size = size
        self.resize_mode = preprocess_cfg["resize_mode"]
        self.interpolation = preprocess_cfg["interpolation"]
        self.fill = preprocess_cfg["fill_color"] / 255.0
        self.pil_8bit = pil_8bit
        self.description = description
        self.normalize = Normalize(preprocess_cfg["mean"], preprocess_cfg["std"])

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights (images are cast to it after preprocessing)."""
        return next(self.model.parameters()).dtype

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """Resize and crop/pad float [B,3,H,W] in [0,1] to [B,3,S,S] as the model's open_clip transform does."""
        return clip_geometry(images, self.input_size, self.resize_mode, self.interpolation, self.fill, self.pil_8bit)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable preprocessing to normalised [B,3,S,S] in the model dtype (computed in float32)."""
        x = self.geometry(images.float())
        return self.normalize(x).to(self.dtype)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        return openclip.text_features(self.model, tokens).float()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        image = openclip.image_features(self.model, self.preprocess(images)).float()
        return (image * self.text_features(prompts)).sum(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, model={self.description!r}"


def _local_checkpoint(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in OPEN_CLIP_FILES if (path / name).is_file()]
        if found:
            return found[0]
    return resolve_file(path, reward="clip", role="checkpoint", repo_id="", filename=OPEN_CLIP_FILES[-1])


def _is_model_folder(checkpoint: str | os.PathLike | None) -> bool:
    return checkpoint is not None and (Path(checkpoint) / openclip.FOLDER_CONFIG).is_file()


def load_clip(
    *,
    device: torch.device,
    dtype: torch.dtype,
    model: str = "ViT-L-14",
    pretrained: str | None = "openai",
    checkpoint: str | os.PathLike | None = None,
    pil_8bit: bool = True,
) -> ClipScore:
    """CLIP alignment reward. `checkpoint` may be a folder in open_clip's own layout (open_clip_config.json, the
    weights, and tokenizer files if the config names a Hugging Face tokenizer): its config then sets the
    architecture, preprocessing and tokenizer, and `model`/`pretrained` are ignored. Otherwise the weights come
    from `checkpoint` (a file or folder) if given, else the `pretrained` tag's file through open_clip's registry
    (Hugging Face cache); the tag also sets the preprocessing and QuickGELU (`pretrained=None`: model defaults).
    `pil_8bit=False` resizes in floating point instead of reproducing PIL's 8-bit resize."""
    if _is_model_folder(checkpoint):
        return _load_folder(Path(checkpoint), device, dtype, pil_8bit)
    if checkpoint is None and pretrained is None:
        raise ValueError("clip: pass pretrained='<open_clip tag>' or checkpoint='/path/to/open_clip weights'")
    tag = openclip.pretrained_config(model, pretrained, reward="clip")
    if checkpoint is not None:
        path = _local_checkpoint(checkpoint)
    else:
        path = openclip.pretrained_file(model, pretrained, reward="clip")
    quick_gelu = True if tag.get("quick_gelu") else None
    net = openclip.load_model(model, path, reward="clip", device=device, dtype=dtype, quick_gelu=quick_gelu)
    description = f"{model} ({pretrained or Path(path).name})"
    preprocess = openclip.preprocess_config(model, pretrained)
    reward = ClipScore(net, openclip.get_tokenizer(model), preprocess, description, pil_8bit=pil_8bit)
    return reward.to(device)


def _load_folder(folder: Path, device: torch.device, dtype: torch.dtype, pil_8bit: bool = True,
                 cls: type[ClipScore] = ClipScore) -> ClipScore:
    """The reward (`cls`, a ClipScore) of an open_clip model folder (the layout `open_clip.create_model("local-dir:...")`
    reads)."""
    config, preprocess, weights = openclip.read_folder(folder, reward="clip")
    net = openclip.load_model(config, weights, reward="clip", device=device, dtype=dtype)
    tokenizer = openclip.get_tokenizer(f"local-dir:{folder}")
    preprocess = openclip.preprocess_config(config, overrides=preprocess)
    reward = cls(net, tokenizer, preprocess, folder.name, pil_8bit=pil_8bit)
    return reward.to(device)


def load_shapes_clip(*, device: torch.device, dtype: torch.dtype, pil_8bit: bool = True) -> ClipScore:
    """The CLIP shipped in this package, trained on the procedural shapes of the shipped shapes-sd model: a
    learned text-alignment reward for that domain (64x64 images; model card: docs/shapes.md)."""
    reward = _load_folder(SHAPES_CLIP_DIR, device, dtype, pil_8bit)
    reward.name = "shapes-clip"
    return reward
