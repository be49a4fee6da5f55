"""Reward checkpoints with random weights, written locally in the official formats (no downloads).

Random weights cost exactly what trained ones cost, so the benchmarks time the real architectures on these
files, and the tests load the same files to check parity with the official implementations. Each writer
produces the layout of the official release:

    random_clip_state_dict(model, seed)      open_clip CLIP weights with correlated towers (HPS, the CLIP reward)
    write_hps(path, arch, seed)              HPS_v2.1_compressed.pt: {'state_dict': open_clip state dict}, float16
    write_pickscore(folder, spec, seed)      PickScore_v1: config.json + model.safetensors or pytorch_model.bin
    write_clip_tokenizer(folder)             the LAION processor's vocab.json + merges.txt (CLIP BPE)
    random_openai_clip_state(seed, arch)     OpenAI CLIP weights (open_clip's key names), rounded to float16
    write_head(path, seed)                   sac+logos+ava1-l14-linearMSE.pth, the aesthetic MLP
    write_imagereward(folder, prompts)       ImageReward.pt (the original BLIP keys) + med_config.json + vocab.txt
    write_hf_clip_vision(folder, state, arch) an OpenAI CLIP image tower in transformers' layout
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

LOGIT_SCALE = math.log(100.0)  # CLIP's and PickScore_v1's learned logit scale is ~100
HPS_FILE = "HPS_v2.1_compressed.pt"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_SCORE_MEAN = 5.0  # where the random aesthetic head puts scores, like real ones (about 4-7)

# CLIP-H as in yuvalkirstain/PickScore_v1's config.json (transformers layout).
PICKSCORE_CONFIG = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
    projection_dim=1024,
)
PICKSCORE_SMALL = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=32,
)
MED_CONFIG = {  # THUDM/ImageReward med_config.json (BLIP's BERT-base "med" config)
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
IMAGEREWARD_HEAD_GAIN = 2.0  # head init gain (the official 1/769 std makes every random-weight score equal)
BLIP_EMBED_DIM = 256  # width of BLIP's contrastive projections, which ImageReward.pt holds and the score never reads


def pool_sampler(largest: int, generator: torch.Generator):
    """randn(shape) drawing a random slice of one pool of normal numbers: fast for a billion weights."""
    pool = torch.randn(largest + 2**20, generator=generator)

    def randn(shape: torch.Size) -> torch.Tensor:
        start = int(torch.randint(0, pool.numel() - shape.numel() + 1, (1,), generator=generator))
        return pool[start : start + shape.numel()].view(shape)

    return randn


# -- open_clip: HPS and the CLIP reward ---------------------------------------------------------------------
SHARED_KEYS = ("visual.ln_post.bias", "visual.proj", "ln_final.bias", "text_projection")


def random_clip_state_dict(model: nn.Module, seed: int, cosine: float = 0.3) -> dict[str, torch.Tensor]:
    """Random fp16 weights for an open_clip CLIP with unit-gain layers, plus one direction shared by image and
    text embeddings so cosines sit near `cosine` instead of 0 (pure random towers give scores of +-0.02, where a
    relative error means nothing). The final LayerNorm biases are mapped onto that direction by a rank-one
    change of each projection. Only the shapes of `model`'s state dict are read (meta tensors will do)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, ref in model.state_dict().items():
        shape, (owner, leaf) = ref.shape, ("." + key).rsplit(".", 2)[-2:]
        noise = (torch.rand(shape, generator=g) * 2 - 1) * math.sqrt(3)  # unit variance, cheaper than randn
        if key == "logit_scale":
            value = torch.full(shape, LOGIT_SCALE)
        elif owner.startswith("ln"):  # ln_1, ln_2, ln_pre, ln_post, ln_final
            value = 1.0 + 0.05 * noise if leaf == "weight" else 0.5 * noise
        elif leaf.endswith("bias"):
            value = 0.02 * noise
        elif key == "token_embedding.weight":
            value = 0.02 * noise
        elif key in ("visual.proj", "text_projection"):
            value = noise * shape[0] ** -0.5
        elif "positional_embedding" in key or "class_embedding" in key:
            value = noise * shape[-1] ** -0.5
        else:
            value = noise * math.prod(shape[1:]) ** -0.5
        state[key] = value if key in SHARED_KEYS else value.half()  # halve now: peak memory stays one fp16 copy
    dim = state["text_projection"].shape[1]
    shared = torch.randn(dim, generator=g)
    shared *= math.sqrt(cosine / (1 - cosine) * dim) / shared.norm()
    for bias_key, proj_key in (SHARED_KEYS[:2], SHARED_KEYS[2:]):
        bias, proj = state[bias_key], state[proj_key]
        state[proj_key] = proj + torch.outer(bias, shared - bias @ proj) / bias.dot(bias)
    return {k: v.half() for k, v in state.items()}  # a no-op for all but SHARED_KEYS


