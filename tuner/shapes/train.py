"""Train the shipped shapes models from scratch: a VAE, then a UNet with its text encoder; a CLIP beside them;
then shapes-flow, an SD3-style flow-matching transformer on the same VAE and text encoders.

    python -m tuner.shapes.train --out build/shapes                 # shapes-sd's stages; the CLIP in a second process
    python -m tuner.shapes.train --out build/shapes --stage flow    # one of vae clip unet eval flow flow-eval
    python -m tuner.shapes.train --out build/shapes --install       # copy the results to where the package ships them
    python -m tuner.shapes.train --out build/shapes --stage relation # a relation CLIP from the CLIP (not shipped)

Read top to bottom: the data stream, one loop per model, then evaluation (tuner/shapes/evaluate.py).
Every image is made on the fly from (seed, index) (tuner/shapes/data.py): stream seed 0 trains, seed 1 is
held out. Writes <out>/vae, <out>/pipeline (a StableDiffusionPipeline folder), <out>/clip (an open_clip
folder), <out>/flow (a StableDiffusion3Pipeline folder), <out>/logs/<stage>.jsonl (loss curves) and, after
`eval` / `flow-eval`, report.json / flow_report.json and figures. The flow stage takes its VAE and text encoders
from <out>/pipeline and <out>/clip, or from the shipped shapes-sd and shapes-clip where those are absent.
With --<stage>-time-limit, a stage measures its speed over its first 50 steps and cuts its step count to what
fits (its learning-rate schedule still runs to the end); its log records the steps it ran.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.shapes import models
from tuner.shapes.data import (ShapesData, blur, colours_swapped, mismatched_caption, relation_swapped,
                               render_tensors, scene_tensors)

PACKAGE_PIPELINE = Path(__file__).parent / "model"
PACKAGE_CLIP = Path(__file__).parents[2] / "rewards" / "weights" / "shapes-clip"
PACKAGE_FLOW = Path(__file__).parent / "flow_model"


@dataclass
class Stage:
    """Optimisation settings of one stage."""

    steps: int
    batch: int
    lr: float
    warmup: int
    weight_decay: float = 0.0


STAGES = {
    "vae": Stage(steps=8000, batch=128, lr=1e-3, warmup=200),
    "clip": Stage(steps=6000, batch=512, lr=1e-3, warmup=300, weight_decay=0.1),
    "unet": Stage(steps=16000, batch=512, lr=6e-4, warmup=500, weight_decay=0.01),
    "flow": Stage(steps=30000, batch=256, lr=4e-4, warmup=500, weight_decay=0.01),
    "relation": Stage(steps=2000, batch=128, lr=2e-4, warmup=50, weight_decay=0.1),
}
VAE_KL_WEIGHT = 1e-5  # per latent element, against per-pixel L1: keeps the latent smooth, the decoder sharp
CAPTION_DROP = 0.1  # UNet and flow: share of empty captions, for classifier-free guidance
MIN_SNR_GAMMA = 5.0  # UNet: min-SNR loss weighting (Hang et al., 2023)
EMA_DECAY = 0.999


# ------------------------------------------------------------------------------------------------ data
class Tokens:
    """Captions -> padded token ids [B, length] with a transformers tokenizer (picklable for workers)."""

    def __init__(self, tok, length: int):
        self.tok, self.length = tok, length

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.tok(captions, padding="max_length", max_length=self.length, truncation=True,
                        return_tensors="pt").input_ids


class Stream(torch.utils.data.Dataset):
    """Batch i of the training stream: scene tensors (rendered later, on the GPU) and caption token ids."""

    def __init__(self, batch: int, tokens: Tokens | None = None, drop_caption: float = 0.0, negatives: bool = False,
                 seed: int = 0, relation_negatives: bool = False):
        self.batch, self.tokens, self.drop, self.negatives, self.data = batch, tokens, drop_caption, negatives, ShapesData(seed)
        self.relation_negatives = relation_negatives

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        scenes = self.data.scenes(i * self.batch, self.batch)
        out = scene_tensors(scenes)
        if self.tokens is not None:
            rng = random.Random(f"captions-{self.data.seed}-{i}")
            out["tokens"] = self.tokens(["" if rng.random() < self.drop else s.caption for s in scenes])
            if self.negatives:
                out["negative_tokens"] = self.tokens([mismatched_caption(s, rng)[0] for s in scenes])
            if self.relation_negatives:  # pairs: the relation, then the colours swapped; one shape: other facts
                out["relation_tokens"] = self.tokens([relation_swapped(s) if len(s.shapes) == 2 else
                                                      mismatched_caption(s, rng)[0] for s in scenes])
                out["colour_tokens"] = self.tokens([colours_swapped(s) if len(s.shapes) == 2 else
                                                    mismatched_caption(s, rng)[0] for s in scenes])
        return out


def batches(stream: Stream, start: int, steps: int, workers: int, device: torch.device):
    """(step, batch on device, images [B,3,64,64] in [0,1]) for steps start..steps-1, prefetched by workers."""
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, sampler=range(start, steps), num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=False)
    for step, batch in zip(range(start, steps), loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        yield step, batch, render_tensors(batch, device)


# ------------------------------------------------------------------------------------------------ helpers
def lr_at(step: int, s: Stage) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    """JSON lines of training metrics, and the clock of the stage's time limit."""

    def __init__(self, path: Path, settings: Stage, time_limit: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file, self.limit, self.start = path.open("w"), time_limit, time.perf_counter()
        self.write({"settings": asdict(settings), "time_limit_s": time_limit, "device": _device_name()})

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def step(self, step: int, every: int, **metrics: torch.Tensor | float) -> None:
        if step % every == 0:
            row = {k: round(float(v.detach() if torch.is_tensor(v) else v), 6) for k, v in metrics.items()}
            self.write({"step": step, "seconds": round(self.elapsed, 1), **row})
            print(f"[{self.file.name}] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, step: int, s: Stage, warm: int = 20, probe: int = 80) -> bool:
        """Whether `step` was the last. Under a time limit the step count is cut, once, to what fits in it, from
        the speed between steps `warm` and `probe` (start-up excluded), so the learning-rate schedule still ends."""
        if self.limit > 0 and step + 1 == warm:
            self._warm = self.elapsed
        if self.limit > 0 and step + 1 == probe:
            rate = (self.elapsed - self._warm) / (probe - warm)
            fits = probe + int((self.limit - self.elapsed) / rate)
            if fits < s.steps:
                s.steps = max(fits, probe)
                self.write({"steps_cut_to": s.steps, "seconds_per_step": round(rate, 4)})
        return step + 1 >= s.steps or (self.limit > 0 and self.elapsed > 1.05 * self.limit)

    def close(self, steps_done: int, **extra) -> None:
        self.write({"done": steps_done, "seconds": round(self.elapsed, 1), **extra})
        self.file.close()


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _optimizer(params, s: Stage) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.99), fused=torch.cuda.is_available())


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ------------------------------------------------------------------------------------------------ VAE
def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(out: Path, s: Stage, device: torch.device, workers: int, time_limit: float) -> None:
    """AutoencoderKL on rendered images: L1 + L1 of image gradients (crisp edges) + a small KL; bf16 autocast."""
    vae = models.vae().to(device).train()
    opt = _optimizer(list(vae.parameters()), s)
    log = Log(out / "logs" / "vae.jsonl", s, time_limit)
    step = 0
    for step, _, images in batches(Stream(s.batch), 0, s.steps, workers, device):
        x = images * 2 - 1
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            rec = vae.decode(posterior.sample()).sample.float()
        l1 = (rec - x).abs().mean()
        edge = sum((a - b).abs().mean() for a, b in zip(_edges(rec), _edges(x)))
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + edge + VAE_KL_WEIGHT * kl
        _set_lr(opt, lr_at(step, s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log.step(step, 50, loss=loss, l1=l1, edge=edge, kl=kl)
        if log.done(step, s):
            break
    vae.eval()
    scale, psnr = _latent_scale_and_psnr(vae, device, n=min(1024, 8 * s.batch))
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out / "vae")
    log.close(step + 1, scaling_factor=scale, heldout_psnr=psnr)


@torch.no_grad()
def _latent_scale_and_psnr(vae, device: torch.device, n: int = 1024) -> tuple[float, float]:
    """1 / std of the held-out latents (SD's scaling_factor), and the held-out reconstruction PSNR in dB."""
    images, _ = ShapesData(1).batch(0, n, device)
    x = images * 2 - 1
    z = vae.encode(x).latent_dist.sample()
    rec = (vae.decode(z).sample.clamp(-1, 1) + 1) / 2
    mse = ((rec - images) ** 2).mean((1, 2, 3))
    return float(1 / z.std()), float((-10 * torch.log10(mse)).mean())


# ------------------------------------------------------------------------------------------------ CLIP
def _clip_step(model, opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, s: Stage) -> None:
    """One optimizer step of a CLIP stage: scheduled lr, clipped gradient, logit scale kept within CLIP's bound."""
    _set_lr(opt, lr_at(step, s))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def train_clip(out: Path, s: Stage, device: torch.device, workers: int, time_limit: float) -> None:
    """open_clip CLIP, contrastive with one hard negative caption per image (one fact changed, NegCLIP-style)."""
    tok = models.tokenizer()
    length = models.CLIP["text_cfg"]["context_length"]
    model = models.clip_model(len(tok)).to(device).train()
    opt = _optimizer(list(model.parameters()), s)
    mean = torch.tensor(models.CLIP_PREPROCESS["mean"], device=device)[:, None, None]
    std = torch.tensor(models.CLIP_PREPROCESS["std"], device=device)[:, None, None]
    log = Log(out / "logs" / "clip.jsonl", s, time_limit)
    stream = Stream(s.batch, Tokens(tok, length), negatives=True)
    step = 0
    for step, batch, images in batches(stream, 0, s.steps, workers, device):
        with _autocast(device):
            image = F.normalize(model.encode_image((images - mean) / std).float(), dim=-1)
            text = F.normalize(model.encode_text(torch.cat([batch["tokens"], batch["negative_tokens"]])).float(), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T  # [B, 2B]: each image against captions and negatives
        labels = torch.arange(len(image), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, : len(image)].T, labels)) / 2
        _clip_step(model, opt, loss, step, s)
        log.step(step, 50, loss=loss, logit_scale=model.logit_scale.exp())
        if log.done(step, s):
            break
    models.save_clip(model.eval(), tok, out / "clip")
    log.close(step + 1)


