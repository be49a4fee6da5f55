"""VQAScore (Lin et al., 2024) with CLIP-FlanT5-XXL: the probability that the model answers "Yes" to the question
'Does this figure show "{prompt}"? Please answer yes or no.' about the image, as t2v_metrics 3.0 computes it.

    tokens  = [system message " USER: "] </s> <576 image tokens> ["\\n" question " ASSISTANT: "] </s>
    score   = exp(mean over the answer's tokens ("Yes", "</s>") of log p(token | image, question, answer so far))
            = sqrt(p("Yes") * p("</s>" | "Yes"))   (the exp of minus t2v_metrics' mean cross-entropy)

Built on transformers' CLIPVisionModel (ViT-L/14 at 336 px; the output of its second-to-last layer, patch tokens
only, so its last layer is not built), an MLP projector (Linear, GELU, Linear) and T5ForConditionalGeneration
(FlanT5-XXL), loaded from the ORIGINAL checkpoint (zhiqiulin/clip-flant5-xxl) through an explicit key mapping.
The logits are cut to the tokenizer's 32,100 tokens, as t2v_metrics' `resize_token_embeddings(len(tokenizer))` does.

Images are padded to a square with the CLIP mean colour (122, 116, 104), then resized to 336 px with PIL's 8-bit
bicubic arithmetic by default (`pil_8bit=False`: the float resize), as the official `expand2square` + CLIP image
processor see them. Per prompt, the question's token ids are cached; the encoder cannot be cached, since it runs
over the image and question tokens jointly. About 11.3 B parameters: 22.6 GB of weights in bf16 (the default here,
and what t2v_metrics runs); see docs/rewards.md for memory and speed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from .base import Reward
from .checkpoint import read_checkpoint, read_json
from .errors import CheckpointMismatchError, CorruptCheckpointError, InputError, MissingFileError
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_bicubic, resize_pil_8bit

NAME = "vqascore"
REPO_ID = "zhiqiulin/clip-flant5-xxl"
TOKENIZER_REPO = "google/flan-t5-xxl"
VISION_REPO = "openai/clip-vit-large-patch14-336"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")

# t2v_metrics 3.0 (models/vqascore_models/clip_t5_model.py, constants.py): templates and the 't5_chat' format.
QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
CONTEXT_LEN = 2048  # the tokenizer's model_max_length: the token ids (image marker included) are cut there

# openai/clip-vit-large-patch14-336's vision config: used when no `vision` folder is given.
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
PAD_LEVELS = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)  # expand2square's fill: (122, 116, 104)

VISION_PREFIX = "vision_tower.vision_tower."  # CLIPT5's vision_tower (CLIPVisionTower) and its CLIPVisionModel
EMBEDDING_ALIASES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                     "embed_tokens.weight")  # one tensor under four names (T5's shared, CLIPT5's embed_tokens)
VOCAB_ROWS = ("t5.shared.weight", "t5.lm_head.weight")  # cut to the tokenizer's size
RENAMED = "keys renamed vision_tower.vision_tower.* -> vision.*, mm_projector.* -> projector.*, T5's -> t5.*"


# -- files -----------------------------------------------------------------------------------------------------
def check_config(config: dict, source: str) -> dict:
    """The CLIP-T5 fields the score depends on, checked: projector type, selected layer and feature."""
    absent = [k for k in ("d_model", "num_layers", "num_heads", "d_ff", "vocab_size") if k not in config]
    if absent:
        raise CorruptCheckpointError(f"{NAME}: {source} lacks {', '.join(absent)}; is it {REPO_ID}'s {CONFIG_FILE}?")
    projector = config.get("mm_projector_type", "linear")
    if projector != "linear" and not re.fullmatch(r"mlp\d+x_gelu", projector):
        raise CorruptCheckpointError(f"{NAME}: {source}: unsupported mm_projector_type {projector!r}")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise CorruptCheckpointError(f"{NAME}: {source}: only mm_vision_select_feature 'patch' is supported")
    return config


def vision_config(path: str | os.PathLike | None):
    """The CLIP image tower's config: from a CLIP config.json (full or vision-only), else CLIP ViT-L/14-336's."""
    from transformers import CLIPVisionConfig

    if path is None:
        return CLIPVisionConfig(**CLIP_L_336)
    config = read_json(path, reward=NAME, what="vision config")
    fields = config.get("vision_config", config)
    keep = {k: v for k, v in fields.items() if k in CLIP_L_336 or k in ("num_channels", "attention_dropout")}
    return CLIPVisionConfig(**keep)


def load_tokenizer(path: str | os.PathLike):
    """FlanT5's tokenizer from its tokenizer.json (the `tokenizers` library: normaliser, pieces, appended </s>)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise CorruptCheckpointError(f"{NAME}: could not read the tokenizer {path}: {err}") from err
    missing = [t for t in ("<pad>", "</s>") if tokenizer.token_to_id(t) is None]
    if missing:
        raise CorruptCheckpointError(f"{NAME}: {path} has no {', '.join(missing)} token; is it FlanT5's tokenizer?")
    return tokenizer


