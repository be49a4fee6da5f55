"""benchmarks.flow_tuning: its plain-autograd side computes the engine's gradient, and the script runs end to end."""

import json

import pytest
import torch

from benchmarks.flow_tuning import main, naive_step, plans
from tests.tuner_fixtures import PROMPTS, SIZE, ToyReward, denoiser_grads, relative_error, tiny_adapter
from tuner.engine import reward_backward

pytestmark = pytest.mark.usefixtures("single_thread")
T = 6


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("name", ["drtune K=5", "draft K=5", "alignprop suffix 10"])
def test_plain_autograd_side_gives_the_engine_gradient(family, name):
    """The checkpointed plain implementation the engine is timed against computes the very same gradient."""
    adapter, plan = tiny_adapter(family), plans(T)[name]
    cond = adapter.encode_prompts(PROMPTS)
    kwargs = dict(height=SIZE, width=SIZE, guidance_scale=3.5, generator=torch.Generator().manual_seed(2))
    reward_backward(adapter, plan, cond, ToyReward(), PROMPTS, **kwargs)
    want = denoiser_grads(adapter)
    adapter.denoiser.zero_grad(set_to_none=True)
    kwargs["generator"] = torch.Generator().manual_seed(2)
    naive_step(adapter, plan, cond, ToyReward(), PROMPTS, **kwargs)
    assert relative_error(denoiser_grads(adapter), want) < 1e-10


def test_script_smoke(tmp_path):
    main(["--smoke", "--model", "flux", "--batches", "1", "--compare-batch", "1", "--out", str(tmp_path),
          "--weights", str(tmp_path / "w")])
    result = json.loads((tmp_path / "flow_tuning-flux.json").read_text())
    assert {r["kind"] for r in result["rows"].values()} == {"engine", "naive"}
    assert all(r["s_per_image"] > 0 for r in result["rows"].values())
    assert "| engine: drtune K=5 [batch 1] |" in (tmp_path / "flow_tuning-flux.md").read_text()


def test_full_finetune_smoke(tmp_path):
    """--full-finetune: every weight trained and stepped by AdamW, one row per batch and checkpointing setting."""
    main(["--smoke", "--model", "sd35", "--full-finetune", "--batches", "1", "--out", str(tmp_path),
          "--weights", str(tmp_path / "w")])
    result = json.loads((tmp_path / "flow_tuning-sd35-full.json").read_text())
    rows = result["rows"]
    assert [(r["batch"], r["checkpointing"]) for r in rows.values()] == [(1, "off"), (1, "on")]
    assert all(r["kind"] == "full" and r["s_per_image"] > 0 for r in rows.values())
    assert result["meta"]["lora_rank"] is None and "AdamW" in result["meta"]["optimizer"]
    table = (tmp_path / "flow_tuning-sd35-full.md").read_text()
    assert "| full: drtune K=5 [batch 1, checkpointing on] | 1 | on |" in table
