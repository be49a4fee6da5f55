"""LAION aesthetic predictor v2 ("improved aesthetic predictor", christophschuhmann/improved-aesthetic-predictor).

score = MLP(normalise(CLIP_ViT-L/14_image_embedding(image))), an estimate of the mean 1-10 rating people
give the image (trained on SAC, LAION-Logos and AVA). The CLIP is OpenAI's ViT-L/14 (QuickGELU); the
head is a stack of linears 768-1024-128-64-16-1 with dropouts between and no activations (so, in eval,
one affine map of the normalised embedding). Images follow OpenAI CLIP's `preprocess`: shortest side
to 224 (bicubic, long side truncated), center crop 224 (offset rounded, as torchvision does), mean/std.
By default (`pil_8bit=True`) the image is rounded to 8 bits and resized with PIL's 8-bit arithmetic, as the
official script sees it; `pil_8bit=False` resizes in floating point instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import openclip
from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_shortest_then_crop

NAME = "aesthetic"
HEAD_REPO = "camenduru/improved-aesthetic-predictor"  # a mirror of the GitHub release file, same name
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
BACKBONE = "ViT-L-14"  # OpenAI weights, so QuickGELU
BACKBONE_TAG = "openai"
BACKBONE_FILE = "open_clip_pytorch_model.bin"

PathLike = str | os.PathLike


class AestheticHead(nn.Module):
    """The predictor's MLP; attribute names give the checkpoint's keys `layers.{0,2,4,6,7}`."""

    def __init__(self, width: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class Aesthetic(Reward):
    """LAION aesthetic predictor v2: an MLP on the normalised CLIP ViT-L/14 image embedding."""

    name = NAME
    needs_prompt = False
    input_size = 224
    published_scale = 1.0
    scale_note = "predicted mean human rating on a 1-10 scale; most photos score 4-7, curated art 6-7+"

    def __init__(self, visual: nn.Module, head: AestheticHead, input_size: int = 224, pil_8bit: bool = True) -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.input_size = input_size
        self.pil_8bit = pil_8bit
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised 224x224 pixels, like OpenAI CLIP's torchvision `preprocess` (float32)."""
        pixels = resize_shortest_then_crop(images.float(), self.input_size, offset="round", pil_8bit=self.pil_8bit)
        return self.normalize(pixels)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings [B, 768] (float32)."""
        dtype = self.visual.conv1.weight.dtype
        return openclip.image_features(self.visual, self.preprocess(images).to(dtype)).float()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        features = self.image_features(images)
        return self.head(features.to(self.head.layers[0].weight.dtype)).squeeze(-1)


def load_aesthetic(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: PathLike | None = None,
    backbone: PathLike | None = None,
    pil_8bit: bool = True,
) -> Aesthetic:
    """Build the predictor: head from `checkpoint` (the original .pth), CLIP ViT-L/14 from `backbone`
    (an OpenAI/open_clip state-dict file or a folder holding open_clip_pytorch_model.bin); both default to the hub.
    `pil_8bit=False` resizes in floating point instead of reproducing PIL's 8-bit resize."""
    head_file = resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=HEAD_REPO, filename=HEAD_FILE)
    head = AestheticHead()
    load_state_dict_strict(head, read_checkpoint(head_file, reward=NAME), reward=NAME, source=str(head_file))
    visual = openclip.load_model(
        BACKBONE, _backbone_file(backbone), reward=NAME, device=device, dtype=dtype, quick_gelu=True, image_only=True
    )
    # the head stays float32 as in the official code (it is 1M parameters); only the CLIP follows `dtype`
    size = openclip.preprocess_config(BACKBONE)["size"]
    return Aesthetic(visual, head.to(device), input_size=size, pil_8bit=pil_8bit).to(device)


def _backbone_file(backbone: PathLike | None) -> Path:
    if backbone is None:
        return openclip.pretrained_file(BACKBONE, BACKBONE_TAG, reward=NAME)
    hub = openclip.pretrained_config(BACKBONE, BACKBONE_TAG, reward=NAME).get("hf_hub", "").rstrip("/")
    return resolve_file(backbone, reward=NAME, role="backbone", repo_id=hub, filename=BACKBONE_FILE)
