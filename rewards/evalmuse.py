"""EvalMuse's FGA-BLIP2 (Han et al., 2024): image-text alignment on EvalMuse-40k's 1-5 scale.

    score = 1 + 4 * mean over the 32 query tokens of softmax(itm_head(Q-Former(queries + caption | ViT(image))))[1]

BLIP-2's image-text matching model (the "coco" one: EVA ViT-g/14 at 364 px, 39 blocks, then the BERT-base Q-Former
whose 32 learned queries cross-attend to the image while attending jointly to the caption's tokens), fine-tuned by
the authors on EvalMuse-40k ratings. The score is their `element_score` (lavis/models/blip2_models/fga_blip2.py),
which their eval.py calls after LAVIS's `blip_caption` text processor and `blip_image_eval` image processor.

Built from transformers' BLIP-2 modules: `Blip2VisionModel` (the EVA ViT-g; its post_layernorm is LAVIS's
ln_vision) and `Blip2QFormerModel` with the text branch, behind BERT word and position embeddings as LAVIS's
Q-Former takes a caption. Loaded from the ORIGINAL `fga_blip2.pth` (a LAVIS checkpoint, keys visual_encoder.*,
ln_vision.*, Qformer.bert.*, query_tokens, itm_head.*) or imscore's safetensors re-upload with the same keys.
The official code first loads LAVIS's BLIP-2 COCO checkpoint and then the FGA-BLIP2 file over it (strict=False);
`base_checkpoint` does the same for an FGA-BLIP2 file that lacks the ViT (LAVIS saves only trained parameters).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from . import imagereward as ir
from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint
from .errors import CheckpointMismatchError, InputError, MissingFileError
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_bicubic, resize_pil_8bit

NAME = "evalmuse"
REPO_ID = "hanshuhao/FGA-BLIP2"  # the authors' upload, linked from github.com/DYEvaLab/EvalMuse
CHECKPOINT_FILE = "fga_blip2.pth"
BASE_URL = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_finetune_coco.pth"
IMAGE_SIZE = 364
NUM_QUERIES = 32
MAX_WORDS = 50  # LAVIS's blip_caption processor keeps the first 50 words
# EVA ViT-g/14 as LAVIS's create_eva_vit_g builds it (mlp_ratio 4.3637 -> 6144), at the "coco" model's 364 px
VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
              image_size=IMAGE_SIZE, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu")
# bert-base-uncased with cross-attention every second layer to the 1408-wide image tokens; 30523 tokens ([DEC] added)
QFORMER = dict(vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, layer_norm_eps=1e-12,
               cross_attention_frequency=2, encoder_hidden_size=1408, pad_token_id=0)
# Tensors of the LAVIS model the alignment score never reads: the LM head, contrastive projections and temperature,
# and the element-mask MLP (mask_proj: FGA-BLIP2's per-token weights, used in training only).
UNUSED = re.compile(r"^(Qformer\.cls\.|vision_proj\.|text_proj\.|temp$|mask_proj\.)")
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
ANSWER_YES = 1  # the ITM head's second logit is "matched"


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """LAVIS's blip_caption processor: lower case, .!"()*#:;~ to spaces, runs of whitespace to one space, stripped,
    at most `max_words` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


# LAVIS names -> ours: whole names first; else a prefix, then renamings inside the key, in this order
NAMES = {"visual_encoder.cls_token": "vision.embeddings.class_embedding",
         "visual_encoder.pos_embed": "vision.embeddings.position_embedding",
         "visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
         "visual_encoder.patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias",
         "Qformer.bert.embeddings.word_embeddings.weight": "word_embeddings.weight",
         "Qformer.bert.embeddings.position_embeddings.weight": "position_embeddings.weight",
         "Qformer.bert.embeddings.LayerNorm.weight": "qformer.layernorm.weight",
         "Qformer.bert.embeddings.LayerNorm.bias": "qformer.layernorm.bias",
         "query_tokens": "query_tokens", "itm_head.weight": "itm_head.weight", "itm_head.bias": "itm_head.bias"}
