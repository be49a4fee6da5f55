"""imscore 0.0.11's rewards, built offline on the benchmark's files: the SAME weights our rewards load.

imscore's constructors fetch from the Hugging Face hub (open_clip's LAION ViT-H-14, yuvalkirstain/PickScore_v1,
openai/clip-vit-large-patch14, bert-base-uncased) and its usual entry point, `Class.from_pretrained(repo)`, then
loads imscore's own converted weights. With no network, each builder runs imscore's constructor with the names
it fetches through replaced, in imscore's module only, by the same loader pointed at the local official-format
file, then loads what the constructor did not (the aesthetic MLP, ImageReward's whole state dict) strictly:

    hpsv2.1      imscore.hps.model.create_model_and_transforms -> open_clip's own, pretrained=HPS_v2.1_compressed.pt
    pickscore    imscore.pickscore.model.CLIPModel.from_pretrained -> transformers' own, on the PickScore_v1 folder;
                 AutoProcessor.from_pretrained -> a CLIPProcessor over the same CLIP BPE files ours reads; under
                 transformers 5, get_image/text_features return a ModelOutput that imscore (written for transformers
                 4) divides by its norm: they are wrapped to return its `pooler_output`, the tensor 4.x returned
    aesthetic    imscore.aesthetic.model.CLIPVisionModelWithProjection.from_pretrained -> transformers' own, on the
                 ViT-L/14 file converted to transformers' layout; the MLP from sac+logos+ava1-l14-linearMSE.pth
    mps          imscore.mps.model.XCLIPModel.from_pretrained -> imscore's own XCLIPModel built from the CLIP
                 config.json beside the weights; CrossModel -> imscore's own with the sizes of the file's condition
                 branch (the full model's are the ones imscore hard-codes); AutoTokenizer -> the same CLIP BPE files
                 ours reads (with the LAION tokenizer's model_max_length, 77); then imscore's safetensors re-upload
                 (RE-N-Y/mpsv1 layout, written by benchmarks.checkpoints_mps) loaded strictly
    imagereward  imscore.imreward.model.BertTokenizer.from_pretrained -> the local vocab.txt (plus the
                 `additional_special_tokens_ids` attribute imscore reads, gone from transformers 5 tokenizers); the
                 modules built on the meta device, then ImageReward.pt loaded strictly (its keys are imscore's keys)

Every load is strict (a missing, unexpected or mis-shaped key is an error), so both sides hold identical weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch
from torch import nn

from rewards.checkpoint import read_checkpoint

IMSCORE_REWARDS = ("hpsv2.1", "pickscore", "imagereward", "aesthetic", "mps", "vqascore", "aesthetic-shadow",
                   "cyclereward", "evalmuse", "pickscore-siglip", "pickscore-clip", "imreward-overall_rating-clip",
                   "imreward-overall_rating-siglip", "imreward-overall_rating-dinov2")


def available() -> bool:
    """Whether imscore is installed."""
    try:
        import imscore  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    """imscore's version, or None if it is not installed."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("imscore")
    except Exception:
        return None


def load(name: str, files: dict, *, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """imscore's model for reward `name` on the benchmark's files, frozen, in eval mode, on `device` in `dtype`."""
    if not available():
        raise ImportError("the imscore comparison needs imscore 0.0.11: pip install imscore==0.0.11")
    builders: dict[str, Callable[..., nn.Module]] = {
        "hpsv2.1": _hps, "pickscore": _pickscore, "aesthetic": _aesthetic, "imagereward": _imagereward, "mps": _mps,
        "vqascore": _vqascore, "aesthetic-shadow": _shadow, "cyclereward": _cyclereward,
        "evalmuse": _evalmuse,
        **{n: _own_head for n in IMSCORE_REWARDS if n.startswith(("pickscore-", "imreward-"))},
    }
    if name not in builders:
        raise KeyError(f"imscore has no implementation of {name!r} in this benchmark; it has {', '.join(builders)}")
    builder = builders[name]
    model = builder(files, torch.device(device)) if builder is not _own_head else _own_head(files, name)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def score(model: nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """imscore's documented call, `model.score(pixels, prompts)`, as one score per image. imscore's VQAScore returns
    exp(-loss) with the loss averaged over the whole batch: one number per batch, repeated for each image here (the
    work timed is the batch's forward and backward all the same)."""
    out = model.score(images, prompts).reshape(-1)
    return out.expand(len(images)) if out.numel() == 1 else out


# -- builders -------------------------------------------------------------------------------------------------------
def _hps(files: dict, device: torch.device) -> nn.Module:
    import open_clip
    import imscore.hps.model as module

    checkpoint = str(files["sources"]["hpsv2.1"]["checkpoint"])

    def create_model_and_transforms(name, pretrained=None, **kwargs):
        with torch.device(device):  # random init on the target device; the checkpoint overwrites every weight
            return open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device, **kwargs)

    with mock.patch.object(module, "create_model_and_transforms", create_model_and_transforms):
        return module.HPSv2()


def _pickscore(files: dict, device: torch.device) -> nn.Module:
    import imscore.pickscore.model as module
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder, tokenizer = files["sources"]["pickscore"]["checkpoint"], files["extra"]["clip_tokenizer"]
    text = CLIPTokenizer.from_pretrained(str(tokenizer))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=text)
    replacements = {
        "CLIPModel": _Redirect(CLIPModel, folder),
        "AutoProcessor": mock.Mock(from_pretrained=mock.Mock(return_value=processor)),
    }
    with mock.patch.multiple(module, **replacements):
        scorer = module.PickScorer()
    for name in ("get_image_features", "get_text_features"):
        setattr(scorer.model, name, _returning_tensor(getattr(scorer.model, name)))
    return scorer