def weight_files(checkpoint: str | os.PathLike | None, config_path: Path) -> list[Path]:
    """The checkpoint's weight files, shards in order: the given file (or index), else the first of WEIGHT_FILES found
    beside config.json (a local folder) or in the hub repo."""
    given = Path(checkpoint) if checkpoint is not None else None
    if given is not None and given.is_file() and given.name != CONFIG_FILE:
        return _shards(given, given.parent) if given.name.endswith(".index.json") else [given]
    folder = None if given is None else config_path.parent
    errors = []
    for name in WEIGHT_FILES:
        try:
            found = resolve_file(folder, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename=name)
        except MissingFileError as err:
            errors.append(str(err))
            continue
        return _shards(found, folder) if name.endswith(".index.json") else [found]
    where = folder if folder is not None else f"the Hugging Face repo {REPO_ID} ({errors[-1]})"
    raise MissingFileError(
        f"{NAME}: no weights found in {where} (looked for {', '.join(WEIGHT_FILES)}). "
        f"Download them with `hf download {REPO_ID}`, or pass checkpoint='/path/to/clip-flant5-xxl' to "
        f"rewards.load({NAME!r}, ...)."
    )


def _shards(index: Path, folder: Path | None) -> list[Path]:
    """The shard files an index's weight_map names, from `folder` (the index's own) or the hub."""
    names = sorted(set(read_json(index, reward=NAME, what="weight index").get("weight_map", {}).values()))
    if not names:
        raise CorruptCheckpointError(f"{NAME}: {index} maps no weights; download it again.")
    where = None if folder is None else index.parent
    return [resolve_file(where, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename=n) for n in names]


def question(prompt: str) -> str:
    """The 't5_chat' conversation around the official question about `prompt`, with the image marker."""
    return f"{SYSTEM_MSG} USER: {IMAGE_TOKEN}\n{QUESTION_TEMPLATE.format(prompt)} ASSISTANT: "


# -- key mapping -------------------------------------------------------------------------------------------------
def convert_key(key: str, vision_layers: int) -> str | None:
    """Our name for an original CLIP-FlanT5 key; "" for tensors the score never reads, None for unknown keys."""
    if key.startswith(VISION_PREFIX):
        rest = key[len(VISION_PREFIX):]
        if not rest.startswith("vision_model."):
            return None
        rest = rest[len("vision_model."):]
        layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
        if layer and int(layer.group(1)) >= vision_layers:
            return ""  # layers after the selected one (the last, for select layer -2)
        if rest == "embeddings.position_ids":
            return ""  # a buffer of older transformers; ours is rebuilt as arange
        return "vision." + rest
    if key.startswith("mm_projector."):
        return "projector." + key[len("mm_projector."):]
    if key in EMBEDDING_ALIASES:
        return "t5.shared.weight"
    if key.startswith(("encoder.", "decoder.")) or key == "lm_head.weight":
        return "t5." + key
    return None


def convert_vision_key(key: str, vision_layers: int) -> str | None:
    """Our name for a key of openai/clip-vit-large-patch14-336's CLIPModel weights (the text tower is not read)."""
    if key.startswith("vision_model."):
        return convert_key(VISION_PREFIX + key, vision_layers)
    if key.startswith(("text_model.", "visual_projection.", "text_projection.")) or key == "logit_scale":
        return ""
    return None


