"""Opt-in speed-ups of a reward's gradient: `rewards.load(name, fast=True)` or `rewards.load(name, compile=True)`.

fast: the same function, computed with less work; scores equal the default path's up to float rounding.
    * open_clip image towers (HPS, CLIP, aesthetic) run self-attention as one fused qkv projection and one
      `scaled_dot_product_attention` call on strided views, without nn.MultiheadAttention's layout copies;
    * image towers whose score reads only the class token (open_clip token pooling, transformers' CLIP vision in
      PickScore) run their last block for that token only: its MLP, output projection and queries skip the
      other 256 tokens (2.5% of ViT-H/14's FLOPs at 224 px, 3.5% of ViT-L/14's), in the forward and backward.
compile: fast, plus `torch.compile` of every repeated transformer block on the image path ("regional"
    compilation: all blocks of a tower share one compiled graph per input shape and dtype, so compiling costs
    about one block's time). It fuses LayerNorms, GELUs, residual adds and casts, and removes most of eager
    PyTorch's per-op overhead; scores differ from eager by kernel rounding. `compile` may be a dict of
    `torch.compile` options, e.g. {"mode": "max-autotune-no-cudagraphs"} or {"dynamic": False}.
recompute: memory for time, the same function: each repeated block keeps only its input for the backward and
    recomputes its activations there (activation checkpointing, `torch.utils.checkpoint`, non-reentrant), so a
    gradient through a large scorer (HPSv3's 7B decoder, VQAScore's 11B) holds one block's activations instead of
    all of them, for about one more forward. Combines with `fast` and `compile`.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Reward


def optimize(reward: Reward, *, fast: bool = False, compile: bool | dict = False, recompute: bool = False) -> Reward:
    """Apply the speed-ups in place (see the module docstring) and return `reward`; `compile` implies `fast`."""
    options = _compile_options(compile)
    for part in _parts(reward):
        if fast or options is not None:
            _restructure(part)
        if recompute:
            for block in recomputed_blocks(part):
                _recompute_in_backward(block)
        if options is not None:
            for block in compiled_blocks(part):
                block.compile(**options)
    return reward


def _compile_options(compile: bool | dict) -> dict | None:
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        return dict(compile)
    raise TypeError(f"compile must be True, False or a dict of torch.compile options, got {compile!r}")


def _parts(reward: Reward) -> Iterator[Reward]:
    parts = getattr(reward, "parts", None)  # a Mixture
    yield from (parts if isinstance(parts, nn.ModuleList) else [reward])


# -- where the blocks are -----------------------------------------------------------------------------------------
def _open_clip_visual(reward: Reward) -> nn.Module | None:
    """The open_clip VisionTransformer of HPS, CLIP or aesthetic rewards (None for other rewards or towers)."""
    visual = getattr(reward, "visual", None)
    if visual is None and hasattr(reward, "model"):
        visual = getattr(reward.model, "visual", None)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return visual if isinstance(blocks, nn.ModuleList) else None


def _hf_vision_layers(reward: Reward) -> nn.ModuleList | None:
    """The encoder layers of a transformers CLIP image tower (PickScore)."""
    vision = getattr(getattr(reward, "model", None), "vision_model", None)
    if vision is None:
        return None
    for name, module in vision.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            return module
    return None


def compiled_blocks(reward: Reward, class_token: bool = False) -> list[nn.Module]:
    """The repeated blocks on `reward`'s image path that `compile` compiles; a class-token-only block stays eager
    (`class_token=True` lists it too)."""
    blocks: list[nn.Module] = []
    visual = _open_clip_visual(reward)
    if visual is not None:
        blocks += list(visual.transformer.resblocks)
    layers = _hf_vision_layers(reward)
    if layers is not None:
        blocks += list(layers)
    # ImageReward: ViT and cross-attending BERT; MPS: its CLIP image tower (every token is read) and condition branch;
    # HPSv3: Qwen2-VL's vision blocks and decoder layers; imscore's heads and Aesthetic Shadow: their transformers image
    # towers (layer paths of transformers 4 and 5); VQAScore and EvalMuse: their transformers image towers, and
    # EvalMuse's Q-Former
    for owner, attr in (("vision", "blocks"), ("vision", "encoder.layers"), ("qformer", "encoder.layer"),
                        ("text", "encoder.layer"), ("clip", "vision_model.encoder.layers"),
                        ("branch", "layers"), ("text", "layers"), ("backbone", "vision_model.encoder.layers"),
                        ("backbone", "encoder.layers"), ("backbone", "encoder.layer"), ("model", "vit.layers"),
                        ("model", "vit.encoder.layer")):
        blocks += _module_list(reward, owner, attr)
    return [b for b in blocks if class_token or not isinstance(b, (ClassTokenBlock, ClassTokenLayer))]


def _module_list(reward: Reward, owner: str, path: str) -> list[nn.Module]:
    """The blocks of the ModuleList at reward.<owner>.<path> (dotted), or none where the reward has no such list."""
    module = getattr(reward, owner, None)
    for name in path.split("."):
        module = getattr(module, name, None)
    return list(module) if isinstance(module, nn.ModuleList) else []


def recomputed_blocks(reward: Reward) -> list[nn.Module]:
    """The repeated blocks whose activations `recompute` drops: compile's blocks and the class-token-only ones, and
    VQAScore's T5 encoder and decoder blocks (its T5 runs without a key-value cache)."""
    blocks = compiled_blocks(reward, class_token=True)
    for owner, attr in (("t5", "encoder.block"), ("t5", "decoder.block")):
        blocks += [b for b in _module_list(reward, owner, attr) if all(b is not seen for seen in blocks)]
    return blocks