def _returning_tensor(method: Callable) -> Callable:
    """imscore 0.0.11 was written for transformers 4, whose CLIPModel.get_*_features return the projected embeddings;
    transformers 5 returns a ModelOutput holding them as `pooler_output`. Same computation, the old return type."""

    def call(*args, **kwargs):
        out = method(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return call


def _aesthetic(files: dict, device: torch.device) -> nn.Module:
    import imscore.aesthetic.model as module
    from transformers import CLIPVisionModelWithProjection

    vision = _Redirect(CLIPVisionModelWithProjection, files["extra"]["hf_clip_vision"])
    with mock.patch.object(module, "CLIPVisionModelWithProjection", vision):
        scorer = module.LAIONAestheticScorer()
    head = files["sources"]["aesthetic"]["checkpoint"]
    _load_strict(scorer.mlp, read_checkpoint(head, reward="imscore aesthetic"), str(head))
    return scorer


def _imagereward(files: dict, device: torch.device) -> nn.Module:
    import imscore.imreward.model as module
    from transformers import BertTokenizer

    paths = files["sources"]["imagereward"]
    vocab = Path(paths["tokenizer"]).parent
    tokenizer = mock.Mock(from_pretrained=lambda _repo_id: _blip_tokenizer(BertTokenizer, vocab))
    with mock.patch.object(module, "BertTokenizer", tokenizer), torch.device("meta"):
        scorer = module.ImageReward()  # 447M parameters: no random init, every tensor comes from the checkpoint
    _load_strict(scorer, read_checkpoint(paths["checkpoint"], reward="imscore imagereward"), str(paths["checkpoint"]),
                 assign=True)
    return scorer


def _mps(files: dict, device: torch.device) -> nn.Module:
    import imscore.mps.model as module
    from transformers import CLIPConfig, CLIPTokenizer

    from rewards import mps

    paths = files["extra"]["mps_imscore"]
    state = read_checkpoint(paths["checkpoint"], reward="imscore mps")
    config = CLIPConfig.from_json_file(str(paths["config"]))
    tokenizer = CLIPTokenizer.from_pretrained(str(paths["tokenizer"]))
    tokenizer.model_max_length = mps.CONTEXT_LENGTH  # the LAION tokenizer_config.json's value
    ours = mps.branch_sizes(mps.convert_checkpoint(state, source=str(paths["checkpoint"]))[0])
    sizes = {"dim": ours["dim"], "layer_num": ours["layers"], "heads": ours["heads"], "dim_head": ours["head_dim"],
             "ff_mult": ours["ff_dim"] // ours["dim"]}
    xclip, cross = module.XCLIPModel, module.CrossModel
    replacements = {
        "XCLIPModel": mock.Mock(from_pretrained=lambda _repo_id: xclip(config)),
        "CrossModel": lambda **_hard_coded: cross(**sizes),
        "AutoTokenizer": mock.Mock(from_pretrained=lambda *args, **kwargs: tokenizer),
    }
    with mock.patch.multiple(module, **replacements), torch.device("meta"):
        scorer = module.MPS()  # no random init: every tensor comes from the file
    scorer.load_state_dict(state, strict=True, assign=True)
    mps.restore_position_ids(scorer)
    return scorer


def _vqascore(files: dict, device: torch.device) -> nn.Module:
    """imscore's VQAScore with the CLIP-FlanT5 checkpoint's tensors. Its constructor's hub loads (google/flan-t5-xxl,
    openai/clip-vit-large-patch14-336) become the same architectures built on the meta device from the written
    configs, its tokenizer the written FlanT5 tokenizer; the checkpoint's keys are then mapped onto imscore's (t5.*,
    v.*, mm_projector.*; embedding and lm_head rows cut to the 32,100 tokens imscore resizes to) and loaded strictly.
    imscore's projector is fixed at Linear(1024, 4096), GELU, Linear(4096, 4096): smoke runs re-size it."""
    import imscore.vqascore.model as module
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration
    from transformers import T5Tokenizer

    paths = files["sources"]["vqascore"]
    config = json.loads((Path(paths["checkpoint"]) / "config.json").read_text())
    t5 = T5Config(**{k: v for k, v in config.items() if not k.startswith("mm_") and k not in ("model_type",
                                                                                               "architectures")})
    vision = CLIPVisionConfig.from_pretrained(str(paths["vision"]))
    replacements = {
        "T5ForConditionalGeneration": mock.Mock(from_pretrained=lambda _: _on_meta(T5ForConditionalGeneration, t5)),
        "T5Tokenizer": mock.Mock(from_pretrained=lambda _: T5Tokenizer.from_pretrained(str(paths["tokenizer"]))),
        "CLIPVisionModel": mock.Mock(from_pretrained=lambda _: CLIPVisionModel(vision)),
        "CLIPImageProcessor": mock.Mock(from_pretrained=lambda _: CLIPImageProcessor()),
    }
    with mock.patch.multiple(module, **replacements):
        scorer = module.VQAScore()  # the 11B T5 on the meta device; CLIP and the projector (0.3B) on the CPU
    width = config["d_model"]
    if scorer.mm_projector[0].weight.shape != (width, vision.hidden_size):
        scorer.mm_projector = nn.Sequential(nn.Linear(vision.hidden_size, width), nn.GELU(), nn.Linear(width, width))
    state = _imscore_vqa_state(scorer, paths["checkpoint"])
    _load_strict(scorer, state, str(paths["checkpoint"]), assign=True)
    scorer.t5.set_input_embeddings(scorer.t5.shared)
    return scorer


def _cyclereward(files: dict, device: torch.device) -> nn.Module:
    """imscore's CycleReward: its BLIP with the local vocabulary, built on the meta device, then the release
    checkpoint's state dict loaded strictly (its keys are imscore's; the text position ids buffer aside)."""
    import imscore.cyclereward.blip as blip
    import imscore.cyclereward.model as module
    from transformers import BertTokenizer

    paths = files["sources"]["cyclereward"]
    tokenizer = mock.Mock(from_pretrained=lambda _: _blip_tokenizer(BertTokenizer, paths["tokenizer"].parent))
    with mock.patch.object(blip, "BertTokenizer", tokenizer), torch.device("meta"):
        scorer = module.CycleReward()
    state = read_checkpoint(paths["checkpoint"], reward="imscore cyclereward")
    own = scorer.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    _load_strict(scorer, state, str(paths["checkpoint"]), assign=True)
    return scorer


def _evalmuse(files: dict, device: torch.device) -> nn.Module:
    """imscore's EvalMuse with the local vocabulary (plus BLIP-2's [DEC]), built on the meta device, then the
    authors' fga_blip2.pth state dict loaded strictly (its keys are imscore's; `temp` aside)."""
    import imscore.evalmuse.model as module

    from rewards.evalmuse import _tokenizer

    paths = files["sources"]["evalmuse"]
    tokenizer = _tokenizer(paths["tokenizer"])
    with mock.patch.object(module.BertTokenizer, "from_pretrained", lambda *a, **k: tokenizer), torch.device("meta"):
        scorer = module.EvalMuse()
    state = read_checkpoint(paths["checkpoint"], reward="imscore evalmuse")
    state = {k: v for k, v in state.get("model", state).items() if k != "temp"}
    _load_strict(scorer, state, str(paths["checkpoint"]), assign=True)
    return scorer


def _shadow(files: dict, device: torch.device) -> nn.Module:
    """imscore's ShadowAesthetic on the benchmark's folder; its score (the two logits) softmaxed to P(hq), our score."""
    import imscore.aesthetic.model as module
    from transformers import ViTForImageClassification

    folder = files["sources"]["aesthetic-shadow"]["checkpoint"]
    with mock.patch.object(module, "ViTForImageClassification", _Redirect(ViTForImageClassification, folder)):
        scorer = module.ShadowAesthetic()
    labels = {v: int(k) for k, v in scorer.model.config.id2label.items()}
    return _HighQuality(scorer, labels["hq"])


class _HighQuality(nn.Module):
    """imscore's ShadowAesthetic with a score of one number per image: the softmax probability of 'hq'."""

    def __init__(self, scorer: nn.Module, index: int) -> None:
        super().__init__()
        self.scorer, self.index = scorer, index

    def score(self, pixels: torch.Tensor, prompts=None) -> torch.Tensor:
        logits = self.scorer.score(pixels, prompts)
        return logits.reshape(len(pixels), -1).float().softmax(-1)[:, self.index]


def _own_head(files: dict, name: str) -> nn.Module:
    """imscore's own rating and preference models: their from_pretrained on the benchmark's repo folder, whose
    config names the local base folder as `tag` (imscore's constructor loads the base from there, then the repo)."""
    from imscore.aesthetic.model import CLIPAestheticScorer, Dinov2AestheticScorer, SiglipAestheticScorer
    from imscore.preference.model import CLIPPreferenceScorer, SiglipPreferenceScorer

    classes = {"pickscore-siglip": SiglipPreferenceScorer, "pickscore-clip": CLIPPreferenceScorer, "clip":
               CLIPAestheticScorer, "siglip": SiglipAestheticScorer, "dinov2": Dinov2AestheticScorer}
    cls = classes.get(name) or classes[name.rsplit("-", 1)[-1]]
    with transformers_4_siglip_tower():
        return cls.from_pretrained(str(files["sources"][name]["checkpoint"]))


@contextlib.contextmanager
def transformers_4_siglip_tower() -> Iterator[None]:
    """imscore 0.0.11's SiglipAestheticScorer reads `SiglipVisionModel(...).vision_model`, the inner transformer of
    transformers 4; under transformers 5 the model is that transformer. Give it the old nesting back (same modules,
    the old `vision_model.` level in the keys), in imscore's module only; under transformers 4, change nothing."""
    import imscore.aesthetic.model as module
    from transformers import SiglipVisionModel

    if _nests_vision_model():
        yield
        return

    class Nested(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.vision_model, self.config = inner, inner.config

        def forward(self, **kwargs):
            return self.vision_model(**kwargs)

    factory = mock.Mock(from_pretrained=lambda tag, **kw: Nested(SiglipVisionModel.from_pretrained(tag, **kw)))
    with mock.patch.object(module, "SiglipVisionModel", factory):
        yield


def _nests_vision_model() -> bool:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                                                     num_attention_heads=1))
    return hasattr(model, "vision_model")


def _on_meta(cls: type, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def _imscore_vqa_state(scorer: nn.Module, folder: Path) -> dict:
    """The checkpoint's shards under imscore's keys (t5.*, v.*, mm_projector.*): vocabulary rows cut to imscore's
    size, one tensor for all names of the shared embedding. Keys imscore lacks are left out; the strict load then
    checks that every tensor of imscore's model was given."""
    from rewards.vqascore import EMBEDDING_ALIASES, VISION_PREFIX

    index = json.loads((Path(folder) / "pytorch_model.bin.index.json").read_text())
    own = scorer.state_dict()
    tower = "v.vision_model." if any(k.startswith("v.vision_model.") for k in own) else "v."  # transformers 4 / 5
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        for key, value in read_checkpoint(Path(folder) / shard, reward="imscore vqascore").items():
            if key.startswith(VISION_PREFIX + "vision_model."):
                target = tower + key.removeprefix(VISION_PREFIX + "vision_model.")
            elif key.startswith("mm_projector."):
                target = key
            elif key in EMBEDDING_ALIASES:
                target = "t5.shared.weight"
            else:
                target = "t5." + key
            if target in own:
                state[target] = value[: own[target].shape[0]] if target in VOCAB_ROWS else value
    for alias in ("t5.encoder.embed_tokens.weight", "t5.decoder.embed_tokens.weight"):
        if alias in own:
            state[alias] = state["t5.shared.weight"]
    return state


VOCAB_ROWS = ("t5.shared.weight", "t5.lm_head.weight")  # imscore resizes FlanT5's 32,128 rows to 32,100


def _blip_tokenizer(cls: type, folder: Path):
    """bert-base-uncased from the local vocab with BLIP's two added tokens. imscore then reads
    `additional_special_tokens_ids`, which transformers 5 tokenizers no longer have: it is set to the same ids."""
    tokenizer = cls.from_pretrained(str(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if not hasattr(tokenizer, "additional_special_tokens_ids"):
        tokenizer.additional_special_tokens_ids = tokenizer.convert_tokens_to_ids(["[ENC]"])
    return tokenizer


class _Redirect:
    """Stands in for a transformers class in imscore's module: `from_pretrained(<hub id>)` loads `folder` instead,
    with the real class; weights must fit exactly."""

    def __init__(self, cls: type, folder: Path) -> None:
        self.cls, self.folder = cls, str(folder)

    def from_pretrained(self, _repo_id: str, *args, **kwargs):
        model, info = self.cls.from_pretrained(self.folder, *args, output_loading_info=True, **kwargs)
        kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
        bad = {k: sorted(v) for k, v in info.items() if k in kinds and v}
        if bad:
            raise RuntimeError(f"{self.cls.__name__} from {self.folder} does not fit its weights: {bad}")
        return model


def _load_strict(module: nn.Module, state: dict, source: str, assign: bool = False) -> None:
    own = set(module.state_dict())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise RuntimeError(f"imscore's {type(module).__name__} does not fit {source}: "
                           f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    module.load_state_dict(state, strict=True, assign=assign)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"imscore's {type(module).__name__}: tensors {left[:5]} were not loaded from {source}")


@contextlib.contextmanager
def tiny_evalmuse(vit_depth: int, qformer_layers: int) -> Iterator[None]:
    """While active, imscore's EvalMuse has `vit_depth` ViT blocks and `qformer_layers` Q-Former layers (its widths
    are fixed), like ours under rewards.evalmuse.VISION / QFORMER (smoke runs only)."""
    if not available():
        yield
        return
    import imscore.evalmuse.model as module
    from transformers import BertConfig

    vit = module.VisionTransformer
    config = mock.Mock(from_dict=lambda d: BertConfig.from_dict({**d, "num_hidden_layers": qformer_layers}))
    with mock.patch.multiple(module, VisionTransformer=lambda **kw: vit(**{**kw, "depth": vit_depth}),
                             BertConfig=config):
        yield


@contextlib.contextmanager
def tiny_imagereward(vision: dict, med: dict) -> Iterator[None]:
    """While active, imscore's ImageReward and CycleReward have the ViT sizes `vision` (embed_dim, depth, num_heads)
    and BERT `med` overrides, like ours under `rewards.imagereward.VISION` (smoke runs only)."""
    if not available():
        yield
        return
    import imscore.imreward.model as module
    from transformers import BertConfig

    blip, vit = module.BLIP, module.VisionTransformer

    def small_blip(image_size: int = 224, **kwargs):
        return blip(image_size=image_size, vision_width=vision["embed_dim"], **kwargs)

    def small_vit(**kwargs):
        return vit(**{**kwargs, "depth": vision["depth"], "num_heads": vision["num_heads"]})

    import imscore.cyclereward.blip as cycle_blip
    import imscore.cyclereward.model as cycle

    cycle_bl, cycle_vit = cycle.BLIP, cycle_blip.VisionTransformer

    def small_cycle_blip(image_size: int = 224, **kwargs):
        return cycle_bl(image_size=image_size, vision_width=vision["embed_dim"], **kwargs)

    def small_cycle_vit(**kwargs):
        return cycle_vit(**{**kwargs, "depth": vision["depth"], "num_heads": vision["num_heads"]})

    config = mock.Mock(from_dict=lambda d: BertConfig.from_dict({**d, **med}))
    with contextlib.ExitStack() as stack:  # CycleReward (imscore.cyclereward) is built from the same BLIP parts
        stack.enter_context(mock.patch.multiple(module, BLIP=small_blip, VisionTransformer=small_vit,
                                                BertConfig=config))
        stack.enter_context(mock.patch.object(cycle, "BLIP", small_cycle_blip))
        stack.enter_context(mock.patch.multiple(cycle_blip, VisionTransformer=small_cycle_vit, BertConfig=config))
        yield
