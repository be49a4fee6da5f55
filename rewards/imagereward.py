"""ImageReward (Xu et al., 2023): BLIP ViT-L/16 image tokens, a cross-attending BERT over the prompt, an MLP head.

    score = (head(text_encoder(prompt, cross-attending to vit(image))[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Built from maintained modules, timm's `VisionTransformer` and transformers' `BlipTextModel` (BLIP's "med" BERT,
same parameter names), and loaded from the ORIGINAL `ImageReward.pt` through an explicit key mapping
(`convert_checkpoint`): every tensor the score uses is loaded, anything missing or left over is an error.
The text side depends on the image (cross-attention), so the per-prompt cache holds tokens, not features.
Images are rounded to 8 bits and resized with PIL's 8-bit arithmetic by default, as the official score() sees
them (`pil_8bit=False`: float resize).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint, read_json
from .errors import CheckpointMismatchError, CorruptCheckpointError, MissingFileError
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_shortest_then_crop

NAME = "imagereward"
REPO_ID = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
CONFIG_FILE = "med_config.json"
TOKENIZER_REPO = "bert-base-uncased"
VOCAB_FILE = "vocab.txt"

IMAGE_SIZE = 224
MAX_TOKENS = 35
SCORE_MEAN = 0.16717362830052426  # published normalisation of the head's output (ImageReward.py)
SCORE_STD = 1.0333394966054072
VISION = dict(img_size=IMAGE_SIZE, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
HEAD_WIDTHS = (768, 1024, 128, 64, 16, 1)

# Original key prefix -> ours. The original head is nn.Sequential(Linear, Dropout, Linear, Dropout, Linear,
# Dropout, Linear, Linear): its Linear layers sit at indices 0, 2, 4, 6, 7.
PREFIXES = {"blip.visual_encoder.": "vision.", "blip.text_encoder.": "text."}
HEAD_INDICES = {0: 0, 2: 1, 4: 2, 6: 3, 7: 4}
# Tensors of the original BLIP_Pretrain that the score never reads (contrastive projections); dropped by name.
UNUSED_KEYS = frozenset(f"blip.{proj}.{p}" for proj in ("vision_proj", "text_proj") for p in ("weight", "bias"))
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"  # a buffer; must be arange, ours rebuilds it
RENAMED = "keys renamed blip.visual_encoder.* -> vision.*, blip.text_encoder.* -> text.*, mlp.layers.* -> head.*"


def convert_checkpoint(state_dict: dict[str, torch.Tensor], *, source: str = CHECKPOINT_FILE,
                       head_indices: dict[int, int] = HEAD_INDICES, name: str = NAME,
                       expected: str = f"the original {CHECKPOINT_FILE} from the Hugging Face repo {REPO_ID}") -> dict:
    """Map the original state dict of ImageReward (or of a reward on its BLIP modules with another head layout, such
    as CycleReward) to this module's keys; unknown or malformed keys are errors naming `name` and `expected`."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key == POSITION_IDS:
            _check_position_ids(value, source, name)
        elif key in UNUSED_KEYS:
            continue
        elif (new := _convert_key(key, head_indices)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointMismatchError(
            f"{name}: {source} holds {len(unknown)} keys that {name} does not have ({shown}). Is this {expected}?"
        )
    return out


def _convert_key(key: str, head_indices: dict[int, int] = HEAD_INDICES) -> str | None:
    for old, new in PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    parts = key.split(".")
    if len(parts) == 4 and parts[:2] == ["mlp", "layers"] and parts[2].isdigit() and int(parts[2]) in head_indices:
        return f"head.{head_indices[int(parts[2])]}.{parts[3]}"
    return None


def _check_position_ids(value: torch.Tensor, source: str, name: str = NAME) -> None:
    if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
        raise CheckpointMismatchError(f"{name}: {source}: {POSITION_IDS} is not 0, 1, 2, ...; the file is damaged.")


def read_med_config(path: str | os.PathLike) -> dict:
    """Read BLIP's med_config.json (a BERT config) and check the fields the score depends on."""
    config = read_json(path, reward=NAME, what="config")
    wanted = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [k for k in wanted if k not in config]
    if absent:
        raise CorruptCheckpointError(f"{NAME}: {path} lacks {', '.join(absent)}; is it ImageReward's {CONFIG_FILE}?")
    if not config.get("add_cross_attention", False):
        raise CorruptCheckpointError(
            f"{NAME}: {path} sets add_cross_attention false, but ImageReward's text encoder cross-attends."
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise CorruptCheckpointError(f"{NAME}: {path}: only absolute position embeddings are supported.")
    return config


def build_vision() -> nn.Module:
    """BLIP's ViT-L/16 as a timm VisionTransformer returning all 197 tokens after the final LayerNorm."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        **VISION, qkv_bias=True, num_classes=0, global_pool="", norm_layer=partial(nn.LayerNorm, eps=1e-6)
    )


def build_text(config: dict, encoder_width: int) -> nn.Module:
    """BLIP's "med" BERT (no token types, no pooler, cross-attention in every layer) as transformers' BlipTextModel."""
    from transformers import BlipTextConfig, BlipTextModel

    cfg = BlipTextConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        encoder_hidden_size=encoder_width,  # BLIP overrides the file's encoder_width with the ViT width
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        max_position_embeddings=config.get("max_position_embeddings", 512),
        hidden_act=config.get("hidden_act", "gelu"),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        pad_token_id=config.get("pad_token_id", 0),
        is_decoder=True,  # BlipTextModel builds its cross-attention layers only for decoders; we run it bidirectional
    )
    return BlipTextModel(cfg, add_pooling_layer=False)


def load_tokenizer(vocab: str | os.PathLike):
    """bert-base-uncased from `vocab` (its vocab.txt) plus BLIP's two added tokens, as the official init_tokenizer."""
    from transformers import BertTokenizer

    vocab = Path(vocab)
    if vocab.name != VOCAB_FILE:
        raise MissingFileError(f"{NAME}: the tokenizer file must be named {VOCAB_FILE} (got {vocab}); rename it.")
    tokenizer = BertTokenizer.from_pretrained(str(vocab.parent), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """Human-preference score of an image for a prompt (see the module docstring)."""

    name = NAME
    needs_prompt = True
    input_size = IMAGE_SIZE
    published_scale = 1.0
    scale_note = (
        f"(MLP output - {SCORE_MEAN:.4f}) / {SCORE_STD:.4f}: roughly standardised on ImageRewardDB; "
        "the paper and the official score() report this value unscaled"
    )

    def __init__(self, med_config: dict, tokenizer, pil_8bit: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.pil_8bit = pil_8bit  # round to 8 bits, resize with PIL's arithmetic: what the official score() sees
        self.vision = build_vision()
        self.text = build_text(med_config, encoder_width=VISION["embed_dim"])
        self.head = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(HEAD_WIDTHS[:-1], HEAD_WIDTHS[1:])))
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token ids and attention mask [N, 2, 35], as the official score() tokenises (first token stays [CLS])."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        return torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1).to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Shortest side to 224 (bicubic, antialiased), centre crop (torchvision's rounded offset), CLIP mean/std."""
        pixels = resize_shortest_then_crop(images.float(), IMAGE_SIZE, offset="round", pil_8bit=self.pil_8bit)
        return self.normalize(pixels)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ViT tokens [B, 197, 1024] that the text encoder cross-attends to."""
        return self.vision.forward_features(self.preprocess(images).to(self.vision.cls_token.dtype))

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """First-token state [B, 768] of the prompt encoded with cross-attention to the image, in float32."""
        tokens = self.text_features(prompts)
        out = self.text(
            input_ids=tokens[:, 0],
            attention_mask=tokens[:, 1],
            encoder_hidden_states=self.image_tokens(images),
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0].float()

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        x = self.features(images, prompts)
        for layer in self.head:  # affine layers, no activations; always in float32 like the official score()
            x = F.linear(x, layer.weight.float(), layer.bias.float())
        return ((x - SCORE_MEAN) / SCORE_STD).squeeze(-1)


def load_imagereward(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    pil_8bit: bool = True,
) -> ImageReward:
    """Build ImageReward from `ImageReward.pt`, `med_config.json` and bert-base-uncased's `vocab.txt` (paths or hub).
    `pil_8bit=False` resizes in floating point instead of reproducing PIL's 8-bit resize."""
    ckpt_path = resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename=CHECKPOINT_FILE)
    config_path = resolve_file(config, reward=NAME, role="config", repo_id=REPO_ID, filename=CONFIG_FILE)
    vocab_path = resolve_file(tokenizer, reward=NAME, role="tokenizer", repo_id=TOKENIZER_REPO, filename=VOCAB_FILE)
    med_config, tok = read_med_config(config_path), load_tokenizer(vocab_path)
    with torch.device("meta"):  # no random init of 447M parameters; every tensor comes from the checkpoint
        model = ImageReward(med_config, tok, pil_8bit=pil_8bit)
    model.vision.to(dtype)  # the head stays float32; loading casts the checkpoint's tensors into these
    model.text.to(dtype)
    model.to_empty(device=device)
    model.normalize.reset()
    ids = model.text.embeddings.position_ids
    ids.copy_(torch.arange(ids.shape[-1], device=device).expand_as(ids))
    state = convert_checkpoint(read_checkpoint(ckpt_path, reward=NAME), source=str(ckpt_path))
    load_state_dict_strict(model, state, reward=NAME, source=f"{ckpt_path} ({RENAMED})")
    return model
