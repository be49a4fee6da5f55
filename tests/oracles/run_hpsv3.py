"""Runs INSIDE the shared oracle environment (see build.py): the official `hpsv3` package builds its reward model
from a small local Qwen2-VL base folder, writes a random-weight HPSv3.safetensors (its own state dict), and scores
PNG images with `HPSv3RewardInferencer.reward` (the official path, PIL) and with `differentiable=True` (tensors).

    <oracle python> run_hpsv3.py job.json

job.json: {"seed", "base" (folder with config.json, tokenizer, chat template, preprocessor config; the random base
weights are written there), "checkpoint" (written here), "yaml" (written here), "head_gain", "images": [png],
"prompts": [str], "out" (a torch file: mu [N], sigma [N], the input ids and pixel patches the model saw, the
differentiable path's mu and pixel-gradient norms, mu of the scorer in bf16)}. Only the standard library, torch, PIL, numpy and the official
package (with its pinned transformers) are used, so nothing from the project under test leaks into the oracle.
"""

import json
import sys
import time
import types


def install_stubs():
    """Stand-ins for modules the package's TRAINING code imports and its scoring never calls (not installed here)."""
    import transformers.trainer  # noqa: F401  (transformers reads which packages exist before the stand-ins appear)

    for name in ("fire", "pandas", "datasets"):
        sys.modules.setdefault(name, types.ModuleType(name))
    trl = types.ModuleType("trl")

    class RewardTrainer:  # base class of the package's VLMRewardTrainer, never instantiated when scoring
        pass

    def get_quantization_config(model_config):  # trl's answer when neither 4- nor 8-bit loading is asked for
        if model_config.load_in_4bit or model_config.load_in_8bit:
            raise NotImplementedError("the oracle runs unquantised")
        return None

    trl.RewardTrainer = RewardTrainer
    trl.get_quantization_config = get_quantization_config
    trl.get_kbit_device_map = lambda: None
    sys.modules["trl"] = trl


def write_yaml(job, path, dtype="float32"):
    """The package's own HPSv3_7B.yaml with the base model, `dtype` (the official file's bf16, or float32) and no
    DeepSpeed/flash-attention."""
    from pathlib import Path

    import hpsv3
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml"))
    config.update(model_name_or_path=job["base"], torch_dtype=dtype, bf16=dtype == "bfloat16", disable_flash_attn2=True,
                  output_dir=str(Path(path).parent / "out"), report_to="none", gradient_checkpointing=False)
    config.pop("deepspeed", None)
    Path(path).write_text(json.dumps(config))  # JSON is YAML


def write_base_weights(base, seed):
    """Random Qwen2-VL weights (transformers' own init) as the base folder's model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(base))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{base}/model.safetensors",
              metadata={"format": "pt"})


def write_checkpoint(job):
    """The official model built as the inferencer builds it, its head re-drawn with a larger gain so scores spread."""
    import torch
    from safetensors.torch import save_file

    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml

    (_, training, model_config, lora), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), job["yaml"], is_train=False
    )
    model, _, _ = create_model_and_processor(model_config=model_config, peft_lora_config=lora, training_args=training)
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    with torch.no_grad():
        for layer in model.rm_head:
            if isinstance(layer, torch.nn.Linear):
                gain = job["head_gain"] / layer.in_features**0.5
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * gain)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, job["checkpoint"])


def score_official(inferencer, job):
    """The official reward(), one image at a time, with the ids and patches the model saw."""
    import torch

    seen = {}
    inferencer.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    mu, sigma, ids, pixels, grids = [], [], [], [], []
    with torch.no_grad():
        for path, prompt in zip(job["images"], job["prompts"]):
            out = inferencer.reward([path], [prompt])
            mu.append(out[0, 0].item())
            sigma.append(out[0, 1].item())
            ids.append(seen["input_ids"][0].clone())
            pixels.append(seen["pixel_values"].clone())
            grids.append(seen["image_grid_thw"][0].clone())
    return {"mu": torch.tensor(mu, dtype=torch.float64), "sigma": torch.tensor(sigma, dtype=torch.float64),
            "input_ids": ids, "pixel_values": pixels, "image_grid_thw": grids}


def score_bf16(job):
    """The official scorer in its own precision (the whole model in bf16, the head in float32). On CUDA a float32
    autocast hands the head float32 states; on this CPU a pre-hook does that cast, the head being its only user."""
    import torch

    from hpsv3 import HPSv3RewardInferencer

    yaml = job["yaml"].replace(".yaml", "_bf16.yaml")
    write_yaml(job, yaml, "bfloat16")
    inferencer = HPSv3RewardInferencer(config_path=yaml, checkpoint_path=job["checkpoint"], device="cpu")
    inferencer.model.rm_head.register_forward_pre_hook(lambda module, args: (args[0].float(),))
    with torch.no_grad():
        mu = [inferencer.reward([p], [t])[0, 0].item() for p, t in zip(job["images"], job["prompts"])]
    return {"mu_bf16": torch.tensor(mu, dtype=torch.float64)}


def score_differentiable(inferencer, job):
    """The package's differentiable path: float tensors in 0..255, torchvision bicubic, and the pixel gradient."""
    import numpy as np
    import torch
    from PIL import Image

    mu, grad_norms = [], []
    for path, prompt in zip(job["images"], job["prompts"]):
        pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()
        pixels.requires_grad_(True)
        out = inferencer.reward([pixels], [prompt])
        out[0, 0].backward()
        mu.append(out[0, 0].item())
        grad_norms.append(pixels.grad.norm().item() if torch.isfinite(pixels.grad).all() else float("nan"))
    return {"diff_mu": torch.tensor(mu, dtype=torch.float64), "diff_grad_norm": torch.tensor(grad_norms)}


def main(job_path):
    job = json.loads(open(job_path).read())
    install_stubs()
    import torch
    import transformers

    from hpsv3 import HPSv3RewardInferencer

    t0 = time.perf_counter()
    write_yaml(job, job["yaml"])
    write_base_weights(job["base"], job["seed"])
    write_checkpoint(job)
    inferencer = HPSv3RewardInferencer(config_path=job["yaml"], checkpoint_path=job["checkpoint"], device="cpu")
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = score_official(inferencer, job)
    score_s = time.perf_counter() - t0
    del inferencer
    differentiable = HPSv3RewardInferencer(
        config_path=job["yaml"], checkpoint_path=job["checkpoint"], device="cpu", differentiable=True
    )
    result.update(score_differentiable(differentiable, job))
    del differentiable
    result.update(score_bf16(job))
    result.update(build_s=build_s, score_s=score_s,
                  versions={"torch": str(torch.__version__), "transformers": str(transformers.__version__)})
    torch.save(result, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
