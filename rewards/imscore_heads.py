"""The reward models imscore trained itself (RE-N-Y, krea.ai), loaded from imscore's own hub files.

Two kinds, each on a transformers backbone named by the `tag` in the repo's config.json:

- rating heads (prompt-free): an MLP on a CLIP, SigLIP or DINOv2 image tower, trained to predict ImageRewardDB's
  fidelity or overall rating, or AVA's mean rating. Features: CLIP's first token before the final LayerNorm,
  SigLIP's mean token, DINOv2's first token beside its mean patch token.
- preference models (prompt): a CLIP or SigLIP model fine-tuned on Pick-a-Pic v2; score = the model's
  image-text logit (logit_scale.exp() * cosine, plus SigLIP's logit_bias).

The MLP is Linear(d, e*d), then ONE Linear(e*d, e*d) applied `layers` times with a ReLU after each (imscore builds
its nn.Sequential from a repeated list, so the repeats share weights; its files hold that weight under one of the
repeated indices), then Linear layers down to 1 (no activations between them). Images follow imscore's own
`score()`, the preprocessing the heads were trained and published with: the base processor's resize (bilinear,
antialiased, on the float tensor), centre crop and normalisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint, read_json
from .errors import CheckpointMismatchError, CorruptCheckpointError
from .hf_keys import fit_keys
from .hub import resolve_file, resolve_folder
from .preprocess import Normalize, center_crop, resize_bicubic, shortest_side_size

PathLike = str | os.PathLike
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class Variant:
    """One imscore hub repo: which backbone family and which kind of head."""

    repo_id: str
    family: str  # "clip", "siglip" or "dinov2"
    preference: bool  # True: image-text logit of the whole model; False: rating MLP on the image tower
    trained_on: str


VARIANTS = {
    "pickscore-siglip": Variant("RE-N-Y/pickscore-siglip", "siglip", True, "Pick-a-Pic v2 preferences"),
    "pickscore-clip": Variant("RE-N-Y/pickscore-clip", "clip", True, "Pick-a-Pic v2 preferences"),
    **{
        f"imreward-{rating}-{family}": Variant(f"RE-N-Y/imreward-{rating}-{family}", family, False,
                                               f"ImageRewardDB {rating.replace('_', ' ')}s")
        for rating in ("fidelity_rating", "overall_rating") for family in ("siglip", "clip", "dinov2")
    },
    **{
        f"ava-rating-{family}-sampled-{sampled}": Variant(f"RE-N-Y/ava-rating-{family}-sampled-{sampled}", family,
                                                          False, "AVA mean ratings")
        for family in ("clip", "siglip", "dinov2") for sampled in ("True", "False")
    },
}


class RatingHead(nn.Module):
    """imscore's rating MLP: first Linear, one shared Linear+ReLU applied `repeats` times, then a Linear tail."""

    def __init__(self, widths_in: int, expansion: int, repeats: int, tail: tuple[int, ...]) -> None:
        super().__init__()
        wide = widths_in * expansion
        self.first = nn.Linear(widths_in, wide)
        self.shared = nn.Linear(wide, wide)
        self.repeats = repeats
        widths = (wide, *tail)
        self.tail = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        for _ in range(self.repeats):
            x = F.relu(self.shared(x))
        for layer in self.tail:
            x = layer(x)
        return x.squeeze(-1)

    def original_keys(self) -> dict[str, list[str]]:
        """Our key -> the original `head.<index>` keys that may hold it (the shared layer: any repeat)."""
        keys = {"first": ["head.0"], "shared": [f"head.{2 + 3 * i}" for i in range(self.repeats)]}
        keys.update({f"tail.{j}": [f"head.{2 + 3 * self.repeats + j}"] for j in range(len(self.tail))})
        return keys


