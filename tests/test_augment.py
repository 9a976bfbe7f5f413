"""Per-batch augmentation, consistent teaching, mixed targets, scarce labels and the T/alpha search."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd.augment import BatchAugment, Mix, random_crop, random_resized_crop, step_generator
from edgekd.data import load_data
from edgekd.distillation import distill, transfer_set
from edgekd.errors import EdgekdError
from edgekd.losses import mixed_cross_entropy
from edgekd.objective import Batch, Objective, ObjectiveConfig, OfflineTargets, compute
from edgekd.recipe import DataConfig, ModelConfig, load_recipe
from edgekd.train import fit


def test_crop_shifts_each_image_inside_its_padding():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    out = random_crop(x, 2, step_generator(0, 0, 0))
    assert out.shape == x.shape
    for i in range(2):   # every output is a window of the zero-padded image
        padded = F.pad(x[i:i + 1], (2, 2, 2, 2))
        windows = [padded[0, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def _ramps(n, h, w):
    """Two channels holding each pixel's column and row: a bilinear view of them names the box it was cut from."""
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    return torch.stack([cols, rows])[None].repeat(n, 1, 1, 1)


def test_resized_crop_boxes_cover_the_scale_range_with_bounded_aspect():
    n, h, w = 400, 20, 20
    out = random_resized_crop(_ramps(n, h, w), (0.08, 1.0), step_generator(0, 0, 0))
    assert out.shape == (n, 2, h, w)
    # sampled at pixel centres, a box of width bw (a fraction of W) spans bw * (W - 1) columns of the ramp
    bw = (out[:, 0, 0, -1] - out[:, 0, 0, 0]) / (w - 1)
    bh = (out[:, 1, -1, 0] - out[:, 1, 0, 0]) / (h - 1)
    area, ratio = bw * bh, bw / bh
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0 + 1e-5
    assert (area < 0.3).sum() > 50 and (area > 0.7).sum() > 20   # the whole range is drawn, not one scale
    assert ratio.min() >= 3 / 4 - 0.05 and ratio.max() <= 4 / 3 + 0.05
    # every box lies inside the image: its interior columns and rows stay on one straight ramp (a box reaching
    # past an edge would resample the clamped border: a flat run); the outermost column may touch the
    # half-pixel border
    for line in (out[:, 0, 0, 1:-1], out[:, 1, 1:-1, 0]):
        t = torch.linspace(0, 1, line.shape[1])
        straight = line[:, :1] + (line[:, -1:] - line[:, :1]) * t
        assert (line - straight).abs().max() < 1e-3
    narrow = random_resized_crop(_ramps(200, h, w), (0.2, 0.25), step_generator(0, 0, 1))
    a2 = ((narrow[:, 0, 0, -1] - narrow[:, 0, 0, 0]) / (w - 1)) * ((narrow[:, 1, -1, 0] - narrow[:, 1, 0, 0]) / (h - 1))
    assert a2.min() >= 0.2 - 0.02 and a2.max() <= 0.25 + 0.02


