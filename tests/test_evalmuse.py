"""EvalMuse (FGA-BLIP2): parity with imscore's port on the official preprocessing, the LAVIS key mapping, the caption
processor, gradients, and the errors a user can act on.

The authors' scorer is a fork of LAVIS vendored in their GitHub repository, not an installable package, so the oracle
is imscore 0.0.11's `EvalMuse` network (its module names are LAVIS's, so it reads the same file strictly), fed what the
authors' eval.py feeds theirs: the image resized to 364x364 by PIL (bicubic) from its 8-bit version, and the caption
after LAVIS's blip_caption processor. Both models are the real architecture cut to 2 ViT blocks and 2 Q-Former
layers (full width), so the test stays short.
"""

from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from benchmarks import imscore_models
from benchmarks.checkpoints import write_vocab
from rewards import CheckpointMismatchError, InputError, MissingFileError
from rewards import evalmuse as em
from tests.parity import (TARGET_MEAN_DIFF_OVER_STD, assert_gradient_matches_central_difference,
                          assert_rejects_bad_inputs, photographs)

imscore_model = pytest.importorskip("imscore.evalmuse.model")

LAYERS = 2
CAPTIONS = [  # as users write them; the processed forms (<= 32 tokens) are what imscore is given
    "An astronaut in a white space suit, studio portrait.",
    "A cup of coffee on a saucer; seen from above!!",
    "a cat (ginger) on a sofa",
    "Black-and-white photo of a cameraman: tripod, lawn",
    "TINY astronaut ~ 35mm film",
    "coffee, \"portrait\" crop",
]


@contextlib.contextmanager
def _small() -> Iterator[None]:
    """Ours and imscore's EvalMuse with LAYERS ViT blocks and Q-Former layers (full widths)."""
    with mock.patch.dict(em.VISION, num_hidden_layers=LAYERS), mock.patch.dict(em.QFORMER, num_hidden_layers=LAYERS), \
            imscore_models.tiny_evalmuse(LAYERS, LAYERS):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """A random FGA-BLIP2 in the authors' format (a LAVIS checkpoint {"model": state}), built by imscore's module."""
    work = tmp_path_factory.mktemp("evalmuse")
    vocab = write_vocab(work / "vocab.txt", [em.pre_caption(c) for c in CAPTIONS])
    tokenizer = em._tokenizer(vocab)
    with _small(), mock.patch.object(imscore_model.BertTokenizer, "from_pretrained", lambda *a, **k: tokenizer):
        oracle = imscore_model.EvalMuse()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "LayerNorm" in name or "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        oracle.itm_head.weight.mul_(200)  # a spread of scores worth measuring
        oracle.query_tokens.normal_(generator=gen)
    state = {**oracle.state_dict(), "temp": torch.tensor(0.07)}
    torch.save({"model": state, "epoch": 3}, work / em.CHECKPOINT_FILE)
    return {"oracle": oracle.eval(), "checkpoint": work / em.CHECKPOINT_FILE, "tokenizer": vocab, "work": work}


def _load(files: dict, **options) -> rewards.Reward:
    with _small():
        return rewards.load("evalmuse", **{"checkpoint": files["checkpoint"], "tokenizer": files["tokenizer"],
                                           **options})


@pytest.fixture(scope="module")
def reward(files) -> rewards.Reward:
    return _load(files)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255


def _official_pixels(a: np.ndarray) -> torch.Tensor:
    """The authors' image path up to the network: PIL bicubic to 364x364 from the 8-bit image, then ToTensor."""
    return _tensor(np.asarray(Image.fromarray(a).resize((em.IMAGE_SIZE, em.IMAGE_SIZE), Image.BICUBIC)))


def test_caption_processor_is_lavis_blip_caption():
    assert em.pre_caption("A Cat; on the mat!!  (photo)\n") == "a cat on the mat photo"
    assert em.pre_caption('He said: "hi" ~ #1*') == "he said hi 1"
    assert em.pre_caption("Keep, commas - and hyphens' too?") == "keep, commas - and hyphens' too?"
    assert em.pre_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))


