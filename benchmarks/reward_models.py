"""The rewards the gradient benchmark times: ours through `rewards.load`, imscore's through its own classes, all on
ONE set of random-weight files written in the official formats (random weights cost exactly what trained ones cost).

    files = write_files(root, tiny=False)          # cached: a second call with the same root reuses the files
    reward = load_ours("hpsv2.1", files, device="cuda", dtype=torch.bfloat16, compile=True)
    scorer = imscore_models.load("hpsv2.1", files, device="cuda", dtype=torch.bfloat16)

`tiny_architectures()` shrinks every architecture for CPU smoke runs while keeping the real loading paths: the
open_clip names ViT-H-14 / ViT-L-14 resolve to tiny configs, ImageReward's ViT and BERT get one block (ours and
imscore's alike). Everything else, file formats and code paths included, is the full-size suite's.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

import rewards
from benchmarks import checkpoints as ck
from benchmarks import checkpoints_mps as ck_mps

MODEL_REWARDS = ("hpsv2.1", "pickscore", "imagereward", "aesthetic", "clip", "mps", "vqascore", "hpsv3")
REWARDS = MODEL_REWARDS + ("symmetry", "sharpness")
# Opt-in (--names): the second step of the zoo, one case per backbone and head kind; files written only when named.
ZOO2_REWARDS = ("aesthetic-shadow", "cyclereward", "evalmuse", "pickscore-siglip", "pickscore-clip", "imreward-overall_rating-clip",
                "imreward-overall_rating-siglip", "imreward-overall_rating-dinov2")
KNOWN_REWARDS = REWARDS + ZOO2_REWARDS
FILES_VERSION = 2  # bump when a writer changes: cached files of another version are rewritten

PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "a watercolor painting of a lighthouse at sunset",
    "a red sports car parked in front of a glass building",
    "portrait of an old fisherman with a grey beard, 35mm film",
    "a cozy library with tall bookshelves and a fireplace",
    "a futuristic city skyline at night with flying cars",
    "a golden retriever puppy playing in the snow",
    "a bouquet of sunflowers in a blue ceramic vase",
    "a mountain lake reflecting pine trees at dawn",
    "a steampunk owl made of brass gears",
    "a plate of pancakes with berries and maple syrup",
    "a medieval castle on a cliff above the sea",
    "an isometric illustration of a tiny island village",
    "a close-up of a hummingbird drinking from a flower",
    "a robot barista making coffee in a busy cafe",
    "a foggy forest path with rays of light",
    "a minimalist poster of a rocket launch",
    "a koi pond in a japanese garden in autumn",
    "a knight in shining armor holding a lantern",
    "an oil painting of a stormy sea with a sailing ship",
    "a desert landscape with red rock arches under stars",
    "a bowl of fresh fruit on a marble counter",
    "a neon sign reading open in a rainy alley",
    "a snow leopard resting on a rocky ledge",
    "a child flying a kite on a windy beach",
    "a cyberpunk street market with holograms",
    "a vintage typewriter on a desk next to a window",
    "a field of lavender under a purple sky",
    "an astronaut floating above the earth, photorealistic",
    "a wooden cabin by a frozen lake at twilight",
]

# Smoke-run sizes: the full configs' structure with tiny widths and depths.
TINY_HPS = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY_OPENAI = {  # embed_dim 768: the aesthetic head reads 768-wide embeddings
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
TINY_IR_VISION = {"embed_dim": 64, "depth": 1, "num_heads": 4}
# VQAScore: CLIP ViT-L/14-336 + FlanT5-XXL (11.3B parameters, 22.6 GB of bf16 files, written only when selected);
# smoke runs keep 336 px and the 32,100-token vocabulary (imscore hard-codes it) with tiny widths and depths.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
TINY_CLIP_336 = {**CLIP_L_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "projection_dim": 16}
TINY_FLANT5 = {**ck.FLANT5_XXL, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 1, "num_decoder_layers": 1,
               "num_heads": 4}
LAZY_REWARDS = ("vqascore", "hpsv3")  # their files (23 GB, 16 GB at full size) are written only when selected
# Batch sizes of the full suite for rewards that cannot run its default (32, 8, 1): VQAScore holds 22.6 GB of bf16
# weights and saves ~6.3 GB of activations per image for the backward (docs/rewards.md, vqascore card: Memory).
BATCHES = {"vqascore": (8, 4, 1),
           # Aesthetic Shadow (assumed ViT-H/14 at 1024 px: 5,330 tokens x 32 blocks) saves several GB per image
           "aesthetic-shadow": (4, 2, 1)}
TINY_MED = {"num_hidden_layers": 1}
TINY_EVALMUSE_LAYERS = (1, 2)  # ViT blocks, Q-Former layers (imscore fixes the widths: 1408 and 768)


@contextlib.contextmanager
def tiny_architectures() -> Iterator[None]:
    """While active, ViT-H-14 and ViT-L-14 mean tiny open_clip models, ImageReward (ours and imscore's) has one
    ViT block 64 wide and EvalMuse (ours and imscore's) one ViT block and two Q-Former layers; files written and
    models loaded meanwhile have those sizes."""
    import open_clip.factory as factory

    from rewards import imagereward as ir

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(factory._MODEL_CONFIGS, {"ViT-H-14": TINY_HPS, "ViT-L-14": TINY_OPENAI}))
        stack.enter_context(mock.patch.dict(ir.VISION, TINY_IR_VISION))
        from benchmarks import imscore_models

        stack.enter_context(imscore_models.tiny_imagereward(TINY_IR_VISION, TINY_MED))
        from rewards import evalmuse as em

        stack.enter_context(mock.patch.dict(em.VISION, num_hidden_layers=TINY_EVALMUSE_LAYERS[0]))
        stack.enter_context(mock.patch.dict(em.QFORMER, num_hidden_layers=TINY_EVALMUSE_LAYERS[1]))
        stack.enter_context(imscore_models.tiny_evalmuse(*TINY_EVALMUSE_LAYERS))
        yield


def write_files(root: Path, *, tiny: bool, rewards: tuple[str, ...] = REWARDS) -> dict:
    """Write (or reuse) every reward's files under root/{full,tiny}: {"sources": {reward: {...}}, "extra": {...}};
    those of LAZY_REWARDS only if `rewards` names them."""
    folder = Path(root) / ("tiny" if tiny else "full")
    files = _cached(folder / "files.json", tiny, lambda: _write(folder, tiny))
    if "vqascore" in rewards:
        vqa = _cached(folder / "vqascore" / "files.json", tiny, lambda: _write_vqascore(folder / "vqascore", tiny))
        files["sources"]["vqascore"] = vqa["sources"]["vqascore"]
    if "hpsv3" in rewards:
        files["sources"]["hpsv3"] = hpsv3_sources(root, tiny=tiny)
    for name in (r for r in ZOO2_REWARDS if r in rewards):
        files["sources"][name] = zoo2_sources(root, name, tiny=tiny)
    return files


def zoo2_sources(root: Path, name: str, *, tiny: bool) -> dict[str, Path]:
    """Files of an opt-in reward under root/{full,tiny}/zoo2 (base folders shared), written once."""
    from benchmarks import zoo2_files as ih
    from rewards.imscore_heads import VARIANTS

    folder = Path(root) / ("tiny" if tiny else "full") / "zoo2"
    if name == "aesthetic-shadow":
        target = folder / "aesthetic-shadow-v2"
        if not (target / "model.safetensors").is_file():
            ih.write_shadow(target, tiny=tiny, image_size=1024)  # imscore resizes to 1024 whatever the config says
        return {"checkpoint": target}
    if name == "cyclereward":
        med = {**ck.MED_CONFIG, **(TINY_MED if tiny else {})}
        target = folder / "cyclereward"
        if not (target / "CycleReward-Combo.pth").is_file():
            ih.write_cyclereward(target, PROMPTS, seed=0, med_config=med)
        return {"checkpoint": target / "CycleReward-Combo.pth", "config": target / "med_config.json",
                "tokenizer": target / "vocab.txt"}
    if name == "evalmuse":
        target = folder / "evalmuse"
        if not (target / "fga_blip2.pth").is_file():
            ih.write_evalmuse(target, PROMPTS, seed=0)
        return {"checkpoint": target / "fga_blip2.pth", "tokenizer": target / "vocab.txt"}
    family = VARIANTS[name].family
    base, repo = folder / f"base-{family}", folder / name
    if not (base / "model.safetensors").is_file():
        ih.write_base(base, family, tiny=tiny)
    if not (repo / "model.safetensors").is_file():
        ih.write_head_repo(repo, name, base)
    return {"checkpoint": repo}


def _cached(marker: Path, tiny: bool, write) -> dict:
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("version") == FILES_VERSION and saved.get("tiny") == tiny:
            return _paths(saved["files"])
    start = time.perf_counter()
    files = write()
    record = {"version": FILES_VERSION, "tiny": tiny, "seconds": round(time.perf_counter() - start, 1)}
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**record, "files": _strings(files)}, indent=2))
    return files


def _write_vqascore(folder: Path, tiny: bool) -> dict:
    t5, vision = (TINY_FLANT5, TINY_CLIP_336) if tiny else (ck.FLANT5_XXL, CLIP_L_336)
    return {"sources": {"vqascore": ck.write_vqascore(folder, PROMPTS, t5, vision, seed=0)}, "extra": {}}


def hpsv3_sources(root: Path, *, tiny: bool) -> dict[str, Path]:
    """HPSv3's files (16 GB at full size) under root/{full,tiny}/hpsv3, written once with their own marker."""
    from benchmarks import hpsv3_files

    folder = Path(root) / ("tiny" if tiny else "full") / "hpsv3"
    return hpsv3_files.write_benchmark_files(folder, PROMPTS, tiny=tiny)


def _write(folder: Path, tiny: bool) -> dict:
    med = {**ck.MED_CONFIG, **(TINY_MED if tiny else {})}
    pickscore = ck.PICKSCORE_SMALL if tiny else ck.PICKSCORE_CONFIG
    tokenizer = ck.write_clip_tokenizer(folder / "clip_tokenizer")
    openai = ck.random_openai_clip_state(seed=0, arch="ViT-L-14")
    backbone = folder / "openai" / "ViT-L-14.pt"
    backbone.parent.mkdir(parents=True, exist_ok=True)
    torch.save(openai, backbone)
    hf_vision = ck.write_hf_clip_vision(folder / "clip-vit-large-patch14", openai, "ViT-L-14")
    del openai
    mps = ck_mps.write_mps(folder / "mps", ck_mps.MPS_SMALL if tiny else ck_mps.MPS_CONFIG, seed=0)
    sources = {
        "hpsv2.1": {"checkpoint": ck.write_hps(folder / "hps" / ck.HPS_FILE, "ViT-H-14", seed=0)},
        "pickscore": {
            "checkpoint": ck.write_pickscore(folder / "PickScore_v1", pickscore, seed=0, fmt="bin"),
            "tokenizer": tokenizer,
        },
        "imagereward": ck.write_imagereward(folder / "ImageReward", PROMPTS, seed=0, med_config=med),
        "aesthetic": {"checkpoint": ck.write_head(folder / "aesthetic" / ck.HEAD_FILE, seed=0), "backbone": backbone},
        "clip": {"checkpoint": backbone},  # ViT-L-14 with the openai tag's preprocessing and QuickGELU
        "symmetry": {},
        "sharpness": {},
        "mps": {"checkpoint": mps["pickle"], "tokenizer": mps["tokenizer"]},  # the official whole-model pickle
    }
    mps_imscore = {"checkpoint": mps["safetensors"], "config": mps["config"], "tokenizer": mps["tokenizer"]}
    return {"sources": sources, "extra": {"hf_clip_vision": hf_vision, "clip_tokenizer": tokenizer,
                                          "mps_imscore": mps_imscore}}


def _strings(files: dict) -> dict:
    return json.loads(json.dumps(files, default=str))


def _paths(files: dict) -> dict:
    sources = {name: {k: Path(v) for k, v in src.items()} for name, src in files["sources"].items()}
    extra = {k: {role: Path(p) for role, p in v.items()} if isinstance(v, dict) else Path(v)
             for k, v in files["extra"].items()}
    return {"sources": sources, "extra": extra}


def load_ours(
    name: str, files: dict, *, device: str, dtype: torch.dtype, fast: bool = False, compile: bool | dict = False,
    recompute: bool = False,
) -> rewards.Reward:
    """Our reward `name` from the written files, as a user loads it; the per-call input check off, as in the tuner."""
    reward = rewards.load(name, device=device, dtype=dtype, fast=fast, compile=compile, recompute=recompute,
                          **files["sources"][name])
    reward.check_values = False
    return reward


def prompts_for(batch: int) -> list[str]:
    """`batch` prompts, distinct up to len(PROMPTS)."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