def _recompute_in_backward(block: nn.Module) -> None:
    """Make `block` save only its inputs for the backward and recompute its activations there (idempotent)."""
    if "forward" not in vars(block):  # a partial, not a closure: a deep copy of the reward rebinds it to the copy
        block.forward = functools.partial(_forward_recomputed, block)


def _forward_recomputed(block: nn.Module, *args, **kwargs):
    forward = type(block).forward.__get__(block)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


# -- fast: restructured towers --------------------------------------------------------------------------------------
def _restructure(reward: Reward) -> None:
    visual = _open_clip_visual(reward)
    if visual is not None:
        _fast_open_clip(visual)
    layers = _hf_vision_layers(reward)
    if layers is not None and not isinstance(layers[-1], ClassTokenLayer) and _is_hf_clip_layer(layers[-1]):
        layers[-1] = ClassTokenLayer(layers[-1])


def _fast_open_clip(visual: nn.Module) -> None:
    blocks = visual.transformer.resblocks
    for block in blocks:
        if _is_plain_block(block):
            block.attn = SelfAttention(block.attn)
    last = blocks[-1]
    if _reads_class_token_only(visual) and type(getattr(last, "attn", None)) is SelfAttention:
        blocks[-1] = last if isinstance(last, ClassTokenBlock) else ClassTokenBlock(last)


def _reads_class_token_only(visual: nn.Module) -> bool:
    """Whether an open_clip VisionTransformer's output depends on its last block's class token alone."""
    pooled_by_token = getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
    return pooled_by_token and not getattr(visual, "output_tokens", False)


def _is_plain_block(block: nn.Module) -> bool:
    """An open_clip ResidualAttentionBlock doing batch-first self-attention with a stock nn.MultiheadAttention."""
    attn = getattr(block, "attn", None)
    return (
        type(block).__name__ == "ResidualAttentionBlock"
        and not hasattr(block, "ln_1_kv")
        and type(attn) is nn.MultiheadAttention
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


def _is_hf_clip_layer(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "scale")) and all(
        hasattr(layer, n) for n in ("layer_norm1", "layer_norm2", "mlp")
    )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] (a view)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's batch-first self-attention as one qkv projection and one SDPA call.

    It holds the same parameters under the same names (in_proj_weight, in_proj_bias, out_proj), so state dicts
    are unchanged; `attend(x, queries=1)` computes the outputs of the first token only.
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads = mha.num_heads
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None):
        """The nn.MultiheadAttention call open_clip makes: (output, None); `key`/`value` must be `query` or None."""
        if (key is not None and key is not query) or (value is not None and value is not query) or need_weights:
            raise ValueError("SelfAttention computes self-attention only, without attention weights")
        return self.attend(query, attn_mask=attn_mask), None

    def attend(self, x: torch.Tensor, queries: int | None = None, attn_mask: torch.Tensor | None = None):
        """Self-attention output of x [B, N, W] for all tokens, or for the first `queries` tokens only."""
        batch, _, width = x.shape
        w, b = self.in_proj_weight, self.in_proj_bias
        if queries is None:
            q, k, v = self._split(F.linear(x, w, b), 3)
        else:
            q = _heads(F.linear(x[:, :queries], w[:width], None if b is None else b[:width]), self.num_heads)
            k, v = self._split(F.linear(x, w[width:], None if b is None else b[width:]), 2)
            attn_mask = None if attn_mask is None else attn_mask[..., :queries, :]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # nn.MultiheadAttention masks where True, SDPA attends where True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, width))

    def _split(self, packed: torch.Tensor, parts: int) -> torch.Tensor:
        """[B, N, parts*H*D] -> [parts, B, H, N, D] (strided views: SDPA reads them without copies)."""
        return packed.unflatten(-1, (parts, self.num_heads, -1)).permute(2, 0, 3, 1, 4)


class _Adopting(nn.Module):
    """A module that takes over another's children under the same names, so the state dict is unchanged."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, child in module.named_children():
            self.add_module(name, child)


class ClassTokenBlock(_Adopting):
    """An open_clip ResidualAttentionBlock (with SelfAttention) that outputs the class token only, [B, 1, W]."""

    def forward(self, q_x: torch.Tensor, k_x=None, v_x=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        x = q_x[:, :1] + self.ls_1(self.attn.attend(self.ln_1(q_x), queries=1, attn_mask=mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class ClassTokenLayer(_Adopting):
    """A transformers CLIPEncoderLayer that outputs the class token only, [B, 1, W] (PickScore's last layer)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        attn = self.self_attn
        x = self.layer_norm1(hidden_states)
        q = _heads(attn.q_proj(x[:, :1]), attn.num_heads)
        k, v = _heads(attn.k_proj(x), attn.num_heads), _heads(attn.v_proj(x), attn.num_heads)
        mask = None if attention_mask is None else attention_mask[..., :1, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        h = hidden_states[:, :1] + attn.out_proj(out.transpose(1, 2).flatten(2))
        return h + self.mlp(self.layer_norm2(h))
