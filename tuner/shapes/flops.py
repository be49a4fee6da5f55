"""How long the shapes-flow stage takes on a GPU, estimated from FLOPs before it has run there.

    python -m tuner.shapes.flops            # FLOPs per trained image of the unet and flow stages, and the estimate

Counts the floating-point operations of one training step of each stage (forward and backward of the very loss
functions the stages run, tuner.shapes.train.unet_loss / flow_loss, attention included) with torch's
FlopCounterMode on the CPU, per image. The unet stage's measured speed (its log, docs/shapes/logs/unet.jsonl:
seconds per step at batch 512 on the GPU it ran on) gives the FLOP rate this code reached there; the flow stage's
time per step is estimated at the same rate, and, as a bound, at the rate of a fixed share of the GPU's peak.
Transformers of this width (128) use tensor cores about as poorly as the UNet's convolutions do, so the first
estimate is the likelier; it is an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tuner.shapes import models
from tuner.shapes.data import ShapesData
from tuner.shapes.train import STAGES, flow_loss, unet_loss

UNET_LOG = Path(__file__).parents[2] / "docs" / "shapes" / "logs" / "unet.jsonl"
H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM (and H200) dense bf16 tensor-core peak


def _count(loss_fn) -> float:
    """FLOPs of loss_fn() and its backward, attention through the math kernel (which the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss_fn().backward()
    return float(counter.get_total_flops())


def unet_flops(batch: int = 2) -> float:
    """Training FLOPs per image of the unet stage (VAE encoding, text encoder and UNet, forward and backward)."""
    tok = models.tokenizer()
    images, captions = ShapesData(0).batch(0, batch)
    tokens = tok(captions, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    vae, text_encoder, unet = models.vae().requires_grad_(False), models.text_encoder(tok), models.unet()
    abar = models.scheduler("ddpm").alphas_cumprod
    return _count(lambda: unet_loss(vae, 1.0, text_encoder, unet, abar, images, tokens)) / batch


def flow_flops(batch: int = 2, layers: int = models.FLOW_TRANSFORMER["num_layers"],
               heads: int = models.FLOW_TRANSFORMER["num_attention_heads"]) -> float:
    """Training FLOPs per image of the flow stage (VAE encoding, both text encoders, the transformer over 256
    image and 288 text tokens, forward and backward)."""
    from rewards.clip_score import SHAPES_CLIP_DIR

    tok = models.tokenizer(models.FLOW_TOKENS)
    images, captions = ShapesData(0).batch(0, batch)
    tokens = tok(captions, padding="max_length", max_length=models.FLOW_TOKENS, return_tensors="pt").input_ids
    vae = models.vae().requires_grad_(False)
    text_encoder = models.flow_text_encoder(models.text_encoder(models.tokenizer()), tok)
    text_encoder_2 = models.clip_text_encoder(SHAPES_CLIP_DIR, tok).requires_grad_(False)
    transformer = models.flow_transformer(layers, heads)
    return _count(lambda: flow_loss(vae, 0.0, 1.0, text_encoder, text_encoder_2, transformer, images, tokens)) / batch


def unet_speed(log: Path = UNET_LOG) -> tuple[float, int, str]:
    """(seconds per step, batch, device) of the unet stage's logged run."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rate = next(r["seconds_per_step"] for r in rows if "seconds_per_step" in r)
    return rate, rows[0]["settings"]["batch"], rows[0]["device"]


def estimate(batch: int = STAGES["flow"].batch, time_limit: float = 330.0, mfu: float = 0.15) -> dict:
    """FLOPs per image of both stages and the flow stage's estimated seconds per step and steps in time_limit."""
    torch.manual_seed(0)
    unet, flow = unet_flops(), flow_flops()
    seconds, unet_batch, device = unet_speed()
    achieved = unet * unet_batch / seconds
    at_unet_rate = flow * batch / achieved
    at_mfu = flow * batch / (mfu * H100_BF16_DENSE)
    return {"unet_gflops_per_image": unet / 1e9, "flow_gflops_per_image": flow / 1e9,
            "unet_measured": {"seconds_per_step": seconds, "batch": unet_batch, "device": device,
                              "achieved_tflops": achieved / 1e12},
            "flow_seconds_per_step_at_the_unets_rate": at_unet_rate,
            f"flow_seconds_per_step_at_{mfu:.0%}_of_peak": at_mfu,
            "flow_steps_in_time_limit": {"time_limit_s": time_limit,
                                         "at_the_unets_rate": int(time_limit / at_unet_rate),
                                         f"at_{mfu:.0%}_of_peak": int(time_limit / at_mfu)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuner.shapes.flops", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=STAGES["flow"].batch, help="the flow stage's batch")
    p.add_argument("--time-limit", type=float, default=330.0, help="the flow stage's time limit, seconds")
    p.add_argument("--mfu", type=float, default=0.15, help="share of the bf16 peak for the second estimate")
    args = p.parse_args(argv)
    print(json.dumps(estimate(args.batch, args.time_limit, args.mfu), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
