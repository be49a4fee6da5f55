"""Relation controls without a reward gradient: shapes-sd fine-tuned by the denoising loss alone, judged as the
relation runs are (benchmarks/shapes_relation.py).

    python -m benchmarks.shapes_selftrain --source selected --steps 300 --seeds 2   # reward-ranked self-training
    python -m benchmarks.shapes_selftrain --source rendered --steps 300             # more of the training data

`selected` samples shapes-sd on the relation config's training captions (`shapes_pairs`, dataset seed 0), `--seeds`
noise draws each, keeps the samples a learned reward calls right (shapes-relation on shapes-clip: probability of the
captioned layout above `--keep`) and trains a LoRA on them by the denoising loss: reward-ranked fine-tuning (RAFT,
Dong et al. 2023), which compares whole samples and follows no pixel gradient, so a reward cannot be hacked through
its pixels. `rendered` trains the same LoRA on the procedural generator's own images of seed 0 (about 99% right by
the judge): what more supervised training gives at the same budget. Both: LoRA rank 8 (or, `--full`, every UNet
weight) on the UNet's attention projections (the relation config's), AdamW, batches of 16, one timestep of the
20-step DDIM schedule per batch (tuner.guards.pretrain.denoising_loss). The judge then samples the tuned model on the
relation config's 128 held-out captions (dataset seed 1) x 2 noise seeds, 20 DDIM steps at guidance 5 (`--guidance`),
and one JSON line goes to --log. `--text-encoder` trains every text-encoder weight too (the tuner keeps it
frozen). `--source none` judges the base model; `--flip-relations` samples each pair caption
with the opposite relation from the same noise and judges it against the original caption.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

LOG = Path(__file__).parent / "results" / "shapes_selftrain.jsonl"
BATCH, STEPS, GUIDANCE, SAMPLE_SEED = 16, 20, 5.0, 7_000_000


def own_samples(adapter, captions: list[str], seeds: int) -> tuple[torch.Tensor, list[str]]:
    """`seeds` samples of each caption (noise seed SAMPLE_SEED + index), images in [0, 1] on the CPU."""
    from tuner import engine

    caps = [c for c in captions for _ in range(seeds)]
    gens = [torch.Generator().manual_seed(SAMPLE_SEED + i) for i in range(len(caps))]
    images = engine.sample_each(adapter, adapter.encode_prompts(caps), generators=gens, batch_size=64, height=64,
                                width=64, num_steps=STEPS, guidance_scale=GUIDANCE)
    return images.float().cpu(), caps


@torch.no_grad()
def kept_by_reward(images: torch.Tensor, captions: list[str], keep: float) -> torch.Tensor:
    """Mask of the samples whose captioned layout shapes-relation (on shapes-clip) gives a probability above `keep`."""
    import rewards

    relation = rewards.load("shapes-relation")
    score = torch.cat([relation(images[i:i + 64], captions[i:i + 64]) for i in range(0, len(captions), 64)])
    return score > math.log(keep)


def batches(source: str, adapter, captions: list[str], args) -> tuple[Callable | None, dict]:
    """step -> (images, captions) of the chosen source (None: no training), and what to log about it."""
    if source == "none":
        return None, {}
    if source == "rendered":
        from tuner.shapes.data import ShapesData

        data = ShapesData(0)
        return (lambda step, g: data.batch(step * BATCH, BATCH)), {}
    images, caps = own_samples(adapter, captions, args.seeds)
    mask = kept_by_reward(images, caps, args.keep)
    images, caps = images[mask], [c for c, k in zip(caps, mask) if k]

    def draw(step: int, g: torch.Generator):
        idx = torch.randint(0, len(caps), (BATCH,), generator=g)
        return images[idx], [caps[i] for i in idx]

    return draw, {"sampled": len(mask), "kept": len(caps)}


def flipped(caption: str) -> str:
    """A pair caption with the opposite relation (a one-shape caption unchanged)."""
    from rewards.shapes_relation import alternatives

    from tuner.shapes.judge import parse_caption

    return alternatives(caption)[0] if len(parse_caption(caption).shapes) == 2 else caption


def trainable_encoding(adapter) -> Callable:
    """adapter.encode_prompts with the gradient kept (the text encoder's last hidden state, as diffusers' SD
    pipelines take it; checked equal to the frozen path before it is used). Conditional embeddings only: the
    denoising loss calls the model on the caption alone."""
    from tuner.pipelines.base import Conditioning

    pipe = adapter.pipe

    def encode(prompts: list[str], negatives: list[str] | None = None) -> Conditioning:
        tok = pipe.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return Conditioning(pipe.text_encoder(ids.to(adapter.device))[0])

    with torch.no_grad():
        probe = ["a red circle left of a blue square on a white background"]
        torch.testing.assert_close(encode(probe).prompt_embeds, adapter.encode_prompts(probe).prompt_embeds)
    return encode


def fine_tune(adapter, draw: Callable, args: argparse.Namespace) -> None:
    """args.steps AdamW steps of the denoising loss on draw's batches, on a LoRA or (args.full) every UNet weight."""
    from tuner import lora
    from tuner.guards.pretrain import denoising_loss

    if args.full:
        adapter.denoiser.requires_grad_(True)
        params = list(adapter.denoiser.parameters())
    else:
        params = lora.add_lora(adapter.denoiser, rank=8, alpha=8.0, target_modules=list(adapter.lora_targets))
    if args.text_encoder:
        adapter.encode_prompts = trainable_encoding(adapter)
        adapter.pipe.text_encoder.requires_grad_(True)
        params += list(adapter.pipe.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        images, caps = draw(step, g)
        loss = denoising_loss(adapter, images, caps, num_steps=STEPS, generator=g, height=64, width=64)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    if args.text_encoder:
        del adapter.encode_prompts  # back to the class's frozen encoding, now with the trained weights


def run(args: argparse.Namespace) -> dict:
    """Fine-tune, judge, and append the row to args.log."""
    from benchmarks.shapes_relation import CHECKS
    from tuner import pipelines, shapes
    from tuner.prompts import read_prompts
    from tuner.shapes import judge

    start = time.time()
    torch.manual_seed(0)
    adapter = pipelines.load_adapter(str(shapes.MODEL_DIR), device=torch.device("cpu"), dtype=torch.float32)
    train_captions = read_prompts("shapes_pairs")
    draw, info = batches(args.source, adapter, train_captions, args)
    if draw is None:
        args.steps = 0
    else:
        fine_tune(adapter, draw, args)
    held_out = judge.held_out_captions(128, exclude=set(train_captions))
    prompts = [flipped(c) for c in held_out] if args.flip_relations else held_out
    verdicts = []
    with torch.no_grad():
        for seed in (0, 1):
            samples = judge.sample_shapes_sd(prompts, seed, steps=STEPS, guidance=args.guidance, adapter=adapter)
            verdicts += judge.judge_each(samples, held_out)
    counts = judge.tallies(verdicts)
    trained = "nothing" if draw is None else "full UNet" if args.full else "LoRA rank 8"
    if draw is not None and args.text_encoder:
        trained += " + text encoder"
    row = {"source": args.source, "trained": trained, "steps": args.steps, "lr": args.lr, "guidance": args.guidance,
           "flip_relations": args.flip_relations, "seeds": args.seeds, "keep": args.keep, **info,
           "after": {k: list(counts[k]) for k in CHECKS if k in counts}, "seconds": round(time.time() - start),
           "date": time.strftime("%Y-%m-%d")}
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(log: Path) -> str:
    """The log as a markdown table: one row per run, each check's rate in % (passes / images)."""
    from benchmarks.shapes_relation import CHECKS

    head = ["source", "trained", "steps", "lr", "guidance", "sampled from", "kept", *CHECKS, "seconds"]
    lines = ["| " + " | ".join(head) + " |",
             "|---" * (8 + len(CHECKS)) + "|"]
    for row in map(json.loads, log.read_text().splitlines()):
        kept = f"{row['kept']} of {row['sampled']}" if "kept" in row else "-"
        rates = [f"{100 * p / n:.1f}" for p, n in (row["after"][c] for c in CHECKS)]
        source = "relation flipped" if row.get("flip_relations") else "caption"
        lines.append(f"| {row['source']} | {row['trained']} | {row['steps']} | {row['lr']:g} | {row['guidance']:g} | "
                     f"{source} | {kept} | " + " | ".join(rates) + f" | {row['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["selected", "rendered", "none"], default="none",
                   help="none: judge the base model (e.g. at another --guidance)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of 16 images")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=2, help="noise draws per training caption (selected)")
    p.add_argument("--keep", type=float, default=0.9, help="reward probability above which a sample is kept")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="guidance scale of the judged samples")
    p.add_argument("--flip-relations", action="store_true",
                   help="sample each pair caption with the opposite relation (same noise) and judge it against the "
                        "original caption: how much the relation words move the shapes")
    p.add_argument("--text-encoder", action="store_true", help="also train every text-encoder weight")
    p.add_argument("--full", action="store_true", help="train every UNet weight instead of a LoRA")
    p.add_argument("--log", type=Path, default=LOG)
    p.add_argument("--table", action="store_true", help="print the log as a markdown table and exit")
    args = p.parse_args(argv)
    print(table(args.log) if args.table else json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
