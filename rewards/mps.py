"""MPS (Multi-dimensional Preference Score, Kwai-Kolors/MPS, CVPR 2024), the released "overall" model.

A CLIP-H (transformers `CLIPModel`) whose image tokens attend, through a 4-layer condition branch, to the prompt's
tokens that resemble the words of the "overall" condition. As the official evaluation script computes it:

    text_f, eos = text_projection(all 77 token states), text_projection(EOS state)   (no attention mask)
    cond_f      = text_projection(token states of CONDITION)
    s[i]        = max_j <text_f[i], cond_f[j]>, divided by its maximum over i   (per image: the script scores one
                                                                                  image per call)
    keep[i]     = s[i] > 0.3
    image_f     = visual_projection(every token of the vision encoder's last layer, before post_layernorm)
    feature     = branch(image_f, text_f, keep)[class token]
    score       = logit_scale.exp() * cos(feature, eos)

The branch: per layer, a cross-attention (16 query heads, one shared key/value head of 64, pre-LayerNorm, a
parallel SwiGLU feed-forward) from the image tokens to the kept prompt tokens, then a parallel self-attention +
SwiGLU block (one shared key/value head, rotary positions). docs/rewards.md says how each fact was established.

Weights: the official whole pickled model `MPS_overall_checkpoint.pth` (read with `torch.load(weights_only=True)`
through stand-in classes that only hold tensors: no code of the checkpoint runs), or imscore's safetensors
re-upload (hub repo RE-N-Y/mpsv1, the default) with the CLIP config of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
Tokenizer: that LAION repo's CLIP BPE. Images follow its CLIP processor (PIL path), as for PickScore.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .checkpoint import load_state_dict_strict, read_checkpoint
from .errors import CheckpointMismatchError, CorruptCheckpointError, UnsafeCheckpointError
from .hub import resolve_file
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Normalize, resize_shortest_then_crop

NAME = "mps"
HUB_REPO = "RE-N-Y/mpsv1"  # imscore's safetensors re-upload of the official checkpoint
HUB_FILE = "model.safetensors"
CLIP_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the tokenizer and CLIP config the official scripts load
TOKENIZER_FILES = ("vocab.json", "merges.txt")
CONTEXT_LENGTH = 77
CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, instance, "
    "texture, quantity, attributes, position, number, location, word, things."
)
MASK_THRESHOLD = 0.3  # the evaluation scripts' threshold; the model's own forward (and imscore) use 0.01
IMSCORE_PREFIX = "mps."

PathLike = str | os.PathLike


# -- the condition branch ---------------------------------------------------------------------------------------------
def _swiglu(x: torch.Tensor) -> torch.Tensor:
    """First half gated by SiLU of the second half."""
    value, gate = x.chunk(2, dim=-1)
    return value * F.silu(gate)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding with the two halves of the head dimension as the (real, imaginary) pairs."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class BranchLayer(nn.Module):
    """One layer of the condition branch: cross-attention to prompt tokens, then a parallel self-attention block."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.ff_dim = heads, head_dim, ff_dim
        inner = heads * head_dim
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_q = nn.Linear(dim, inner, bias=False)
        self.cross_kv = nn.Linear(dim, 2 * head_dim, bias=False)
        self.cross_out = nn.Linear(inner, dim, bias=False)
        self.cross_ff_in = nn.Linear(dim, 2 * ff_dim, bias=False)
        self.cross_ff_out = nn.Linear(ff_dim, dim, bias=False)
        self.self_norm = nn.LayerNorm(dim)
        self.self_in = nn.Linear(dim, inner + 2 * head_dim + 2 * ff_dim, bias=False)
        self.self_out = nn.Linear(inner, dim, bias=False)
        self.self_ff_out = nn.Linear(ff_dim, dim, bias=False)
        self.register_buffer("inv_freq", torch.empty(head_dim // 2))
        self.register_buffer("rope_cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, head_dim), persistent=False)

    def set_positions(self, angles: torch.Tensor) -> None:
        """Cosine and sine tables of the rotary angles [positions, head_dim], computed in float32."""
        self.rope_cos, self.rope_sin = angles.float().cos(), angles.float().sin()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def cross(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Image tokens attend to the kept prompt tokens (one shared key/value head); plus a parallel feed-forward."""
        h = self.cross_norm(x)
        q = self._split_heads(self.cross_q(h))
        k, v = self.cross_kv(context).unsqueeze(1).expand(-1, self.heads, -1, -1).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return x + self.cross_out(out.transpose(1, 2).flatten(2)) + self.cross_ff_out(_swiglu(self.cross_ff_in(h)))

    def parallel(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the image tokens with rotary positions, in parallel with a SwiGLU feed-forward."""
        h = self.self_norm(x)
        inner = self.heads * self.head_dim
        q, k, v, ff = self.self_in(h).split((inner, self.head_dim, self.head_dim, 2 * self.ff_dim), dim=-1)
        n = x.shape[1]
        cos, sin = self.rope_cos[:n], self.rope_sin[:n]
        q = _rotate(self._split_heads(q), cos, sin)
        k = _rotate(k, cos, sin).unsqueeze(1).expand(-1, self.heads, -1, -1)
        v = v.unsqueeze(1).expand(-1, self.heads, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.self_out(out.transpose(1, 2).flatten(2)) + self.self_ff_out(_swiglu(ff))

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.parallel(self.cross(x, context, keep))


class ConditionBranch(nn.Module):
    """The stack of branch layers; reads image tokens [B, N, D] and prompt tokens [B, T, D] with a keep mask [B, T]."""

    def __init__(self, dim: int, layers: int, heads: int, head_dim: int, ff_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BranchLayer(dim, heads, head_dim, ff_dim) for _ in range(layers))

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if layer.rope_cos.shape[0] < x.shape[1]:
                raise ValueError(f"{NAME}: {x.shape[1]} image tokens but rotary tables for {layer.rope_cos.shape[0]}")
            x = layer(x, context, keep)
        return x


# -- the reward ---------------------------------------------------------------------------------------------------
class MPS(Reward):
    """MPS "overall": logit_scale.exp() * cos(condition-branch class token, prompt EOS embedding)."""

    name = NAME
    needs_prompt = True
    published_scale = 1.0
    scale_note = "logit_scale.exp() * cosine (logit scale ~100 from the checkpoint), as the official eval script"

    def __init__(self, clip: nn.Module, branch: ConditionBranch, tokenizer, pil_8bit: bool = True) -> None:
        super().__init__()
        self.clip = clip  # not `model`: rewards.speed's class-token-only shortcut must not touch this tower
        self.branch = branch
        self.tokenizer = tokenizer
        self.input_size = clip.config.vision_config.image_size
        self.pil_8bit = pil_8bit
        self.mask_threshold = MASK_THRESHOLD
        self.condition = CONDITION
        self.normalize = Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights; inputs are cast to it."""
        return self.clip.logit_scale.dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> normalised pixels: the PIL CLIP processor's resize, floored center crop, mean/std."""
        pixels = resize_shortest_then_crop(images.float(), self.input_size, offset="floor", pil_8bit=self.pil_8bit)
        return self.normalize(pixels)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every projected token of the vision encoder's last layer (no post LayerNorm), [B, N, D]."""
        pixels = self.preprocess(images).to(self.dtype)
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).last_hidden_state)

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, max_length=CONTEXT_LENGTH, padding="max_length", truncation=True,
                             return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def _text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected states of all tokens [N, T, D], projected EOS state [N, D]); causal mask only, as official."""
        out = self.clip.text_model(input_ids=ids)
        return self.clip.text_projection(out.last_hidden_state), self.clip.text_projection(out.pooler_output)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Per prompt, packed [T+1, D+1]: token features | condition similarity s, and a last row: unit EOS | 0."""
        tokens, eos = self._text(self._tokens(prompts))
        condition, _ = self._text(self._tokens([self.condition]))
        tokens, eos, condition = tokens.float(), eos.float(), condition.float()
        best = torch.einsum("ntd,cd->ntc", tokens, condition[0]).amax(dim=-1)  # [N, T]
        similarity = best / best.amax(dim=-1, keepdim=True)  # per prompt: the script scores one image per call
        last = F.pad(F.normalize(eos, dim=-1), (0, 1))[:, None]
        return torch.cat((torch.cat((tokens, similarity[..., None]), dim=-1), last), dim=1)

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        packed = self.text_features(prompts)
        tokens, similarity, eos = packed[:, :-1, :-1], packed[:, :-1, -1], packed[:, -1, :-1]
        keep = similarity > self.mask_threshold
        feature = self.branch(self.image_tokens(images), tokens.to(self.dtype), keep)[:, 0]
        return self.clip.logit_scale.float().exp() * (F.normalize(feature.float(), dim=-1) * eos).sum(dim=-1)


# -- loading --------------------------------------------------------------------------------------------------------
def load_mps(
    *,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: PathLike | None = None,
    config: PathLike | None = None,
    tokenizer: PathLike | None = None,
    pil_8bit: bool = True,
) -> MPS:
    """Build MPS from `checkpoint`: the official MPS_overall_checkpoint.pth (a whole pickled model, read without
    running any of its code) or imscore's model.safetensors (default: the hub repo RE-N-Y/mpsv1, whose CLIP config
    is `config`, default the LAION CLIP-H config.json). `tokenizer`: a folder with vocab.json and merges.txt."""
    path = resolve_file(checkpoint, reward=NAME, role="checkpoint", repo_id=HUB_REPO, filename=HUB_FILE)
    if path.suffix == ".safetensors":
        state, pickled_config = read_checkpoint(path, reward=NAME), None
    else:
        state, pickled_config = read_official_pickle(path)
    clip_config = _clip_config(config, pickled_config)
    reward = MPS(*build_model(clip_config, state, source=str(path)), load_tokenizer(tokenizer), pil_8bit=pil_8bit)
    return reward.to(device=device, dtype=dtype)


def build_model(clip_config, state: dict[str, torch.Tensor], *, source: str) -> tuple[nn.Module, ConditionBranch]:
    """The CLIP model and the branch from a checkpoint in the official or imscore's key layout (no random init)."""
    from transformers import CLIPModel

    ours, cached_angles = convert_checkpoint(state, source=source)
    with torch.device("meta"):
        clip = CLIPModel(clip_config)
        branch = ConditionBranch(**branch_sizes(ours))
    model = nn.ModuleDict({"clip": clip, "branch": branch})
    load_state_dict_strict(model, ours, reward=NAME, source=source, assign=True)
    restore_position_ids(clip)
    positions = (clip_config.vision_config.image_size // clip_config.vision_config.patch_size) ** 2 + 1
    for i, layer in enumerate(branch.layers):
        layer.set_positions(_angles(layer.inv_freq, positions, cached_angles.get(i), source))
    return clip.float().eval(), branch.float().eval()


def branch_sizes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Width, depth, heads, head width and feed-forward width of the branch, read from its weight shapes."""
    layers = {int(m.group(1)) for k in state if (m := re.match(r"branch\.layers\.(\d+)\.", k))}
    if not layers:
        raise CheckpointMismatchError(f"{NAME}: the checkpoint holds no condition-branch weights (cross_model.*)")
    needed = [f"branch.layers.0.{n}.weight" for n in ("cross_q", "cross_kv", "cross_ff_out")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointMismatchError(f"{NAME}: the checkpoint lacks {', '.join(missing)} (official: cross_model.layers.0."
                                      "0.fn.{to_q, to_kv, ff.2}.weight); is this the MPS checkpoint?")
    q, kv, ff = (state[k].shape for k in needed)
    head_dim = kv[0] // 2
    return {"dim": q[1], "layers": len(layers), "heads": q[0] // head_dim, "head_dim": head_dim, "ff_dim": ff[1]}


def _angles(inv_freq: torch.Tensor, positions: int, cached: torch.Tensor | None, source: str) -> torch.Tensor:
    """Rotary angles [positions, head_dim]: the official code's cached table if the pickle holds one that is long
    enough (it then never recomputes), else position * inv_freq from the checkpoint's inv_freq, in float32."""
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq.float())
    angles = torch.cat((freqs, freqs), dim=-1)
    if cached is None or cached.shape[0] < positions:
        return angles
    cached = cached[:positions].float()
    if cached.shape != angles.shape or not torch.allclose(cached, angles, rtol=4e-3, atol=0.2):
        raise CheckpointMismatchError(f"{NAME}: {source} holds a rotary table (pos_emb) that does not fit its inv_freq")
    return cached


def restore_position_ids(model: nn.Module) -> None:
    """Re-create the non-persistent `position_ids` aranges of the CLIP embeddings, which the state dict lacks."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.position_ids = torch.arange(ids.shape[-1]).expand(1, -1)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{NAME}: tensors {left[:5]} were not loaded; this transformers version adds state we miss")


# -- key mapping: the official module tree (imscore prefixes it with "mps.") -> ours -----------------------------------
BRANCH_NAMES = {
    "0.fn.norm.weight": "cross_norm.weight",
    "0.fn.norm.bias": "cross_norm.bias",  # a buffer (zeros) in the official LayerNorm; loaded as it is
    "0.fn.to_q.weight": "cross_q.weight",
    "0.fn.to_kv.weight": "cross_kv.weight",
    "0.fn.to_out.weight": "cross_out.weight",
    "0.fn.ff.0.weight": "cross_ff_in.weight",
    "0.fn.ff.2.weight": "cross_ff_out.weight",
    "1.fn.norm.weight": "self_norm.weight",
    "1.fn.norm.bias": "self_norm.bias",
    "1.fn.fused_attn_ff_proj.weight": "self_in.weight",
    "1.fn.attn_out.weight": "self_out.weight",
    "1.fn.ff_out.1.weight": "self_ff_out.weight",
    "1.fn.rotary_emb.inv_freq": "inv_freq",
}
POS_EMB = re.compile(r"cross_model\.layers\.(\d+)\.1\.fn\.pos_emb$")


def convert_key(key: str) -> str | None:
    """Our name for an official (or imscore) key; None for keys we do not keep."""
    key = key.removeprefix(IMSCORE_PREFIX)
    if key.startswith("model."):
        return None if key.endswith("embeddings.position_ids") else "clip." + key[len("model."):]
    m = re.match(r"cross_model\.layers\.(\d+)\.(.+)$", key)
    if m and m.group(2) in BRANCH_NAMES:
        return f"branch.layers.{m.group(1)}.{BRANCH_NAMES[m.group(2)]}"
    return key  # unknown: kept under its own name, so strict loading names it


def convert_checkpoint(state: dict, *, source: str) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """(our state dict, cached rotary tables by layer) from an official/imscore state dict; position ids are checked."""
    ours, cached = {}, {}
    for key, value in state.items():
        bare = key.removeprefix(IMSCORE_PREFIX)
        if m := POS_EMB.match(bare):
            cached[int(m.group(1))] = value
            continue
        if bare.endswith("embeddings.position_ids"):
            if not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise CheckpointMismatchError(f"{NAME}: {key} in {source} is not 0, 1, 2, ...; the file is damaged")
            continue
        ours[convert_key(key)] = value
    return ours, cached


# -- the official pickle, read through stand-ins -----------------------------------------------------------------------
ROOT_CLASS = "trainer.models.clip_model.CLIPModel"
PICKLED_CLASSES = (  # every class a torch.save of the official model names (transformers 4.27.3, torch 2.x)
    ROOT_CLASS,
    "trainer.models.clip_model.XCLIPModel",
    *(f"trainer.models.cross_modeling.{n}" for n in (
        "Cross_model", "Residual", "CrossAttention", "ParallelTransformerBlock", "LayerNorm", "RotaryEmbedding",
        "SwiGLU")),
    *(f"transformers.models.clip.modeling_clip.{n}" for n in (
        "CLIPTextTransformer", "CLIPVisionTransformer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings", "CLIPEncoder",
        "CLIPEncoderLayer", "CLIPAttention", "CLIPMLP")),
    *(f"transformers.models.clip.configuration_clip.{n}" for n in ("CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig")),
    "transformers.activations.GELUActivation",
    "transformers.activations.QuickGELUActivation",
    "transformers.generation.configuration_utils.GenerationConfig",
    *(f"torch.nn.modules.{n}" for n in (
        "container.ModuleList", "container.Sequential", "conv.Conv2d", "linear.Linear", "linear.Identity",
        "normalization.LayerNorm", "sparse.Embedding", "activation.GELU", "activation.SiLU")),
)
PICKLED_FUNCTIONS = ("torch._C._nn.gelu", "torch.nn.functional.gelu", "torch.nn.functional.silu")


class StandIn:
    """An object of the official pickle, kept only as its pickled attributes (`state`). Unpickling creates it without
    arguments and hands it its attribute dict; any attempt to call it with arguments is refused."""

    official = "?"

    def __init__(self, *args, **kwargs) -> None:
        raise pickle.UnpicklingError(f"the checkpoint tried to call {self.official} with arguments; refused")

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state for {self.official}: {type(state).__name__}")
        self.__dict__["state"] = state


class FunctionReference:
    """Stands for a function the pickle names as an attribute value (e.g. GELU's `act`); calling it is refused."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"the checkpoint tried to call {self.name}; refused")


def _stand_ins() -> list[tuple[object, str]]:
    classes = [(type(n.rsplit(".", 1)[1], (StandIn,), {"official": n, "__module__": __name__}), n)
               for n in PICKLED_CLASSES]
    return classes + [(FunctionReference(n), n) for n in PICKLED_FUNCTIONS]


def read_official_pickle(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in the official key names, CLIP config dict) of a whole pickled MPS model; only tensors, plain
    containers and the stand-ins above are admitted, so no code of the checkpoint ever runs."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{NAME}: checkpoint {path} is empty; download it again.")
    try:
        with torch.serialization.safe_globals(_stand_ins()):
            root = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        culprit = _culprit(str(err))
        raise UnsafeCheckpointError(
            f"{NAME}: refused to load {path}: it is not the official MPS pickle, which holds only the model's classes "
            f"and tensors (torch.load(weights_only=True) said: {culprit}). A checkpoint never runs code here."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CorruptCheckpointError(
            f"{NAME}: could not read checkpoint {path} ({path.stat().st_size} bytes): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. The file is truncated or not a torch checkpoint; "
            "download it again."
        ) from err
    if getattr(root, "official", None) != ROOT_CLASS:
        raise CheckpointMismatchError(
            f"{NAME}: {path} holds a {getattr(root, 'official', type(root).__name__)}, not the official whole "
            f"{ROOT_CLASS}; pass MPS_overall_checkpoint.pth or imscore's model.safetensors."
        )
    return _module_tensors(root, ""), _pickled_config(root, path)


def _culprit(message: str) -> str:
    """The line of torch's weights-only error that names what was refused."""
    words = ("GLOBAL", "tried to call", "Can only", "unrecognized function", "unexpected pickled")
    lines = [line.strip().removeprefix("WeightsUnpickler error: ") for line in message.splitlines()]
    return next((line for line in lines if any(w in line for w in words)), lines[0] if lines else "")


def _module_tensors(module: StandIn, prefix: str) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a pickled module tree under their dotted names (non-persistent buffers too)."""
    state = module.state
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if isinstance(tensor, torch.Tensor):
                out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, StandIn):
            out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


CONFIG_KEYS = {
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "layer_norm_eps", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id"),
    "vision": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "layer_norm_eps", "hidden_act"),
}


def _pickled_config(root: StandIn, path: Path) -> dict:
    """The CLIP config the pickled model was built with, as a CLIPConfig dict."""
    model = (root.state.get("_modules") or {}).get("model")
    config = getattr(model, "state", {}).get("config")
    fields = _attributes(config)
    if not fields or "text_config" not in fields:
        raise CheckpointMismatchError(f"{NAME}: {path} holds no CLIP config under model.config")
    out = {f"{tower}_config": {k: v for k, v in _attributes(fields[f"{tower}_config"]).items() if k in keys}
           for tower, keys in CONFIG_KEYS.items()}
    out["projection_dim"] = fields.get("projection_dim")
    out["logit_scale_init_value"] = fields.get("logit_scale_init_value", 2.6592)
    return out


def _attributes(obj) -> dict:
    return obj.state if isinstance(obj, StandIn) else obj if isinstance(obj, dict) else {}


def _clip_config(config: PathLike | None, pickled: dict | None):
    """transformers CLIPConfig: from the pickle if it came with one, else from config.json (default: the LAION repo)."""
    from transformers import CLIPConfig

    if pickled is not None and config is None:
        return CLIPConfig(**pickled)
    path = resolve_file(config, reward=NAME, role="config", repo_id=CLIP_REPO, filename="config.json")
    fields = json.loads(path.read_text())
    return CLIPConfig(**{k: v for k, v in fields.items() if k in ("text_config", "vision_config", "projection_dim",
                                                                    "logit_scale_init_value")})


def load_tokenizer(source: PathLike | None):
    """The CLIP BPE tokenizer (vocab.json + merges.txt) of the LAION CLIP-H repo, or a local folder holding them."""
    from transformers import CLIPTokenizer

    folder = Path(source).parent if source is not None and Path(source).is_file() else source
    files = [resolve_file(folder, reward=NAME, role="tokenizer", repo_id=CLIP_REPO, filename=name)
             for name in TOKENIZER_FILES]
    tokenizer = CLIPTokenizer.from_pretrained(str(files[0].parent))
    tokenizer.model_max_length = CONTEXT_LENGTH
    return tokenizer