PREFIXES = (("ln_vision.", "vision.post_layernorm."), ("visual_encoder.", "vision."), ("Qformer.bert.", "qformer."))
RENAMES = ((".blocks.", ".encoder.layers."), (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
           (".attn.proj.", ".self_attn.projection."), (".attn.", ".self_attn."),
           (".attention.self.", ".attention.attention."), (".crossattention.self.", ".crossattention.attention."))


def ours_name(key: str) -> str | None:
    """This module's name for the LAVIS tensor `key` (None for a key FGA-BLIP2 does not have)."""
    if key in NAMES:
        return NAMES[key]
    for old, new in PREFIXES:
        if key.startswith(old):
            name = new + key[len(old):]
            for a, b in RENAMES:
                name = name.replace(a, b)
            return name
    return None


def lavis_name(name: str) -> str:
    """The LAVIS key of this module's tensor `name` (the inverse of ours_name)."""
    whole = {ours: lavis for lavis, ours in NAMES.items()}
    if name in whole:
        return whole[name]
    for old, new in PREFIXES:
        if name.startswith(new):
            key = old + name[len(new):]
            for a, b in RENAMES:
                key = key.replace(b, a)
            return key
    raise KeyError(name)


def convert_checkpoint(state: dict[str, torch.Tensor], own: set[str], *, source: str) -> dict[str, torch.Tensor]:
    """Map a LAVIS FGA-BLIP2 state dict (or imscore's re-upload) to this module's keys; unknown keys are errors."""
    out, unknown = {}, []
    biases = {}
    for key, value in state.items():
        if UNUSED.match(key):
            continue
        if key == POSITION_IDS:
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise CheckpointMismatchError(f"{NAME}: {source}: {POSITION_IDS} is not 0, 1, 2, ...; the file is "
                                              f"damaged.")
        elif (new := ours_name(key)) is None:
            unknown.append(key)
        elif new.endswith((".self_attn.q_bias", ".self_attn.v_bias")):
            biases[new] = value
        else:
            out[new] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" ... and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointMismatchError(f"{NAME}: {source} holds {len(unknown)} keys FGA-BLIP2 does not have ({shown}). "
                                      f"Is this {CHECKPOINT_FILE} from the Hugging Face repo {REPO_ID}?")
    out.update(_attention_biases(biases, own))
    return out


