"""Fit checkpoint key names written by one transformers version to the modules of the installed one.

Hub files keep the names of the transformers version that wrote them; transformers 5 renamed some modules (ViT and
DINOv2 attention `attention.attention.query` -> `attention.q_proj`, ViT's `encoder.layer.N` -> `layers.N` and its
`intermediate.dense` / `output.dense` -> `mlp.fc1` / `mlp.fc2`; SigLIP's image model lost its `vision_model.`
level) and converts old names when its own `from_pretrained` reads a file. Rewards that read the tensors
themselves use these renamings instead: a key the module already has is kept, others are renamed only if the
new name is one the module has, so a wrong renaming cannot load silently (the strict load names what is left).
"""

from __future__ import annotations

import re

import torch

RENAMES = (  # (pattern, replacement) on legacy names, applied in this order
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)
VISION_LEVEL = "vision_model."


def fit_keys(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """`state` with each key the module lacks renamed to the module's name for it, where one of the renamings
    gives a name the module has."""
    return {_fit(key, own): value for key, value in state.items()}


def _fit(key: str, own: set[str]) -> str:
    if key in own:
        return key
    for candidate in _candidates(key):
        if candidate in own:
            return candidate
    return key


def _candidates(key: str) -> list[str]:
    renamed = key
    for pattern, replacement in RENAMES:
        renamed = re.sub(pattern, replacement, renamed)
    out = [renamed, re.sub(r"(^|\.)encoder\.layer\.", r"\1layers.", renamed)]
    for name in list(out):
        if name.startswith(VISION_LEVEL):
            out.append(name[len(VISION_LEVEL):])
        else:
            out.append(VISION_LEVEL + name)
    return out