def write_hps(path: Path, arch: str | dict = "ViT-H-14", seed: int = 0) -> Path:
    """An HPS-style checkpoint: torch.save({'state_dict': ...}) of an open_clip model `arch`, float16."""
    from rewards import openclip

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": random_clip_state_dict(openclip.build_model(arch), seed=seed)}, path)
    return path


def write_open_clip_folder(folder: Path, cfg: dict, state: dict[str, torch.Tensor], preprocess: dict) -> Path:
    """A folder in open_clip's own layout (what `create_model("local-dir:...")` reads): config + weights."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


# -- PickScore: transformers CLIPModel ------------------------------------------------------------------------
def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of OpenAI CLIP's BPE (as in the LAION repo), rebuilt from open_clip's merges."""
    import open_clip.tokenizer as oct

    folder.mkdir(parents=True, exist_ok=True)
    gz = Path(oct.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_config(spec: dict):
    """A transformers CLIPConfig of `spec` with PickScore's logit scale."""
    from transformers import CLIPConfig

    return CLIPConfig(**spec, logit_scale_init_value=LOGIT_SCALE)


def random_clip_state(config, seed: int = 0, shared: float = 1.1) -> dict[str, torch.Tensor]:
    """Random CLIP weights at sensible scales (fan-in linears, LayerNorms near identity), logit scale log(100).

    Pure random towers give cosines near 0, so scores near 0 where a relative error means little. Both pooled
    outputs get a LayerNorm bias along a direction that the projections map onto one shared unit vector u
    (`shared` sets its weight), so prompt and image embeddings have cosine ~0.2 and scores ~20, as real
    PickScores do. Values are slices of one random pool, which is much faster than drawing 1e9 numbers.
    """
    from transformers import CLIPModel

    with torch.device("meta"):
        shapes = CLIPModel(config).state_dict()
    g = torch.Generator().manual_seed(seed)
    randn = pool_sampler(max(m.numel() for m in shapes.values()), g)
    state = {}
    for key, meta in shapes.items():
        if key == "logit_scale":
            state[key] = torch.tensor(LOGIT_SCALE)
        elif "norm" in key:
            state[key] = 1.0 + 0.1 * randn(meta.shape) if key.endswith("weight") else 0.1 * randn(meta.shape)
        elif key.endswith("bias"):
            state[key] = 0.02 * randn(meta.shape)
        elif "embedding" in key and meta.ndim < 4:
            state[key] = (0.02 if meta.ndim == 2 else 0.2) * randn(meta.shape)
        else:
            state[key] = randn(meta.shape) * meta[0].numel() ** -0.5  # fan-in scaling (linears, patch conv)
    u = nn.functional.normalize(torch.randn(config.projection_dim, generator=g), dim=0)
    towers = (("vision_model.post_layernorm", "visual_projection"), ("text_model.final_layer_norm", "text_projection"))
    for norm, proj in towers:
        width = state[f"{norm}.bias"].numel()
        d = nn.functional.normalize(torch.randn(width, generator=g), dim=0)
        state[f"{norm}.bias"] = state[f"{norm}.bias"] + 0.5 * width**0.5 * d
        state[f"{proj}.weight"] = state[f"{proj}.weight"] + shared * torch.outer(u, d)
    return state


def write_pickscore(folder: Path, spec: dict, seed: int = 0, fmt: str = "safetensors") -> Path:
    """A PickScore_v1-style folder: config.json + model.safetensors (or pytorch_model.bin, which torch.save
    streams: safetensors builds the whole 4 GB file in memory first)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = clip_config(spec)
    config.to_json_file(str(folder / "config.json"))
    state = random_clip_state(config, seed)
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


# -- the aesthetic predictor: OpenAI CLIP ViT-L/14 + an MLP head ----------------------------------------------
class OfficialHead(nn.Module):
    """The MLP of improved-aesthetic-predictor's simple_inference.py (dropouts, no activations)."""

    def __init__(self) -> None:
        super().__init__()
        sizes = [768, 1024, 128, 64, 16]
        drops = [0.2, 0.2, 0.1]
        layers: list[nn.Module] = []
        for i in range(4):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < 3:
                layers.append(nn.Dropout(drops[i]))
        layers.append(nn.Linear(16, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def write_head(path: Path, seed: int = 0) -> Path:
    """A random head saved as the original file is: torch.save of a plain state dict.

    Scores of a random head would sit near its bias with a tiny spread; the last layer is rescaled so that
    the affine map it amounts to has a slope of 40 along the embedding and an offset of 5 (like real scores)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    head = OfficialHead()
    with torch.no_grad():
        slope = torch.eye(768)
        for i in (0, 2, 4, 6, 7):
            slope = head.layers[i].weight @ slope
        head.layers[7].weight.mul_(40.0 / slope.norm())
        head.layers[7].bias.add_(HEAD_SCORE_MEAN - head(torch.zeros(1, 768)).item())
    torch.save(head.state_dict(), path)
    return path


def random_openai_clip_state(seed: int = 0, arch: str | dict = "ViT-L-14") -> dict[str, torch.Tensor]:
    """Random CLIP weights in OpenAI's state-dict layout (open_clip keeps the same keys), rounded to float16 like
    OpenAI's release, whose weights are float16, and stored as float32 like open_clip's hub files."""
    from rewards import openclip

    shapes = openclip.build_model(arch, quick_gelu=True).state_dict()
    randn = pool_sampler(max(m.numel() for m in shapes.values()), torch.Generator().manual_seed(seed))
    state = {}
    for key, meta in shapes.items():
        if key == "logit_scale":
            value = torch.tensor(LOGIT_SCALE)
        elif ".ln_" in key or key.startswith("ln_"):
            value = 1.0 + 0.1 * randn(meta.shape) if key.endswith("weight") else 0.1 * randn(meta.shape)
        elif key.endswith("bias"):
            value = 0.02 * randn(meta.shape)
        elif "embedding" in key:
            value = (0.02 if meta.ndim == 2 else 0.2) * randn(meta.shape)
        elif key.endswith("proj") or key == "text_projection":  # used as x @ proj: fan-in is dim 0
            value = randn(meta.shape) * meta.shape[0] ** -0.5
        else:  # linear (out, in) and conv (out, in, k, k) weights: fan-in is the rest
            value = randn(meta.shape) * meta[0].numel() ** -0.5
        state[key] = value.half().float()
    return state


def hf_clip_vision(state: dict[str, torch.Tensor], arch: str | dict) -> tuple[object, dict[str, torch.Tensor]]:
    """(CLIPVisionConfig, state dict) of the image tower of OpenAI-layout CLIP weights in transformers' names,
    the conversion that made openai/clip-vit-large-patch14 (q/k/v split from in_proj, projection transposed)."""
    from transformers import CLIPVisionConfig

    from rewards import openclip

    vision = openclip.model_config(arch)["vision_cfg"]
    width, layers = vision["width"], vision["layers"]
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)), num_hidden_layers=layers,
        num_attention_heads=width // vision.get("head_width", 64), image_size=vision["image_size"],
        patch_size=vision["patch_size"], projection_dim=state["visual.proj"].shape[1], hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    return config, _hf_vision_keys(state, layers)


def _hf_vision_keys(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    v, hf = "visual.", "vision_model."
    out = {
        f"{hf}embeddings.class_embedding": state[f"{v}class_embedding"],
        f"{hf}embeddings.position_embedding.weight": state[f"{v}positional_embedding"],
        f"{hf}embeddings.patch_embedding.weight": state[f"{v}conv1.weight"],
        "visual_projection.weight": state[f"{v}proj"].t(),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for leaf in ("weight", "bias"):
            out[f"{hf}{theirs}.{leaf}"] = state[f"{v}{ours}.{leaf}"]
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(layers):
        src, dst = f"{v}transformer.resblocks.{i}.", f"{hf}encoder.layers.{i}."
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
        for part, leaf in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
            for name, chunk in zip("qkv", state[f"{src}attn.{part}"].chunk(3)):
                out[f"{dst}self_attn.{name}_proj.{leaf}"] = chunk
    return {k: t.contiguous() for k, t in out.items()}


def write_hf_clip_vision(folder: Path, state: dict[str, torch.Tensor], arch: str | dict) -> Path:
    """A transformers `CLIPVisionModelWithProjection` folder (config.json + model.safetensors) of the image tower
    of OpenAI-layout CLIP weights: the same weights in the layout of openai/clip-vit-large-patch14."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config, hf_state = hf_clip_vision(state, arch)
    config.to_json_file(str(folder / "config.json"))
    save_file(hf_state, str(folder / "model.safetensors"))
    return folder


# -- ImageReward ----------------------------------------------------------------------------------------------
def write_vocab(path: Path, prompts: list[str]) -> Path:
    """A 30522-entry BERT vocabulary with bert-base-uncased's special-token ids, covering `prompts`."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'()-:;\""
    words = sorted({w for p in prompts for w in re.findall(r"[a-z0-9]+", p.lower())})
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(chars) + [f"##{c}" for c in chars] + [w for w in words if w not in chars]
    tokens += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(tokens))]
    assert len(tokens) == 30522 and len(set(tokens)) == 30522
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n")
    return path


def random_imagereward_state(med_config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the ORIGINAL ImageReward.pt keys (blip.visual_encoder.*, blip.text_encoder.*,
    blip.{vision,text}_proj.*, mlp.layers.*): this package's ImageReward shapes mapped back to BLIP's names.
    The ViT size is that of `rewards.imagereward.VISION` when called."""
    from rewards import imagereward as ir

    with torch.device("meta"):
        shapes = ir.ImageReward(med_config, tokenizer=None).state_dict()
    randn = pool_sampler(max(m.numel() for m in shapes.values()), torch.Generator().manual_seed(seed))
    state = {_original_key(k): _random_value(k, meta.shape, randn) for k, meta in shapes.items()}
    vision, text = ir.VISION["embed_dim"], med_config["hidden_size"]
    for name, width in (("vision_proj", vision), ("text_proj", text)):
        state[f"blip.{name}.weight"] = randn(torch.Size([BLIP_EMBED_DIM, width])) * width**-0.5
        state[f"blip.{name}.bias"] = torch.zeros(BLIP_EMBED_DIM)
    state[ir.POSITION_IDS] = torch.arange(med_config.get("max_position_embeddings", 512))[None]
    return state


def _original_key(key: str) -> str:
    from rewards import imagereward as ir

    for old, new in ir.PREFIXES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    _, index, leaf = key.split(".")  # head.{j}.{weight,bias}
    original = {j: i for i, j in ir.HEAD_INDICES.items()}[int(index)]
    return f"mlp.layers.{original}.{leaf}"


def _random_value(key: str, shape: torch.Size, randn) -> torch.Tensor:
    if "norm" in key.lower():  # LayerNorm weights near 1, biases small
        return 1.0 + 0.1 * randn(shape) if key.endswith("weight") else 0.1 * randn(shape)
    if key.startswith("head."):
        return randn(shape) * (IMAGEREWARD_HEAD_GAIN * shape[-1] ** -0.5 if key.endswith("weight") else 0.1)
    if key.endswith("bias"):
        return 0.02 * randn(shape)
    if key.endswith(("cls_token", "pos_embed")) or "embeddings" in key:
        return 0.02 * randn(shape)
    return randn(shape) * shape[1:].numel() ** -0.5  # linears (out, in) and the patch conv: fan-in


def write_imagereward(folder: Path, prompts: list[str], seed: int = 0, med_config: dict | None = None) -> dict:
    """THUDM/ImageReward's files in `folder`: ImageReward.pt, med_config.json, and a vocab.txt covering `prompts`."""
    from rewards import imagereward as ir

    folder.mkdir(parents=True, exist_ok=True)
    med_config = dict(med_config or MED_CONFIG)
    (folder / ir.CONFIG_FILE).write_text(json.dumps(med_config, indent=2))
    write_vocab(folder / ir.VOCAB_FILE, prompts)
    torch.save(random_imagereward_state(med_config, seed), folder / ir.CHECKPOINT_FILE)
    return {"checkpoint": folder / ir.CHECKPOINT_FILE, "config": folder / ir.CONFIG_FILE,
            "tokenizer": folder / ir.VOCAB_FILE}


# -- VQAScore: CLIP-FlanT5-XXL (t2v_metrics) ----------------------------------------------------------------------
FLANT5_XXL = dict(  # google/flan-t5-xxl's config.json, as zhiqiulin/clip-flant5-xxl's T5 fields
    d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64, vocab_size=32128,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    tie_word_embeddings=False, layer_norm_epsilon=1e-6, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0,
    eos_token_id=1)
CLIP_MM = dict(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", use_mm_proj=True, model_type="clip_t5",
               architectures=["CLIPT5ForConditionalGeneration"])
T5_PIECES = 32000  # FlanT5's SentencePiece vocabulary; 100 sentinel tokens follow (32,100 tokens in all)


def write_t5_tokenizer(folder: Path, prompts: list[str]) -> Path:
    """A FlanT5-shaped tokenizer (T5's special ids, 32,000 unigram pieces covering `prompts` and the VQAScore
    question, 100 sentinels) saved as tokenizer.json, which VQAScore reads."""
    from transformers import T5Tokenizer

    from rewards import vqascore as vq

    words = sorted({w for p in prompts + [vq.question(""), "Yes"] for w in re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]",
                                                                                        p)})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -5.0) for w in words] + [(w, -6.0) for w in words]
    chars = [chr(c) for c in range(33, 127)]
    pieces += [(c, -8.0) for c in chars if (c, -6.0) not in pieces]
    pieces += [(f"▁filler{i}", -12.0) for i in range(T5_PIECES - len(pieces))]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def clip_t5_state_shapes(t5: dict, vision: dict) -> dict[str, torch.Size]:
    """Shapes of every tensor of zhiqiulin/clip-flant5-xxl's checkpoint under its ORIGINAL keys (CLIPT5's vision
    tower with all its layers, mm_projector.{0,2}, T5's keys and the four names of the shared embedding)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        tower = CLIPVisionModel(CLIPVisionConfig(**vision)).state_dict()
        text = T5ForConditionalGeneration(T5Config(**t5)).state_dict()
    shapes = {"vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v.shape
              for k, v in tower.items() if not k.endswith("position_ids")}
    width = t5["d_model"]
    shapes.update({"mm_projector.0.weight": torch.Size([width, vision["hidden_size"]]),
                   "mm_projector.0.bias": torch.Size([width]), "mm_projector.2.weight": torch.Size([width, width]),
                   "mm_projector.2.bias": torch.Size([width])})
    shapes.update({k: v.shape for k, v in text.items()})
    shapes["embed_tokens.weight"] = shapes["shared.weight"]
    return shapes


def write_clip_flant5(folder: Path, t5: dict, vision: dict, seed: int = 0, shard_bytes: int = 5 << 30) -> Path:
    """A zhiqiulin/clip-flant5-xxl-style folder: config.json + pytorch_model-XXXXX-of-YYYYY.bin shards (bfloat16,
    the shared embedding stored once under its four names) + pytorch_model.bin.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = clip_t5_state_shapes(t5, vision)
    config = {**t5, **CLIP_MM, "mm_hidden_size": vision["hidden_size"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    randn = pool_sampler(max(s.numel() for s in shapes.values()), torch.Generator().manual_seed(seed))
    aliases = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embed_tokens.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, shape in shapes.items():
        if key in aliases:
            continue
        value = _clip_t5_value(key, shape, randn).bfloat16()
        if size and size + value.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.numel() * 2
        if key == "shared.weight":
            shards[-1].update({alias: value for alias in aliases})
    names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        torch.save(shard, folder / name)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": sum(2 * s.numel() for k, s in shapes.items() if k not in aliases)},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return folder


def _clip_t5_value(key: str, shape: torch.Size, randn) -> torch.Tensor:
    if "norm" in key.lower():  # LayerNorms (CLIP) and T5's RMSNorms: weights near 1
        return 1.0 + 0.1 * randn(shape) if key.endswith("weight") else 0.1 * randn(shape)
    if key.endswith("bias"):
        return 0.02 * randn(shape)
    if "embed" in key or "shared" in key or "relative_attention_bias" in key:
        return randn(shape)
    return randn(shape) * shape[1:].numel() ** -0.5  # linears (out, in) and the patch conv: fan-in


def write_vqascore(folder: Path, prompts: list[str], t5: dict, vision: dict, seed: int = 0) -> dict:
    """VQAScore's three sources: the CLIP-FlanT5 folder, FlanT5's tokenizer, and the CLIP folder's config.json."""
    from transformers import CLIPVisionConfig

    clip = folder / "clip-vit-large-patch14-336"
    clip.mkdir(parents=True, exist_ok=True)
    CLIPVisionConfig(**vision).to_json_file(str(clip / "config.json"))
    return {"checkpoint": write_clip_flant5(folder / "clip-flant5-xxl", t5, vision, seed),
            "tokenizer": write_t5_tokenizer(folder / "flan-t5-xxl", prompts), "vision": clip}