# -- the model ---------------------------------------------------------------------------------------------------
def build_projector(config: dict, vision_width: int) -> nn.Sequential:
    """LLaVA's projector: Linear(vision, d_model), then (GELU, Linear(d_model, d_model)) for each extra depth."""
    kind = config.get("mm_projector_type", "linear")
    depth = 1 if kind == "linear" else int(re.fullmatch(r"mlp(\d+)x_gelu", kind).group(1))
    width = config["d_model"]
    layers: list[nn.Module] = [nn.Linear(vision_width, width)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(width, width)]
    return nn.Sequential(*layers)


def selected_layers(config: dict, total: int) -> int:
    """How many vision layers feed the projector: hidden_states[select_layer] is the output of that many layers."""
    select = config.get("mm_vision_select_layer", -2)
    count = total + 1 + select if select < 0 else select
    if not 0 < count <= total:
        raise CorruptCheckpointError(f"{NAME}: mm_vision_select_layer {select} does not fit a {total}-layer tower")
    return count


def build_t5(config: dict, vocab: int):
    """FlanT5 as transformers' T5ForConditionalGeneration, its vocabulary cut to the tokenizer's `vocab` tokens."""
    from transformers import T5Config, T5ForConditionalGeneration

    skip = {"architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
            "vocab_size", "use_cache"}
    fields = {k: v for k, v in config.items() if k not in skip and not k.startswith(("mm_", "image_", "tune_"))}
    return T5ForConditionalGeneration(T5Config(**fields, vocab_size=vocab, use_cache=False))


