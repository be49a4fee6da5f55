"""MPS files with random weights in the two released layouts (no downloads, no official code needed):

    write_mps(folder, spec, seed)   MPS_overall_checkpoint.pth: a whole pickled model, as torch.save(model) of the
                                    official trainer.models.clip_model.CLIPModel writes it (float16), and
                                    model.safetensors: imscore's re-upload (RE-N-Y/mpsv1), the same tensors under
                                    "mps." + the official names; plus the CLIP config.json and the tokenizer files

The pickle is written with stand-in objects that pickle under the official class names (the names a torch.save of
the official model holds under transformers 4.27.3: trainer.models.*, transformers.models.clip.*, torch.nn.modules.*,
the config classes and GELU's function), each with the attribute dicts an nn.Module pickles (_parameters, _buffers,
_modules, ...). So the file has the official structure while neither the official code nor transformers 4 is needed.
"""

from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from benchmarks import checkpoints as ck

# The released model: CLIP-H (PickScore's sizes, the LAION CLIP-H config) and Cross_model(dim=1024, layer_num=4,
# heads=16) with its defaults dim_head=64, ff_mult=4.
MPS_CONFIG = {"clip": ck.PICKSCORE_CONFIG, "branch": {"layers": 4, "heads": 16, "head_dim": 64, "ff_mult": 4}}
MPS_SMALL = {"clip": {**ck.PICKSCORE_SMALL, "projection_dim": 64},
             "branch": {"layers": 2, "heads": 2, "head_dim": 16, "ff_mult": 4}}
PICKLE_FILE = "MPS_overall_checkpoint.pth"
SAFETENSORS_FILE = "model.safetensors"
HOOK_DICTS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")
CLIP_CLASSES = {"CLIPTextModel": "CLIPTextTransformer", "CLIPVisionModel": "CLIPVisionTransformer"}  # 5.x -> 4.27


class Pickled:
    """Pickles as the official object `name`: GLOBAL name, NEWOBJ without arguments, BUILD with `attributes`."""

    def __init__(self, name: str, attributes: dict) -> None:
        self.name, self.attributes = name, attributes


class Function:
    """A function of the official environment held as an attribute value (pickled as a GLOBAL reference)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs):  # callable, so that a test can write a payload that calls it
        raise TypeError(f"{self.name} is only a name here")


class _OfficialPickler(pickle._Pickler):
    """The pure-Python pickler, writing `Pickled` objects and `Function`s under their official names without
    importing them (pickle's own save_global would look the names up in this environment)."""

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, (Pickled, Function)):
            if id(obj) in self.memo:
                return self.write(self.get(self.memo[id(obj)][0]))
            module, _, qualname = obj.name.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
            if isinstance(obj, Pickled):
                self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
            self.memoize(obj)
            if isinstance(obj, Pickled):
                self.save(obj.attributes)
                self.write(pickle.BUILD)
            return None
        return super().save(obj, save_persistent_id)


OFFICIAL_PICKLE = types.SimpleNamespace(__name__="official_pickle", Pickler=_OfficialPickler, dump=pickle.dump)


def module(name: str, params: dict | None = None, buffers: dict | None = None, children: dict | None = None,
           non_persistent: tuple = (), **attributes) -> Pickled:
    """A pickled nn.Module: the attribute dicts torch 2.x pickles, plus `attributes`."""
    state = {"training": False,
             "_parameters": OrderedDict((k, None if v is None else nn.Parameter(v, requires_grad=False))
                                     for k, v in (params or {}).items()),
             "_buffers": OrderedDict(buffers or {}), "_non_persistent_buffers_set": set(non_persistent)}
    state.update({hook: OrderedDict() for hook in HOOK_DICTS})
    state["_modules"] = OrderedDict(children or {})
    return Pickled(name, {**state, **attributes})