# ------------------------------------------------------------------------------------------------ relation CLIP
RELATION_NOISE = 0.08  # largest standard deviation of the pixel noise the relation CLIP trains under
RELATION_BLUR = 1.5  # largest gaussian blur sigma (pixels) it trains under, in half of the images
RELATION_ADVERSARY = 1.0  # L2 radius (pixels in [0, 1]) of the one-step adversarial perturbation; 0: none


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training views that look more like a decoder's output: random pixel noise and, in half the images, blur."""
    b = len(images)
    sigma = torch.rand(b, generator=generator) * RELATION_BLUR * (torch.rand(b, generator=generator) < 0.5)
    images = torch.where((sigma > 0)[:, None, None, None], blur(images, sigma.to(images.device)), images)
    scale = torch.rand(b, 1, 1, 1, generator=generator) * RELATION_NOISE
    noise = torch.randn(images.shape, generator=generator) * scale
    return (images + noise.to(images.device)).clamp(0, 1)


def _relation_loss(model, images: torch.Tensor, batch: dict[str, torch.Tensor], mean, std) -> torch.Tensor:
    """InfoNCE of each image against every caption of the batch and its three hard negatives (relation swapped,
    colours swapped, one other fact), and of each caption against every image."""
    with _autocast(images.device):
        image = F.normalize(model.encode_image((images - mean) / std).float(), dim=-1)
        tokens = torch.cat([batch[k] for k in ("tokens", "relation_tokens", "colour_tokens", "negative_tokens")])
        text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T  # [B, 4B]
    labels = torch.arange(len(image), device=images.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, : len(image)].T, labels)) / 2


