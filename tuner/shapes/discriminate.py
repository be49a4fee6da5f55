"""Can a learned shapes reward tell two shapes' relation apart? Its own caption against the relation-swapped one.

For held-out pair captions ("a blue star left of a yellow hexagon ..."), the share of images that score their
caption above the same caption with the opposite relation ("... right of ..."), and above the caption with the two
shapes' colours swapped, on (a) the rendered dataset images and (b) shapes-sd's samples of the same captions.
On samples, some of which show the wrong relation, it also gives the agreement with the ground-truth judge: among
samples whose two colours the judge finds, the share where the reward prefers the caption the judge says is true.

    python -m tuner.shapes.discriminate --reward shapes-clip --captions 128 --seeds 0

It also attacks the rendered images: one gradient step of a given L2 norm towards the relation-swapped caption,
and the share of images whose verdict survives (a reward an optimiser can flip with a small step is easy to hack).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tuner.shapes.data import Scene, ShapesData, colours_swapped, relation_swapped, render

HELD_OUT_SEED = 1  # the dataset seed no shapes model trained on


def pair_scenes(n: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """The first n two-shape scenes of a dataset seed (distinct colours, so a colour swap changes the caption)."""
    out, index = [], 0
    while len(out) < n:
        out += [s for s in ShapesData(seed).scenes(index, 4 * n)
                if len(s.shapes) == 2 and s.shapes[0].color != s.shapes[1].color]
        index += 4 * n
    return out[:n]


@torch.no_grad()
def margins(reward, images: torch.Tensor, scenes: list[Scene], batch: int = 64) -> dict[str, torch.Tensor]:
    """Score of each image's own caption minus its relation-swapped and colour-swapped captions: [N] each."""
    own, rel, col = [], [], []
    for i in range(0, len(scenes), batch):
        x, part = images[i:i + batch], scenes[i:i + batch]
        own.append(reward(x, [s.caption for s in part]).float().cpu())
        rel.append(reward(x, [relation_swapped(s) for s in part]).float().cpu())
        col.append(reward(x, [colours_swapped(s) for s in part]).float().cpu())
    own = torch.cat(own)
    return {"relation": own - torch.cat(rel), "colours": own - torch.cat(col)}


def attacked(reward, scenes: list[Scene], radius: float) -> float:
    """P(own caption > relation-swapped) on rendered images each moved one gradient step of L2 norm `radius`
    (pixels in [0, 1]) towards the swapped caption: how little it takes to flip the reward's verdict."""
    images = render(scenes).requires_grad_(True)
    own, swapped = [s.caption for s in scenes], [relation_swapped(s) for s in scenes]
    (grad,) = torch.autograd.grad((reward(images, own) - reward(images, swapped)).sum(), images)
    step = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None, None]
    moved = (images - radius * step).clamp(0, 1).detach()
    return float((margins(reward, moved, scenes)["relation"] > 0).float().mean())


def judged_agreement(margin: torch.Tensor, images: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """Among samples whose colours the judge finds: the share where the reward's preference (own caption or the
    relation-swapped one) matches the judge's relation verdict, and how many samples that is."""
    from tuner.shapes.judge import judge_each

    verdicts = judge_each(images, [s.caption for s in scenes])
    kept = [(bool(m > 0), v["relation"]) for m, v in zip(margin, verdicts) if v["colors"]]
    right = sum(v for _, v in kept)
    return {"agreement": sum(p == v for p, v in kept) / max(len(kept), 1), "judged": len(kept),
            "judge_relation": right / max(len(kept), 1)}


def measure(reward, scenes: list[Scene], seeds: list[int], steps: int = 25, guidance: float = 5.0,
            device: str = "cpu", radii: tuple[float, ...] = ()) -> dict[str, dict[str, float]]:
    """P(own caption > swapped caption) on rendered images (also attacked at each L2 radius) and on shapes-sd
    samples (each noise seed)."""
    out = {}
    real = render(scenes)
    m = margins(reward, real, scenes)
    out["rendered"] = {"relation": float((m["relation"] > 0).float().mean()),
                       "colours": float((m["colours"] > 0).float().mean()), "n": len(scenes)}
    for radius in radii:
        out[f"rendered_attacked_l2_{radius:g}"] = {"relation": attacked(reward, scenes, radius), "n": len(scenes)}
    if seeds:
        from tuner.shapes.judge import sample_shapes_sd

        captions = [s.caption for s in scenes]
        for seed in seeds:
            images = sample_shapes_sd(captions, seed, steps, guidance, device=device)
            m = margins(reward, images, scenes)
            out[f"samples_seed{seed}"] = {"relation": float((m["relation"] > 0).float().mean()),
                                          "colours": float((m["colours"] > 0).float().mean()), "n": len(scenes),
                                          **judged_agreement(m["relation"], images, scenes)}
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m tuner.shapes.discriminate: a shapes reward's relation discrimination, printed (and as JSON)."""
    import rewards

    p = argparse.ArgumentParser(prog="python -m tuner.shapes.discriminate", description=main.__doc__)
    p.add_argument("--reward", action="append", help="reward name (repeatable); default shapes-clip")
    p.add_argument("--clip", action="append", type=Path, help="an open_clip folder of the shapes domain, scored as the "
                   "clip reward (repeatable)")
    p.add_argument("--captions", type=int, default=128, help="held-out pair captions (dataset seed 1)")
    p.add_argument("--seeds", default="0", help="noise seeds of shapes-sd's samples, comma-separated; '' for none")
    p.add_argument("--attack", default="0.5,1,2", help="L2 radii of the one-step attack on rendered images, "
                   "comma-separated; '' for none")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = p.parse_args(argv)
    start = time.time()
    scenes = pair_scenes(args.captions)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    radii = tuple(float(r) for r in args.attack.split(",") if r.strip())
    figures = {}
    chosen = {name: {} for name in args.reward or ([] if args.clip else ["shapes-clip"])}
    chosen.update({str(folder): {"checkpoint": folder} for folder in args.clip or []})
    for name, sources in chosen.items():
        reward = rewards.load("clip" if sources else name, device=args.device, **sources)
        figures[name] = measure(reward, scenes, seeds, args.steps, args.guidance, args.device, radii)
        for where, row in figures[name].items():
            print(f"{name} {where}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()), flush=True)
    print(f"{time.time() - start:.0f} s")
    if args.out:
        report = {"captions": args.captions, "seeds": seeds, "attack": radii, "figures": figures}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