@pytest.mark.slow
def test_scores_match_imscore_network_on_official_preprocessing(files, reward):
    oracle = files["oracle"]
    texts = [em.pre_caption(c) for c in CAPTIONS]
    assert max(len(reward.tokenizer(t).input_ids) for t in texts) <= 32  # imscore pads/truncates to 32
    with torch.no_grad():
        ref = torch.cat([oracle.score(_official_pixels(a), [t]) for a, t in zip(photographs(), texts)]).double()
        ours = torch.cat([reward(_tensor(a), [c]) for a, c in zip(photographs(), CAPTIONS)]).double()
        batch = reward(torch.cat([_tensor(photographs()[0])] * 2), CAPTIONS[:2]).double()  # padded to the longest
    spread = ref.std()
    result = {"std": spread.item(), "mean_over_std": ((ours - ref).abs().mean() / spread).item()}
    print(result)
    assert result["std"] > 0.05, result
    assert result["mean_over_std"] <= TARGET_MEAN_DIFF_OVER_STD, result
    assert abs(batch[0] - ours[0]) < 1e-5 and 1 <= ours.min() and ours.max() <= 5


@pytest.mark.slow
def test_gradient_matches_finite_differences(files):
    """float64, float resize: autograd against a central difference."""
    reward = _load(files, dtype=torch.float64, qformer_dtype=torch.float64, pil_8bit=False)
    assert_gradient_matches_central_difference(reward, (100, 130), ["a cat"])


@pytest.mark.slow
def test_files_without_the_vit_need_the_base_checkpoint(files, reward, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(files["checkpoint"], weights_only=True)["model"]
    x = _tensor(photographs()[2])
    with torch.no_grad():
        expected = reward(x, ["a cat"])
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))  # imscore's form
        assert torch.equal(_load(files, checkpoint=tmp_path / "model.safetensors")(x, ["a cat"]), expected)
        trained = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}  # LAVIS's frozen-ViT save
        torch.save({"model": trained}, tmp_path / "fga_blip2.pth")
        with pytest.raises(CheckpointMismatchError, match="base_checkpoint"):
            _load(files, checkpoint=tmp_path / "fga_blip2.pth")
        base = {k: (torch.zeros_like(v) if not k.startswith("visual_encoder.") else v) for k, v in state.items()}
        torch.save({"model": base}, tmp_path / "blip2_finetune_coco.pth")  # the FGA file must win where both hold a key
        both = _load(files, checkpoint=tmp_path / "fga_blip2.pth", base_checkpoint=tmp_path / "blip2_finetune_coco.pth")
        assert torch.equal(both(x, ["a cat"]), expected)


@pytest.mark.slow
def test_errors(files, reward, tmp_path):
    assert_rejects_bad_inputs(reward)
    state = torch.load(files["checkpoint"], weights_only=True)["model"]
    torch.save({"model": {**state, "blip.extra.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="blip.extra.weight"):
        _load(files, checkpoint=tmp_path / "bad.pth")
    torch.save({"model": {**state, "Qformer.bert.extra.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(qformer.extra.weight\)"):
        _load(files, checkpoint=tmp_path / "bad.pth")
    with pytest.raises(MissingFileError, match=em.CHECKPOINT_FILE):
        _load(files, checkpoint=tmp_path / "nowhere")
    with pytest.raises(InputError, match="the Q-Former has 512 positions"):
        reward(torch.rand(1, 3, 64, 64), [" ".join(["zqxjkvbwpy" * 2] * 50)])


def test_registered():
    assert "evalmuse" in rewards.available() and rewards.needs_prompt("evalmuse")


@pytest.mark.slow
def test_benchmark_writer_round_trips_through_the_lavis_keys(tmp_path):
    """benchmarks.zoo2_files writes the authors' format; our loader and the benchmark's imscore peer read it
    strictly and agree."""
    from benchmarks.zoo2_files import write_evalmuse

    with _small():
        paths = write_evalmuse(tmp_path, CAPTIONS)
        reward = rewards.load("evalmuse", **paths)
        oracle = imscore_models._evalmuse({"sources": {"evalmuse": paths}}, torch.device("cpu"))  # the benchmark's peer
    x = _official_pixels(photographs()[0])
    with torch.no_grad():
        ours, ref = reward(x, [em.pre_caption(CAPTIONS[0])]), oracle.eval().score(x, [em.pre_caption(CAPTIONS[0])])
    assert abs(ours.item() - ref.item()) < 1e-4 and ours.item() != 3.0