def to_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This module's state dict under the LAVIS keys (transformers 5's one qkv bias split back into q_bias, v_bias)."""
    out = {}
    for name, value in state.items():
        if name.endswith(".self_attn.qkv.bias"):
            q, _, v = value.chunk(3)
            stem = lavis_name(name[: -len("qkv.bias")] + "q_bias")[: -len("q_bias")]
            out[stem + "q_bias"], out[stem + "v_bias"] = q, v
        else:
            out[lavis_name(name)] = value
    return out


def _attention_biases(biases: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """EVA's q_bias and v_bias as the installed transformers holds them: the two parameters (transformers 4) or one
    qkv bias with zeros for the keys (transformers 5)."""
    out = {}
    for name, value in biases.items():
        if name in own:
            out[name] = value
        elif name.endswith(".q_bias"):
            stem = name[: -len("q_bias")]
            v_bias = biases.get(stem + "v_bias")
            if v_bias is not None:
                out[stem + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
    return out


class EvalMuse(Reward):
    """FGA-BLIP2's alignment of an image with its prompt, 1 (none) to 5 (full); higher is better."""

    needs_prompt = True
    input_size = IMAGE_SIZE
    published_scale = 1.0
    scale_note = "1 to 5, EvalMuse-40k's alignment ratings (element_score's alignment_score)"

    def __init__(self, tokenizer, pil_8bit: bool = True) -> None:
        from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

        super().__init__()
        self.name = NAME
        self.tokenizer = tokenizer
        self.pil_8bit = pil_8bit
        self.vision = Blip2VisionModel(Blip2VisionConfig(**VISION))
        qconfig = Blip2QFormerConfig(**QFORMER, use_qformer_text_input=True)
        self.word_embeddings = nn.Embedding(qconfig.vocab_size, qconfig.hidden_size, padding_idx=qconfig.pad_token_id)
        self.position_embeddings = nn.Embedding(qconfig.max_position_embeddings, qconfig.hidden_size)
        self.qformer = Blip2QFormerModel(qconfig)
        self.query_tokens = nn.Parameter(torch.zeros(1, NUM_QUERIES, qconfig.hidden_size))
        self.itm_head = nn.Linear(qconfig.hidden_size, 2)
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token ids and mask [N, 2, 512] of the processed captions, untruncated (as element_score tokenises them),
        padded to the Q-Former's 512 positions; cached per prompt."""
        positions = self.position_embeddings.num_embeddings
        texts = [pre_caption(p) for p in prompts]
        ids = self.tokenizer(texts, truncation=False)["input_ids"]
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[longest]) > positions:
            raise InputError(f"{NAME}: a caption of {len(ids[longest])} tokens cannot be scored: the Q-Former has "
                             f"{positions} positions, and the official scorer does not truncate "
                             f"({texts[longest][:60]!r}...)")
        out = torch.full((len(ids), 2, positions), self.tokenizer.pad_token_id, dtype=torch.long)
        out[:, 1] = 0
        for row, seq in zip(out, ids):
            row[0, : len(seq)] = torch.tensor(seq)
            row[1, : len(seq)] = 1
        return out.to(self.device)

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [B, L] of the prompts, cut to the batch's longest caption (the padding is masked out,
        so each score is that of its caption alone)."""
        cached = self.text_features(prompts)
        length = int(cached[:, 1].sum(dim=1).max())
        return cached[:, 0, :length], cached[:, 1, :length]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """364x364 (aspect not kept; PIL bicubic on the 8-bit image), OpenAI CLIP mean/std, float32."""
        x = images if images.dtype == torch.float64 else images.float()  # float64 stays (gradient checks)
        size = (IMAGE_SIZE, IMAGE_SIZE)
        pixels = resize_pil_8bit(x, size) if self.pil_8bit else resize_bicubic(x, size)
        pixels = pixels.to(x.dtype)
        return (pixels - self.normalize.mean.to(x.dtype)) / self.normalize.std.to(x.dtype)

    def match_probabilities(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """P(matched) [B, 32 + L] at every query and caption token (element_score's itm_scores)."""
        ids, mask = self.tokens(prompts)
        pixels = self.preprocess(images).to(self.vision.embeddings.patch_embedding.weight.dtype)
        image = self.vision(pixel_values=pixels).last_hidden_state
        qdtype = self.query_tokens.dtype  # the Q-Former runs in its own dtype (float32 unless asked), as LAVIS's
        image = image.to(qdtype)
        text = self.word_embeddings(ids) + self.position_embeddings(torch.arange(ids.shape[1], device=ids.device))
        queries = self.query_tokens.expand(ids.shape[0], -1, -1)
        joint_mask = torch.cat([torch.ones(queries.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
        image_mask = torch.ones(image.shape[:2], dtype=mask.dtype, device=mask.device)
        hidden = self.qformer(query_embeds=torch.cat([queries, text.to(qdtype)], dim=1), query_length=NUM_QUERIES,
                              attention_mask=joint_mask, encoder_hidden_states=image,
                              encoder_attention_mask=image_mask).last_hidden_state
        return self.itm_head(hidden).softmax(dim=-1)[..., ANSWER_YES]

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.match_probabilities(images, prompts)[:, :NUM_QUERIES].mean(dim=1) * 4 + 1


def load_evalmuse(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: str | os.PathLike | None = None,
    base_checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    qformer_dtype: torch.dtype = torch.float32,
    pil_8bit: bool = True,
) -> EvalMuse:
    """Build FGA-BLIP2 from `checkpoint` (the authors' fga_blip2.pth or imscore's model.safetensors with its keys;
    default: the authors' hub file), over `base_checkpoint` (LAVIS's blip2_finetune_coco.pth, as the official
    loading does first; needed only when `checkpoint` lacks the ViT) and bert-base-uncased's `tokenizer` (vocab.txt).
    The ViT runs in `dtype`; the Q-Former in `qformer_dtype` (float32, as LAVIS casts the image tokens to)."""
    ckpt = resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=REPO_ID, filename=CHECKPOINT_FILE)
    vocab = resolve_file(tokenizer, reward=NAME, role="tokenizer", repo_id=ir.TOKENIZER_REPO, filename=ir.VOCAB_FILE)
    with torch.device("meta"):
        model = EvalMuse(_tokenizer(vocab), pil_8bit=pil_8bit)
    model.vision.to(dtype)
    for part in (model.word_embeddings, model.position_embeddings, model.qformer, model.itm_head):
        part.to(qformer_dtype)
    model.query_tokens = nn.Parameter(model.query_tokens.to(qformer_dtype), requires_grad=False)
    model.to_empty(device=device)
    model.normalize.reset()
    state = _lavis_state(read_checkpoint(ckpt, reward=NAME))
    source = str(ckpt)
    if base_checkpoint is not None:
        base = resolve_file(base_checkpoint, reward=NAME, role="base_checkpoint", repo_id="",
                            filename=BASE_URL.rsplit("/", 1)[1])
        state = {**_lavis_state(read_checkpoint(base, reward=NAME)), **state}
        source = f"{base} overlaid with {ckpt}"
    own = set(model.state_dict())
    converted = convert_checkpoint(state, own, source=source)
    if not any(k.startswith("vision.encoder.") for k in converted):
        raise CheckpointMismatchError(
            f"{NAME}: {source} holds no ViT weights (visual_encoder.*): LAVIS saves only the parameters it trained, "
            f"and FGA-BLIP2 trained with the ViT frozen. Pass base_checkpoint=<blip2_finetune_coco.pth> "
            f"(from {BASE_URL}), which the official code loads first, or imscore's merged re-upload as checkpoint.")
    load_state_dict_strict(model, converted, reward=NAME, source=f"{source} (LAVIS keys renamed)")
    return model


def _lavis_state(obj: dict) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS checkpoint ({"model": state, "optimizer": ..., ...}) or a plain one."""
    state = obj.get("model", obj)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _tokenizer(vocab: str | os.PathLike):
    """bert-base-uncased from `vocab` (its vocab.txt) plus BLIP-2's [DEC] token, as LAVIS's Blip2Base.init_tokenizer."""
    from transformers import BertTokenizer

    vocab = Path(vocab)
    if vocab.name != ir.VOCAB_FILE:
        raise MissingFileError(f"{NAME}: the tokenizer file must be named {ir.VOCAB_FILE} (got {vocab}); rename it.")
    tokenizer = BertTokenizer.from_pretrained(str(vocab.parent), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer
