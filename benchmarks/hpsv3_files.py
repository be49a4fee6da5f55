"""HPSv3's files with random weights, written locally in the official layouts (no downloads).

    write_qwen2vl_base(folder, config, corpus)   Qwen2-VL-7B-Instruct's config.json, preprocessor_config.json,
                                                 chat_template.json and a small byte-level BPE tokenizer
                                                 (vocab.json, merges.txt, tokenizer_config.json) whose special
                                                 tokens have Qwen2-VL's names and roles
    write_hpsv3(path, config, vocab_rows, seed)  HPSv3.safetensors: the state dict of the official
                                                 Qwen2VLRewardModelBT (visual.*, model.*, lm_head.*, rm_head.*)

The tokenizer is small (256 byte tokens plus merges learned from `corpus`), so its ids differ from Qwen's; token
counts of English text come out close to the real tokenizer's when `merges` is a few hundred.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HPSV3_FILE = "HPSv3.safetensors"

# Qwen/Qwen2-VL-7B-Instruct config.json (the flat layout transformers 4.45-4.49 wrote; transformers 5 reads it).
QWEN2VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}
QWEN2VL_VOCAB = 151643  # byte-level BPE tokens before the special tokens
HPSV3_VOCAB_ROWS = 151658  # HPSv3 resized the embeddings to the tokenizer plus <|Reward|>

# Qwen2-VL's special tokens in id order after the BPE vocabulary (tokenizer_config.json's added_tokens_decoder).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
TOKEN_ID_KEYS = {"bos_token_id": 0, "eos_token_id": 2, "vision_start_token_id": 9, "vision_end_token_id": 10,
                 "vision_token_id": 11, "image_token_id": 12, "video_token_id": 13}

# Qwen2-VL-7B-Instruct's chat template (chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
PREPROCESSOR = {  # preprocessor_config.json
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def tiny_qwen2vl(vocab_size: int, initializer_range: float = 0.02) -> dict:
    """A small Qwen2-VL config of the real architecture: 14 px patches, 2x2 merge, two frames, M-RoPE sections."""
    config = json.loads(json.dumps(QWEN2VL_7B))
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_window_layers=2, vocab_size=vocab_size, torch_dtype="float32",
                  initializer_range=initializer_range, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config["vision_config"].update(depth=2, embed_dim=32, num_heads=2, hidden_size=64)
    return config


def write_tokenizer(folder: Path, corpus: list[str], merges: int = 400, vocab_size: int | None = None) -> int:
    """A byte-level BPE (256 bytes + `merges` learned on `corpus`) with Qwen2-VL's special tokens; returns the
    tokenizer's length (the id the official package then gives <|Reward|>). `vocab_size` pads the BPE vocabulary
    with tokens no merge produces, so that the special tokens get their real ids (QWEN2VL_VOCAB onwards)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json + merges.txt
    base = tok.get_vocab_size()
    if vocab_size is not None and vocab_size > base:
        vocab = json.loads((folder / "vocab.json").read_text())
        vocab.update({f"<unused_{i}>": i for i in range(base, vocab_size)})
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        base = vocab_size
    added = {str(base + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {
        "add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "padding_side": "left", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return base + len(SPECIAL_TOKENS)


def write_qwen2vl_base(folder: Path, config: dict | None, corpus: list[str], merges: int = 400) -> dict:
    """Qwen2-VL-7B-Instruct's non-weight files in `folder`; `config` None writes the 7B config and a tokenizer whose
    special tokens have the real ids. Returns the config written, plus the tokenizer's length."""
    folder = Path(folder)
    length = write_tokenizer(folder, corpus, merges, vocab_size=None if config else QWEN2VL_VOCAB)
    config = json.loads(json.dumps(config or QWEN2VL_7B))
    base = length - len(SPECIAL_TOKENS)
    config.update({key: base + i for key, i in TOKEN_ID_KEYS.items()})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"]}))
    return {**config, "tokenizer_length": length}


def official_shapes(config: dict, vocab_rows: int) -> dict[str, torch.Size]:
    """Keys and shapes of the official Qwen2VLRewardModelBT's state dict (transformers 4 names: visual.*, model.*,
    lm_head.*, rm_head.{0,3,5}.*) for a base config and `vocab_rows` embeddings."""
    from rewards.hpsv3 import HEAD_INDICES, build_configs
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VisionTransformerPretrainedModel,
        Qwen2VLTextModel,
    )

    text, vision = build_configs(config, vocab_rows)
    with torch.device("meta"):
        shapes = {f"visual.{k}": v.shape for k, v in Qwen2VisionTransformerPretrainedModel(vision).state_dict().items()}
        shapes.update({f"model.{k}": v.shape for k, v in Qwen2VLTextModel(text).state_dict().items()})
    shapes["lm_head.weight"] = torch.Size((vocab_rows, text.hidden_size))
    widths = (text.hidden_size, 1024, 16, 2)
    for index, (a, b) in zip(HEAD_INDICES, zip(widths[:-1], widths[1:])):
        shapes[f"rm_head.{index}.weight"], shapes[f"rm_head.{index}.bias"] = torch.Size((b, a)), torch.Size((b,))
    return shapes


def random_hpsv3_state(config: dict, vocab_rows: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       head_gain: float = 2.0) -> dict[str, torch.Tensor]:
    """A random state dict with the official keys and shapes; the head in float32 with gain `head_gain`."""
    gen = torch.Generator().manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    state = {}
    for key, shape in official_shapes(config, vocab_rows).items():
        if key.startswith("rm_head."):  # the head stays float32, as the official model saves it
            state[key] = torch.randn(shape, generator=gen) * (head_gain / shape[-1] ** 0.5 if len(shape) == 2 else 0.1)
        else:
            state[key] = _random(key, shape, gen, std).to(dtype)
    return state


def _random(key: str, shape: torch.Size, gen: torch.Generator, std: float) -> torch.Tensor:
    if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight", "layernorm.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


def write_hpsv3(path: Path, config: dict, vocab_rows: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """HPSv3.safetensors with random weights in the official layout."""
    from safetensors.torch import save_file

    state = random_hpsv3_state(config, vocab_rows, seed, dtype)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return Path(path)


def write_benchmark_files(folder: Path, prompts: list[str], *, tiny: bool) -> dict[str, Path]:
    """The benchmark's HPSv3 sources {checkpoint, base} under `folder`, reused when already written: at full size
    the 7B config, a tokenizer with the real special-token ids and about the real token count of the instruction
    (1000 merges), and HPSv3.safetensors in bf16 (16 GB); tiny: `tiny_qwen2vl`."""
    from rewards.hpsv3 import INSTRUCTION, REQUEST

    folder = Path(folder)
    marker = folder / "files.json"
    sources = {"checkpoint": folder / HPSV3_FILE, "base": folder / "base"}
    if marker.is_file() and json.loads(marker.read_text()).get("tiny") == tiny:
        return sources
    corpus = [INSTRUCTION + REQUEST, *prompts]
    if tiny:
        length = write_tokenizer(sources["base"], corpus, merges=1000)
        config = write_qwen2vl_base(sources["base"], tiny_qwen2vl(length + 32), corpus, merges=1000)
    else:
        config = write_qwen2vl_base(sources["base"], None, corpus, merges=1000)
    rows = config.pop("tokenizer_length") + 1  # + <|Reward|>
    write_hpsv3(sources["checkpoint"], config, rows, dtype=torch.float32 if tiny else torch.bfloat16)
    marker.write_text(json.dumps({"tiny": tiny, "vocab_rows": rows}))
    return sources
