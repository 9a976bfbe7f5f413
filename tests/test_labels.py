import json

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.labels import filter_labels, format_filter_report, label_pool, read_labels
from edgekd.losses import soft_target_loss, topk_soft_target_loss
from edgekd.models import build_model
from edgekd.objective import Batch, ObjectiveConfig, compute
from edgekd.teachers import FunctionTeacher, TeacherOutput, TorchTeacher

INPUT_SHAPE = (1, 4, 4)
CLASSES = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp:hidden=16", INPUT_SHAPE, CLASSES).eval()


@pytest.fixture(scope="module")
def pool():
    return np.random.default_rng(0).standard_normal((100, *INPUT_SHAPE)).astype(np.float32)


class CountingTeacher:
    """A real TorchTeacher that counts its calls and can die after `fail_after` calls (a killed labelling job)."""

    def __init__(self, teacher, fail_after=None):
        self.teacher, self.fail_after, self.calls = teacher, fail_after, 0
        self.name = "counting teacher"

    def identity(self):
        return self.teacher.identity()

    def __call__(self, x):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.teacher(x)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_label_pool_writes_topk_soft_targets_at_temperature(model, pool, tmp_path):
    manifest = label_pool(TorchTeacher(model), pool, tmp_path / "l", shard_size=40, temperature=2.0, top_k=3,
                          batch_size=16)
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == [
        "manifest.json", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert manifest["complete"] and manifest["samples"] == 100 and manifest["output_kind"] == "logits"
    assert manifest["stored"] == "topk" and manifest["num_classes"] == CLASSES and not manifest["renormalized"]
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 40), (40, 80), (80, 100)]
    assert json.loads((tmp_path / "l" / "manifest.json").read_text()) == manifest
    for key in ("teacher", "pool_sha256", "temperature", "top_k", "created", "edgekd_version"):
        assert manifest[key] is not None
    with np.load(tmp_path / "l" / "shard-00001.npz") as f:
        assert f["topk_probs"].dtype == np.float16 and f["topk_indices"].dtype == np.int16

    labels = read_labels(tmp_path / "l", pool=pool)
    z = TorchTeacher(model)(pool).values
    p_t = _softmax(z / 2.0)
    assert np.array_equal(labels.indices, np.arange(100)) and np.array_equal(labels.labels, z.argmax(1))
    assert np.array_equal(labels.topk_indices, np.argsort(-p_t, 1)[:, :3])
    assert np.allclose(labels.topk_probs, -np.sort(-p_t, 1)[:, :3], atol=1e-3)
    assert np.allclose(labels.confidence, _softmax(z).max(1), atol=1e-3)
    assert labels.temperature == 2.0 and labels.num_classes == CLASSES

    with pytest.raises(EdgekdError, match="were made for another pool"):
        read_labels(tmp_path / "l", pool=pool[:50])
    with open(tmp_path / "l" / "shard-00002.npz", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe\xfd")
    with pytest.raises(EdgekdError, match=r"shard-00002.npz fails its sha256 check"):
        read_labels(tmp_path / "l")


def test_interrupted_labelling_resumes_only_the_missing_shards(model, pool, tmp_path):
    base = TorchTeacher(model)
    reference = label_pool(base, pool, tmp_path / "ref", shard_size=20, top_k=2, batch_size=10)

    out = tmp_path / "l"
    dying = CountingTeacher(base, fail_after=5)   # 2 calls per shard: shards 0 and 1 done, killed in shard 2
    with pytest.raises(KeyboardInterrupt):
        label_pool(dying, pool, out, shard_size=20, top_k=2, batch_size=10)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and [s["file"] for s in partial["shards"]] == ["shard-00000.npz",
                                                                                 "shard-00001.npz"]
    with pytest.raises(EdgekdError, match=r"incomplete \(2 of 5 shards\)"):
        read_labels(out)
    (out / "shard-00001.npz").write_bytes(b"corrupt")   # and one finished shard got damaged

    again = CountingTeacher(base)
    manifest = label_pool(again, pool, out, shard_size=20, top_k=2, batch_size=10)
    assert again.calls == 8   # shards 1, 2, 3, 4 redone; shard 0 kept
    assert manifest["complete"] and manifest["created"] == partial["created"]
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]

    (out / "shard-00003.npz").unlink()
    again = CountingTeacher(base)
    label_pool(again, pool, out, shard_size=20, top_k=2, batch_size=10)
    assert again.calls == 2
    again = CountingTeacher(base)
    label_pool(again, pool, out, shard_size=20, top_k=2, batch_size=10)
    assert again.calls == 0   # complete and verified: nothing to do
    a, b = read_labels(out), read_labels(tmp_path / "ref")
    assert np.array_equal(a.topk_probs, b.topk_probs) and np.array_equal(a.labels, b.labels)


