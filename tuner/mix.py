"""LoRA strength and checkpoint mixing after training, as a LoRA file stock diffusers loads.

    python -m tuner.mix --lora runs/a/lora --out runs/a/lora-0.6 --weights 0.6
    python -m tuner.mix --lora runs/a/lora --lora runs/b/lora --weights 0.5 0.5 --out runs/ab
    python -m tuner.mix --lora runs/a/lora --out runs/a/half --weights 0.5 --gallery --model shapes-sd \
        --prompts "a red circle in the center on a white background" --strengths 0 0.5 1 1.5

The result is the weighted SUM OF UPDATES, sum_i w_i * dW_i with dW_i = (alpha_i / r_i) B_i A_i of each LoRA, written
exactly as one LoRA of rank r_1 + r_2 + ...: A = [A_1; A_2; ...] (rows stacked), B = [w_1 c_1 B_1, w_2 c_2 B_2, ...]
(columns side by side, c_i = alpha_i / r_i) and alpha = rank, so B A = sum_i w_i dW_i. Interpolating the low-rank
factors themselves, (1 - s) B_1 A_1 mixed factor by factor, would not give that sum (the product of averaged factors
adds cross terms). A module one file lacks gets zero factors of that file's rank.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tuner.lora import LORA_WEIGHTS

METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft LoraConfig in the safetensors header
# (A suffix, B suffix) of diffusers' UNet layout and of peft's (transformer) layout.
STYLES = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"))


@dataclass
class LoraFile:
    """One LoRA: factors (A, B) per module key, the update's scale alpha / r, its layout and header metadata."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    style: tuple[str, str]
    component: str  # "unet" or "transformer": the prefix of the metadata keys
    metadata: dict

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]

    def deltas(self) -> dict[str, torch.Tensor]:
        """The effective weight update of each module, scale * B @ A (float64)."""
        return {k: self.scale * _product(b.double(), a.double()) for k, (a, b) in self.factors.items()}


