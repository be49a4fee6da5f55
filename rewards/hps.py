"""HPSv2 and HPSv2.1: human preference score, the cosine of open_clip ViT-H-14 image and prompt embeddings.

Official recipe (package `hpsv2`, `img_score.score`): ToTensor, then on the float tensor a bicubic antialiased
resize of the longest side to 224 (sizes rounded, no clamp), zero padding to 224 x 224 (left/top get half,
rounded down), OpenAI CLIP normalisation; the score is image_features . text_features of the L2-normalised
embeddings. The weights `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` (Hugging Face `xswu/HPSv2`) hold
the whole open_clip model under 'state_dict', so ViT-H-14 is built without its LAION base weights.
"""

from __future__ import annotations

import os

import torch

from . import openclip
from .clip_score import ClipScore
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, longest_side_size, pad_to_square, resize_bicubic

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_NAMES = {"v2.0": "hpsv2", "v2.1": "hpsv2.1"}
HPS_ARCH = "ViT-H-14"
HPS_PREPROCESS = {
    "size": 224,
    "mean": OPENAI_CLIP_MEAN,
    "std": OPENAI_CLIP_STD,
    "interpolation": "bicubic",
    "resize_mode": "longest",
    "fill_color": 0,
}


def hps_geometry(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPS's ResizeMaxSize on float [B,3,H,W]: longest side to `size` (rounded sizes, no clamp), zero pad."""
    h, w = images.shape[-2:]
    return pad_to_square(resize_bicubic(images, longest_side_size(h, w, size), clamp=False), size, fill=0.0)


class HPS(ClipScore):
    """Human Preference Score v2 / v2.1 (ViT-H-14); score = cosine similarity, papers print it x100."""

    scale_note = (
        "cosine of the L2-normalised image and prompt embeddings, as hpsv2.score() returns it "
        "(about 0.2-0.35 for real images); the HPS papers print 100 x cosine"
    )

    def __init__(self, model: torch.nn.Module, tokenizer, name: str) -> None:
        super().__init__(model, tokenizer, HPS_PREPROCESS, description=f"{HPS_ARCH} ({name})")
        self.name = name

    def geometry(self, images: torch.Tensor) -> torch.Tensor:
        """The official transform runs on float tensors: no PIL rounding and no clamp after the resize."""
        return hps_geometry(images, self.input_size)


def load_hps(
    *,
    device: torch.device,
    dtype: torch.dtype,
    version: str = "v2.1",
    checkpoint: str | os.PathLike | None = None,
) -> HPS:
    """Build HPS `version` ("v2.0" or "v2.1") from `checkpoint` (a file or folder), else from `xswu/HPSv2`."""
    if version not in HPS_FILES:
        raise ValueError(f"HPS version must be one of {', '.join(HPS_FILES)}, got {version!r}")
    name = HPS_NAMES[version]
    path = resolve_file(checkpoint, reward=name, role="checkpoint", repo_id=HPS_REPO, filename=HPS_FILES[version])
    model = openclip.load_model(HPS_ARCH, path, reward=name, device=device, dtype=dtype)
    return HPS(model, openclip.get_tokenizer(HPS_ARCH), name).to(device)