def test_labels_from_another_teacher_pool_or_settings_are_refused(model, pool, tmp_path):
    label_pool(TorchTeacher(model), pool, tmp_path, shard_size=50, top_k=2)
    other = build_model("mlp:hidden=16", INPUT_SHAPE, CLASSES)
    with pytest.raises(EdgekdError, match=r"other settings \(teacher: folder has 'torch:.*never mixed"):
        label_pool(TorchTeacher(other), pool, tmp_path, shard_size=50, top_k=2)
    with pytest.raises(EdgekdError, match=r"temperature: folder has 1.0, this run 4.0"):
        label_pool(TorchTeacher(model), pool, tmp_path, shard_size=50, top_k=2, temperature=4.0)
    with pytest.raises(EdgekdError, match=r"pool_sha256: .*samples: folder has 100, this run 99"):
        label_pool(TorchTeacher(model), pool[:99], tmp_path, shard_size=50, top_k=2)


def test_labels_only_and_topk_teachers(pool, tmp_path):
    hard = FunctionTeacher(lambda x: TeacherOutput("labels", (x.reshape(len(x), -1)[:, 0] > 0).astype(np.int64)),
                           identity="sign-of-first-pixel")
    manifest = label_pool(hard, pool, tmp_path / "hard", shard_size=64)
    assert manifest["stored"] == "labels" and manifest["output_kind"] == "labels"
    labels = read_labels(tmp_path / "hard")
    assert labels.topk_probs is None and labels.confidence is None
    assert np.array_equal(labels.labels, (pool.reshape(100, -1)[:, 0] > 0).astype(np.int64))
    with pytest.raises(EdgekdError, match="min_confidence needs teacher confidences"):
        filter_labels(labels, min_confidence=0.5)
    with pytest.raises(EdgekdError, match="gives hard labels only; keep='topk'"):
        label_pool(hard, pool, tmp_path / "hard2", keep="topk")

    def top2(x):   # an API returning the best two logits, unsorted
        z = x.reshape(len(x), -1)[:, :4] * 2
        idx = np.argsort(z, 1)[:, -2:]
        return TeacherOutput("topk", np.take_along_axis(z, idx, 1), idx, "logits")

    manifest = label_pool(FunctionTeacher(top2, identity="top2"), pool, tmp_path / "top2", top_k=5)
    assert manifest["renormalized"] and manifest["top_k_stored"] == 2 and manifest["output_kind"] == "topk-logits"
    labels = read_labels(tmp_path / "top2")
    z = pool.reshape(100, -1)[:, :4] * 2
    assert np.array_equal(labels.labels, z.argmax(1))
    assert np.allclose(np.asarray(labels.topk_probs).sum(1), 1, atol=2e-3)


def _designed_pool_teacher():
    """Class c of sample i: 15 samples of class 0, 10 of class 1, 5 of class 2; confidence rising with i."""
    classes = np.array([0] * 15 + [1] * 10 + [2] * 5)
    confidence = np.concatenate([np.linspace(0.4, 0.95, 15), np.linspace(0.4, 0.95, 10), np.linspace(0.4, 0.95, 5)])

    def fn(x):
        i = x[:, 0].astype(np.int64)
        p = np.full((len(i), 4), 0.0, np.float32)
        p[np.arange(len(i)), classes[i]] = confidence[i]
        rest = (1 - confidence[i]) / 3
        for j in range(len(i)):
            p[j, [c for c in range(4) if c != classes[i[j]]]] = rest[j]
        return TeacherOutput("probs", p)

    pool = np.arange(30, dtype=np.float32)[:, None].repeat(2, 1)
    return FunctionTeacher(fn, identity="designed"), pool, classes, confidence


