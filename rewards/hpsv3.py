"""HPSv3 (Ma, Shui et al., ICCV 2025): Qwen2-VL-7B-Instruct reads the image and an instruction holding the prompt; a
RankNet head on the hidden state of the added `<|Reward|>` token gives (mu, sigma). The score is mu.

Built on transformers' own Qwen2-VL modules (`Qwen2VisionTransformerPretrainedModel`, `Qwen2VLTextModel`) and
loaded from the ORIGINAL `HPSv3.safetensors` (the state dict of the official `Qwen2VLRewardModelBT`, a
`Qwen2VLForConditionalGeneration` with an `rm_head`) through an explicit key mapping; the base model's config,
tokenizer, chat template and image-processor files come from Qwen/Qwen2-VL-7B-Instruct.

What decides the number, as the official `hpsv3` 1.0.0 package computes it (`HPSv3RewardInferencer.reward`):
- image: the package's own fetch resizes the 8-bit RGB image with PIL bicubic to `smart_resize(h, w)` with
  min_pixels = max_pixels = 256 * 28 * 28 (a 28-multiple grid of about 448 x 448 pixels' area), then Qwen2-VL's
  processor rescales by 1/255, normalises with the OpenAI CLIP mean/std, repeats the frame twice in time and cuts
  14 px patches in 2 x 2 merge order;
- text: the chat template of Qwen2-VL-7B-Instruct over one user message [image, INSTRUCTION(prompt) + the reward
  request ending in `<|Reward|>`], with the generation prompt; right padding;
- positions: the official forward calls the decoder with `position_ids=None`, so every token, image tokens included,
  gets the plain 1-D position 0, 1, 2, ... in all three M-RoPE sections (no 3-D image positions). The model was
  trained that way; `get_rope_index` would give other numbers;
- the head: Linear(3584, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2) in float32 on the final-norm
  hidden state at the `<|Reward|>` token; the score is output[0] (mu), output[1] is sigma;
- dtypes: the official scorer casts the whole model to bf16 (rotary frequency buffers included) but the head; its
  transformers computed the vision rotary angles in that dtype (`vision_rotary` does the same).

Caching: the token ids of the text around the image are cached per prompt (`encode_text`). Nothing after them can
be: the decoder runs over image and text jointly, and the instruction and prompt come AFTER the image, so their
states depend on it. Only the ~20 system tokens before the image are image-independent (not worth a KV cache).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint, read_json
from .errors import CheckpointMismatchError, CorruptCheckpointError, InputError, MissingFileError
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_bicubic, resize_pil_8bit

NAME = "hpsv3"
REPO_ID = "MizzenAI/HPSv3"
CHECKPOINT_FILE = "HPSv3.safetensors"
BASE_REPO = "Qwen/Qwen2-VL-7B-Instruct"
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
CHAT_TEMPLATE_FILE = "chat_template.json"

# Constants of the official package (hpsv3/inference.py, hpsv3/dataset/utils.py, data_collator_qwen.py).
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels of the official image fetch
MAX_RATIO = 200
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
HEAD_WIDTHS = (1024, 16, 2)  # rm_head: Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2)
HEAD_INDICES = (0, 3, 5)  # the Linear layers' indices in the official nn.Sequential
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
REQUEST = """
Please provide the overall ratings of this image: <|Reward|>