def test_resized_crop_of_the_whole_image_is_the_image_and_views_are_seeded():
    x = torch.randn(8, 3, 12, 12)
    # scale 1 on a square image fits only at ratio 1: every draw falls back to the whole image, resampled
    # at its own pixel centres
    torch.testing.assert_close(random_resized_crop(x, (1.0, 1.0), step_generator(0, 0, 0)), x, atol=1e-5, rtol=0)
    aug = BatchAugment(resized_crop=(0.08, 1.0), flip=True)
    a, _ = aug(x, step_generator(5, 2, 3))
    b, _ = aug(x, step_generator(5, 2, 3))
    c, _ = aug(x, step_generator(5, 2, 4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert aug.without_mixing().resized_crop == (0.08, 1.0)
    with pytest.raises(EdgekdError, match=r"resized_crop, crop, flip and cutmix need \(N, C, H, W\) images"):
        aug(torch.randn(4, 6), step_generator(0, 0, 0))


def test_views_are_seeded_by_seed_epoch_and_step():
    aug = BatchAugment(crop=2, flip=True, mixup=1.0)
    x = torch.randn(16, 1, 8, 8)
    a, mix_a = aug(x, step_generator(3, 1, 7))
    b, mix_b = aug(x, step_generator(3, 1, 7))
    c, _ = aug(x, step_generator(3, 1, 8))
    assert torch.equal(a, b) and torch.equal(mix_a.perm, mix_b.perm) and mix_a.lam == mix_b.lam
    assert not torch.equal(a, c)


def test_mixup_mixes_pairs_by_lambda():
    x = torch.randn(8, 1, 6, 6)
    out, mix = BatchAugment(mixup=0.4)(x, step_generator(0, 0, 1))
    assert 0.0 <= mix.lam <= 1.0 and sorted(mix.perm.tolist()) == list(range(8))
    torch.testing.assert_close(out, mix.lam * x + (1 - mix.lam) * x[mix.perm])


def test_cutmix_lambda_is_the_kept_area():
    x = torch.zeros(6, 1, 10, 10)
    x += torch.arange(6).view(6, 1, 1, 1).float()     # image i is filled with the value i
    for step in range(5):
        out, mix = BatchAugment(cutmix=1.0)(x, step_generator(0, 0, step))
        for i in range(6):
            own = (out[i] == i).float().mean().item()
            if int(mix.perm[i]) != i:
                assert own == pytest.approx(mix.lam)
                assert ((out[i] == i) | (out[i] == mix.perm[i])).all()


def test_mixed_cross_entropy_matches_the_formula_and_skips_unlabelled():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 2, -1, 1])
    perm = torch.tensor([1, 0, 3, 2])
    lam = 0.7
    ce = lambda i, c: F.cross_entropy(logits[i:i + 1], torch.tensor([c]))  # noqa: E731
    parts, weights = [], []
    for i in range(4):
        for w, label in ((lam, int(y[i])), (1 - lam, int(y[perm[i]]))):
            if label >= 0:
                parts.append(w * ce(i, label))
                weights.append(w)
    expected = sum(parts) / sum(weights)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, Mix(perm, lam)), expected)
    # unmixed: plain cross-entropy over the labelled samples
    torch.testing.assert_close(mixed_cross_entropy(logits, y), F.cross_entropy(logits[y >= 0], y[y >= 0]))
    assert mixed_cross_entropy(logits, torch.full((4,), -1)).item() == 0.0


