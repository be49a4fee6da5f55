"""Random-weight files, in their official formats, of the zoo's second step: Aesthetic Shadow's ViT folder,
CycleReward's release checkpoint (`write_cyclereward`), and imscore's own rewards in imscore's hub layout: a base
folder per backbone (the
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


def write_base(folder: Path, family: str, *, tiny: bool, seed: int = 0) -> Path:
    """The base model's hub folder: config.json, preprocessor_config.json, tokenizer files and random weights saved
    by transformers' save_pretrained (so under the hub's key names). Our reward reads only the configs and the
    tokenizer (the head repo holds every tensor it uses); imscore's constructor loads these weights."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = (TINY if tiny else FULL)[family]
    if family == "clip":
        from transformers import CLIPConfig, CLIPImageProcessor

        write_clip_tokenizer(folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                                   "model_max_length": 77}))
        config = CLIPConfig(**spec)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                           image_mean=OPENAI_MEAN, image_std=OPENAI_STD).save_pretrained(str(folder))
    elif family == "siglip":
        from transformers import SiglipConfig, SiglipImageProcessor

        size = spec["vision_config"]["image_size"]
        tokenizer = _sentencepiece_tokenizer(spec["text_config"]["vocab_size"], spec["text_config"]
                                             ["max_position_embeddings"])
        tokenizer.save_pretrained(str(folder))
        ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        config = SiglipConfig(text_config={**spec["text_config"], **ids}, vision_config=spec["vision_config"])
        SiglipImageProcessor(size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(str(folder))
    else:
        from transformers import BitImageProcessor, Dinov2Config

        config = Dinov2Config(**spec)
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                          do_convert_rgb=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(
            str(folder))
    torch.manual_seed(seed)
    _base_model(family, config).save_pretrained(str(folder))
    return folder


def _base_model(family: str, config):
    from transformers import CLIPModel, Dinov2Model, SiglipModel

    model = {"clip": CLIPModel, "siglip": SiglipModel, "dinov2": Dinov2Model}[family](config)
    if family in ("clip", "siglip"):  # the trained models' logit scale (about 100 / 10) and SigLIP's bias (about -10)
        with torch.no_grad():
            model.logit_scale.fill_(4.6 if family == "clip" else 2.3)
    return model


def _sentencepiece_tokenizer(vocab_size: int, max_length: int):
    """A SigLIP-shaped unigram tokenizer (pad 0, eos 1, unk 2) on the tokenizers backend, `vocab_size` pieces."""
    from transformers import T5Tokenizer

    letters = [chr(c) for c in range(97, 123)] + [chr(c) for c in range(48, 58)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -4.0) for c in letters] + [(c, -5.0) for c in letters]
    pieces += [(f"▁filler{i}", -12.0) for i in range(vocab_size - len(pieces))]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def backbone_state(family: str, base: Path, preference: bool) -> dict[str, torch.Tensor]:
    """The base weights under imscore's keys: `model.` + the hub's names; rating heads hold the image tower only
    (CLIP's at the top level, SigLIP's under transformers 4's `vision_model.` level)."""
    from safetensors.torch import load_file

    state = load_file(str(base / "model.safetensors"))
    if not preference and family == "clip":
        state = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    elif not preference and family == "siglip":
        state = {k: v for k, v in state.items() if k.startswith("vision_model.")}
    return {f"model.{k}": v for k, v in state.items() if not k.endswith("position_ids")}


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
    state = backbone_state(spec.family, base, spec.preference)
    options = {"tag": str(base)}
    if not spec.preference:
        hidden = json.loads((base / "config.json").read_text())
        hidden = hidden.get("vision_config", hidden)["hidden_size"]
        state.update(random_head_state(spec.family, hidden, seed))
        options.update(expansion=EXPANSION, layers=LAYERS, freeze=-1, dropout=0.1)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(options, indent=2))
    return folder


# -- Aesthetic Shadow v2 (shadowlilac): a transformers ViT classifier folder ------------------------------------------
SHADOW_MEAN, SHADOW_STD = [0.65463551, 0.60715182, 0.61108185], [0.32903292, 0.32726001, 0.31909652]
SHADOW_FULL = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   image_size=1024, patch_size=14)  # ASSUMED ViT-H/14 at 1024 px (the repo's config is unread here)
SHADOW_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=256,
                   patch_size=32)