def _adversarial(model, images: torch.Tensor, batch: dict[str, torch.Tensor], mean, std, radius: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Images moved one gradient step (L2 norm `radius` per image, from a random start) to raise the loss: training
    on them makes the model's image gradients follow what the picture shows rather than pixel patterns."""
    start = torch.randn(images.shape, generator=generator).to(images.device)
    start = start / start.flatten(1).norm(dim=1)[:, None, None, None] * radius * 0.5
    x = (images + start).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(_relation_loss(model, x, batch, mean, std), x)
    step = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None, None] * radius
    return (images + step).clamp(0, 1).detach()


def train_relation(out: Path, s: Stage, device: torch.device, workers: int, time_limit: float,
                   adversary: float = RELATION_ADVERSARY) -> None:
    """A relation CLIP: the shapes CLIP (<out>/clip, else the shipped one) fine-tuned on the training
    seed's images with each pair's relation-swapped and colour-swapped captions as hard negatives, on noisy, blurred
    and adversarially perturbed views, meant to give an image gradient that moves shapes rather than pixels. Writes
    <out>/relation, an open_clip folder: rewards.load("shapes-relation", checkpoint=<out>/relation) scores with it.
    Not shipped: tuning on it did no better than on shapes-clip (docs/tuner.md, relation runs)."""
    import open_clip

    source = out / "clip" if (out / "clip" / "open_clip_model.safetensors").is_file() else PACKAGE_CLIP
    model = open_clip.create_model(f"local-dir:{source}").float().to(device).train()
    tok = models.tokenizer()
    opt = _optimizer(list(model.parameters()), s)
    mean = torch.tensor(models.CLIP_PREPROCESS["mean"], device=device)[:, None, None]
    std = torch.tensor(models.CLIP_PREPROCESS["std"], device=device)[:, None, None]
    log = Log(out / "logs" / "relation.jsonl", s, time_limit)
    log.write({"init": "shipped shapes-clip" if source == PACKAGE_CLIP else str(source), "adversary": adversary})
    stream = Stream(s.batch, Tokens(tok, models.CLIP["text_cfg"]["context_length"]), negatives=True,
                    relation_negatives=True)
    generator = torch.Generator().manual_seed(0)
    step = 0
    for step, batch, images in batches(stream, 0, s.steps, workers, device):
        images = _degrade(images, generator)
        if adversary > 0:
            images = _adversarial(model, images, batch, mean, std, adversary, generator)
        loss = _relation_loss(model, images, batch, mean, std)
        _clip_step(model, opt, loss, step, s)
        log.step(step, 20, loss=loss)
        if log.done(step, s, warm=5, probe=20):
            break
    models.save_clip(model.eval(), tok, out / "relation")
    log.close(step + 1)


