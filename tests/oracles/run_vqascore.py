"""Runs INSIDE the shared oracle environment (see build.py): the official `t2v-metrics` 3.0 package builds a tiny
CLIP-FlanT5 (its own CLIPT5ForConditionalGeneration: a CLIP vision tower at 336 px, the MLP projector, a FlanT5),
saves it as the release is saved (save_pretrained: config.json + pytorch_model-*.bin shards and their index), and
scores PNG images with its own `CLIPT5Model.forward(images, texts)`, the function behind
`t2v_metrics.VQAScore('clip-flant5-xxl')`.

    <oracle python> run_vqascore.py job.json

job.json: {"seed", "folder" (files are written here: flan-t5-xxl/, clip-vit-large-patch14-336/, clip-flant5-xxl/),
"t5" (tiny T5 config fields), "vision" (tiny CLIPVisionConfig fields), "corpus" (texts the tokenizer is trained on),
"vocab_size", "extra_rows" (embedding rows beyond the tokenizer, as FlanT5's 32,128 for 32,100 tokens), "shard_size",
"gains" (init scales), "answer_gain", "answer_lean" (the answer tokens' lm_head rows: their scale, and a lean towards
the decoder input at their step), "images": [png], "prompts": [str], "out" (a torch file with scores [N], the
preprocessed pixels [N,3,336,336], the projected image tokens and the written folders)}.

The hub names the package hard-codes (google/flan-t5-xxl, zhiqiulin/clip-flant5-xxl,
openai/clip-vit-large-patch14-336) are redirected to the local folders. The model is run in float32: the package
casts it to bfloat16, so every weight is written rounded to bfloat16 and cast back after loading (exactly).
Only the standard library, torch, sentencepiece, transformers and the official package are used.
"""

import importlib.util
import io
import json
import sys
import time
import types
from pathlib import Path

HUB = {"tokenizer": "google/flan-t5-xxl", "model": "zhiqiulin/clip-flant5-xxl",
       "vision": "openai/clip-vit-large-patch14-336"}
PREPROCESSOR = {  # openai/clip-vit-large-patch14-336's preprocessor_config.json
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}