def test_filter_and_balance_report_counts(tmp_path):
    teacher, pool, classes, confidence = _designed_pool_teacher()
    label_pool(teacher, pool, tmp_path, top_k=2, shard_size=8)
    labels = read_labels(tmp_path)
    assert labels.num_classes == 4 and np.array_equal(labels.labels, classes)

    kept, report = filter_labels(labels, min_confidence=0.6)
    expected_conf = [int(((classes == c) & (confidence >= 0.6 - 1e-3)).sum()) for c in range(4)]
    assert [r["before"] for r in report["per_class"]] == [15, 10, 5, 0]
    assert [r["after_confidence"] for r in report["per_class"]] == expected_conf
    assert report["total"] == {"before": 30, "after_confidence": sum(expected_conf), "after": sum(expected_conf)}
    assert np.all(kept.confidence >= 0.6 - 1e-3)

    kept, report = filter_labels(labels, min_confidence=0.6, balance=True, seed=1)
    rarest = min(n for n in expected_conf if n)
    assert [r["after"] for r in report["per_class"]] == [rarest, rarest, rarest, 0]
    assert report["per_class_target"] == rarest and len(kept) == 3 * rarest
    assert np.all(np.diff(kept.indices) > 0)   # pool order kept
    assert np.array_equal(kept.labels, classes[kept.indices])
    again, _ = filter_labels(labels, min_confidence=0.6, balance=True, seed=1)
    assert np.array_equal(again.indices, kept.indices)

    kept, report = filter_labels(labels, balance=7)
    assert [r["after"] for r in report["per_class"]] == [7, 7, 5, 0] and report["total"]["after"] == 19
    assert "| total" in format_filter_report(report)
    with pytest.raises(EdgekdError, match="balance must be true/false or a per-class cap >= 1"):
        filter_labels(labels, balance=0)


def test_topk_loss_from_stored_probabilities_matches_full_kd():
    # What a training loop does with labels: values_are="probs", the probabilities already at T.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g) * 3
    for T in (1.0, 4.0):
        p = torch.softmax(t / T, dim=1)
        vals, idx = p.sort(dim=1, descending=True)
        full = soft_target_loss(s, t, T)
        assert torch.allclose(topk_soft_target_loss(s, vals, idx, T, values_are="probs"), full, atol=1e-5)
    # k < C: the missing mass is spread uniformly over the other classes (written out by hand).
    T = 2.0
    p = torch.softmax(t / T, dim=1)
    vals, idx = p.topk(2, dim=1)
    target = torch.zeros_like(p).scatter(1, idx, vals)
    rest = ((1 - vals.sum(1)) / 4).unsqueeze(1)
    target = torch.where(target > 0, target, rest.expand_as(target))
    log_q = torch.log_softmax(s / T, dim=1)
    hand = (target * (target.log() - log_q)).sum(1).mean() * T * T
    assert torch.allclose(topk_soft_target_loss(s, vals, idx, T, values_are="probs"), hand, atol=1e-5)
    y = torch.tensor([0, -1, 2, 3, -1, 5, 1, 0])
    mixed = compute(Batch(s, y, topk=(vals, idx), values_are="probs"), ObjectiveConfig(T, 0.7))
    ce = torch.nn.functional.cross_entropy(s[y >= 0], y[y >= 0])
    assert torch.allclose(mixed, 0.7 * hand + 0.3 * ce, atol=1e-5)


def test_labelling_a_streamed_pool_decodes_in_workers_and_maps_its_shards(tmp_path, monkeypatch):
    """`edgekd label` over a folder of images: decoded only in DataLoader workers, written shard by shard,
    read back memory-mapped, and the same labels as the same pool in memory."""
    import os

    from edgekd.data import load_data, normalize_like, pool_source
    from edgekd.recipe import DataConfig
    from tests.test_streaming import _folder, record_decodes

    cfg = DataConfig(source=str(_folder(tmp_path / "imgs")), num_workers=2, val_fraction=0.0)
    d = load_data(cfg)
    x = normalize_like(d, pool_source(_folder(tmp_path / "pool", per_class=15), cfg, d.preprocess))
    decodes = record_decodes(monkeypatch, tmp_path / "decodes")
    teacher = FunctionTeacher(lambda b: b.reshape(len(b), -1)[:, :5] * 3, identity="f")
    label_pool(teacher, x, tmp_path / "lab", shard_size=8, batch_size=4)
    pids = decodes()
    assert len(pids) == 30 and os.getpid() not in pids
    lab = read_labels(tmp_path / "lab", pool=x)
    assert all(isinstance(p, np.memmap) for p in lab.topk_probs.parts) and len(lab.topk_probs.parts) == 4
    label_pool(teacher, x[:], tmp_path / "ref", shard_size=8, batch_size=4)
    ref = read_labels(tmp_path / "ref")
    np.testing.assert_array_equal(lab.labels, ref.labels)
    np.testing.assert_array_equal(np.asarray(lab.topk_probs), np.asarray(ref.topk_probs))
    kept = lab.subset(lab.labels == lab.labels[0])   # a view of the mapped rows, read on lookup
    np.testing.assert_array_equal(kept.topk_indices[:], np.asarray(ref.topk_indices)[ref.labels == ref.labels[0]])