def rating_head(family: str, hidden: int, options: dict) -> RatingHead:
    """imscore's head for a `hidden`-wide tower: input d (DINOv2: 2d, its first token beside its mean patch token),
    tail d, d/2, 1 (DINOv2: 2d, d, d/2, 1)."""
    width = 2 * hidden if family == "dinov2" else hidden
    tail = (width, width // 2, width // 4, 1) if family == "dinov2" else (width, width // 2, 1)
    return RatingHead(width, int(options["expansion"]), int(options["layers"]), tail)


class ImscoreReward(Reward):
    """One of imscore's own rewards (see the module docstring); `variant` says which."""

    published_scale = 1.0

    def __init__(self, name: str, variant: Variant, backbone: nn.Module, head: RatingHead | None, tokenizer,
                 geometry: dict) -> None:
        super().__init__()
        self.name = name
        self.variant = variant
        self.needs_prompt = variant.preference
        self.backbone = backbone
        self.head = head
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.input_size = geometry["input_size"]
        self.normalize = Normalize(geometry["mean"], geometry["std"])
        formula = "logit_scale.exp() * cosine" + (" + logit_bias" if variant.family == "siglip" else "")
        self.scale_note = (formula if variant.preference else "MLP rating, on the scale of its training ratings") + (
            f" (imscore's {variant.repo_id}, trained on {variant.trained_on})")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the backbone's weights; pixels are cast to it."""
        return next(self.backbone.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """imscore's transform: resize (torchvision's antialiased bilinear, computed as one matrix product per axis,
        whose backward is far cheaper on a GPU than interpolate's), optional centre crop (rounded offset), normalise."""
        g, x = self.geometry, _wide(images)
        if g["resize"] is not None:
            h, w = x.shape[-2:]
            size = g["resize"] if isinstance(g["resize"], tuple) else shortest_side_size(h, w, g["resize"])
            if tuple(size) != (h, w):
                x = resize_bicubic(x, tuple(size), clamp=False, filter="bilinear")
        if g["crop"] is not None:
            x = center_crop(x, tuple(g["crop"]), offset="round")
        if not g["normalize"]:
            return x
        return (x - self.normalize.mean.to(x.dtype)) / self.normalize.std.to(x.dtype)  # float64 stays float64

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features: what the head reads (rating) or the L2-normalised embedding (preference)."""
        pixels = self.preprocess(images).to(self.dtype)
        family = self.variant.family
        if self.variant.preference:
            tower = self.backbone.vision_model(pixel_values=pixels).pooler_output
            embeds = self.backbone.visual_projection(tower) if family == "clip" else tower
            return F.normalize(_wide(embeds), dim=-1)
        tokens = _wide(self.backbone(pixel_values=pixels).last_hidden_state)
        if family == "clip":
            return tokens[:, 0]
        if family == "siglip":
            return tokens.mean(dim=1)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings [N, D], tokenised as imscore does (padded to the maximum length)."""
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(self.device)
        pooled = self.backbone.text_model(**tokens).pooler_output
        embeds = self.backbone.text_projection(pooled) if self.variant.family == "clip" else pooled
        return F.normalize(_wide(embeds), dim=-1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if not self.variant.preference:
            return self.head(self.image_features(images).to(self.head.first.weight.dtype))
        image = self.image_features(images)
        cosine = (image * self.text_features(prompts).to(image.dtype)).sum(-1)
        logit = _wide(self.backbone.logit_scale).exp() * cosine
        if self.variant.family == "siglip":
            logit = logit + _wide(self.backbone.logit_bias)
        return logit


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when the reward runs in float64 (gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


# -- loading -----------------------------------------------------------------------------------------------------------
def load_imscore_head(
    *,
    device: torch.device,
    dtype: torch.dtype,
    variant: str,
    checkpoint: PathLike | None = None,
    base: PathLike | None = None,
) -> ImscoreReward:
    """Build imscore's `variant` from `checkpoint` (its hub folder, or its model.safetensors with config.json beside)
    and `base` (a folder with the backbone's config.json, preprocessor_config.json and, for preference models, its
    tokenizer files; default: the hub repo the checkpoint's config names as `tag`, configs only, never weights)."""
    spec = VARIANTS[variant]
    weights = resolve_file(checkpoint, reward=variant, role="checkpoint", repo_id=spec.repo_id, filename=WEIGHTS_FILE)
    config_source = weights.parent if checkpoint is not None else None
    config_path = resolve_file(config_source, reward=variant, role="checkpoint", repo_id=spec.repo_id,
                               filename=CONFIG_FILE)
    options = read_options(config_path, variant)
    tag = options["tag"]
    base_source = base if base is not None else (tag if Path(tag).is_dir() else None)
    base_dir = resolve_folder(base_source, reward=variant, role="base", repo_id=tag,
                              required=(CONFIG_FILE, PREPROCESSOR_FILE))
    backbone = build_backbone(spec, base_dir)
    head = None if spec.preference else rating_head(spec.family, backbone.config.hidden_size, options)
    state = read_checkpoint(weights, reward=variant)
    load_backbone(backbone, state, variant, weights)
    if head is not None:
        load_head(head, state, variant, weights)
    tokenizer = _tokenizer(base_dir) if spec.preference else None
    if head is not None:  # the small head runs in float32 (float64 when asked), whatever the backbone's dtype
        head.to(torch.float64 if dtype == torch.float64 else torch.float32)
    reward = ImscoreReward(variant, spec, backbone.to(dtype), head, tokenizer, geometry(base_dir))
    return reward.to(device)


def read_options(path: Path, variant: str) -> dict:
    """The constructor arguments imscore saved in the repo's config.json (tag, expansion, layers)."""
    options = read_json(path, reward=variant, what="config")
    if "tag" not in options:
        raise CorruptCheckpointError(f"{variant}: {path} names no backbone `tag`; is it imscore's config.json?")
    return {"expansion": 4, "layers": 3, **options}


def build_backbone(spec: Variant, base_dir: Path) -> nn.Module:
    """The transformers backbone of `spec` from the base config, on the meta device (every weight is loaded)."""
    from transformers import (CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel,
                              SiglipVisionModel)

    config_file = str(base_dir / CONFIG_FILE)
    with torch.device("meta"):
        if spec.family == "dinov2":
            return Dinov2Model(Dinov2Config.from_json_file(config_file))
        if spec.family == "clip":
            model = CLIPModel(CLIPConfig.from_json_file(config_file))
            return model if spec.preference else model.vision_model  # imscore's AutoModel(tag).vision_model
        config = SiglipConfig.from_json_file(config_file)
        return SiglipModel(config) if spec.preference else SiglipVisionModel._from_config(config.vision_config)


def load_backbone(backbone: nn.Module, state: dict, variant: str, source: Path) -> None:
    """Load the `model.*` tensors strictly (assigning, so the meta tensors become the file's), then rebuild the
    non-persistent position ids."""
    own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and not k.endswith("position_ids")}
    stray = [k for k in state if not k.startswith(("model.", "head."))]
    if stray:
        raise CheckpointMismatchError(f"{variant}: {source} holds keys imscore's model does not have: {stray[:8]}")
    own = fit_keys(own, set(backbone.state_dict()))
    load_state_dict_strict(backbone, own, reward=variant, source=f"{source} (model.* keys)", assign=True)
    for module in backbone.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"{variant}: buffer {name} was not loaded; this transformers version adds state")
                module._buffers[name] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
    backbone.eval()


def load_head(head: RatingHead, state: dict, variant: str, source: Path) -> None:
    """Map imscore's `head.<index>` tensors to the head; repeats of the shared layer must be equal."""
    found, missing = {}, []
    for ours, candidates in head.original_keys().items():
        for part in ("weight", "bias"):
            present = [state[f"{c}.{part}"] for c in candidates if f"{c}.{part}" in state]
            if not present:
                missing.append(f"{candidates[0]}.{part}")
                continue
            if any(not torch.equal(present[0], t) for t in present[1:]):
                raise CheckpointMismatchError(f"{variant}: {source}: the repeated head layers {candidates} differ")
            found[f"{ours}.{part}"] = present[0]
    known = {f"{c}.{p}" for cs in head.original_keys().values() for c in cs for p in ("weight", "bias")}
    extra = sorted(k for k in state if k.startswith("head.") and k not in known)
    if missing or extra:
        raise CheckpointMismatchError(
            f"{variant}: {source} does not hold imscore's head of this shape (missing {missing[:6]}, unexpected "
            f"{extra[:6]}); is the config.json beside it the one saved with these weights?")
    load_state_dict_strict(head, found, reward=variant, source=f"{source} (head.* keys)")


def geometry(base_dir: Path) -> dict:
    """Resize, crop and normalisation of imscore's transform, from the base processor's configuration."""
    from transformers import AutoImageProcessor

    config = AutoImageProcessor.from_pretrained(str(base_dir)).to_dict()
    resize = _size(config.get("size")) if config.get("do_resize") else None
    crop = _size(config.get("crop_size")) if config.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = (crop, crop)
    side = crop or (resize if isinstance(resize, tuple) else None)
    return {"resize": resize, "crop": crop, "normalize": bool(config.get("do_normalize")),
            "mean": tuple(config["image_mean"]), "std": tuple(config["image_std"]),
            "input_size": side[0] if side and side[0] == side[1] else None}


def _size(size) -> int | tuple[int, int]:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise CorruptCheckpointError(f"unsupported image size {size!r} in the base processor configuration")


def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))
