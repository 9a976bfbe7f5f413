"""edgekd.objective: each term equals the loss function it came from, weights and alpha shares, the [loss] table,
and QAT-KD training on the FP32 student's objective (searched T, hints, unlabelled pool, augmentation)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgekd import objective as O
from edgekd.augment import Mix
from edgekd.errors import EdgekdError
from edgekd.losses import mixed_cross_entropy, soft_target_loss, topk_soft_target_loss
from edgekd.recipe import load_recipe, recipe_from_dict, to_toml


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 1, -1, 3, -1, 2])
    return s, t, y


def _embedding_loss(student, teacher, mse_weight=1.0, cosine_weight=0.0, similarity_weight=0.0):
    """The embedding loss as it was written before the objective (the reference the terms must equal)."""
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    loss = student.new_zeros((), dtype=torch.float32)
    if mse_weight:
        loss = loss + mse_weight * ((s - t) ** 2).sum(-1).mean()
    if cosine_weight:
        loss = loss + cosine_weight * (1.0 - (s * t).sum(-1)).mean()
    if similarity_weight:
        loss = loss + similarity_weight * ((s @ s.T - t @ t.T) ** 2).mean()
    return loss


def _hinton(soft, s, y, alpha, mix=None):
    """The loss fit computed before the objective (losses.mix_hard_labels): the reference, written out."""
    if y is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * mixed_cross_entropy(s, y, mix)


def test_each_term_is_the_loss_it_came_from(batch):
    s, t, y = batch
    cfg = O.ObjectiveConfig(temperature=3.0, alpha=0.7)
    mix = Mix(torch.tensor([5, 4, 3, 2, 1, 0]), 0.3)
    assert torch.equal(O.ce(O.Batch(s, y, mix), cfg), mixed_cross_entropy(s, y, mix))
    assert torch.equal(O.kd(O.Batch(s, teacher_logits=t), cfg), soft_target_loss(s, t, 3.0))
    vals, idx = t.topk(3, dim=1)
    for values_are, v in (("logits", vals), ("probs", torch.softmax(t / 3.0, 1).gather(1, idx))):
        b = O.Batch(s, topk=(v, idx), values_are=values_are)
        assert torch.equal(O.topk_kd(b, cfg), topk_soft_target_loss(s, v, idx, 3.0, values_are=values_are))
    f = [(torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)), (torch.randn(6, 8), torch.randn(6, 8))]
    assert [x.item() for x in O.hint(O.Batch(s, features=f), cfg)] == [F.mse_loss(a, b).item() for a, b in f]
    e = O.Batch(s, teacher_embeddings=t)
    assert torch.equal(O.embedding_mse(e, cfg), _embedding_loss(s, t))
    assert torch.equal(O.embedding_cosine(e, cfg), _embedding_loss(s, t, 0.0, 1.0))
    assert torch.equal(O.embedding_similarity(e, cfg), _embedding_loss(s, t, 0.0, 0.0, 1.0))


def test_default_objective_is_todays_loss_to_the_last_bit(batch):
    """The defaults give exactly (not approximately) the losses fit used to call, so no figure moves."""
    s, t, y = batch
    mix = Mix(torch.tensor([1, 0, 3, 2, 5, 4]), 0.6)
    vals, idx = t.topk(2, dim=1)
    soft, topk_soft = soft_target_loss(s, t, 4.0), topk_soft_target_loss(s, vals, idx, 4.0)
    for alpha in (0.0, 0.5, 0.9, 1.0):
        cfg = O.ObjectiveConfig(temperature=4.0, alpha=alpha)
        assert torch.equal(O.compute(O.Batch(s, y, mix, teacher_logits=t), cfg), _hinton(soft, s, y, alpha, mix))
        assert torch.equal(O.compute(O.Batch(s, y, topk=(vals, idx)), cfg), _hinton(topk_soft, s, y, alpha))
        assert torch.equal(O.compute(O.Batch(s, teacher_logits=t), cfg), soft)   # no labels: the soft term only
    assert torch.equal(O.compute(O.Batch(s, y, mix), O.ObjectiveConfig()), mixed_cross_entropy(s, y, mix))
    # and the same gradients, bit for bit (the terms are summed in the order the backward pass accumulated)
    grads = []
    for loss_fn in (lambda v: O.compute(O.Batch(v, y, mix, teacher_logits=t), O.ObjectiveConfig(4.0, 0.7)),
                    lambda v: _hinton(soft_target_loss(v, t, 4.0), v, y, 0.7, mix)):
        v = s.clone().requires_grad_()
        loss_fn(v).backward()
        grads.append(v.grad)
    assert torch.equal(*grads)
    f = [(torch.randn(6, 3), torch.randn(6, 3)), (torch.randn(6, 3), torch.randn(6, 3))]
    cfg = O.ObjectiveConfig(2.0, 0.5, weights=(("hint", 0.25),))
    today = _hinton(soft_target_loss(s, t, 2.0), s, y, 0.5)
    for a, b in f:
        today = today + 0.25 * F.mse_loss(a, b)
    assert torch.equal(O.compute(O.Batch(s, y, teacher_logits=t, features=f), cfg), today)
    emb = O.ObjectiveConfig(weights=(("embedding_mse", 0.5), ("embedding_cosine", 2.0), ("embedding_similarity", 1.0)))
    assert torch.equal(O.compute(O.Batch(s, teacher_embeddings=t), emb), _embedding_loss(s, t, 0.5, 2.0, 1.0))
    assert torch.equal(O.compute(O.Batch(s, teacher_embeddings=t), O.ObjectiveConfig()), _embedding_loss(s, t))


def test_embedding_terms_hand_values() -> None:
    def loss(s, t, mse_weight=1.0, cosine_weight=0.0, similarity_weight=0.0):
        cfg = O.ObjectiveConfig(weights=(("embedding_mse", mse_weight), ("embedding_cosine", cosine_weight),
                                         ("embedding_similarity", similarity_weight)))
        return O.compute(O.Batch(s, teacher_embeddings=t), cfg).item()

    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert loss(s, t, mse_weight=1, cosine_weight=0) == pytest.approx(2.0)   # |s - t|^2
    assert loss(s, t, mse_weight=0, cosine_weight=1) == pytest.approx(1.0)   # 1 - cos
    assert loss(s, t, mse_weight=0, similarity_weight=1) == pytest.approx(0.0)  # 1x1: both 1
    # inputs are normalized first: [3, 4] -> [0.6, 0.8]; against [1, 0]: 0.4^2 + 0.8^2 = 0.8 and 1 - 0.6 = 0.4
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[2.0, 0.0]])
    assert loss(s, t) == pytest.approx(0.8)
    assert loss(s, t, mse_weight=0.5, cosine_weight=2.0) == pytest.approx(0.5 * 0.8 + 2 * 0.4)
    # relational term: student similarity matrix I, teacher all ones -> off-diagonal errors 1 -> mean 0.5
    s, t = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert loss(s, t, mse_weight=0, similarity_weight=1) == pytest.approx(0.5)
    with pytest.raises(EdgekdError, match="project the student"):
        loss(torch.ones(2, 3), torch.ones(2, 4))


def test_weights_scale_terms_and_alpha_shares_soft_and_hard(batch):
    s, t, y = batch
    cfg = O.ObjectiveConfig(temperature=2.0, alpha=0.8, weights=(("ce", 3.0), ("kd", 0.5)))
    b = O.Batch(s, y, teacher_logits=t)
    assert O.weighted_terms(b, cfg) == [("kd", 0.5 * 0.8), ("ce", 3.0 * (1 - 0.8))]
    expected = 3.0 * (1 - 0.8) * mixed_cross_entropy(s, y) + 0.5 * 0.8 * soft_target_loss(s, t, 2.0)
    assert math.isclose(O.compute(b, cfg).item(), expected.item(), rel_tol=1e-6)
    # alpha splits only a soft and a hard term that are both active; a weight of 0 switches a term off
    assert O.weighted_terms(O.Batch(s, y), cfg) == [("ce", 3.0)]
    assert O.weighted_terms(b, O.ObjectiveConfig(alpha=0.8, weights=(("ce", 0.0),))) == [("kd", 1.0)]
    assert O.weighted_terms(O.Batch(s, teacher_logits=t), cfg) == [("kd", 0.5)]
    assert O.weighted_terms(b, O.ObjectiveConfig(alpha=1.0)) == [("kd", 1.0)]
    with pytest.raises(EdgekdError, match="no term applies"):
        O.compute(O.Batch(s, y), O.ObjectiveConfig(weights=(("ce", 0.0),)))


def test_adding_a_term_is_one_function_and_one_registry_entry(batch, monkeypatch):
    s, t, y = batch

    def logit_l2(b, cfg):
        return (b.logits ** 2).mean()
    monkeypatch.setitem(O.TERMS, "logit_l2", O.Term(logit_l2, ("logits",), default=0.0))
    r = recipe_from_dict({"loss": {"logit_l2": 0.1}})
    cfg = O.config_from_recipe(r)
    assert torch.equal(O.compute(O.Batch(s, y), cfg), mixed_cross_entropy(s, y) + 0.1 * (s ** 2).mean())


def test_loss_table_in_the_recipe(tmp_path):
    r = recipe_from_dict({"loss": {"ce": 0.5, "kd": 2}, "distill": {"temperature": 3.0, "alpha": 0.6}})
    cfg = O.config_from_recipe(r)
    assert (cfg.temperature, cfg.alpha, cfg.weight("ce"), cfg.weight("kd"), cfg.weight("hint")) == (3.0, 0.6, 0.5, 2.0,
                                                                                                     1.0)
    assert O.config_from_recipe(r, temperature=8.0, alpha=0.25).temperature == 8.0
    (tmp_path / "r.toml").write_text(to_toml(r))                      # written flat, read back the same
    assert load_recipe(tmp_path / "r.toml").loss == r.loss
    assert "[loss]" not in to_toml(recipe_from_dict({}))             # no table: today's defaults
    default = O.config_from_recipe(recipe_from_dict({"distill": {"feature_weight": 0.3}}))
    assert (default.weight("ce"), default.weight("kd"), default.weight("topk_kd"), default.weight("hint")) == (
        1.0, 1.0, 1.0, 0.3)
    unknown = r"\[loss\]: unknown loss term 'kdd' \(expected one of kd, topk_kd, ce, hint"
    for raw, message in [({"loss": {"kdd": 1.0}}, unknown),
                         ({"loss": {"ce": -1}}, r"\[loss\]\.ce: expected a finite weight >= 0, got -1"),
                         ({"loss": {"kd": "x"}}, r"\[loss\]\.kd: expected a finite weight >= 0, got 'x'"),
                         ({"loss": {"kd": float("inf")}}, r"\[loss\]\.kd: expected a finite weight"),
                         ({"loss": 1}, r"\[loss\]: expected a table"),
                         ({"loss": {"hint": 1.0}, "distill": {"feature_weight": 2.0}}, "keep one of them"),
                         ({"loss": {"embedding_cosine": 1.0}}, r"\[loss\]: embedding_cosine: the sentence-embedding"),
                         ({"loss": {"kd": 1.0}, "embedding": {}}, r"\[loss\]: kd: the sentence-embedding task")]:
        with pytest.raises(EdgekdError, match=message):
            recipe_from_dict(raw)


SCARCE = """
[data]
source = "digits"
test_fraction = 0.25
val_fraction = 0.15
labelled = 100

