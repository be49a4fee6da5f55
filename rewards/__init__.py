"""Differentiable reward models for tuning text-to-image diffusion models.

    import rewards
    r = rewards.load("hpsv2.1", device="cuda", dtype=torch.bfloat16)
    scores = r(images, prompts)          # images float [B,3,H,W] in [0,1]; scores float32 [B], differentiable

Every reward loads the ORIGINAL checkpoint (a local path, or the official Hugging Face repo through
huggingface_hub) and matches the official implementation's score; see docs/rewards.md.
"""

import torch

from .base import Reward
from .errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    InputError,
    MissingFileError,
    RewardError,
    UnknownRewardError,
    UnsafeCheckpointError,
)
from . import imscore_heads as _imscore_heads
from .mixture import Mixture, combine
from .registry import available, load, needs_prompt, register

register("hpsv2", "rewards.hps:load_hps", needs_prompt=True, version="v2.0")
register("hpsv2.1", "rewards.hps:load_hps", needs_prompt=True, version="v2.1")
register("pickscore", "rewards.pickscore:load_pickscore", needs_prompt=True)
register("imagereward", "rewards.imagereward:load_imagereward", needs_prompt=True)
register("aesthetic", "rewards.aesthetic:load_aesthetic", needs_prompt=False)
register("clip", "rewards.clip_score:load_clip", needs_prompt=True)
register("symmetry", "rewards.lowlevel:load_symmetry", needs_prompt=False)
register("sharpness", "rewards.lowlevel:load_sharpness", needs_prompt=False)
register("shapes-clip", "rewards.clip_score:load_shapes_clip", needs_prompt=True)
register("shapes-relation", "rewards.shapes_relation:load_shapes_relation", needs_prompt=True)
register("mps", "rewards.mps:load_mps", needs_prompt=True)
register("vqascore", "rewards.vqascore:load_vqascore", needs_prompt=True, dtype=torch.bfloat16)  # 11B parameters
register("hpsv3", "rewards.hpsv3:load_hpsv3", needs_prompt=True)
register("aesthetic-shadow", "rewards.shadow_aesthetic:load_shadow_aesthetic", needs_prompt=False)
register("cyclereward", "rewards.cyclereward:load_cyclereward", needs_prompt=True, variant="Combo")
register("cyclereward-i2t", "rewards.cyclereward:load_cyclereward", needs_prompt=True, variant="I2T")
register("cyclereward-t2i", "rewards.cyclereward:load_cyclereward", needs_prompt=True, variant="T2I")
register("evalmuse", "rewards.evalmuse:load_evalmuse", needs_prompt=True)
for _name, _variant in _imscore_heads.VARIANTS.items():  # imscore's own heads: one name per hub repo
    register(_name, "rewards.imscore_heads:load_imscore_head", needs_prompt=_variant.preference, variant=_name)

__all__ = [
    "Reward",
    "Mixture",
    "available",
    "needs_prompt",
    "combine",
    "load",
    "register",
    "RewardError",
    "UnknownRewardError",
    "InputError",
    "MissingFileError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
]
__version__ = "0.1.0"