def import_official():
    """Import the CLIP-FlanT5 scorer without the package __init__ files (they import every model family and check
    for ffmpeg); cv2, imported by mm_utils for video helpers the score never calls, is a stand-in."""
    import transformers  # noqa: F401  (before the stand-in: transformers probes for a real cv2 at import)

    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    root = Path(importlib.util.find_spec("t2v_metrics").submodule_search_locations[0])
    for name, path in (("t2v_metrics", root), ("t2v_metrics.models.vqascore_models", root / "models/vqascore_models")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    from t2v_metrics.models.vqascore_models import clip_t5_model
    from t2v_metrics.models.vqascore_models.clip_t5 import model

    clip_t5_model.CLIPT5Config = model.CLIPT5Config
    return clip_t5_model


def redirect(cls, names):
    """`cls.from_pretrained(hub name)` loads the local folder instead (names: hub name -> folder)."""
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, name, *args, **kwargs):
        return original(klass, names.get(str(name), name), *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def write_tokenizer(folder, corpus, vocab_size):
    """A small unigram SentencePiece model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no <s>) and nmt_nfkc
    normalisation, saved as FlanT5's repo holds it: spiece.model for the slow tokenizer, tokenizer.json for fast."""
    import sentencepiece as spm
    from transformers import T5Tokenizer, T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, normalization_rule_name="nmt_nfkc", character_coverage=1.0,
        num_threads=1, hard_vocab_limit=False, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    T5Tokenizer(str(folder / "spiece.model")).save_pretrained(str(folder))
    T5TokenizerFast.from_pretrained(str(folder), from_slow=True).save_pretrained(str(folder))


def bf16_random_(module, gains, seed):
    """Random weights rounded to bfloat16: LayerNorm weights near 1, linears fan-in scaled times a gain."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower() and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith("bias"):
                value = 0.02 * noise
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                value = gains.get("embedding", 1.0) * noise
            else:
                gain = next((v for k, v in gains.items() if k in name), 1.0)
                value = gain * noise / p[0].numel() ** 0.5
            p.copy_(value.bfloat16().float())


def build_files(job, official):
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = Path(job["folder"])
    paths = {"tokenizer": folder / "flan-t5-xxl", "vision": folder / "clip-vit-large-patch14-336",
             "model": folder / "clip-flant5-xxl"}
    write_tokenizer(paths["tokenizer"], job["corpus"], job["vocab_size"])
    names = {HUB[k]: str(v) for k, v in paths.items()}
    for cls in (AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, official.CLIPT5ForConditionalGeneration):
        redirect(cls, names)

    torch.manual_seed(job["seed"])
    vision = CLIPVisionModel(CLIPVisionConfig(**job["vision"]))
    bf16_random_(vision, {}, job["seed"])
    vision.save_pretrained(str(paths["vision"]))
    (paths["vision"] / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))

    tokens = len(AutoTokenizer.from_pretrained(HUB["tokenizer"], use_fast=False))
    config = official.CLIPT5Config(**job["t5"], vocab_size=tokens + job["extra_rows"], mm_vision_tower=HUB["vision"],
                                   mm_hidden_size=job["vision"]["hidden_size"], mm_projector_type="mlp2x_gelu",
                                   mm_vision_select_layer=-2, mm_vision_select_feature="patch", use_mm_proj=True,
                                   architectures=["CLIPT5ForConditionalGeneration"])
    model = official.CLIPT5ForConditionalGeneration(config)  # builds the vision tower from the CLIP folder
    bf16_random_(model, job["gains"], job["seed"] + 1)
    answer = AutoTokenizer.from_pretrained(HUB["tokenizer"], use_fast=False)("Yes").input_ids
    with torch.no_grad():  # the answer's logits vary most, and lean towards the decoder's input token at each step
        inputs = torch.nn.functional.normalize(model.shared.weight[[config.decoder_start_token_id, answer[0]]], dim=-1)
        rows = model.lm_head.weight[answer] * job["answer_gain"] + job["answer_lean"] * inputs
        model.lm_head.weight[answer] = rows.bfloat16().float()
    # safetensors refuses CLIPT5's shared embedding (shared.weight is also embed_tokens.weight): as pickled shards
    model.save_pretrained(str(paths["model"]), max_shard_size=job["shard_size"], safe_serialization=False)
    return paths


def main(job_path):
    job = json.loads(open(job_path).read())
    official = import_official()
    import torch

    t0 = time.perf_counter()
    paths = build_files(job, official)
    scorer = official.CLIPT5Model("clip-flant5-xxl", device="cpu", cache_dir=str(Path(job["folder"]) / "hf_cache"))
    scorer.model.float()  # bfloat16-exact weights: the cast back is exact, and the oracle runs in float32
    build_s = time.perf_counter() - t0

    taps = {}
    tower = scorer.model.get_vision_tower()
    tower.register_forward_pre_hook(lambda m, i: taps.__setitem__("pixels", i[0].detach().float()))
    scorer.model.mm_projector.register_forward_hook(lambda m, i, o: taps.__setitem__("tokens", o.detach().float()))
    scores, pixels, tokens = [], [], []
    t0 = time.perf_counter()
    for path, prompt in zip(job["images"], job["prompts"]):
        scores.append(float(scorer.forward([path], [prompt])[0]))
        pixels.append(taps["pixels"][0])
        tokens.append(taps["tokens"][0])
    score_s = time.perf_counter() - t0
    torch.save(
        {"scores": torch.tensor(scores, dtype=torch.float64), "pixels": torch.stack(pixels),
         "image_tokens": torch.stack(tokens), "paths": {k: str(v) for k, v in paths.items()},
         "build_s": build_s, "score_s": score_s,
         "versions": {"torch": str(torch.__version__), "transformers": str(sys.modules["transformers"].__version__)}},
        job["out"],
    )


if __name__ == "__main__":
    main(sys.argv[1])
