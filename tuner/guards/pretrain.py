"""The pretraining (denoising) loss on image-caption pairs, as ReFL adds it to keep the model near its data.

loss = weight * mean((model(x_t, t, caption) - target)^2), with x_t = adapter.add_noise(x0, noise, t), x0 the VAE
latent of a data image (the posterior's mean), t one timestep of the run's sampling schedule drawn uniformly per
micro-batch, and the target of the family: the noise epsilon for epsilon-predicting UNets (SD 1.5, SDXL),
alpha_t * noise - sigma_t * x0 for v-prediction ones, the flow velocity noise - x0 for SD3 / FLUX. The model is
called on the caption alone (no CFG; FLUX.1-dev's guidance embedding gets guidance 1). It is one more denoiser
graph per micro-batch, built and freed after the reward's sweep, so memory stays at one graph.

Data: guards.pretrain_data = shapes (the procedural generator of tuner.shapes, its training seed) or a folder in the
diffusers `imagefolder` layout: images plus metadata.jsonl, one JSON object a line with "file_name" and "text".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..prompts import PromptSampler

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageFolder:
    """Image-caption pairs of a diffusers imagefolder (metadata.jsonl with file_name and text), read when drawn."""

    def __init__(self, folder: str | Path, caption_column: str = "text"):
        self.folder = Path(folder)
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"guards.pretrain_data={folder}: no metadata.jsonl there (the diffusers imagefolder "
                                    f"layout: one JSON object a line with \"file_name\" and \"{caption_column}\")")
        self.items = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file_name" not in row or caption_column not in row:
                raise ValueError(f"{meta}, line {n}: needs \"file_name\" and \"{caption_column}\", has {sorted(row)}")
            self.items.append((self.folder / row["file_name"], str(row[caption_column])))
        if not self.items:
            raise ValueError(f"{meta} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    def pair(self, index: int, height: int, width: int) -> tuple[torch.Tensor, str]:
        """Image `index` resized (shorter side, bicubic) and centre-cropped to height x width, in [0,1], and its caption."""
        from PIL import Image

        path, caption = self.items[index]
        image = Image.open(path).convert("RGB")
        scale = max(height / image.height, width / image.width)
        image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        return array.permute(2, 0, 1).float() / 255, caption


class PairSource:
    """Batches of (images [B,3,H,W] in [0,1], captions) for (step, micro-batch, rank): a pure function, so a resumed
    run draws what the uninterrupted one would (folders are shuffled epoch by epoch like the prompts)."""

    def __init__(self, data: str, *, batch_size: int, height: int, width: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.height, self.width, self.batch_size = height, width, batch_size
        self.position = dict(grad_accum=grad_accum, rank=rank, world_size=world_size)
        if data == "shapes":
            from ..shapes.data import ShapesData

            self.shapes, self.folder = ShapesData(0), None
        else:
            self.shapes, self.folder = None, ImageFolder(data)
            self.sampler = PromptSampler(list(range(len(self.folder))), batch_size, seed=seed, **self.position)

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, list[str]]:
        if self.folder is not None:
            pairs = [self.folder.pair(i, self.height, self.width) for i in self.sampler.batch(step, micro)]
            return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs]
        p = self.position
        start = ((step * p["grad_accum"] + micro) * p["world_size"] + p["rank"]) * self.batch_size
        images, captions = self.shapes.batch(start, self.batch_size)
        if images.shape[-2:] != (self.height, self.width):
            images = torch.nn.functional.interpolate(images, size=(self.height, self.width), mode="bicubic",
                                                     antialias=True).clamp(0, 1)
        return images, captions


@torch.no_grad()
def encode_images(adapter, images: torch.Tensor) -> torch.Tensor:
    """Images in [0,1] as the engine's latents (the VAE posterior's mean, shifted and scaled as decode undoes)."""
    vae = adapter.vae
    z = vae.encode((images * 2 - 1).to(adapter.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).to(adapter.latent_dtype)


def target(adapter, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """What the family's denoiser should output at x_t = add_noise(x0, noise, t)."""
    if adapter.family in ("sd3", "flux"):
        return noise - x0
    kind = adapter.scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return adapter.scheduler.get_velocity(x0, noise, t.reshape(1))
    raise ValueError(f"the pretraining loss supports epsilon and v_prediction UNets, not prediction_type {kind!r}")


def denoising_loss(adapter, images: torch.Tensor, captions: list[str], *, num_steps: int, generator: torch.Generator,
                   height: int, width: int) -> torch.Tensor:
    """The denoising loss of one batch (attached to the denoiser's parameters); draws t's index, then the noise."""
    x0 = encode_images(adapter, images)
    adapter.set_timesteps(num_steps, height, width)
    index = int(torch.randint(0, num_steps, (), generator=generator))
    t = adapter.scheduler.timesteps[index]
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = adapter.add_noise(x0, noise, t)
    negatives = None if adapter.family == "flux" else [""] * len(captions)
    cond = adapter.encode_prompts(captions, negatives)
    out = adapter.denoise(x_t, t, cond, 1.0)
    adapter.set_timesteps(num_steps, height, width)  # leave the scheduler fresh (Euler keeps a step index)
    return (out - target(adapter, x0, noise, t)).pow(2).mean()
