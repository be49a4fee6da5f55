"""Two CPU processes (DDP over gloo, launched by torchrun): replicas stay identical, save and resume, uneven prompts."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.tuner_fixtures import BASE
from tuner import checkpoint as ckpt
from tuner.logging import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    import tuner.train as T
    from tuner import lora
    from tuner.config import load_config, validate
    from tests.tuner_fixtures import BASE

    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    save, batch, seen = T.save_checkpoint, T.PromptSampler.batch, []

    def spy_save(root, step, *, accelerator, denoiser, **kw):  # every rank dumps its own trained weights
        state = {k: v.contiguous() for k, v in lora.trainable_state(denoiser).items()}
        save_file(state, out / f"rank{accelerator.process_index}-step{step}.safetensors")
        return save(root, step, accelerator=accelerator, denoiser=denoiser, **kw)

    def spy_batch(self, step, micro=0):
        prompts = batch(self, step, micro)
        seen.append([step, micro, prompts])
        return prompts

    T.save_checkpoint, T.PromptSampler.batch = spy_save, spy_batch
    T.train(validate(load_config(BASE, overrides)))
    (out / f"prompts-rank{rank}-{len(list(out.glob('prompts-rank%d-*' % rank)))}.json").write_text(json.dumps(seen))
""")


def _launch(tmp_path, *overrides):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)  # this checkout first
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_two_processes_stay_in_sync_save_and_resume(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "train.txt").write_text("\n".join(f"prompt number {i}" for i in range(5)))  # 5: not divisible by 2 x 2
    (tmp_path / "eval.txt").write_text("an eval prompt\n")
    (tmp_path / "select.txt").write_text("a selection prompt\n")
    common = [f"output_dir={tmp_path}", "name=ddp", "sampling.num_steps=4", "method_options={num_trained: 2, early_stop_range: 2}",
              "train.batch_size=1", "train.grad_accum=2", "checkpoint.every=1", "checkpoint.keep=10", "log.eval_every=2",
              "log.progress=false", f"prompts.file={tmp_path / 'train.txt'}", f"prompts.eval_file={tmp_path / 'eval.txt'}",
              "prompts.num_eval=1", "train.lr=1e-2",
              # the guards on two processes (the prompt draws stay as they are: selection prompts come from a file)
              "guards.kl_weight=0.5", "guards.pretrain_weight=0.5", "guards.pretrain_data=shapes",
              "guards.augment=[crop,noise]", "guards.normalize=total", "guards.normalize_samples=2",
              "guards.select_every=2", "guards.select_metric=symmetry", f"guards.select_prompts={tmp_path / 'select.txt'}",
              "guards.select_num=1", "guards.keep_best=true"]
    _launch(tmp_path, *common, "train.steps=2")
    _launch(tmp_path, *common, "train.steps=4", "resume=latest")

    run = tmp_path / "ddp"
    weights = {}
    for step in range(1, 5):
        r0, r1 = (load_file(tmp_path / f"rank{r}-step{step}.safetensors") for r in (0, 1))
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), f"ranks differ at step {step}"
        saved = ckpt.read_tensors(run / "checkpoints" / f"step-{step:08d}", "trainable.safetensors")
        assert all(torch.equal(saved[k], r0[k]) for k in r0)
        weights[step] = r0
        assert {p.name for p in (run / "checkpoints" / f"step-{step:08d}").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert any(not torch.equal(weights[3][k], weights[2][k]) for k in weights[2])  # training moved on after resume

    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    assert [r["step"] for r in rows if "select/score" in r] == [0, 2, 4]
    assert all("kl_penalty" in r and "pretrain_loss" in r for r in rows if "reward" in r)
    for session in (0, 1):  # same iteration count on both ranks, each rank its own prompts
        p0, p1 = (json.loads((tmp_path / f"prompts-rank{r}-{session}.json").read_text()) for r in (0, 1))
        assert [s[:2] for s in p0] == [s[:2] for s in p1] and len(p0) == 4
        assert all(a[2] != b[2] for a, b in zip(p0, p1))
    # every step draws 4 consecutive positions of the epoch-wise shuffled list: 5 prompts cycle without a gap
    seen = [s[2][0] for session in (0, 1) for rec in zip(*(json.loads((tmp_path / f"prompts-rank{r}-{session}.json").read_text())
                                                             for r in (0, 1))) for s in rec]
    assert sorted(seen[:5]) == [f"prompt number {i}" for i in range(5)]