def _product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def lora_path(path: str | Path) -> Path:
    """The weights file of a LoRA given as the file or as its folder (a run's lora/)."""
    path = Path(path)
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA at {path} (looked for {file}); give the folder a run wrote (runs/NAME/lora) "
                                f"or its {LORA_WEIGHTS}")
    return file


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA written by the tuner (or any diffusers LoRA that keeps its config in the file's header)."""
    file = lora_path(path)
    with safe_open(file, "pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if METADATA_KEY not in header:
        raise ValueError(f"{file} carries no {METADATA_KEY} header (its rank and alpha); write it with the tuner or "
                         f"diffusers' save_lora_weights")
    meta = json.loads(header[METADATA_KEY])
    component = next(iter(meta)).split(".", 1)[0]
    config = {k.split(".", 1)[1]: v for k, v in meta.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise ValueError(f"{file}: per-module ranks or alphas (rank_pattern / alpha_pattern) and DoRA are not supported")
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    style = next((s for s in STYLES if any(k.endswith(s[0]) for k in tensors)), None)
    if style is None:
        raise ValueError(f"{file}: no LoRA factors found (keys ending in {STYLES[0][0]} or {STYLES[1][0]})")
    factors = {k[: -len(style[0])]: (v, tensors[k[: -len(style[0])] + style[1]])
               for k, v in tensors.items() if k.endswith(style[0])}
    return LoraFile(factors, scale, style, component, meta)


def mix(loras: list[LoraFile], weights: list[float]) -> LoraFile:
    """The LoRA whose update is sum_i weights[i] * (update of loras[i]), of rank sum r_i, alpha = rank (scale 1)."""
    if len(loras) != len(weights) or not loras:
        raise ValueError(f"give one weight per LoRA: {len(weights)} weights for {len(loras)} LoRAs")
    if len({lf.component for lf in loras}) > 1:
        raise ValueError("cannot mix a UNet LoRA with a transformer LoRA")
    keys = list(dict.fromkeys(k for lf in loras for k in lf.factors))
    factors = {}
    for key in keys:
        a_parts, b_parts = [], []
        ref_a, ref_b = next(lf.factors[key] for lf in loras if key in lf.factors)
        for lf, w in zip(loras, weights):
            zeros = (ref_a.new_zeros(lf.rank, *ref_a.shape[1:]), ref_b.new_zeros(ref_b.shape[0], lf.rank, *ref_b.shape[2:]))
            a, b = lf.factors.get(key, zeros)  # a LoRA that leaves the module alone adds zero factors of its rank
            a_parts.append(a)
            b_parts.append((b.double() * (w * lf.scale)).to(b.dtype))
        factors[key] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
    rank = sum(lf.rank for lf in loras)
    first = loras[0]
    meta = dict(first.metadata)
    c = first.component
    targets = sorted({t for lf in loras for t in lf.metadata.get(f"{lf.component}.target_modules") or []})
    meta.update({f"{c}.r": rank, f"{c}.lora_alpha": rank, f"{c}.use_rslora": False, f"{c}.rank_pattern": {},
                 f"{c}.alpha_pattern": {}, f"{c}.target_modules": targets})
    return LoraFile(factors, 1.0, first.style, c, meta)


def write_lora(lora: LoraFile, directory: str | Path) -> Path:
    """Write `lora` as directory/pytorch_lora_weights.safetensors, loadable by the stock pipeline's load_lora_weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    a_suffix, b_suffix = lora.style
    tensors = {}
    for key, (a, b) in lora.factors.items():
        tensors[key + a_suffix], tensors[key + b_suffix] = a.contiguous(), b.contiguous()
    path = directory / LORA_WEIGHTS
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(lora.metadata, indent=2, sort_keys=True),
                                       "format": "pt"})
    return path


def gallery(model: str, lora_dir: Path, prompts: list[str], strengths: list[float], *, steps: int, size: int,
            guidance: float, seed: int, out: Path) -> Path:
    """A grid of the stock pipeline with the LoRA at each strength (columns) for each prompt (rows), same seeds."""
    from PIL import Image, ImageDraw

    from tuner import engine
    from tuner.logging import _fit, to_pil
    from tuner.train import _adapter
    from tuner.config import Config

    adapter = _adapter(Config(model=model), torch.device("cpu"), torch.float32, None)
    adapter.pipe.load_lora_weights(str(lora_dir), adapter_name="mix")
    cond = adapter.encode_prompts(prompts, None if adapter.family == "flux" else [""] * len(prompts))
    columns = []
    for s in strengths:
        adapter.pipe.set_adapters(["mix"], adapter_weights=[s])
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        columns.append(_fit(engine.sample_each(adapter, cond, generators=gens, batch_size=len(prompts), height=size,
                                               width=size, num_steps=steps, guidance_scale=guidance), 128, 256))
    h, w, pad, top = columns[0].shape[-2], columns[0].shape[-1], 4, 20
    canvas = Image.new("RGB", (len(strengths) * (w + pad) + pad, top + len(prompts) * (h + top)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, s in enumerate(strengths):
        draw.text((pad + j * (w + pad), 4), f"strength {s:g}", fill="black")
    for i, prompt in enumerate(prompts):
        y = top + i * (h + top)
        draw.text((pad, y + 2), prompt[:80], fill="black")
        for j, images in enumerate(columns):
            canvas.paste(to_pil(images[i]), (pad + j * (w + pad), y + top - 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tuner.mix", description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", action="append", required=True, help="a LoRA folder or file (repeat to mix several)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per LoRA (default: 1 for one LoRA, an "
                   "equal share each for several)")
    p.add_argument("--out", required=True, help="folder to write pytorch_lora_weights.safetensors into")
    p.add_argument("--gallery", action="store_true", help="also write out/gallery.png across --strengths")
    p.add_argument("--model", default="shapes-sd", help="the base model for the gallery (as the tuner's model=)")
    p.add_argument("--prompts", nargs="+", default=["a photo of a cat"], help="gallery prompts")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5], help="gallery strengths")
    p.add_argument("--steps", type=int, default=25, help="gallery sampling steps")
    p.add_argument("--size", type=int, default=64, help="gallery image side in pixels")
    p.add_argument("--guidance", type=float, default=5.0, help="gallery guidance scale")
    p.add_argument("--seed", type=int, default=0, help="gallery seed of prompt 0 (prompt i: seed + i)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = args.weights or [1.0 / len(args.lora)] * len(args.lora)
    path = write_lora(mix([read_lora(p) for p in args.lora], weights), args.out)
    print(f"wrote {path}")
    if args.gallery:
        print(f"wrote {gallery(args.model, path.parent, args.prompts, args.strengths, steps=args.steps, size=args.size, guidance=args.guidance, seed=args.seed, out=Path(args.out) / 'gallery.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
