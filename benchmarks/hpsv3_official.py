"""The official `hpsv3` package's differentiable path as the peer of our HPSv3 in the reward-gradient benchmark.

The package (1.0.0) cannot run on transformers 5: its trainer module imports names that transformers 5 removed
(`DistributedTensorGatherer`, `SequentialDistributedSampler` from `transformers.trainer`), and its forward reads the
transformers 4 module layout (`self.model.embed_tokens`, `self.visual`), which transformers 5 moved under
`model.language_model` / `model.visual`. So it runs where the parity tests run it: in the shared oracle environment
(tests/oracles/build.py: transformers 4.49.0 over the project's own torch), as a subprocess, on the SAME files our
case loads (benchmarks.reward_models.hpsv3_sources), and times the same thing: d(sum of mu)/d(pixels) of a batch of
random images in [0, 1] (multiplied by 255, the range that path expects), preprocessing included.

    python -m benchmarks.hpsv3_official --jsonl RUN.jsonl --batches 8,1 --dtypes bf16     # on the GPU machine
    python -m benchmarks.hpsv3_official --smoke                                            # tiny, on the CPU
    python -m benchmarks.reward_gradients --report RUN.jsonl                               # tables with both

Records go to --jsonl in the suite's format (impl "official", variant "differentiable"), so the report compares our
rows with them as it compares with imscore's. The oracle environment needs PyPI once, or DRTUNE_ORACLE_ENV set to
one built from local wheels (see the pins in tests/oracles/build.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# -- in the project's environment ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Write or reuse the files, then time the official path in the oracle environment; append records to --jsonl."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny architecture on the CPU: checks the script only")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--dtypes", default=None, help="bf16 and/or fp32 (default bf16; fp32 with --smoke: the official "
                    "head runs bf16 hidden states through its float32 layers only under CUDA autocast)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "drtune-reward-bench-weights")
    ap.add_argument("--jsonl", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parents[1]))
    from benchmarks.reward_models import hpsv3_sources, prompts_for
    from tests.oracles.build import build

    files = hpsv3_sources(args.weights, tiny=args.smoke)
    job = {
        "checkpoint": str(files["checkpoint"]), "base": str(files["base"]),
        "device": args.device or ("cpu" if args.smoke else "cuda"), "size": args.size or (64 if args.smoke else 1024),
        "batches": [int(b) for b in (args.batches or ("2" if args.smoke else "8,1")).split(",")],
        "dtypes": (args.dtypes or ("fp32" if args.smoke else "bf16")).split(","),
        "rounds": args.rounds or (1 if args.smoke else 5), "prompts": prompts_for(64),
    }
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out = Path(tmp) / "job.json", Path(tmp) / "records.jsonl"
        job_path.write_text(json.dumps({**job, "out": str(out), "work": tmp}))
        proc = subprocess.run([str(build()), str(HERE), str(job_path)], env={**os.environ, "PYTHONPATH": ""})
        records = out.read_text() if out.is_file() else ""
    if args.jsonl:
        with args.jsonl.open("a") as f:
            f.write(records)
    print(records, end="")
    return proc.returncode


# -- in the oracle environment ---------------------------------------------------------------------------------------
def official_base(job: dict) -> Path:
    """A base folder the package's `from_pretrained` accepts: the base files, with the checkpoint itself as the
    weights and the config's vocabulary set to the checkpoint's rows (the package then resizes to the same size)."""
    from safetensors import safe_open

    base, folder = Path(job["base"]), Path(job["work"]) / "official_base"
    folder.mkdir(exist_ok=True)
    for item in base.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    with safe_open(job["checkpoint"], "pt") as f:
        rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    config = json.loads((base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    (folder / "model.safetensors").symlink_to(job["checkpoint"])
    return folder


def inferencer(job: dict, dtype: str):
    """The official HPSv3RewardInferencer with differentiable=True on the benchmark's weights."""
    sys.path.insert(0, str(HERE.parents[1] / "tests" / "oracles"))
    from run_hpsv3 import install_stubs

    install_stubs()
    from pathlib import Path as P

    import hpsv3
    from hpsv3 import HPSv3RewardInferencer
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(P(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml"))
    config.update(model_name_or_path=str(official_base(job)), torch_dtype="bfloat16" if dtype == "bf16" else "float32",
                  bf16=dtype == "bf16", disable_flash_attn2=True, output_dir=str(P(job["work"]) / "out"),
                  report_to="none", gradient_checkpointing=False)
    config.pop("deepspeed", None)
    yaml = P(job["work"]) / f"hpsv3_{dtype}.yaml"
    yaml.write_text(json.dumps(config))
    return HPSv3RewardInferencer(config_path=str(yaml), checkpoint_path=job["checkpoint"], device=job["device"],
                                 differentiable=True)


def time_case(model, job: dict, dtype: str, batch: int) -> dict:
    """Median seconds of d(sum of mu)/d(pixels) for one batch, peak memory, and the record the suite writes."""
    import torch

    device = torch.device(job["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device).manual_seed(batch)
    images = torch.rand(batch, 3, job["size"], job["size"], generator=gen, device=device)
    prompts = [job["prompts"][i % len(job["prompts"])] for i in range(batch)]

    def step() -> torch.Tensor:
        pixels = images.detach().requires_grad_(True)
        mu = model.reward(list(pixels * 255.0), prompts)[:, 0]  # the path expects 0..255, one tensor per image
        (grad,) = torch.autograd.grad(mu.sum(), pixels)
        sync()
        return mu

    start = time.perf_counter()
    mu = step()
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    info = {"kind": "reward", "reward": "hpsv3", "impl": "official", "variant": "differentiable", "dtype": dtype,
            "batch": batch, "size": job["size"], "flops": None, "first_call_s": round(first, 2),
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "score_mean": float(mu.float().mean()), "component": None,
            "variant_doc": "official hpsv3 1.0.0, HPSv3RewardInferencer(differentiable=True), transformers 4.49"}
    stats = {"min": min(times), "max": max(times), "mean": statistics.mean(times), "median": median,
             "stddev": statistics.pstdev(times), "rounds": len(times), "data": times}
    return {"name": f"hpsv3-{dtype}-b{batch}-official-differentiable", "stats": stats, "extra_info": info}


def run_job(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    for dtype in job["dtypes"]:
        model = inferencer(job, dtype)
        for batch in job["batches"]:
            record = time_case_or_oom(model, job, dtype, batch)
            with open(job["out"], "a") as f:
                f.write(json.dumps(record) + "\n")
        del model


def time_case_or_oom(model, job: dict, dtype: str, batch: int) -> dict:
    """time_case's record, or the suite's record of a failed case when the device runs out of memory (the next
    batch still runs: the failed case's tensors go with its traceback)."""
    import gc

    import torch

    try:
        return time_case(model, job, dtype, batch)
    except torch.OutOfMemoryError as error:
        message = (str(error).strip() or "out of memory").splitlines()[0]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"failed": f"hpsv3-{dtype}-b{batch}-official-differentiable", "when": "call",
            "error": f"out of memory ({message})"}


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        run_job(sys.argv[1])
    else:
        sys.exit(main())
