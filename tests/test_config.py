"""Configuration: YAML + overrides, refusals before any model loads, and the options table in the docs."""
import re
from pathlib import Path

import pytest
import yaml

from tests.tuner_fixtures import BASE
from tuner import config as C
from tuner.config import ConfigError, apply_override, from_dict, load_config, options, to_dict, validate
from tuner.run import main

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_default_is_the_shipped_model_run():
    cfg = validate(load_config())
    assert cfg.model == "shapes-sd" and cfg.method == "drtune" and cfg.reward == "shapes-clip"
    assert (cfg.sampling.height, cfg.sampling.width, cfg.sampling.num_steps) == (64, 64, 3)
    assert cfg.log.judge_captions >= 128 and cfg.log.judge_seeds >= 2  # the summary's before/after ground truth
    assert cfg.prompts.eval_file is None and cfg.prompts.num_eval == 6  # gallery captions held out of training


@pytest.mark.parametrize("name", sorted(p.name for p in C.CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = validate(load_config(C.CONFIG_DIR / name))
    assert cfg == from_dict(to_dict(cfg))  # the written config.yaml reads back to the same run


def test_shipped_configs_are_all_tested():
    assert {"sdxl_hpsv2.1.yaml", "flux_hpsv2.1.yaml", "flux_hpsv2.1_lowmem.yaml", "sd35_hpsv2.1.yaml", "default.yaml",
            "shapes_symmetry.yaml", "shapes_fewstep.yaml"} <= {p.name for p in C.CONFIG_DIR.glob("*.yaml")}


def test_flow_examples_keep_the_papers_method():
    for name in ("flux_hpsv2.1.yaml", "sd35_hpsv2.1.yaml"):
        cfg = load_config(C.CONFIG_DIR / name)
        assert cfg.method == "drtune" and cfg.method_options["num_trained"] == 5 and cfg.reward == "hpsv2.1"
        assert cfg.sampling.scheduler == "auto" and cfg.lora.target_modules is None
    low, base = (load_config(C.CONFIG_DIR / f"flux_hpsv2.1{s}.yaml") for s in ("_lowmem", ""))
    assert low.train.memory == "low" and (low.model, low.sampling, low.lora) == (base.model, base.sampling, base.lora)
    assert low.train.batch_size * low.train.grad_accum == base.train.prompts_per_step  # on one GPU


def test_paper_setting_of_the_sdxl_example():
    cfg = load_config(C.CONFIG_DIR / "sdxl_hpsv2.1.yaml")
    assert cfg.method == "drtune" and cfg.method_options["num_trained"] == 5
    assert cfg.sampling.num_steps == 50 and cfg.sampling.scheduler == "ddim" and cfg.reward == "hpsv2.1"


def test_overrides_nested_typed_and_mappings():
    cfg = load_config(None, ["train.lr=1e-4", "sampling.num_steps=12", "lora.target_modules=to_q,to_v",
                             "reward={hpsv2.1: 1.0, sharpness: 0.05}", "reward_sources.hpsv2.1.checkpoint=/w/hps.pt",
                             "method_options.num_trained=3", "train.mixed_precision=bf16", "name=abc"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.sampling.num_steps == 12
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.reward == {"hpsv2.1": 1.0, "sharpness": 0.05}
    assert cfg.reward_sources == {"hpsv2.1": {"checkpoint": "/w/hps.pt"}}
    assert cfg.method_options == {"num_trained": 3, "early_stop_range": 2}  # merged into the file's options
    assert cfg.train.mixed_precision == "bf16" and cfg.name == "abc"
    mixture = load_config(BASE, ["reward.sharpness=0.5"]).reward  # merged into the file's mixture
    assert mixture == {"symmetry": 1.0, "shapes-clip": 1.0, "sharpness": 0.5}


def test_yaml_file_over_dataclass_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny-sd15\ntrain:\n  lr: 3e-5\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9"])
    assert cfg.model == "tiny-sd15" and cfg.train.lr == 3e-5 and cfg.train.steps == 9
    assert cfg.sampling.num_steps == C.SamplingConfig().num_steps  # untouched sections keep the defaults


@pytest.mark.parametrize("override, pattern", [
    ("train.lrr=1", r"unknown config key 'train.lrr'.*'train.lr'"),
    ("trian.lr=1", r"unknown config key 'trian'.*'train'"),
    ("train.steps=abc", r"'train.steps': expected an integer"),
    ("train.steps=2.5", r"'train.steps': expected an integer"),
    ("log.tensorboard=maybe", r"'log.tensorboard': expected true or false"),
    ("train.lr=fast", r"'train.lr': expected a number"),
    ("sampling=3", r"'sampling' is a section"),
])
def test_structural_refusals(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@pytest.mark.parametrize("override, pattern", [
    ("method=drtun", r"'method': 'drtun' is not known. Allowed: .*drtune.*Did you mean 'drtune'"),
    ("method_options.k=3", r"'method_options' for method 'drtune'.*no option 'k'"),
    ("reward=hpsv4", r"'reward': 'hpsv4' is not known. Allowed: .*hpsv2.1"),  # hpsv3 exists now
    ("reward={symmetry: 1.0, nope: 2.0}", r"'nope' is not known"),
    ("reward_sources.pickscore.model=/x", r"'reward_sources.pickscore'.*not one of the rewards in use"),
    ("sampling.scheduler=ddpm", r"'sampling.scheduler': 'ddpm' is not known. Allowed: .*ddim"),
    ("train.mixed_precision=fp8", r"'train.mixed_precision': 'fp8' is not known. Allowed: no, fp16, bf16"),
    ("train.lr_schedule=step", r"'train.lr_schedule'.*constant_with_warmup"),
    ("sampling.height=60", r"'sampling.height': must be a multiple of 8"),
    ("train.steps=0", r"'train.steps': must be > 0"),
    ("train.ema_decay=1.0", r"'train.ema_decay': must be in \[0, 1\)"),
    ("model=./no/such/dir", r"'model': './no/such/dir' is neither an existing folder nor a Hugging Face repo id"),
    ("prompts.file=/no/such/prompts.txt", r"'prompts'.*not found.*simple_animals"),
    ("prompts.num_eval=1000", r"'prompts'.*num_eval=1000 would leave no training prompt"),
    ("lora.target_modules=[]", r"'lora.target_modules': empty"),
])
def test_semantic_refusals(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(load_config(None, [override]))


def test_optional_packages_refused_with_a_fix(monkeypatch):
    real = C.importlib.util.find_spec
    monkeypatch.setattr(C.importlib.util, "find_spec", lambda n, *a: None if n in ("bitsandbytes", "wandb") else real(n, *a))
    with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes.*train.optimizer=adamw"):
        validate(load_config(None, ["train.optimizer=adamw8bit"]))
    with pytest.raises(ConfigError, match="wandb is not installed.*log.wandb=false"):
        validate(load_config(None, ["log.wandb=true"]))


def test_cli_refuses_before_loading_a_model(monkeypatch, capsys):
    import tuner.pipelines as P

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(P, "tiny_sdxl_pipeline", boom)
    monkeypatch.setattr(P, "load_adapter", boom)
    assert main(["train.batch_sise=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.batch_sise'" in err and "train.batch_size" in err
    assert main(["--model", "/definitely/not/here"]) == 2
    assert main(["--check", "train.steps=3"]) == 0


def test_print_config_is_loadable(capsys, tmp_path):
    assert main(["--print-config", "train.steps=5", "reward={symmetry: 1.0}"]) == 0
    path = tmp_path / "printed.yaml"
    path.write_text(capsys.readouterr().out)
    cfg = load_config(path)
    assert cfg.train.steps == 5 and cfg.reward == {"symmetry": 1.0}


def test_override_syntax_error_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "train.lr")


def test_docs_list_every_option_with_its_default():
    doc = (ROOT / "docs" / "tuner.md").read_text()
    for table in (C.markdown_table(), C.method_options_table()):
        assert table in doc, "docs/tuner.md is stale: paste the output of `python -m tuner.config`"
    table = doc.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    keys = re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M)
    assert sorted(keys) == sorted(k for k, *_ in options())
    for key, _, default, help in options():
        assert help, f"option {key} has no help text"
        row = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
        assert yaml.safe_load(row.split("|")[3].strip().strip("`")) == default


def test_prompt_split_and_sampler(tmp_path):
    from tuner.prompts import PromptSampler, read_prompts, split

    path = tmp_path / "p.txt"
    path.write_text("# a comment\none\n\ntwo\nthree\nfour\nfive\n")
    prompts = read_prompts(str(path))
    assert prompts == ["one", "two", "three", "four", "five"]
    train_set, eval_set = split(prompts, 2, seed=3)
    assert len(eval_set) == 2 and sorted(train_set + eval_set) == sorted(prompts)
    assert split(prompts, 2, seed=3) == (train_set, eval_set)
    ranks = [PromptSampler(prompts, 2, grad_accum=1, rank=r, world_size=2, seed=0) for r in (0, 1)]
    drawn = [p for step in range(5) for s in ranks for p in s.batch(step)]  # 20 draws = 4 epochs of 5
    for epoch in range(4):
        assert sorted(drawn[5 * epoch:5 * epoch + 5]) == sorted(prompts)  # every prompt once per epoch, no gaps
    assert PromptSampler(prompts, 2, rank=1, world_size=2).batch(3) == ranks[1].batch(3)  # a pure function of step
