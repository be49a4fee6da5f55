"""The TRL AlignProp comparison's smoke mode (benchmarks.alignprop_trl): a tiny SD 1.5 on the CPU, JSON + table.

Our engine and the checkpointed autograd chain always run; TRL is not a project dependency, so its side runs in
a separate test, skipped unless trl 0.23.1's AlignPropTrainer imports. The numbers measured mean nothing.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import alignprop_trl
from tests.tuner_fixtures import PROMPTS, SIZE, ToyReward, relative_error, tiny_adapter, denoiser_grads
from tuner.engine import reward_backward
from tuner.methods import Plan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
STEPS = 3
SMOKE = ["--smoke", "--steps", str(STEPS), "--suffixes", "1", str(STEPS), "--iters", "1"]


def _check_rows(rows: dict, impls: tuple[str, ...], batches: tuple[int, ...]) -> None:
    """Every (impl, suffix, batch) row is there, timed, and made T + suffix UNet calls (suffix ones recomputed)."""
    want = {f"{i} [suffix {s}, batch {b}]" for i in impls for s in (1, STEPS) for b in batches}
    assert set(rows) == want
    for row in rows.values():
        assert row["s_per_image"] > 0 and row["images_per_s"] > 0, row
        assert row["unet_calls"] == STEPS + row["suffix"], row


def test_engine_and_checkpointed_chain(tmp_path):
    """Our two rows at two batches and two suffixes, with the JSON and the table written."""
    out = alignprop_trl.main([*SMOKE, "--batches", "1", "2", "--impls", "engine", "checkpointed",
                              "--out", str(tmp_path)])
    _check_rows(out["rows"], ("engine", "checkpointed"), (1, 2))
    data = json.loads((tmp_path / "alignprop_trl.json").read_text())
    meta = data["meta"]
    assert "random" in meta["weights"] and meta["resolution"] == 64 and meta["lora"]["rank"] == 4
    assert "--smoke" in meta["command"] and meta["versions"]["torch"] and len(meta["trl_step"]) > 3
    assert data["ratios"] == {}  # no TRL rows, nothing to compare with
    table = (tmp_path / "alignprop_trl.md").read_text()
    assert table.count("| engine |") == 4 and table.count("| checkpointed |") == 4


def test_low_memory_and_compiled_rows(tmp_path):
    """The engine in the low-memory mode and with compiled blocks (aot_eager: traced as inductor would, no code
    generation) make the same UNet calls as the engine; compiling comes after every other row."""
    torch._dynamo.reset()
    out = alignprop_trl.main([*SMOKE, "--impls", "engine-compiled", "engine-low", "--compile-backend", "aot_eager",
                              "--out", str(tmp_path)])
    _check_rows(out["rows"], ("engine-low", "engine-compiled"), (1,))
    assert list(out["rows"])[:2] == [f"engine-low [suffix {s}, batch 1]" for s in (1, STEPS)]
    torch._dynamo.reset()


@pytest.mark.parametrize("trained", [(2, 3), (1, 3)])
def test_checkpointed_chain_has_the_engine_gradient(trained, monkeypatch):
    """The third row computes what the engine computes (float64, eta 0, the same starting noise)."""
    adapter, reward = tiny_adapter("sd15"), ToyReward()
    noise = torch.randn(len(PROMPTS), 4, SIZE // 8, SIZE // 8, dtype=torch.float64)
    monkeypatch.setattr(adapter, "initial_latents", lambda *args: noise.clone())
    plan = Plan(4, 3, False, trained, False, trained[0])  # T=4; trained steps need not be a suffix
    cond, grads = adapter.encode_prompts(PROMPTS), []
    for run in ("engine", "checkpointed"):
        adapter.denoiser.zero_grad(set_to_none=True)
        if run == "engine":
            reward_backward(adapter, plan, cond, reward, PROMPTS, height=SIZE, width=SIZE, guidance_scale=3.0,
                            generator=torch.Generator().manual_seed(0))
        else:
            alignprop_trl.checkpointed_chain(adapter, plan, cond, reward, PROMPTS, size=SIZE, guidance=3.0, eta=0.0,
                                             generator=torch.Generator().manual_seed(0))
        grads.append(denoiser_grads(adapter))
    assert relative_error(grads[1], grads[0]) < 1e-9


def test_budget_skips_rows(tmp_path):
    """Past the budget a row is listed as skipped, not measured."""
    out = alignprop_trl.main([*SMOKE, "--impls", "engine", "--budget", "1e-9", "--out", str(tmp_path)])
    assert all(row.get("skipped") == "budget" for row in out["rows"].values())
    assert "skipped (budget)" in (tmp_path / "alignprop_trl.md").read_text()


def test_suffix_longer_than_chain_is_refused():
    """A suffix longer than T is a usage error."""
    with pytest.raises(SystemExit):
        alignprop_trl.parse_args(["--smoke", "--steps", "3", "--suffixes", "4"])


def test_trl_side(tmp_path):
    """TRL's AlignPropTrainer runs on the saved tiny pipeline and makes the same UNet calls as the engine."""
    pytest.importorskip("trl.trainer.alignprop_trainer", reason="TRL's AlignPropTrainer (trl==0.23.1) not installed")
    if alignprop_trl.trl_version() != alignprop_trl.TRL_VERSION:
        pytest.skip(f"the comparison pins trl=={alignprop_trl.TRL_VERSION} (its AlignPropTrainer is what is "
                    f"compared); trl {alignprop_trl.trl_version()} is installed")
    out = alignprop_trl.main([*SMOKE, "--impls", "trl", "engine", "--out", str(tmp_path)])
    _check_rows(out["rows"], ("trl", "engine"), (1,))
    assert set(out["ratios"]) == {f"engine [suffix {s}, batch 1]" for s in (1, STEPS)}
    assert all(r["time_ours_over_trl"] > 0 for r in out["ratios"].values())