# -- random weights ---------------------------------------------------------------------------------------------------
def random_mps_state(spec: dict, seed: int = 0, pos_emb: bool = False) -> dict[str, torch.Tensor]:
    """Random float16 weights under the official names (model.* = transformers 4.27 CLIPModel keys with position_ids,
    cross_model.* = the condition branch, inv_freq as the code computes it); `pos_emb` adds the rotary tables the
    official code caches (a non-persistent buffer that a pickled, used model holds)."""
    config = ck.clip_config(spec["clip"])
    state = {f"model.{k}": v for k, v in ck.random_clip_state(config, seed).items()}
    # Without PickScore's shared direction in the text tokens' final LayerNorm bias: prompt tokens then resemble the
    # condition's tokens by varying amounts, so the condition mask keeps some tokens and drops others, as trained.
    # Token identity, not position, dominates the text tokens (PickScore's writer does the reverse).
    g = torch.Generator().manual_seed(seed + 3)
    bias, tokens, positions = (f"model.text_model.{k}" for k in (
        "final_layer_norm.bias", "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"))
    state[bias] = 0.1 * torch.randn(state[bias].shape, generator=g)
    state[tokens] = torch.randn(state[tokens].shape, generator=g)
    state[positions] = 0.02 * torch.randn(state[positions].shape, generator=g)
    state["model.text_model.embeddings.position_ids"] = torch.arange(config.text_config.max_position_embeddings)[None]
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    state["model.vision_model.embeddings.position_ids"] = torch.arange(patches + 1)[None]
    g.manual_seed(seed + 7)
    b = spec["branch"]
    dim, inner, head, ff = config.projection_dim, b["heads"] * b["head_dim"], b["head_dim"], dim_ff(config, b)

    def linear(out: int, fan_in: int) -> torch.Tensor:
        return torch.randn(out, fan_in, generator=g) * fan_in**-0.5

    for i in range(b["layers"]):
        c, s = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        state.update({
            f"{c}norm.weight": 1 + 0.1 * torch.randn(dim, generator=g), f"{c}norm.bias": torch.zeros(dim),
            f"{c}to_q.weight": linear(inner, dim), f"{c}to_kv.weight": linear(2 * head, dim),
            f"{c}to_out.weight": linear(dim, inner), f"{c}ff.0.weight": linear(2 * ff, dim),
            f"{c}ff.2.weight": linear(dim, ff),
            f"{s}norm.weight": 1 + 0.1 * torch.randn(dim, generator=g), f"{s}norm.bias": torch.zeros(dim),
            f"{s}fused_attn_ff_proj.weight": linear(inner + 2 * head + 2 * ff, dim),
            f"{s}attn_out.weight": linear(dim, inner), f"{s}ff_out.1.weight": linear(dim, ff),
            f"{s}rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head)),
        })
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}  # the release is float16
    if pos_emb:
        for i in range(b["layers"]):
            inv = state[f"cross_model.layers.{i}.1.fn.rotary_emb.inv_freq"]
            freqs = torch.outer(torch.arange(patches + 1, dtype=inv.dtype), inv)  # in float16, as training ran
            state[f"cross_model.layers.{i}.1.fn.pos_emb"] = torch.cat((freqs, freqs), dim=-1)
    return state


def dim_ff(config, branch: dict) -> int:
    """Feed-forward width of the branch: ff_mult * dim."""
    return branch["ff_mult"] * config.projection_dim


# -- the official whole-model pickle ------------------------------------------------------------------------------
def official_tree(spec: dict, state: dict[str, torch.Tensor]) -> Pickled:
    """The pickled trainer.models.clip_model.CLIPModel holding `state` (official key names)."""
    root = "trainer.models."
    clip = _clip_tree(ck.clip_config(spec["clip"]), state)
    layers = {str(i): _branch_layer(state, f"cross_model.layers.{i}.", spec["branch"])
              for i in range(spec["branch"]["layers"])}
    branch = module(f"{root}cross_modeling.Cross_model",
                    children={"layers": module("torch.nn.modules.container.ModuleList", children=layers)})
    return module(f"{root}clip_model.CLIPModel", children={"model": clip, "cross_model": branch})


def _clip_tree(config, state: dict[str, torch.Tensor]) -> Pickled:
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    tree = _hf_module(model, "model.", state)
    text = {k: getattr(config.text_config, k) for k in
            ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "layer_norm_eps", "hidden_act")}
    vision = {k: getattr(config.vision_config, k) for k in
              ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
               "image_size", "patch_size", "layer_norm_eps", "hidden_act")}
    cfg = "transformers.models.clip.configuration_clip."
    tree.attributes["config"] = Pickled(f"{cfg}CLIPConfig", {
        "text_config": Pickled(f"{cfg}CLIPTextConfig", {**text, "bos_token_id": 0, "pad_token_id": 1,
                                                         "eos_token_id": 2, "transformers_version": "4.27.3",
                                                         "torch_dtype": None}),
        "vision_config": Pickled(f"{cfg}CLIPVisionConfig", vision),
        "projection_dim": config.projection_dim, "logit_scale_init_value": 2.6592, "torch_dtype": torch.float16,
        "architectures": ["CLIPModel"], "transformers_version": "4.27.3",
    })
    tree.attributes.update(name_or_path="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", warnings_issued={},
                           generation_config=None, projection_dim=config.projection_dim)
    return tree


