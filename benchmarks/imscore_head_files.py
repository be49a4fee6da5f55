"""Files of imscore's own rewards in imscore's hub layout, with random weights: a base folder per backbone (the
transformers config.json, preprocessor_config.json and tokenizer files a hub repo like openai/clip-vit-large-patch14
holds) and a head repo (config.json naming the base as `tag`, model.safetensors with `model.*` and `head.<index>`
tensors, the repeated head layer stored once, under its first index, as safetensors de-duplicates shared tensors;
the SigLIP image tower under `model.vision_model.*`, where transformers 4, which imscore's files come from, kept it).

    base = write_base(root / "clip", "clip", tiny=True)
    repo = write_head_repo(root / "imreward-overall_rating-clip", "imreward-overall_rating-clip", base, seed=0)

Full sizes are ASSUMED (no network here to read the repos' config.json): CLIP ViT-L/14, SigLIP so400m-patch14-384,
DINOv2-L/14; the reward itself reads the real sizes from the files it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.checkpoints import write_clip_tokenizer
from rewards.imscore_heads import VARIANTS, rating_head

EXPANSION, LAYERS = 4, 3  # imscore's defaults for its rating heads
HEAD_GAIN = 2.0  # on top of torch's Linear init, so random heads spread their scores like trained ones
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

FULL = {
    "clip": dict(  # openai/clip-vit-large-patch14
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768),
    "siglip": dict(  # google/siglip-so400m-patch14-384
        text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         vocab_size=32000, max_position_embeddings=64),
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=384, patch_size=14)),
    "dinov2": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=518,
                   layerscale_value=1.0),  # facebook/dinov2-large
}
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY = {
    "clip": dict(text_config=SMALL, vision_config={**SMALL, "image_size": 224, "patch_size": 32}, projection_dim=16),
    "siglip": dict(text_config={**SMALL, "vocab_size": 256, "max_position_embeddings": 16},
                   vision_config={**SMALL, "image_size": 64, "patch_size": 16}),
    "dinov2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56),
}


def write_base(folder: Path, family: str, *, tiny: bool, weights: bool = False) -> Path:
    """The base model's configuration and tokenizer files; with `weights`, also random base weights, which only
    imscore reads (its constructor loads the base model before the head repo overwrites every tensor)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = (TINY if tiny else FULL)[family]
    if family == "clip":
        from transformers import CLIPConfig, CLIPImageProcessor

        write_clip_tokenizer(folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                                   "model_max_length": 77}))
        CLIPConfig(**spec).save_pretrained(str(folder))
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                           image_mean=OPENAI_MEAN, image_std=OPENAI_STD).save_pretrained(str(folder))
    elif family == "siglip":
        from transformers import SiglipConfig, SiglipImageProcessor

        size = spec["vision_config"]["image_size"]
        tokenizer = _sentencepiece_tokenizer(spec["text_config"]["vocab_size"], spec["text_config"]
                                             ["max_position_embeddings"])
        tokenizer.save_pretrained(str(folder))
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        SiglipConfig(text_config={**spec["text_config"], **ids}, vision_config=spec["vision_config"]).save_pretrained(
            str(folder))
        SiglipImageProcessor(size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(str(folder))
    else:
        from transformers import BitImageProcessor, Dinov2Config

        Dinov2Config(**spec).save_pretrained(str(folder))
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                          do_convert_rgb=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(
            str(folder))
    if weights:
        _base_model(family, folder).save_pretrained(str(folder))
    return folder


def _base_model(family: str, folder: Path):
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel

    config = str(folder / "config.json")
    if family == "clip":
        return CLIPModel(CLIPConfig.from_json_file(config))
    if family == "siglip":
        return SiglipModel(SiglipConfig.from_json_file(config))
    return Dinov2Model(Dinov2Config.from_json_file(config))


def _sentencepiece_tokenizer(vocab_size: int, max_length: int):
    """A SigLIP-shaped unigram tokenizer (pad 0, eos 1, unk 2) on the tokenizers backend, `vocab_size` pieces."""
    from transformers import T5Tokenizer

    letters = [chr(c) for c in range(97, 123)] + [chr(c) for c in range(48, 58)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -4.0) for c in letters] + [(c, -5.0) for c in letters]
    pieces += [(f"▁filler{i}", -12.0) for i in range(vocab_size - len(pieces))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def random_backbone_state(family: str, base: Path, preference: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of the backbone imscore builds from `base` (transformers' own init), under imscore's keys."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel, SiglipVisionModel

    torch.manual_seed(seed)
    config = str(base / "config.json")
    if family == "clip":
        model = CLIPModel(CLIPConfig.from_json_file(config))
        model = model if preference else model.vision_model
    elif family == "siglip":
        cfg = SiglipConfig.from_json_file(config)
        model = SiglipModel(cfg) if preference else SiglipVisionModel._from_config(cfg.vision_config)
    else:
        model = Dinov2Model(Dinov2Config.from_json_file(config))
    prefix = "model.vision_model." if family == "siglip" and not preference else "model."  # transformers 4's layout
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if preference:  # transformers' init puts the logit scale at log(1/0.07) or SigLIP's log(10), bias -10
        state["model.logit_scale"] = torch.tensor([4.6] if family == "clip" else [2.3]).reshape(
            state["model.logit_scale"].shape)
    return state


def random_head_state(family: str, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Random rating MLP under imscore's keys: head.0, head.2 (the shared repeat, stored once), head.11, ..."""
    torch.manual_seed(seed + 1)
    head = rating_head(family, hidden, {"expansion": EXPANSION, "layers": LAYERS})
    out = {}
    for ours, originals in head.original_keys().items():
        for part in ("weight", "bias"):
            gain = HEAD_GAIN if part == "weight" else 1.0
            out[f"{originals[0]}.{part}"] = (gain * head.state_dict()[f"{ours}.{part}"]).contiguous()
    return out


def write_head_repo(folder: Path, variant: str, base: Path, seed: int = 0) -> Path:
    """imscore's hub repo for `variant`: config.json (tag = `base`) and model.safetensors."""
    spec = VARIANTS[variant]
    folder.mkdir(parents=True, exist_ok=True)
    state = random_backbone_state(spec.family, base, spec.preference, seed)
    options = {"tag": str(base)}
    if not spec.preference:
        hidden = json.loads((base / "config.json").read_text())
        hidden = hidden.get("vision_config", hidden)["hidden_size"]
        state.update(random_head_state(spec.family, hidden, seed))
        options.update(expansion=EXPANSION, layers=LAYERS, freeze=-1, dropout=0.1)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(options, indent=2))
    return folder