def write_shadow(folder: Path, *, tiny: bool, seed: int = 0, image_size: int | None = None) -> Path:
    """Aesthetic Shadow v2's hub folder: config.json (labels hq, lq), preprocessor_config.json, model.safetensors."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    spec = dict(SHADOW_TINY if tiny else SHADOW_FULL)
    if image_size is not None:
        spec["image_size"] = image_size
    torch.manual_seed(seed)
    config = ViTConfig(**spec, id2label={0: "hq", 1: "lq"}, label2id={"hq": 0, "lq": 1})
    model = ViTForImageClassification(config)
    with torch.no_grad():  # a wider classifier than the init, so random weights spread P(hq) like a trained model
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(str(folder))
    ViTImageProcessor(size={"height": spec["image_size"], "width": spec["image_size"]}, resample=2,
                      image_mean=SHADOW_MEAN, image_std=SHADOW_STD).save_pretrained(str(folder))
    return folder


# -- CycleReward: the authors' release checkpoint (the CycleReward module's state dict) -------------------------------
def write_cyclereward(folder: Path, prompts: list[str], seed: int = 0, med_config: dict | None = None) -> dict:
    """CycleReward-Combo.pth (keys blip.visual_encoder.*, blip.text_encoder.*, blip.{vision,text}_proj.*, mlp.layers.
    {0,2,4,6,8}.*), med_config.json and a vocab.txt covering `prompts`; the ViT size is `rewards.imagereward.VISION`'s
    when called (BLIP's, which CycleReward shares with ImageReward)."""
    from benchmarks import checkpoints as ck
    from rewards import cyclereward as cr
    from rewards import imagereward as ir

    folder.mkdir(parents=True, exist_ok=True)
    med_config = dict(med_config or ck.MED_CONFIG)
    state = {k: v for k, v in ck.random_imagereward_state(med_config, seed).items() if not k.startswith("mlp.")}
    gen = torch.Generator().manual_seed(seed + 1)
    for original, j in cr.HEAD_INDICES.items():
        fan_in, fan_out = cr.HEAD_WIDTHS[j], cr.HEAD_WIDTHS[j + 1]
        state[f"mlp.layers.{original}.weight"] = torch.randn(fan_out, fan_in, generator=gen) * 2.0 / fan_in**0.5
        state[f"mlp.layers.{original}.bias"] = torch.randn(fan_out, generator=gen) * 0.1
    (folder / ir.CONFIG_FILE).write_text(json.dumps(med_config, indent=2))
    ck.write_vocab(folder / ir.VOCAB_FILE, prompts)
    torch.save(state, folder / "CycleReward-Combo.pth")
    return {"checkpoint": folder / "CycleReward-Combo.pth", "config": folder / ir.CONFIG_FILE,
            "tokenizer": folder / ir.VOCAB_FILE}


def write_evalmuse(folder: Path, prompts: list[str], seed: int = 0) -> dict:
    """fga_blip2.pth as the authors' LAVIS checkpoint ({"model": state}, with the tensors the score does not read:
    the Q-Former's LM head, the contrastive projections, temp and mask_proj) and a vocab.txt covering `prompts`;
    sizes are rewards.evalmuse.VISION / QFORMER's when called."""
    from benchmarks import checkpoints as ck
    from rewards import evalmuse as em

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ck.write_vocab(folder / "vocab.txt", [em.pre_caption(p) for p in prompts])
    with torch.device("meta"):  # shapes only
        model = em.EvalMuse(em._tokenizer(vocab))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        scale = 0.02 if value.ndim > 1 else 0.01
        state[key] = (1.0 if "norm" in key.lower() and key.endswith("weight") else 0.0) + \
            scale * torch.randn(value.shape, generator=gen)
    state["itm_head.weight"] *= 50  # a spread of scores
    width, vocab_size = em.QFORMER["hidden_size"], em.QFORMER["vocab_size"]
    extra = {"Qformer.cls.predictions.bias": (vocab_size,), "Qformer.cls.predictions.transform.dense.weight":
             (width, width), "Qformer.cls.predictions.transform.dense.bias": (width,),
             "Qformer.cls.predictions.transform.LayerNorm.weight": (width,),
             "Qformer.cls.predictions.transform.LayerNorm.bias": (width,),
             "Qformer.cls.predictions.decoder.weight": (vocab_size, width),
             "Qformer.cls.predictions.decoder.bias": (vocab_size,), "vision_proj.weight": (256, width),
             "vision_proj.bias": (256,), "text_proj.weight": (256, width), "text_proj.bias": (256,)}
    widths = (width, 256, 128, 64, 16, 1)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        extra[f"mask_proj.layers.{2 * i}.weight"], extra[f"mask_proj.layers.{2 * i}.bias"] = (b, a), (b,)
    lavis = em.to_lavis(state)
    lavis.update({k: 0.02 * torch.randn(shape, generator=gen) for k, shape in extra.items()})
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(em.QFORMER["max_position_embeddings"])[None]
    lavis["temp"] = torch.tensor(0.07)
    torch.save({"model": lavis, "epoch": 0}, folder / em.CHECKPOINT_FILE)
    return {"checkpoint": folder / em.CHECKPOINT_FILE, "tokenizer": vocab}