def _hf_module(mod: nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> Pickled:
    """A transformers 5 CLIP module as transformers 4.27.3 pickled it (class names, persistent position ids)."""
    cls = type(mod)
    if cls.__name__ == "CLIPModel":
        name = "trainer.models.clip_model.XCLIPModel"  # the official subclass of transformers' CLIPModel
    elif cls.__module__.startswith("transformers.models.clip"):
        name = "transformers.models.clip.modeling_clip." + CLIP_CLASSES.get(cls.__name__, cls.__name__)
    else:
        name = f"{cls.__module__}.{cls.__qualname__}"
    params = {k: state[prefix + k] for k in mod._parameters if prefix + k in state}
    buffers = {k: state[prefix + k] for k in mod._buffers if prefix + k in state}
    children = {k: _hf_module(c, f"{prefix}{k}.", state) for k, c in mod._modules.items()}
    extra = {"act": Function("torch._C._nn.gelu")} if cls.__name__ == "GELUActivation" else {}
    return module(name, params, buffers, children, **extra)


def _branch_layer(state: dict, prefix: str, branch: dict) -> Pickled:
    nn_ = "torch.nn.modules."
    cm = "trainer.models.cross_modeling."

    def linear(key: str) -> Pickled:
        weight = state[prefix + key]
        return module(f"{nn_}linear.Linear", {"weight": weight, "bias": None}, in_features=weight.shape[1],
                      out_features=weight.shape[0])

    def norm(key: str) -> Pickled:
        weight, bias = state[f"{prefix}{key}.weight"], state[f"{prefix}{key}.bias"]
        return module(f"{cm}LayerNorm", {"weight": weight}, {"bias": bias})  # the bias is a buffer there

    cross = module(f"{cm}CrossAttention", children={
        "norm": norm("0.fn.norm"), "context_norm": module(f"{nn_}linear.Identity"),
        "to_q": linear("0.fn.to_q.weight"), "to_kv": linear("0.fn.to_kv.weight"),
        "to_out": linear("0.fn.to_out.weight"),
        "ff": module(f"{nn_}container.Sequential", children={
            "0": linear("0.fn.ff.0.weight"), "1": module(f"{cm}SwiGLU"), "2": linear("0.fn.ff.2.weight")}),
    }, heads=branch["heads"], scale=branch["head_dim"] ** -0.5)
    rotary = module(f"{cm}RotaryEmbedding", buffers={"inv_freq": state[f"{prefix}1.fn.rotary_emb.inv_freq"]})
    inner, head = branch["heads"] * branch["head_dim"], branch["head_dim"]
    ff = state[f"{prefix}1.fn.ff_out.1.weight"].shape[1]
    parallel = module(f"{cm}ParallelTransformerBlock", buffers={"pos_emb": state.get(f"{prefix}1.fn.pos_emb")},
                      non_persistent=("pos_emb",), children={
        "norm": norm("1.fn.norm"), "rotary_emb": rotary,
        "fused_attn_ff_proj": linear("1.fn.fused_attn_ff_proj.weight"), "attn_out": linear("1.fn.attn_out.weight"),
        "ff_out": module(f"{nn_}container.Sequential",
                         children={"0": module(f"{cm}SwiGLU"), "1": linear("1.fn.ff_out.1.weight")}),
    }, fused_dims=(inner, head, head, 2 * ff), heads=branch["heads"], scale=head**-0.5)
    residual = f"{cm}Residual"
    return module(f"{nn_}container.ModuleList", children={
        "0": module(residual, children={"fn": cross}), "1": module(residual, children={"fn": parallel})})


def write_mps(folder: Path, spec: dict = MPS_SMALL, seed: int = 0, pos_emb: bool = False) -> dict[str, Path]:
    """The official pickle, imscore's safetensors (same tensors), the LAION CLIP config.json and tokenizer files."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = random_mps_state(spec, seed, pos_emb=pos_emb)
    torch.save(official_tree(spec, state), folder / PICKLE_FILE, pickle_module=OFFICIAL_PICKLE)
    persistent = {f"mps.{k}": v.contiguous() for k, v in state.items()
                  if not k.endswith(("position_ids", "pos_emb"))}  # what a transformers >= 4.31 state dict holds
    save_file(persistent, str(folder / SAFETENSORS_FILE))
    ck.clip_config(spec["clip"]).to_json_file(str(folder / "config.json"))
    ck.write_clip_tokenizer(folder)
    return {"pickle": folder / PICKLE_FILE, "safetensors": folder / SAFETENSORS_FILE, "config": folder / "config.json",
            "tokenizer": folder}