class VQAScore(Reward):
    """Probability of "Yes" to the official question about the prompt (see the module docstring)."""

    name = NAME
    needs_prompt = True
    input_size = CLIP_L_336["image_size"]
    published_scale = 1.0
    scale_note = "a probability in [0, 1]: exp(-mean cross-entropy) of the answer 'Yes</s>', as t2v_metrics reports"

    def __init__(self, config: dict, vision, tokenizer, pil_8bit: bool = True) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        super().__init__()
        self.tokenizer = tokenizer
        self.pil_8bit = pil_8bit  # round to 8 bits, resize with PIL's arithmetic: what the official score sees
        self.input_size = vision.image_size
        layers = selected_layers(config, vision.num_hidden_layers)
        tower = CLIPVisionModel(CLIPVisionConfig(**{**vision.to_dict(), "num_hidden_layers": layers}))
        self.vision = getattr(tower, "vision_model", tower)  # transformers 4 wraps the tower, 5 does not
        self.projector = build_projector(config, vision.hidden_size)
        self.vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        self.t5 = build_t5(config, self.vocab)
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        self.pad_id, self.eos_id = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
        self.decoder_start = config.get("decoder_start_token_id", config.get("pad_token_id", self.pad_id))
        self.head_ids = self.encode(question("").split(IMAGE_TOKEN)[0])  # the system message: one for all prompts
        self.answer_ids = self.encode(ANSWER)  # [Yes, </s>]

    # -- text ------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of one chunk, </s> appended, as t2v_metrics' tokenizer(chunk).input_ids."""
        return self.tokenizer.encode(text).ids

    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        """The question's ids after the image marker, one tensor per prompt, cut where t2v_metrics cuts them."""
        room = CONTEXT_LEN - len(self.head_ids) - 1
        out = []
        for prompt in prompts:
            if IMAGE_TOKEN in prompt:
                raise InputError(f"{NAME}: a prompt contains {IMAGE_TOKEN!r}, the image marker of the question")
            tail = question(prompt).split(IMAGE_TOKEN)[1]
            out.append(torch.tensor(self.encode(tail)[: max(room, 0)], dtype=torch.long))
        return out

    def question_tokens(self, prompts: list[str]) -> list[torch.Tensor]:
        """Cached per prompt (CPU tensors): encodes only prompts not seen before, least recently used dropped."""
        cache = self._text_cache
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        for prompt, ids in zip(missing, self.encode_text(missing) if missing else []):
            cache[prompt] = ids
        for prompt in dict.fromkeys(prompts):
            cache.move_to_end(prompt)
        tokens = [cache[p] for p in prompts]
        while len(cache) > self.text_cache_size:
            cache.popitem(last=False)
        return tokens

    # -- image -----------------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Pad to a square with the mean colour (expand2square), resize to 336 (PIL bicubic), CLIP mean/std."""
        resize = resize_pil_8bit if self.pil_8bit else resize_bicubic
        square = pad_square(images.float(), PAD_LEVELS)
        return self.normalize(resize(square, (self.input_size, self.input_size)))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Projected patch tokens [B, 576, d_model] of the selected vision layer."""
        pixels = self.preprocess(images).to(self.projector[0].weight.dtype)
        hidden = self.vision(pixel_values=pixels).last_hidden_state  # the selected layer's output, before post-LN
        return self.projector(hidden[:, 1:])

    # -- score -----------------------------------------------------------------------------------------------
    def encoder_inputs(self, image_tokens: torch.Tensor, prompts: list[str]
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings [B, L, d] of system message, image tokens and question, right-padded, and their mask (None
        when no row is padded: the mask is built from lengths known on the host, so no device sync)."""
        embed = self.t5.shared
        device = image_tokens.device
        head = embed(torch.tensor(self.head_ids, device=device))
        tails = [embed(ids.to(device)) for ids in self.question_tokens(prompts)]
        rows = [torch.cat([head, img.to(head.dtype), tail]) for img, tail in zip(image_tokens, tails)]
        lengths = [len(r) for r in rows]
        embeds = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        if min(lengths) == max(lengths):
            return embeds, None
        mask = torch.arange(embeds.shape[1])[None] < torch.tensor(lengths)[:, None]
        return embeds, mask.long().to(device)

    def answer_log_probs(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """log p of each answer token [B, 2] (teacher forcing, softmax over the tokenizer's vocabulary, float32)."""
        labels = torch.tensor(self.answer_ids, device=embeds.device).expand(len(embeds), -1)
        start = torch.full_like(labels[:, :1], self.decoder_start)
        decoder_ids = torch.cat([start, labels[:, :-1]], dim=1)
        logits = self.t5(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        return logits.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        embeds, mask = self.encoder_inputs(self.image_tokens(images), prompts)
        return self.answer_log_probs(embeds, mask).mean(-1).exp()

    def _apply(self, fn, recurse: bool = True):
        # the cached ids are CPU tensors that do not depend on the device or dtype: keep them
        cache = dict(self._text_cache)
        out = super()._apply(fn, recurse)
        self._text_cache.update(cache)
        return out


def pad_square(images: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Pad [B,3,h,w] to a square of side max(h, w) with the colour of 8-bit `levels`, the image at offset
    (side - h) // 2 from the top or (side - w) // 2 from the left, as expand2square's PIL paste."""
    b, c, h, w = images.shape
    if h == w:
        return images
    side = max(h, w)
    fill = torch.tensor(levels, dtype=images.dtype, device=images.device).div(255.0).view(1, c, 1, 1)
    dim, before = (2, (side - h) // 2) if h < w else (3, (side - w) // 2)
    after = side - images.shape[dim] - before
    shape = lambda n: (b, c, n, side) if dim == 2 else (b, c, side, n)  # noqa: E731
    return torch.cat([fill.expand(shape(before)), images, fill.expand(shape(after))], dim=dim)


# -- loading -----------------------------------------------------------------------------------------------------
def load_vqascore(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vision: str | os.PathLike | None = None,
    pil_8bit: bool = True,
) -> VQAScore:
    """Build VQAScore from clip-flant5-xxl (a folder with config.json and its weights, or the hub), FlanT5's
    tokenizer.json and, if given, a CLIP folder (openai/clip-vit-large-patch14-336: its config.json, and its weights
    when the checkpoint holds no vision tower). `pil_8bit=False` resizes in floating point."""
    config_path = resolve_file(checkpoint if checkpoint is None or Path(checkpoint).is_dir()
                               else Path(checkpoint).parent, reward=NAME, role="checkpoint", repo_id=REPO_ID,
                               filename=CONFIG_FILE)
    config = check_config(read_json(config_path, reward=NAME, what="config"), str(config_path))
    files = weight_files(checkpoint, config_path)
    tok = load_tokenizer(resolve_file(tokenizer, reward=NAME, role="tokenizer", repo_id=TOKENIZER_REPO,
                                      filename=TOKENIZER_FILE))
    vision_path = None if vision is None else resolve_file(vision, reward=NAME, role="vision", repo_id=VISION_REPO,
                                                           filename=CONFIG_FILE)
    vcfg = vision_config(vision_path)
    with torch.device("meta"):  # no random init of 11B parameters: every tensor comes from the checkpoint
        model = VQAScore(config, vcfg, tok, pil_8bit=pil_8bit)
    for part in (model.vision, model.projector, model.t5):  # the normalisation constants stay float32
        part.to(dtype)
    model.to_empty(device=device)
    model.t5.set_input_embeddings(model.t5.shared)  # to_empty unties shared params: encoder/decoder embed shared again
    model.normalize.reset()
    ids = model.vision.embeddings.position_ids
    ids.copy_(torch.arange(ids.shape[-1], device=device).expand_as(ids))
    loader = _Loader(model)
    for path in files:
        loader.load(read_checkpoint(path, reward=NAME), str(path), convert_key)
    if not loader.has_vision:
        for path in _vision_weights(vision):
            loader.load(read_checkpoint(path, reward=NAME), str(path), convert_vision_key)
    loader.finish(f"{config_path.parent} ({RENAMED})")
    return model


def _vision_weights(vision: str | os.PathLike | None) -> list[Path]:
    """CLIP's own weights, for checkpoints saved without their (frozen) vision tower."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            return [resolve_file(vision, reward=NAME, role="vision", repo_id=VISION_REPO, filename=name)]
        except MissingFileError:
            continue
    raise MissingFileError(
        f"{NAME}: the checkpoint holds no vision tower, and CLIP's weights were not found "
        f"({'in ' + str(vision) if vision else 'in the Hugging Face repo ' + VISION_REPO}). "
        f"Pass vision='/path/to/clip-vit-large-patch14-336' to rewards.load({NAME!r}, ...)."
    )


class _Loader:
    """Copies converted tensors into the model shard by shard; every parameter must be set exactly once."""

    def __init__(self, model: VQAScore) -> None:
        self.layers = model.vision.config.num_hidden_layers
        self.targets = dict(model.named_parameters())
        self.loaded: dict[str, str] = {}  # our name -> the original key it came from
        self.unknown: list[str] = []
        self.shapes: list[str] = []

    @property
    def has_vision(self) -> bool:
        return any(k.startswith("vision.") for k in self.loaded)

    @torch.no_grad()
    def load(self, state: dict, source: str, convert) -> None:
        for key, value in state.items():
            new = convert(key, self.layers)
            if new is None or (new and new not in self.targets):
                self.unknown.append(key)
                continue
            if not new:
                continue
            target = self.targets[new]
            if new in VOCAB_ROWS:
                if value.shape[0] < target.shape[0]:
                    self.shapes.append(f"{key}: {value.shape[0]} rows < the tokenizer's {target.shape[0]} tokens")
                    continue
                value = value[: target.shape[0]]
            if tuple(value.shape) != tuple(target.shape):
                self.shapes.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
                continue
            if new in self.loaded and new == "t5.shared.weight":
                if not torch.equal(target, value.to(target.dtype).to(target.device)):
                    self.shapes.append(f"{key} differs from {self.loaded[new]} (they must be one tensor)")
                continue
            target.copy_(value)
            self.loaded[new] = key

    def finish(self, source: str) -> None:
        missing = sorted(set(self.targets) - set(self.loaded))
        if not (missing or self.unknown or self.shapes):
            return
        parts = [_listing("missing tensors", missing), _listing("unexpected keys", sorted(self.unknown)),
                 _listing("shape mismatches", self.shapes)]
        raise CheckpointMismatchError(
            f"{NAME}: {source} does not fit the model: {'; '.join(p for p in parts if p)}. "
            f"Is this the original checkpoint of {REPO_ID} (with FlanT5's tokenizer)?"
        )


def _listing(what: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {what} ({', '.join(items[:limit])}{more})"
