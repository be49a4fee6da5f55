"""Runs INSIDE the shared oracle environment (see build.py): the authors' `cyclereward` package writes a random-weight
CycleReward-Combo.pth (its own module's state dict) and scores PNG images through its README usage,
`model, preprocess = cyclereward(...)`, `model.score(preprocess(image)[None], caption)`.

    <oracle python> run_cyclereward.py job.json

job.json: {"seed", "vocab_dir", "vit" ("large" as released, or BLIP's "base"), "cache_dir" (the checkpoint and
med_config.json are written there, where cyclereward() looks for them), "med_config" (a dict), "head_std",
"images": [png], "prompts": [str], "out" (a torch file with scores [N], the preprocessed pixels [N,3,224,224] and
the head's input features [N,768])}. Only the standard library, torch and the official package are used, so
nothing from the project under test leaks in.
"""

import json
import sys
import time


def install_shims(vocab_dir, vit):
    """No network: bert-base-uncased's vocabulary from a local folder, and no BLIP pretrained download (the
    constructor would fetch BLIP's model_large.pth only to have the CycleReward checkpoint overwrite it)."""
    from transformers import BertTokenizer

    original = BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return original(cls, vocab_dir if name == "bert-base-uncased" else name, *args, **kwargs)

    BertTokenizer.from_pretrained = classmethod(from_pretrained)
    from cyclereward.config import cyclereward_args

    cyclereward_args["blip_path"] = ""  # blip_pretrain(pretrained="") skips the download
    cyclereward_args["vit"] = vit  # "large" in the release; BLIP's "base" keeps a CPU test short


def write_random_checkpoint(path, med_config_path, head_std, seed):
    """The official module with random weights (its own init), a wider head so scores spread; saved as the release
    files are: the module's state dict (the head's init and the saving are ImageReward's oracle's: the same MLP)."""
    import torch
    from cyclereward.model import CycleReward

    from run_imagereward import write_random_checkpoint as save_with_wide_head  # this folder, stdlib imports only

    torch.manual_seed(seed)
    save_with_wide_head(CycleReward(device="cpu", med_config=med_config_path), path, head_std, seed)


def main(job_path):
    job = json.loads(open(job_path).read())
    install_shims(job["vocab_dir"], job.get("vit", "large"))
    import os

    import torch
    from PIL import Image

    from cyclereward.model import cyclereward

    cache = job["cache_dir"]
    med_config = os.path.join(cache, "med_config.json")
    with open(med_config, "w") as f:
        json.dump(job["med_config"], f)
    t0 = time.perf_counter()
    write_random_checkpoint(os.path.join(cache, "CycleReward-Combo.pth"), med_config, job["head_std"], job["seed"])
    model, preprocess = cyclereward(device="cpu", model_type="CycleReward-Combo", cache_dir=cache)
    build_s = time.perf_counter() - t0

    captured = {}
    model.mlp.register_forward_pre_hook(lambda m, i: captured.__setitem__("feature", i[0].detach()))
    scores, pixels, features = [], [], []
    t0 = time.perf_counter()
    for path, prompt in zip(job["images"], job["prompts"]):
        image = preprocess(Image.open(path)).unsqueeze(0)
        scores.append(model.score(image, prompt).reshape(()).double())
        pixels.append(image[0])
        features.append(captured["feature"][0])
    torch.save(
        {"scores": torch.stack(scores), "pixels": torch.stack(pixels), "features": torch.stack(features),
         "build_s": build_s, "score_s": time.perf_counter() - t0,
         "versions": {"torch": str(torch.__version__), "transformers": str(sys.modules["transformers"].__version__)}},
        job["out"],
    )


if __name__ == "__main__":
    main(sys.argv[1])
