"""Pipeline adapters: one small object per model family that the trajectory engine drives.

An adapter exposes exactly what reward fine-tuning needs from a diffusers pipeline: prompt encoding (frozen), the
sampling schedule and initial noise, the guided denoiser output, the sampler update, a one-step x0 prediction and a
differentiable decode (tuner/pipelines/base.py lists the calls). Engine and methods are family agnostic.

    base.py    what every family shares          unet.py  SD 1.x and SDXL's UNet + DDPM samplers
    sd15.py    Stable Diffusion 1.x / 2.x        sdxl.py  SDXL
    flow.py    what the flow-matching families share: schedule, Euler step, x0, re-noising
    sd3.py     Stable Diffusion 3 / 3.5          flux.py  FLUX.1 dev / schnell
    tiny.py    tiny random pipelines of each family for tests and smoke runs
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from . import flow, unet
from .base import Adapter, Conditioning
from .flux import FluxAdapter
from .sd3 import SD3Adapter
from .sd15 import SD15Adapter
from .sdxl import SDXLAdapter
from .tiny import (
    TINY_PIPELINES, tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline, tiny_t5_tokenizer,
    tiny_tokenizer,
)

# Every scheduler name a configuration may give; "auto" is each family's own sampler (DDIM for the UNet families,
# flow-matching Euler for SD3 / FLUX).
SCHEDULERS: dict[str, type] = {**unet.SCHEDULERS, **flow.SCHEDULERS}
SCHEDULER_NAMES = ("auto", *SCHEDULERS)
# Stock pipeline class -> adapter, most specific first (SDXL before SD 1.x).
ADAPTERS: dict[type, type[Adapter]] = {
    StableDiffusionXLPipeline: SDXLAdapter,
    StableDiffusion3Pipeline: SD3Adapter,
    FluxPipeline: FluxAdapter,
    StableDiffusionPipeline: SD15Adapter,
}
SUPPORTED = "StableDiffusionXLPipeline, StableDiffusionPipeline (SD 1.x/2.x), StableDiffusion3Pipeline (SD3 / 3.5) " \
            "and FluxPipeline (FLUX.1)"


def adapter_from_pipeline(pipe, *, device, dtype, scheduler: str = "auto", park_denoiser: bool = False,
                          **scheduler_kwargs) -> Adapter:
    """Wrap a loaded diffusers pipeline in its family's adapter; moves it to device/dtype (the denoiser stays on the
    CPU until `adapter.place_denoiser()` with park_denoiser)."""
    for pipeline_class, cls in ADAPTERS.items():
        if isinstance(pipe, pipeline_class):
            return cls(pipe, device=device, dtype=dtype, scheduler=scheduler, park_denoiser=park_denoiser,
                       **scheduler_kwargs)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}: the tuner supports {SUPPORTED}")


def _model_index(model: str) -> tuple[Path, dict]:
    """The path and contents of a model folder's or hub repo's model_index.json."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{model} is a directory without model_index.json: give a diffusers pipeline folder "
                "(as written by pipe.save_pretrained) or a Hugging Face repo id"
            )
    else:
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(model, "model_index.json"))
    return index, json.loads(index.read_text())


def pipeline_class(model: str) -> type:
    """The stock pipeline class a model folder or hub repo declares in its model_index.json."""
    index, contents = _model_index(model)
    name = contents.get("_class_name", "")
    for cls in ADAPTERS:
        if name == cls.__name__:
            return cls
    if "XL" in name:
        return StableDiffusionXLPipeline
    if name.startswith("StableDiffusion") and not name.startswith("StableDiffusion3"):
        return StableDiffusionPipeline
    raise ValueError(f"{index}: pipeline class {name!r} is not supported (the tuner supports {SUPPORTED})")


def saved_absent(model: str) -> list[str]:
    """The components a folder was saved without (null in its model_index.json), which stock from_pretrained must
    be given as None unless optional (an SD3 folder without T5: text_encoder_3, tokenizer_3)."""
    _, contents = _model_index(model)
    return [k for k, v in contents.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None]


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype keyword: `dtype` where diffusers has deprecated `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    renamed = hasattr(deprecation_utils, "_resolve_dtype")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}


def load_adapter(
    model: str, *, device, dtype, vae: str | None = None, scheduler: str = "auto", t5: bool = True,
    park_denoiser: bool = False, **scheduler_kwargs,
) -> Adapter:
    """Load a pipeline (hub id or local dir), optionally swap its VAE or (SD3) leave T5 out, and wrap it in an
    adapter. Components the folder was saved without (an SD3 without T5) load as None."""
    cls = pipeline_class(model)
    extra = {k: None for k in saved_absent(model) if k not in getattr(cls, "_optional_components", [])}
    if vae is not None:
        extra["vae"] = AutoencoderKL.from_pretrained(vae, **_dtype_kwarg(dtype))
    if cls is StableDiffusionPipeline:
        extra.update(safety_checker=None, requires_safety_checker=False)
    if not t5:
        if cls is not StableDiffusion3Pipeline:
            raise ValueError(f"t5=false applies to SD3 pipelines only; {model} is a {cls.__name__}")
        extra.update(text_encoder_3=None, tokenizer_3=None)
    pipe = cls.from_pretrained(model, **_dtype_kwarg(dtype), **extra)
    return adapter_from_pipeline(pipe, device=device, dtype=dtype, scheduler=scheduler, park_denoiser=park_denoiser,
                                 **scheduler_kwargs)


__all__ = [
    "SCHEDULERS", "SCHEDULER_NAMES", "ADAPTERS", "Conditioning", "Adapter", "SD15Adapter", "SDXLAdapter",
    "SD3Adapter", "FluxAdapter", "adapter_from_pipeline", "pipeline_class", "saved_absent", "load_adapter",
    "TINY_PIPELINES",
    "tiny_sdxl_pipeline", "tiny_sd15_pipeline", "tiny_sd3_pipeline", "tiny_flux_pipeline", "tiny_tokenizer",
    "tiny_t5_tokenizer",
]