[teacher]
model = "cnn:widths=8,16"
epochs = 2
batch_size = 128

[student]
model = "cnn:widths=4,8"
epochs = 1
batch_size = 128

[distill]
temperature = 4.0
alpha = 0.7
search_temperatures = [2.0, 8.0]
search_alphas = [0.5]
search_epochs = 1
features = [["features.2", "features.2"]]
baseline = false

[augment]
crop = 1
mixup = 1.0

[quantize]
mode = "qat"
epochs = 1
calibration_size = 64
"""


def test_qat_kd_trains_on_the_fp32_students_objective(tmp_path, monkeypatch):
    """QAT-KD on a scarce-label recipe: the objective receives the unlabelled pool, computes the soft term at
    the searched temperature (never the recipe's 4.0), the hint term on the fake-quantized graph, and mixed
    views; afterwards the graph has no tap left and converts and exports."""
    pytest.importorskip("torchao")
    from edgekd import pipeline
    from edgekd.distillation import distill

    (tmp_path / "r.toml").write_text(SCARCE)
    recipe = load_recipe(tmp_path / "r.toml")
    metrics = distill(recipe, tmp_path / "run", device="cpu", progress=False)
    chosen = metrics["search"]["chosen"]
    assert metrics["student"]["temperature"] == chosen["temperature"] != 4.0

    seen = []
    real = O.compute

    def spy(b, cfg):
        seen.append({"temperature": cfg.temperature, "alpha": cfg.alpha, "n": len(b.logits),
                     "unlabelled": int((b.labels < 0).sum()), "kd": b.teacher_logits is not None,
                     "hints": len(b.features), "mixed": b.mix is not None})
        return real(b, cfg)
    monkeypatch.setattr(O, "compute", spy)
    ctx = pipeline.RunContext(tmp_path / "run")
    result = pipeline.quantize(tmp_path / "run", ctx=ctx, device="cpu", progress=False)
    pool, labelled = len(ctx.data.x_unlabeled), len(ctx.data.x_train)
    assert labelled == 100 and pool > 500
    assert sum(s["n"] for s in seen) == pool + labelled                      # one QAT epoch over the transfer set
    assert sum(s["unlabelled"] for s in seen) == pool
    assert {(s["temperature"], s["alpha"]) for s in seen} == {(chosen["temperature"], chosen["alpha"])}
    assert all(s["kd"] and s["hints"] == 1 and s["mixed"] for s in seen)
    info = result["qat_objective"]
    assert info["temperature_from"] == "metrics.json student" and info["features"] == [["features.2", "features.2"]]
    assert info["received"]["unlabelled"] == pool and info["samples"] == pool + labelled
    assert Path(result["onnx"]["qat"]).is_file()
    assert np.isfinite(result["pytorch_accuracy"]["qat"])


def test_graph_taps_read_a_qat_graph_and_leave_it_as_it_was():
    """Hints on an exported QAT graph: the tap reads the named module's fake-quantized output, and removing it
    restores the graph's code exactly; an unknown module is named with the ones that exist."""
    pytest.importorskip("torchao")
    from edgekd import quantize
    from edgekd.models import build_model

    torch.manual_seed(0)
    gm = quantize.prepare(build_model("cnn:widths=4,8", (1, 8, 8), 10), torch.randn(2, 1, 8, 8),
                          quantize.QuantConfig(scheme="ort-cpu"), qat=True)
    code = gm.code
    taps = O.tap(gm, ["features.2"], "student")
    assert isinstance(taps, O.GraphTaps)
    gm(torch.randn(3, 1, 8, 8))
    assert taps.outputs["features.2"].shape == (3, 4, 8, 8)          # relu output, before the pool
    taps.remove()
    assert gm.code == code and not any("edgekd_tap" in n for n, _ in gm.named_modules())
    with pytest.raises(EdgekdError, match=r"the student has no module 'features.99' \(some of its modules: .*features"):
        O.tap(gm, ["features.99"], "student")
