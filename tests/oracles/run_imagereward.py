"""Runs INSIDE the shared oracle environment (see build.py): the official `image-reward` package writes a
random-weight ImageReward.pt and scores PNG images with its own `ImageReward.score(prompt, pil_image)`.

    <oracle python> run_oracle.py job.json

job.json: {"seed", "med_config", "vocab_dir", "checkpoint" (written here), "head_std", "images": [png], "prompts": [str],
"out" (a torch file with scores [N], the preprocessed pixels [N,3,224,224], image_embeds [N,197,1024] and
features [N,768], the MLP's input)}. Only the standard library,
torch and the official package are used, so nothing from the project under test leaks into the oracle.
"""

import importlib.util
import json
import sys
import time
import types


def install_shims(vocab_dir):
    """Make the official package import on this stack without network: a stand-in `clip`, a local BERT vocab."""
    sys.modules.setdefault("clip", types.ModuleType("clip"))  # imported by CLIPScore/AestheticScore, unused by score()
    from transformers import BertTokenizer

    original = BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return original(cls, vocab_dir if name == "bert-base-uncased" else name, *args, **kwargs)

    BertTokenizer.from_pretrained = classmethod(from_pretrained)
    # The package __init__ also imports ReFL (diffusers, datasets training code); load its modules without it.
    spec = importlib.util.find_spec("ImageReward")
    package = types.ModuleType("ImageReward")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["ImageReward"] = package


def write_random_checkpoint(model, path, head_std, seed):
    """Save the official model's state dict; the head gets a larger init so random-weight scores spread."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * head_std / layer.in_features**0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * 0.1)
    torch.save(model.state_dict(), path)


def main(job_path):
    job = json.loads(open(job_path).read())
    install_shims(job["vocab_dir"])
    import torch
    from PIL import Image

    from ImageReward.ImageReward import ImageReward

    torch.manual_seed(job["seed"])
    t0 = time.perf_counter()
    model = ImageReward(med_config=job["med_config"], device="cpu").eval()
    write_random_checkpoint(model, job["checkpoint"], job["head_std"], job["seed"])
    build_s = time.perf_counter() - t0

    captured = {}
    model.blip.visual_encoder.register_forward_pre_hook(lambda m, i: captured.__setitem__("pixels", i[0].detach()))
    model.blip.visual_encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("image", o.detach()))
    model.mlp.register_forward_pre_hook(lambda m, i: captured.__setitem__("feature", i[0].detach()))
    scores, pixels, images, features = [], [], [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for path, prompt in zip(job["images"], job["prompts"]):
            scores.append(model.score(prompt, Image.open(path)))
            pixels.append(captured["pixels"][0])
            images.append(captured["image"][0])
            features.append(captured["feature"][0])
    score_s = time.perf_counter() - t0
    torch.save(
        {"scores": torch.tensor(scores, dtype=torch.float64), "pixels": torch.stack(pixels),
         "image_embeds": torch.stack(images), "features": torch.stack(features), "build_s": build_s, "score_s": score_s,
         "versions": {"torch": str(torch.__version__), "transformers": str(sys.modules["transformers"].__version__)}},
        job["out"],
    )


if __name__ == "__main__":
    main(sys.argv[1])