END
"""

# Original key prefix -> ours; lm_head (the language-model head, 1 GB in bf16) never touches the score.
PREFIXES = {"visual.": "vision.", "model.": "text.", "rm_head.": "head."}
UNUSED_KEYS = frozenset({"lm_head.weight"})
PROMPT_MARK = "\x00prompt\x00"  # stands for the prompt while the chat template is rendered once
RENAMED = "keys renamed visual.* -> vision.*, model.* -> text.*, rm_head.{0,3,5}.* -> head.{0,1,2}.*"


def smart_resize(height: int, width: int, factor: int = 28, pixels: int = PIXELS) -> tuple[int, int]:
    """The official fetch's output size (h, w): multiples of `factor` with about `pixels` pixels, aspect kept.

    The same float operations in the same order as the package (hpsv3/dataset/utils.py, min = max = `pixels`), so
    the floors and ceils land on the same integers; Python's round() rounds half to even, as there."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(f"{NAME}: the aspect ratio must be below {MAX_RATIO}, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > pixels:
        beta = math.sqrt((height * width) / pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < pixels:
        beta = math.sqrt(pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def convert_checkpoint(state_dict: dict[str, torch.Tensor], *, source: str = CHECKPOINT_FILE) -> dict:
    """Map the official Qwen2VLRewardModelBT state dict to this module's keys; unknown keys are errors."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key in UNUSED_KEYS:
            continue
        new = convert_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointMismatchError(
            f"{NAME}: {source} holds {len(unknown)} keys that HPSv3 does not have ({shown}). "
            f"Is this the original {CHECKPOINT_FILE} from the Hugging Face repo {REPO_ID}?"
        )
    return out


def convert_key(key: str) -> str | None:
    """Our name for one official key, None if it is not part of HPSv3."""
    for old, new in PREFIXES.items():
        if not key.startswith(old):
            continue
        rest = key[len(old) :]
        if old != "rm_head.":
            return new + rest
        index, _, param = rest.partition(".")
        if index.isdigit() and int(index) in HEAD_INDICES and param in ("weight", "bias"):
            return f"head.{HEAD_INDICES.index(int(index))}.{param}"
    return None


def build_configs(config: dict, vocab_size: int):
    """transformers' Qwen2-VL text and vision configs from the base model's config.json, with the checkpoint's
    vocabulary size (HPSv3 resized the embeddings to the tokenizer plus `<|Reward|>`)."""
    from transformers import Qwen2VLConfig

    missing = [k for k in ("hidden_size", "num_hidden_layers", "vision_config") if k not in config]
    if missing and "text_config" not in config:
        raise CorruptCheckpointError(f"{NAME}: config.json lacks {', '.join(missing)}; is it Qwen2-VL's config?")
    full = Qwen2VLConfig.from_dict({**config, "vocab_size": vocab_size, "use_cache": False})
    text = full.text_config if hasattr(full, "text_config") else full
    text.vocab_size = vocab_size
    return text, full.vision_config


class HPSv3Head(nn.Sequential):
    """The RankNet head: hidden -> 1024 -> 16 -> (mu, sigma) with ReLUs (its dropout is inactive at inference)."""

    def __init__(self, hidden: int) -> None:
        widths = (hidden, *HEAD_WIDTHS)
        super().__init__(*(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self):
            x = F.linear(x, layer.weight.float(), layer.bias.float())
            x = F.relu(x) if i < len(self) - 1 else x
        return x


class HPSv3(Reward):
    """Human-preference score of an image for a prompt (see the module docstring)."""

    name = NAME
    needs_prompt = True
    input_size = 448  # the official grid holds about 448 x 448 pixels; any aspect ratio is kept
    published_scale = 1.0
    scale_note = (
        "mu of the RankNet head, unbounded (no normalisation); the paper and the official reward() report it as is. "
        "Model means on the HPSv3 benchmark run from -0.24 (SD2) over 8.20 (SDXL) to 10.55 (Kolors)"
    )

    def __init__(self, text_config, vision_config, tokenizer, chat_template: str, mean, std,
                 pil_8bit: bool = True) -> None:
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLTextModel,
        )

        self.tokenizer = tokenizer
        self.pil_8bit = pil_8bit
        self.vision = Qwen2VisionTransformerPretrainedModel._from_config(vision_config, attn_implementation="sdpa")
        self.text = Qwen2VLTextModel._from_config(text_config, attn_implementation="sdpa")
        self.head = HPSv3Head(text_config.hidden_size)
        self.normalize = Normalize(mean, std)
        self.patch = vision_config.patch_size
        self.merge = vision_config.spatial_merge_size
        self.temporal = vision_config.temporal_patch_size
        self.prefix, self.suffix = self._template_parts(chat_template)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- text -------------------------------------------------------------------------------------------------
    def _template_parts(self, chat_template: str) -> tuple[str, str]:
        """The chat text before and after the image's `<|image_pad|>` run; PROMPT_MARK stands for the prompt."""
        marker = PROMPT_MARK
        message = [{"role": "user", "content": [
            {"type": "image", "image": "image"},
            {"type": "text", "text": INSTRUCTION.format(text_prompt=marker) + REQUEST},
        ]}]
        text = self.tokenizer.apply_chat_template(
            message, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
        if text.count(IMAGE_PAD) != 1 or text.count(marker) != 1:
            raise CorruptCheckpointError(f"{NAME}: the chat template does not place one image and one text part")
        before, after = text.split(IMAGE_PAD)
        return before, after

    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        """Per prompt, the ids of the chat text with one -1 where the image's tokens go (cached per prompt)."""
        before = self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]
        rows = []
        for prompt in prompts:
            after = self.tokenizer(self.suffix.replace(PROMPT_MARK, prompt), add_special_tokens=False)["input_ids"]
            if after.count(self.reward_token_id) != 1 or self.image_token_id in after:
                raise InputError(f"{NAME}: prompt {prompt!r} contains one of the model's special tokens")
            rows.append(torch.tensor(before + [-1] + after, device=self.device))
        return rows

    def text_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """The cached token ids of each prompt's chat text (rows differ in length, so a list, not a stacked tensor)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        self._text_cache.update(zip(missing, self.encode_text(missing) if missing else []))
        for prompt in dict.fromkeys(prompts):
            self._text_cache.move_to_end(prompt)
        rows = [self._text_cache[p] for p in prompts]
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return rows

    def _sequence(self, templates: list[torch.Tensor], n_image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids [B, L] with `n_image` image tokens in place, right-padded as the official processor pads, the
        attention mask and each row's `<|Reward|>` index."""
        rows = []
        for row in templates:
            at = int((row == -1).nonzero())
            image = torch.full((n_image,), self.image_token_id, dtype=row.dtype, device=row.device)
            rows.append(torch.cat([row[:at], image, row[at + 1 :]]))
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        mask = (ids != -1).long()
        ids = ids.masked_fill(ids == -1, self.pad_token_id)
        where = (ids == self.reward_token_id).long().argmax(dim=1)
        return ids, mask, where

    # -- image ------------------------------------------------------------------------------------------------
    def grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patches (rows, columns) of the official grid for images of this size."""
        h, w = smart_resize(*images.shape[-2:], factor=self.patch * self.merge)
        return h // self.patch, w // self.patch

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels to the official grid (8-bit PIL bicubic by default), normalised, as patches [B*h*w, 3*2*14*14]."""
        gh, gw = self.grid(images)
        resize = resize_pil_8bit if self.pil_8bit else resize_bicubic
        return self.patchify(self.normalize(resize(images.float(), (gh * self.patch, gw * self.patch))))

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """Qwen2-VL's patch rows: the frame repeated over time, patches in 2 x 2 merge order, (C, t, y, x) inside."""
        b, c, h, w = pixels.shape
        p, m, t = self.patch, self.merge, self.temporal
        x = pixels[:, None].expand(b, t, c, h, w)
        x = x.reshape(b, t, c, h // (p * m), m, p, w // (p * m), m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(-1, c * t * p * p)

    def image_embeds(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Merged image tokens [B*n, D] in the model dtype and n, the tokens per image."""
        (gh, gw), patches = self.grid(images), self.preprocess(images)
        grid = torch.tensor([[1, gh, gw]] * images.shape[0], device=patches.device)
        out = self.vision(patches.to(self.vision.get_dtype()), grid_thw=grid)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return out, gh * gw // self.merge**2

    # -- score ------------------------------------------------------------------------------------------------
    def outputs(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(mu, sigma) per image, float32 [B, 2]."""
        embeds, n_image = self.image_embeds(images)
        ids, mask, where = self._sequence(self.text_features(prompts), n_image)
        end = int(where.max()) + 1  # causal: the ~10 tokens after <|Reward|> cannot change its state; not computed
        ids, mask = ids[:, :end], mask[:, :end]
        inputs = self.text.embed_tokens(ids)
        inputs = inputs.masked_scatter((ids == self.image_token_id)[..., None], embeds.to(inputs.dtype))
        positions = torch.arange(ids.shape[1], device=ids.device).expand(3, *ids.shape)  # 1-D, as the official
        hidden = self.text(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False)
        state = hidden.last_hidden_state[torch.arange(len(ids), device=ids.device), where]
        return self.head(state.float())

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.outputs(images, prompts)[:, 0]


# -- loading --------------------------------------------------------------------------------------------------
def load_tokenizer(folder: Path):
    """Qwen2-VL's tokenizer from its files, plus `<|Reward|>` as an added special token (as the official package)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return tokenizer


def _base_file(source, filename: str, role: str) -> Path:
    folder = Path(source).parent if source is not None and Path(source).is_file() else source
    return resolve_file(folder, reward=NAME, role=role, repo_id=BASE_REPO, filename=filename)


def load_hpsv3(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    pil_8bit: bool = True,
) -> HPSv3:
    """Build HPSv3 from `HPSv3.safetensors` (path or hub MizzenAI/HPSv3) and the base model's config, tokenizer,
    chat-template and processor files (`base`: a folder holding them, else the hub repo Qwen/Qwen2-VL-7B-Instruct;
    its 16 GB weights are never fetched). `pil_8bit=False` resizes in floating point instead of PIL's 8 bits."""
    ckpt = resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename=CHECKPOINT_FILE)
    config = read_json(_base_file(base, CONFIG_FILE, "base"), reward=NAME, what="config")
    processor = read_json(_base_file(base, PROCESSOR_FILE, "base"), reward=NAME, what="image-processor config")
    files = [_base_file(base, name, "base") for name in TOKENIZER_FILES]
    template = _chat_template(base, files[2])
    tokenizer = load_tokenizer(files[0].parent)
    state = convert_checkpoint(read_checkpoint(ckpt, reward=NAME), source=str(ckpt))
    vocab = _vocab_rows(state, tokenizer, ckpt)
    text_config, vision_config = build_configs(config, vocab)
    mean = processor.get("image_mean", OPENAI_CLIP_MEAN)
    std = processor.get("image_std", OPENAI_CLIP_STD)
    with torch.device("meta"):  # no random init of 8B parameters; every tensor comes from the checkpoint
        model = HPSv3(text_config, vision_config, tokenizer, template, mean, std, pil_8bit=pil_8bit)
    load_state_dict_strict(model, state, reward=NAME, source=f"{ckpt} ({RENAMED})", assign=True)  # one copy
    del state
    _restore_buffers(model)
    # Cast as the official package casts (model.to(bfloat16)): the rotary frequencies too, which it computes with.
    model.vision.to(dtype)
    model.text.to(dtype)
    model.head.float()  # the official head always runs in float32
    return model.to(device)


def _chat_template(base, tokenizer_config: Path) -> str:
    """The processor's chat template (chat_template.json, what the official processor renders with), else the
    tokenizer's (tokenizer_config.json)."""
    try:
        chat_template = _base_file(base, CHAT_TEMPLATE_FILE, "base")
        template = read_json(chat_template, reward=NAME, what="chat template").get("chat_template")
    except MissingFileError:
        template = read_json(tokenizer_config, reward=NAME, what="tokenizer config").get("chat_template")
    if not isinstance(template, str):
        raise CorruptCheckpointError(
            f"{NAME}: neither {CHAT_TEMPLATE_FILE} nor {tokenizer_config} holds a chat template"
        )
    return template


def _vocab_rows(state: dict, tokenizer, ckpt: Path) -> int:
    rows = state.get("text.embed_tokens.weight")
    if rows is None:
        raise CheckpointMismatchError(f"{NAME}: {ckpt} has no model.embed_tokens.weight; is it {CHECKPOINT_FILE}?")
    ids = tokenizer.convert_tokens_to_ids([REWARD_TOKEN, IMAGE_PAD])
    if max(ids) >= rows.shape[0]:
        raise CheckpointMismatchError(
            f"{NAME}: the tokenizer gives {REWARD_TOKEN} id {ids[0]}, beyond the {rows.shape[0]} embeddings of {ckpt};"
            " the tokenizer files do not belong to this checkpoint"
        )
    return rows.shape[0]


def _restore_buffers(model: HPSv3) -> None:
    """Rebuild the non-persistent buffers (rotary frequencies, normalisation constants) that a checkpoint lacks."""
    model._anchor = torch.empty(0)
    model.normalize.to_empty(device="cpu")
    model.normalize.reset()
    model.vision.rotary_pos_emb = vision_rotary(model.vision.rotary_pos_emb.config)
    rotary = model.text.rotary_emb
    for name, buffer in type(rotary)(rotary.config).named_buffers():
        setattr(rotary, name, buffer)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{NAME}: tensors {left[:5]} were not loaded; this transformers version adds state we miss")


def vision_rotary(config) -> nn.Module:
    """transformers' vision rotary embedding, computing in the dtype of its frequencies as transformers 4.45-4.49 did.

    The official model is cast whole to bf16, frequencies included, and its transformers computed the vision angles
    `outer(arange, inv_freq)` and their cos/sin in that dtype (bf16-rounded angles; it was trained so). transformers 5
    computes them in float32. In float32 both are the same."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding

    class VisionRotary(Qwen2VLVisionRotaryEmbedding):
        def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.inv_freq.dtype == torch.float32:
                return super().forward(x, position_ids)
            angles = position_ids[..., None].to(self.inv_freq.dtype) * self.inv_freq
            return self.recomposition_frequencies(angles.cos()), self.recomposition_frequencies(angles.sin())

    return VisionRotary(config)
