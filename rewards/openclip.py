"""open_clip models for the rewards: built without base weights, loaded strictly from one checkpoint file.

Public API (used by rewards.hps, rewards.clip_score and rewards.aesthetic):

    model_config(name: str | dict, *, quick_gelu: bool | None = None) -> dict  # a built-in name or a config dict
    build_model(name: str | dict, *, quick_gelu: bool | None = None) -> nn.Module  # parameters on the meta device
    read_folder(folder) -> (model_cfg, preprocess_cfg, weights)                # open_clip's folder layout (local-dir:)
    open_clip_state_dict(checkpoint: dict) -> dict[str, Tensor]                # unwrap 'state_dict', strip 'module.'
    load_model(name, checkpoint, *, reward, device, dtype, quick_gelu=None, image_only=False) -> nn.Module
    pretrained_config(name: str, tag: str | None, *, reward: str) -> dict      # open_clip's entry for a tag
    pretrained_file(name: str, tag: str, *, reward: str) -> Path              # the tag's file (hub cache)
    preprocess_config(name: str, tag: str | None = None) -> dict               # size, mean, std, interpolation...
    get_tokenizer(name: str) -> Callable[[list[str]], LongTensor]              # open_clip's own tokenizer
    image_features(model: nn.Module, pixels: Tensor) -> Tensor                 # L2-normalised [B, D]
    text_features(model: nn.Module, tokens: LongTensor) -> Tensor              # L2-normalised [B, D]

A model is built with its parameters on the meta device (no random init of hundreds of millions of
weights, no download of base weights), its buffers real; the parameters are then allocated empty on the
target device and filled from the checkpoint by `rewards.checkpoint.load_state_dict_strict`. Buffers that
checkpoints do not hold (the text tower's causal attention mask) are therefore computed as usual.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import load_state_dict_strict, read_checkpoint
from .errors import MissingFileError

FOLDER_CONFIG = "open_clip_config.json"
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
PREPROCESS_DEFAULTS = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


def _open_clip():
    import open_clip

    return open_clip


def model_config(name: str | dict, *, quick_gelu: bool | None = None) -> dict:
    """open_clip's architecture config for `name` (a copy; a dict is taken as the config itself), with
    QuickGELU forced on or off if given."""
    oc = _open_clip()
    cfg = copy.deepcopy(name) if isinstance(name, dict) else oc.get_model_config(name.replace("/", "-"))
    if cfg is None:
        known = ", ".join(oc.list_models())
        raise ValueError(f"open_clip has no model named {name!r}. Known names: {known}")
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False  # never fetch base image weights: the checkpoint has them all
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = False
    return cfg


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers moves to the meta device; buffers stay real.

    It patches `nn.Module.register_parameter` for the duration: do not build modules in other threads meanwhile.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_model(name: str | dict, *, quick_gelu: bool | None = None) -> nn.Module:
    """Build open_clip model `name` (or config dict) with parameters on the meta device and real (CPU) buffers."""
    oc = _open_clip()
    cfg = model_config(name, quick_gelu=quick_gelu)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if "multimodal_cfg" in cfg:
        cls = oc.CoCa
    else:
        cls = oc.CustomTextCLIP if custom_text else oc.CLIP
    with _parameters_on_meta():
        return cls(**cfg)


def open_clip_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights inside an open_clip-style checkpoint: unwrap 'state_dict', strip DDP's 'module.'."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, dict):
        return checkpoint
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter uninitialised storage on `device` (floating ones in `dtype`)."""
    for sub in module.modules():
        for key, param in list(sub._parameters.items()):
            if param is not None and param.device.type == "meta":
                kind = dtype if param.is_floating_point() else param.dtype
                sub._parameters[key] = nn.Parameter(torch.empty_like(param, device=device, dtype=kind), False)


def _image_only(model: nn.Module, state_dict: dict) -> tuple[nn.Module, dict]:
    visual = {k[len("visual.") :]: v for k, v in state_dict.items() if k.startswith("visual.")}
    return model.visual, visual