class _Recorder(nn.Module):
    """A tiny CNN that keeps every input batch it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def test_teacher_sees_exactly_the_students_augmented_and_mixed_view():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = np.where(np.arange(40) % 4 == 0, -1, np.arange(40) % 3).astype(np.int64)   # some unlabelled
    student, teacher = _Recorder(), _Recorder()
    cfg = ModelConfig(epochs=2, batch_size=16, lr=1e-3)
    fit(student, x, y, cfg, device=torch.device("cpu"), desc="t",
        objective=Objective(ObjectiveConfig(4.0, 0.5), teacher=teacher),
        progress=False, augment=BatchAugment(crop=2, flip=True, mixup=1.0, cutmix=1.0, resized_crop=(0.3, 1.0)))
    assert len(teacher.seen) == len(student.seen) == 2 * math.ceil(40 / 16)
    for s, t in zip(student.seen, teacher.seen, strict=True):
        assert torch.equal(s, t)
    # and the views really were augmented (not the raw batches)
    raw = torch.from_numpy(x)
    assert not any(torch.equal(s, raw[: len(s)]) for s in student.seen)


def test_function_matching_loss_is_the_soft_term_only():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    mix = Mix(torch.tensor([1, 0, 3, 2, 4]), 0.3)
    cfg = ObjectiveConfig(2.0, 1.0)
    torch.testing.assert_close(compute(Batch(s, y, mix, teacher_logits=t), cfg),
                               compute(Batch(s, None, teacher_logits=t), cfg))


def test_labelled_subset_is_deterministic_stratified_and_disjoint_from_val_and_test(tmp_path):
    n = 300
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 1, 2, 2), np.float32)  # pixel = sample id
    path = tmp_path / "ids.npz"
    y = np.arange(n) % 3
    np.savez(path, x_train=x[:240], y_train=y[:240], x_test=x[240:], y_test=y[240:])
    cfg = DataConfig(source=str(path), val_fraction=0.1, normalize=False, labelled=30)
    a, b = load_data(cfg), load_data(cfg)
    ids = lambda arr: set(arr[:, 0, 0, 0].astype(int).tolist())  # noqa: E731
    assert ids(a.x_train) == ids(b.x_train) and len(a.x_train) == 30
    assert np.bincount(a.y_train).tolist() == [10, 10, 10]
    train, pool, val, test = ids(a.x_train), ids(a.x_unlabeled), ids(a.x_val), ids(a.x_test)
    assert not (train & pool) and not ((train | pool) & (val | test)) and not (val & test)
    assert len(train | pool | val | test) == n
    x_t, y_t = transfer_set(a)
    assert len(x_t) == len(train) + len(pool) and (y_t == -1).sum() == len(pool)
    other = load_data(DataConfig(source=str(path), val_fraction=0.1, normalize=False, labelled=30, seed=1))
    assert ids(other.x_train) != train
    assert len(load_data(DataConfig(source=str(path), normalize=False, labelled=0.5)).x_train) == 108
    with pytest.raises(EdgekdError, match=r"\[data\].labelled = 2 keeps 2 labels; expected between 3"):
        load_data(DataConfig(source=str(path), labelled=2))


def test_recipe_checks_function_matching_and_labelled(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text("[distill]\nfunction_matching = true\n")
    with pytest.raises(EdgekdError, match=r"function_matching: needs mixed views; set \[augment\] mixup"):
        load_recipe(bad)
    bad.write_text("[data]\nlabelled = 1.5\n")
    with pytest.raises(EdgekdError, match=r"\[data\].labelled"):
        load_recipe(bad)
    bad.write_text("[augment]\ncrop = -1\n")
    with pytest.raises(EdgekdError, match=r"\[augment\]"):
        load_recipe(bad)
    bad.write_text("[augment]\nresized_crop = [0.5, 0.1]\n")
    with pytest.raises(EdgekdError, match=r"\[augment\].resized_crop: expected \[min_scale, max_scale\] with min <="):
        load_recipe(bad)
    bad.write_text("[augment]\nresized_crop = [0, 1]\n")
    with pytest.raises(EdgekdError, match=r"\[augment\].resized_crop: each must be in \(0, 1\]"):
        load_recipe(bad)


def test_scarce_labels_search_and_baseline_steps(tmp_path):
    """One small run: 150 labels on digits, T/alpha search on val, scratch on the labels with equal steps."""
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text("""
[data]
source = "digits"
labelled = 150
[teacher]
model = "mlp:hidden=64"
epochs = 3
batch_size = 64
[student]
model = "mlp:hidden=8"
epochs = 2
batch_size = 64
[distill]
search_temperatures = [1.0, 4.0]
search_alphas = [0.5, 1.0]
search_epochs = 1
""")
    recipe = load_recipe(recipe_path)
    metrics = distill(recipe, tmp_path / "run", device="cpu", progress=False)
    search = metrics["search"]
    assert [(r["temperature"], r["alpha"]) for r in search["table"]] == [(1.0, 0.5), (1.0, 1.0), (4.0, 0.5),
                                                                         (4.0, 1.0)]
    best = max(search["table"], key=lambda r: r["val_accuracy"])
    assert search["chosen"] == {"temperature": best["temperature"], "alpha": best["alpha"]}
    assert (metrics["student"]["temperature"], metrics["student"]["alpha"]) == (best["temperature"], best["alpha"])
    assert metrics["student"]["labelled"] == 150 and metrics["student"]["samples"] > 1000
    assert metrics["student"]["teacher_outputs"] == "computed once"
    assert metrics["scratch"]["samples"] == 150
    steps_student = 2 * math.ceil(metrics["student"]["samples"] / 64)
    assert metrics["scratch"]["epochs"] * math.ceil(150 / 64) >= steps_student
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["search"] == search


def test_teacher_outputs_computed_once_train_the_same_student_as_online_kd():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = (np.arange(64) % 3).astype(np.int64)
    teacher = _Recorder().eval()
    from edgekd.train import predict_logits

    logits = predict_logits(teacher, x)
    classes = np.broadcast_to(np.arange(3), logits.shape).astype(np.int64)
    offline = Objective(ObjectiveConfig(4.0, 0.5),
                        offline=OfflineTargets(lambda _e, idx, _batch: (None, logits[idx], classes[idx])))
    cfg = ModelConfig(epochs=2, batch_size=16, lr=1e-2)
    torch.manual_seed(1)
    a = _Recorder()
    b = _Recorder()
    b.load_state_dict(a.state_dict())
    online = Objective(ObjectiveConfig(4.0, 0.5), teacher=teacher)
    fit(a, x, y, cfg, device=torch.device("cpu"), desc="a", objective=online, progress=False)
    fit(b, x, y, cfg, device=torch.device("cpu"), desc="b", objective=offline, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)
