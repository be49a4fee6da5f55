"""CycleReward (Bahng, Chan, Durand, Isola, ICCV 2025): image-text alignment learnt from cycle-consistency preferences.

    score = head(text_encoder(prompt, cross-attending to vit(image))[:, 0])

ImageReward's architecture (BLIP ViT-L/16 image tokens, BLIP's cross-attending "med" BERT over the prompt) with its
own head: Linear layers 768-1024-128-64-16-1 with a GELU after each but the last, and no normalisation of the
output. Three variants share it: Combo (trained on both CyclePrefDB halves, recommended), I2T and T2I. Built
from the modules of `rewards.imagereward` (timm's ViT, transformers' BlipTextModel) and loaded from the ORIGINAL
`CycleReward-<variant>.pth` (the authors' GitHub release) or a safetensors re-upload with the same keys (imscore's
NagaSaiAbhinay/CycleReward-<variant>). Prompts are tokenised to 128 tokens. Images follow the official
transform (PIL bicubic shortest side 224, centre crop with torchvision's rounded offset, OpenAI mean/std);
`pil_8bit=True` (default) reproduces PIL's 8-bit resize, `pil_8bit=False` resizes in floating point.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import imagereward as ir
from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_shortest_then_crop

VARIANTS = ("Combo", "I2T", "T2I")
HUB_OWNER = "NagaSaiAbhinay"  # imscore's re-upload (model.safetensors); the authors' .pth files are GitHub assets
WEIGHTS_FILE = "model.safetensors"
RELEASE_URL = "https://github.com/hjbahng/cyclereward/releases/download/v1.0.0/CycleReward-{variant}.pth"
MAX_TOKENS = 128
HEAD_WIDTHS = (768, 1024, 128, 64, 16, 1)
HEAD_INDICES = {0: 0, 2: 1, 4: 2, 6: 3, 8: 4}  # nn.Sequential(Linear, GELU, ..., Linear): Linear layers' indices
# BLIP's configs/med_config.json, which the authors' release ships as med_config.json (and imscore hard-codes)
MED_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "vocab_size": 30524, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
              "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 768, "type_vocab_size": 2}


def convert_checkpoint(state: dict[str, torch.Tensor], *, name: str, source: str) -> dict[str, torch.Tensor]:
    """Map the original CycleReward state dict (blip.*, mlp.layers.*) to this module's keys; unknown keys are errors."""
    return ir.convert_checkpoint(state, source=source, head_indices=HEAD_INDICES, name=name,
                                 expected=f"CycleReward-<variant>.pth from {RELEASE_URL.format(variant='<variant>')}")


class CycleReward(Reward):
    """Alignment of an image with a (dense) caption; higher is better (see the module docstring)."""

    needs_prompt = True
    input_size = ir.IMAGE_SIZE
    published_scale = 1.0
    scale_note = "the head's raw output (no normalisation), as the official score() returns it"

    def __init__(self, name: str, med_config: dict, tokenizer, pil_8bit: bool = True) -> None:
        super().__init__()
        self.name = name
        self.tokenizer = tokenizer
        self.pil_8bit = pil_8bit
        self.vision = ir.build_vision()
        self.text = ir.build_text(med_config, encoder_width=ir.VISION["embed_dim"])
        self.head = nn.ModuleList(nn.Linear(a, b) for a, b in zip(HEAD_WIDTHS[:-1], HEAD_WIDTHS[1:]))
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token ids and attention mask [N, 2, 128], as the official score() tokenises."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        return torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1).to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Shortest side to 224 (PIL bicubic), centre crop (rounded offset), OpenAI mean/std (float32)."""
        x = images if images.dtype == torch.float64 else images.float()  # float64 stays (gradient checks)
        pixels = resize_shortest_then_crop(x, ir.IMAGE_SIZE, offset="round", pil_8bit=self.pil_8bit)
        return (pixels - self.normalize.mean.to(pixels.dtype)) / self.normalize.std.to(pixels.dtype)

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """First-token state [B, 768] of the prompt encoded with cross-attention to the image, in float32."""
        tokens = self.text_features(prompts)
        image = self.vision.forward_features(self.preprocess(images).to(self.vision.cls_token.dtype))
        out = self.text(input_ids=tokens[:, 0], attention_mask=tokens[:, 1], encoder_hidden_states=image,
                        is_decoder=False)
        first = out.last_hidden_state[:, 0]
        return first if first.dtype == torch.float64 else first.float()

    def head_output(self, features: torch.Tensor) -> torch.Tensor:
        """The head on features [B, 768] (float32, or float64 for float64 features): Linear layers with a GELU
        between them, like the official MLP."""
        x = features
        for i, layer in enumerate(self.head):
            x = F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))
            x = F.gelu(x) if i < len(self.head) - 1 else x
        return x.squeeze(-1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.head_output(self.features(images, prompts))


def load_cyclereward(
    *,
    device: torch.device,
    dtype: torch.dtype,
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    pil_8bit: bool = True,
) -> CycleReward:
    """Build CycleReward-`variant` from `checkpoint` (the authors' CycleReward-<variant>.pth, or a model.safetensors
    with the same keys; default: imscore's re-upload on the hub), `config` (med_config.json; default BLIP's values)
    and bert-base-uncased's `tokenizer` (vocab.txt)."""
    name = "cyclereward" if variant == "Combo" else f"cyclereward-{variant.lower()}"
    repo = f"{HUB_OWNER}/CycleReward-{variant}"
    ckpt = resolve_file(checkpoint, reward=name, role="checkpoint", repo_id=repo, filename=WEIGHTS_FILE)
    med_config = MED_CONFIG if config is None else ir.read_med_config(
        resolve_file(config, reward=name, role="config", repo_id=repo, filename=ir.CONFIG_FILE))
    vocab = resolve_file(tokenizer, reward=name, role="tokenizer", repo_id=ir.TOKENIZER_REPO, filename=ir.VOCAB_FILE)
    with torch.device("meta"):
        model = CycleReward(name, med_config, ir.load_tokenizer(vocab), pil_8bit=pil_8bit)
    model.vision.to(dtype)  # the head stays float32
    model.text.to(dtype)
    model.to_empty(device=device)
    model.normalize.reset()
    ids = model.text.embeddings.position_ids
    ids.copy_(torch.arange(ids.shape[-1], device=device).expand_as(ids))
    state = convert_checkpoint(read_checkpoint(ckpt, reward=name), name=name, source=str(ckpt))
    load_state_dict_strict(model, state, reward=name, source=f"{ckpt} (keys blip.* and mlp.layers.* renamed)")
    return model