def load_model(
    name: str | dict,
    checkpoint: str | os.PathLike,
    *,
    reward: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quick_gelu: bool | None = None,
    image_only: bool = False,
) -> nn.Module:
    """Build `name` and fill it from `checkpoint`; every weight must come from the file (strict, names keys).

    With `image_only`, return just the image tower (`model.visual`) and ignore the file's other weights.
    The result is in eval mode with gradients off.
    """
    device = torch.device(device)
    model = build_model(name, quick_gelu=quick_gelu)
    state_dict = open_clip_state_dict(read_checkpoint(checkpoint, reward=reward))
    if "logit_scale" in state_dict and hasattr(model, "logit_scale") and not image_only:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    if image_only:
        model, state_dict = _image_only(model, state_dict)
    _materialize(model, device, dtype)
    load_state_dict_strict(model, state_dict, reward=reward, source=str(checkpoint))
    del state_dict
    model.to(device=device, dtype=dtype)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"{reward}: open_clip model {name} kept unloaded tensors on the meta device: {leftover}")
    return model.eval().requires_grad_(False)


def pretrained_config(name: str, tag: str | None, *, reward: str) -> dict:
    """open_clip's registry entry for pretrained `tag` of model `name` ({} when tag is None)."""
    if tag is None:
        return {}
    oc = _open_clip()
    cfg = oc.get_pretrained_cfg(name.replace("/", "-"), tag)
    if not cfg:
        tags = oc.list_pretrained_tags_by_model(name.replace("/", "-"))
        raise ValueError(
            f"{reward}: open_clip has no pretrained tag {tag!r} for model {name!r}. "
            f"Tags for this model: {', '.join(tags) or 'none'}. For your own weights pass checkpoint='/path/file'."
        )
    return cfg


def pretrained_file(name: str, tag: str, *, reward: str) -> Path:
    """Local path of pretrained `tag`'s weights, fetched through open_clip's registry (huggingface_hub cache)."""
    from open_clip.pretrained import download_pretrained

    cfg = pretrained_config(name, tag, reward=reward)
    where = cfg.get("hf_hub") or cfg.get("url") or "?"
    try:
        path = download_pretrained(cfg)
    except Exception as err:  # offline, not cached, network: one actionable message
        raise MissingFileError(
            f"{reward}: could not get the weights of open_clip model {name!r} tag {tag!r} from {where} "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {type(err).__name__}: {err}. "
            f"Download them once online, or pass checkpoint='/path/to/open_clip_pytorch_model.bin'."
        ) from err
    if not path:
        raise MissingFileError(f"{reward}: open_clip's registry has no download source for {name!r} tag {tag!r}.")
    return Path(path)


def preprocess_config(name: str | dict, tag: str | None = None, overrides: dict | None = None) -> dict:
    """Image preprocessing of `name` (a built-in name with pretrained `tag`, or a config dict with a folder's
    preprocess `overrides`): size, mean, std, interpolation, resize_mode, fill."""
    cfg = dict(PREPROCESS_DEFAULTS)
    if tag is not None:
        entry = pretrained_config(name, tag, reward="open_clip")
        cfg.update({k: entry[k] for k in cfg if k in entry})
    cfg.update({k: v for k, v in (overrides or {}).items() if k in cfg})
    size = model_config(name)["vision_cfg"].get("image_size", 224)
    cfg["size"] = size if isinstance(size, int) else tuple(size)
    return cfg


def get_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for model `name` (the CLIP BPE vocab ships inside open_clip; 77 tokens, EOT kept),
    or for a folder in open_clip's layout (`local-dir:` + path; its own tokenizer files if its config names one)."""
    return _open_clip().get_tokenizer(name if name.startswith("local-dir:") else name.replace("/", "-"))


def read_folder(folder: str | os.PathLike, *, reward: str) -> tuple[dict, dict, Path]:
    """(model config, preprocess config, weights file) of a folder in open_clip's own layout, the one
    `open_clip.create_model("local-dir:...")` and hub repos use: open_clip_config.json + the weights."""
    folder = Path(folder)
    config_file = folder / FOLDER_CONFIG
    try:
        config = json.loads(config_file.read_text())
        model_cfg = config["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MissingFileError(
            f"{reward}: {config_file} is missing or not an open_clip config ({type(err).__name__}: {err}); "
            f"a model folder holds {FOLDER_CONFIG} with a 'model_cfg' entry, as open_clip's push_to_hf_hub writes it."
        ) from err
    weights = next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise MissingFileError(f"{reward}: no weights in {folder}: expected one of {', '.join(FOLDER_WEIGHTS)}.")
    return model_cfg, config.get("preprocess_cfg", {}), weights


def image_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of normalised pixels; `model` is a CLIP model or its image tower."""
    tower = getattr(model, "visual", model)
    return F.normalize(tower(pixels), dim=-1)


def text_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings of token ids [B, context]."""
    return model.encode_text(tokens, normalize=True)