# ------------------------------------------------------------------------------------------------ UNet
def unet_loss(vae, scale: float, text_encoder, unet, abar: torch.Tensor, images: torch.Tensor,
              tokens: torch.Tensor) -> torch.Tensor:
    """The UNet stage's loss of one batch: epsilon MSE with min-SNR weights at uniform DDPM timesteps."""
    with torch.no_grad(), _autocast(images.device):
        z = vae.encode(images * 2 - 1).latent_dist.sample().float() * scale
    noise = torch.randn_like(z)
    t = torch.randint(0, len(abar), (len(z),), device=z.device)
    a = abar[t][:, None, None, None]
    z_t = a.sqrt() * z + (1 - a).sqrt() * noise
    with _autocast(images.device):
        context = text_encoder(tokens)[0]
        pred = unet(z_t, t, encoder_hidden_states=context).sample
    snr = abar[t] / (1 - abar[t])
    return (snr.clamp(max=MIN_SNR_GAMMA) / snr * ((pred.float() - noise) ** 2).mean((1, 2, 3))).mean()


def _fit_with_ema(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, s: Stage, log: "Log", data,
                  loss_fn) -> int:
    """The denoiser stages' loop: AdamW on loss_fn(batch, images), clipped at 1, EMA of the weights (warmed up), the
    schedule of `s`, stopped by `log`'s time limit; the EMA weights end up in `params`. Returns the last step."""
    ema = [p.detach().clone() for p in params]
    step = 0
    for step, batch, images in data:
        loss = loss_fn(batch, images)
        _set_lr(opt, lr_at(step, s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        log.step(step, 100, loss=loss)
        if log.done(step, s):
            break
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return step


def train_unet(out: Path, s: Stage, device: torch.device, workers: int, time_limit: float) -> None:
    """UNet + text encoder on the frozen VAE's latents: epsilon MSE with min-SNR weights, bf16 autocast, EMA."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval().requires_grad_(False)
    scale = vae.config.scaling_factor
    tok = models.tokenizer()
    text_encoder, unet = models.text_encoder(tok).to(device).train(), models.unet().to(device).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = _optimizer(params, s)
    abar = models.scheduler("ddpm").alphas_cumprod.to(device)
    log = Log(out / "logs" / "unet.jsonl", s, time_limit)
    stream = Stream(s.batch, Tokens(tok, tok.model_max_length), drop_caption=CAPTION_DROP)
    step = _fit_with_ema(params, opt, s, log, batches(stream, 0, s.steps, workers, device),
                         lambda batch, images: unet_loss(vae, scale, text_encoder, unet, abar, images, batch["tokens"]))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tok, unet=unet.eval(), scheduler=models.scheduler("ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    models.save_tokenizer(tok, out / "pipeline" / "tokenizer")
    log.close(step + 1)


# ------------------------------------------------------------------------------------------------ flow
def flow_sources(out: Path) -> tuple[Path, Path]:
    """The shapes-sd pipeline folder (VAE, text encoder) and the CLIP folder the flow stage builds on: this run's
    where it trained them, else the shipped ones."""
    pipeline = out / "pipeline" if (out / "pipeline" / "model_index.json").is_file() else PACKAGE_PIPELINE
    clip = out / "clip" if (out / "clip" / "open_clip_model.safetensors").is_file() else PACKAGE_CLIP
    return pipeline, clip


def flow_loss(vae, shift: float, scale: float, text_encoder, text_encoder_2, transformer, images: torch.Tensor,
              tokens: torch.Tensor) -> torch.Tensor:
    """The flow stage's loss of one batch: rectified flow, x_sigma = (1 - sigma) x0 + sigma noise, the velocity
    noise - x0 regressed at logit-normal(0, 1) sigmas (SD3's rf/lognorm), timestep = 1000 sigma as the pipeline's."""
    with torch.no_grad(), _autocast(images.device):
        z = (vae.encode(images * 2 - 1).latent_dist.sample().float() - shift) * scale
    noise = torch.randn_like(z)
    sigma = torch.sigmoid(torch.randn(len(z), device=z.device))
    x_t = (1 - sigma[:, None, None, None]) * z + sigma[:, None, None, None] * noise
    with _autocast(images.device):
        embeds, pooled = models.flow_prompt_embeds(text_encoder, text_encoder_2, tokens,
                                                   transformer.config.joint_attention_dim)
        velocity = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled).sample
    return ((velocity.float() - (noise - z)) ** 2).mean()


def _flow_parts(out: Path, init: Path | None, layers: int, heads: int, n_latents: int, device: torch.device):
    """(vae, text_encoder, text_encoder_2, transformer, what they came from): fresh ones on shapes-sd's VAE and
    text encoder and the CLIP, or a trained flow pipeline folder's `init` to go on training (its latent scaling)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = models.tokenizer(models.FLOW_TOKENS)
    if init is not None:
        vae = AutoencoderKL.from_pretrained(init / "vae")
        text_encoder = CLIPTextModelWithProjection.from_pretrained(init / "text_encoder")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(init / "text_encoder_2")
        transformer = SD3Transformer2DModel.from_pretrained(init / "transformer")
        sources = {"init": init.name}
    else:
        base, clip_dir = flow_sources(out)
        vae = AutoencoderKL.from_pretrained(base / "vae")
        text_encoder = models.flow_text_encoder(CLIPTextModel.from_pretrained(base / "text_encoder"), tok)
        text_encoder_2 = models.clip_text_encoder(clip_dir, tok)
        transformer = models.flow_transformer(layers, heads)
        sources = {"vae_and_text_encoder": "shipped shapes-sd" if base == PACKAGE_PIPELINE else "<out>/pipeline",
                   "clip": "shipped shapes-clip" if clip_dir == PACKAGE_CLIP else "<out>/clip"}
    vae = vae.to(device).eval().requires_grad_(False)
    if init is None:
        shift, scale = _latent_shift_and_scale(vae, device, n_latents)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (vae, text_encoder.to(device), text_encoder_2.to(device).eval().requires_grad_(False),
            transformer.to(device), sources)


def train_flow(out: Path, s: Stage, device: torch.device, workers: int, time_limit: float,
               layers: int = models.FLOW_TRANSFORMER["num_layers"],
               heads: int = models.FLOW_TRANSFORMER["num_attention_heads"], init: Path | None = None) -> None:
    """An SD3 MMDiT on the frozen shapes VAE's latents by rectified flow: velocity MSE at logit-normal(0, 1) sigmas
    (SD3's rf/lognorm), 10% empty captions, shapes-sd's text encoder trained jointly, the CLIP's text tower frozen,
    bf16 autocast, EMA; writes <out>/flow, a StableDiffusion3Pipeline folder without T5. With `init` (a flow folder
    this stage wrote) it goes on training that model, with a new learning-rate schedule."""
    from diffusers import StableDiffusion3Pipeline

    from tuner.pipelines.flow import disable_cudnn_attention

    disable_cudnn_attention(device)  # as the tuner does for flow models: a cuDNN attention backward failed there
    vae, text_encoder, text_encoder_2, transformer, sources = _flow_parts(
        out, init, layers, heads, min(1024, 8 * s.batch), device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    tok = models.tokenizer(models.FLOW_TOKENS)
    params = [*transformer.train().parameters(), *text_encoder.train().parameters()]
    opt = _optimizer(params, s)
    log = Log(out / "logs" / "flow.jsonl", s, time_limit)
    log.write({**sources, "shift_factor": shift, "scaling_factor": scale,
               "transformer_parameters": sum(p.numel() for p in transformer.parameters())})
    stream = Stream(s.batch, Tokens(tok, models.FLOW_TOKENS), drop_caption=CAPTION_DROP)
    step = _fit_with_ema(params, opt, s, log, batches(stream, 0, s.steps, workers, device),
                         lambda batch, images: flow_loss(vae, shift, scale, text_encoder, text_encoder_2, transformer,
                                                         images, batch["tokens"]))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=models.flow_scheduler(), vae=vae, text_encoder=text_encoder.eval(),
        tokenizer=tok, text_encoder_2=text_encoder_2, tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out / "flow", safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        models.save_tokenizer(tok, out / "flow" / folder)
    log.close(step + 1)


@torch.no_grad()
def _latent_shift_and_scale(vae, device: torch.device, n: int = 1024) -> tuple[float, float]:
    """Mean and 1 / std of held-out latents: SD3's shift_factor and scaling_factor (latents -> mean 0, std 1)."""
    images, _ = ShapesData(1).batch(0, n, device)
    z = vae.encode(images * 2 - 1).latent_dist.sample()
    return float(z.mean()), float(1 / z.std())


# ------------------------------------------------------------------------------------------------ CLI
INSTALLS = {"pipeline": PACKAGE_PIPELINE, "clip": PACKAGE_CLIP, "flow": PACKAGE_FLOW}


def install(out: Path) -> None:
    """Copy what this run trained (pipeline, CLIP, flow pipeline) into the package (tuner/shapes/model,
    rewards/weights/shapes-clip, tuner/shapes/flow_model)."""
    found = {name: target for name, target in INSTALLS.items() if (out / name).is_dir()}
    if not found:
        raise SystemExit(f"{out} holds none of {', '.join(INSTALLS)}: run the training stages first")
    for name, target in found.items():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out / name, target)
        for config in target.glob("*/config.json"):  # diffusers records the folder it loaded from: a build path
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"installed {out / name} -> {target}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuner.shapes.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for models, logs and figures")
    p.add_argument("--stage", default="all",
                   choices=["all", "vae", "clip", "unet", "eval", "flow", "flow-eval", "relation"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=4, help="data worker processes per stage")
    for name, s in STAGES.items():
        p.add_argument(f"--{name}-steps", type=int, default=s.steps)
        p.add_argument(f"--{name}-batch", type=int, default=s.batch)
        p.add_argument(f"--{name}-time-limit", type=float, default=0.0, help="seconds; 0 = no limit")
    p.add_argument("--flow-layers", type=int, default=models.FLOW_TRANSFORMER["num_layers"],
                   help="joint transformer blocks of shapes-flow")
    p.add_argument("--flow-heads", type=int, default=models.FLOW_TRANSFORMER["num_attention_heads"],
                   help="attention heads of 32 channels of shapes-flow")
    p.add_argument("--flow-init", type=Path, help="a flow pipeline folder this stage wrote, to go on training it "
                   "(its architecture and latent scaling; a new learning-rate schedule)")
    p.add_argument("--relation-adversary", type=float, default=RELATION_ADVERSARY,
                   help="L2 radius of the relation stage's adversarial views (0: none)")
    p.add_argument("--eval-samples", type=int, default=512)
    p.add_argument("--flow-eval-captions", type=int, default=128, help="held-out captions of flow-eval")
    p.add_argument("--flow-eval-seeds", default="0,1,2,3", help="noise seeds of flow-eval, comma-separated (>= 3)")
    p.add_argument("--flow-eval-steps", type=int, default=25, help="sampling steps of flow-eval (both models)")
    p.add_argument("--install", action="store_true", help="copy the results into the package and exit")
    return p.parse_args(argv)


def _stage(args: argparse.Namespace, name: str) -> Stage:
    base = STAGES[name]
    return Stage(**{**asdict(base), "steps": getattr(args, f"{name}_steps"), "batch": getattr(args, f"{name}_batch")})


def _forward(args: argparse.Namespace, stage: str) -> list[str]:
    """The command line that runs one stage of this invocation in its own process."""
    flags = [f"--out={args.out}", f"--stage={stage}", f"--device={args.device}", f"--workers={args.workers}"]
    for name in STAGES:
        for key in ("steps", "batch", "time_limit"):
            flags.append(f"--{name}-{key.replace('_', '-')}={getattr(args, f'{name}_{key}')}")
    return [sys.executable, "-m", "tuner.shapes.train", *flags]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.install:
        install(args.out)
        return 0
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # every batch has the same shapes
    torch.manual_seed(0)

    def flow(*a) -> None:
        train_flow(*a, layers=args.flow_layers, heads=args.flow_heads, init=args.flow_init)

    def relation(*a) -> None:
        train_relation(*a, adversary=args.relation_adversary)

    run = {"vae": train_vae, "clip": train_clip, "unet": train_unet, "flow": flow, "relation": relation}
    if args.stage in run:
        run[args.stage](args.out, _stage(args, args.stage), device, args.workers,
                        getattr(args, f"{args.stage}_time_limit"))
    elif args.stage == "eval":
        _evaluate(args, device)
    elif args.stage == "flow-eval":
        _evaluate_flow(args, device)
    else:  # all (shapes-sd and its CLIP): the CLIP in a second process on the same device, the VAE then the UNet
        clip = subprocess.Popen(_forward(args, "clip"))  # here, then evaluation; shapes-flow has its own stages
        for stage in ("vae", "unet"):
            run[stage](args.out, _stage(args, stage), device, args.workers, getattr(args, f"{stage}_time_limit"))
        if clip.wait() != 0:
            raise SystemExit(f"the CLIP stage failed with exit status {clip.returncode}")
        _evaluate(args, device)
    return 0


def _evaluate(args: argparse.Namespace, device: torch.device) -> None:
    from tuner.shapes.evaluate import evaluate

    evaluate(args.out / "pipeline", args.out / "clip", args.out / "logs", args.out, device, args.eval_samples)


def _evaluate_flow(args: argparse.Namespace, device: torch.device) -> None:
    from tuner.shapes.evaluate import compare_flow, loss_curves

    baseline, _ = flow_sources(args.out)
    seeds = [int(x) for x in args.flow_eval_seeds.split(",")]
    compare_flow(args.out / "flow", baseline, args.out, device, args.flow_eval_captions, seeds, args.flow_eval_steps)
    if (args.out / "logs" / "flow.jsonl").is_file():
        loss_curves(args.out / "logs", args.out / "flow_losses.png", names=("flow",))


if __name__ == "__main__":
    sys.exit(main())
