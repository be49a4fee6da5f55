"""PickScore v1: a CLIP-H (transformers `CLIPModel`) fine-tuned on Pick-a-Pic human preferences.

score = logit_scale.exp() * cos(text_embedding, image_embedding), as in the PickScore README; the
logit scale comes from the checkpoint (about 100), so scores of real images lie around 18-24.
Weights: `yuvalkirstain/PickScore_v1`; tokenizer: `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (the
processor the model was published with). Images follow that processor's PIL path: shortest side
to 224 (bicubic, long side truncated), center crop 224 with the offset floored, OpenAI mean/std. By default
(`pil_8bit=True`) the image is rounded to 8 bits and resized with PIL's 8-bit arithmetic, as the official
processor sees it; `pil_8bit=False` resizes in floating point instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_shortest_then_crop

NAME = "pickscore"
MODEL_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first, as transformers does
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CONTEXT_LENGTH = 77

PathLike = str | os.PathLike


class PickScore(Reward):
    """PickScore v1 on a transformers `CLIPModel`: scaled cosine of prompt and image embeddings."""

    name = NAME
    needs_prompt = True
    published_scale = 1.0
    scale_note = "logit_scale.exp() * cosine (logit scale ~100 from the checkpoint); real images score ~18-24"

    def __init__(self, model: nn.Module, tokenizer, input_size: int = 224, pil_8bit: bool = True) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.input_size = input_size
        self.pil_8bit = pil_8bit
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the CLIP weights; inputs are cast to it."""
        return self.model.logit_scale.dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised 224x224 pixels, like the PIL CLIP processor (float32)."""
        pixels = resize_shortest_then_crop(images.float(), self.input_size, offset="floor", pil_8bit=self.pil_8bit)
        return self.normalize(pixels)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings [B, D]."""
        pixels = self.preprocess(images).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings [N, D] (padding, truncation to 77 tokens)."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt"
        ).to(self.device)
        out = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        text = self.text_features(prompts)
        image = self.image_features(images)
        return self.model.logit_scale.float().exp() * (image * text).sum(dim=-1)


def load_pickscore(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: PathLike | None = None,
    config: PathLike | None = None,
    tokenizer: PathLike | None = None,
    pil_8bit: bool = True,
) -> PickScore:
    """Build PickScore from `checkpoint` (a folder like PickScore_v1 or its weights file) and `tokenizer`
    (a folder with vocab.json and merges.txt), each defaulting to the official Hugging Face repo.
    `pil_8bit=False` resizes in floating point instead of reproducing PIL's 8-bit resize."""
    weights = _weights_file(checkpoint)
    config_file = _config_file(config, checkpoint, weights)
    model = build_clip(config_file, weights).to(device=device, dtype=dtype)
    size = model.config.vision_config.image_size
    return PickScore(model, load_tokenizer(tokenizer), input_size=size, pil_8bit=pil_8bit).to(device)


def build_clip(config_file: Path, weights: Path) -> nn.Module:
    """A transformers `CLIPModel` from its config and weights, built on the meta device (no random init)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_json_file(str(config_file))
    with torch.device("meta"):
        model = CLIPModel(config)
    state = read_checkpoint(weights, reward=NAME)
    # transformers < 4.31 saved the position_ids buffers (aranges) that PickScore_v1's files still hold
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    load_state_dict_strict(model, state, reward=NAME, source=str(weights), assign=True)  # one copy in memory
    _restore_position_ids(model)
    return model.float().eval()


def _restore_position_ids(model: nn.Module) -> None:
    """Re-create the non-persistent `position_ids` buffers, which a checkpoint does not hold."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.position_ids = torch.arange(ids.shape[-1]).expand(1, -1)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{NAME}: tensors {left[:5]} were not loaded; this transformers version adds state we miss")


def load_tokenizer(source: PathLike | None):
    """The CLIP BPE tokenizer from a local folder (vocab.json + merges.txt) or the LAION processor repo."""
    from transformers import CLIPTokenizer

    folder = Path(source).parent if source is not None and Path(source).is_file() else source
    files = [
        resolve_file(folder, reward=NAME, role="tokenizer", repo_id=PROCESSOR_REPO, filename=name)
        for name in TOKENIZER_FILES
    ]
    return CLIPTokenizer.from_pretrained(str(files[0].parent))


def _weights_file(checkpoint: PathLike | None) -> Path:
    name = WEIGHT_FILES[0]
    if checkpoint is not None and Path(checkpoint).is_dir():
        name = next((n for n in WEIGHT_FILES if (Path(checkpoint) / n).is_file()), name)
    return resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=MODEL_REPO, filename=name)


def _config_file(config: PathLike | None, checkpoint: PathLike | None, weights: Path) -> Path:
    source = config if config is not None else (weights.parent if checkpoint is not None else None)
    return resolve_file(source, reward=NAME, role="config", repo_id=MODEL_REPO, filename="config.json")
