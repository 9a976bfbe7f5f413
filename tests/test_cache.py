import json

import numpy as np
import pytest
import torch

from edgekd.cache import (
    ImageAugment,
    augment_key_of,
    augment_views,
    build_cache,
    load_cache,
    make_augment,
    view_rng,
)
from edgekd.errors import EdgekdError
from edgekd.losses import soft_target_loss, topk_soft_target_loss
from edgekd.models import build_model
from edgekd.objective import Batch, ObjectiveConfig, compute
from edgekd.teachers import FunctionTeacher, TeacherOutput, TorchTeacher

INPUT_SHAPE = (1, 6, 6)
CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp:hidden=16", INPUT_SHAPE, CLASSES).eval()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((30, *INPUT_SHAPE)).astype(np.float32)


class RecordingTeacher:
    """A real TorchTeacher that records every batch of views it is shown."""

    def __init__(self, teacher):
        self.teacher, self.seen = teacher, []
        self.name = "recording teacher"

    def identity(self):
        return self.teacher.identity()

    def __call__(self, views):
        self.seen.append(views.copy())
        return self.teacher(views)


def _logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_cache_stores_topk_logits_of_views_the_training_loop_can_regenerate(model, x, tmp_path):
    augment = make_augment("flip,shift=1")
    teacher = RecordingTeacher(TorchTeacher(model))
    manifest = build_cache(teacher, x, tmp_path / "c", top_k=3, epochs=3, augment=augment, seed=7, batch_size=8)
    assert len(teacher.seen) == 3 * 4   # ceil(30 / 8) batches per epoch
    assert manifest["augment"] == "flip,shift=1" and manifest["stored_epochs"] == 3 and manifest["complete"]
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == manifest
    with np.load(tmp_path / "c" / "epoch-00001.npz") as f:
        assert f["values"].dtype == np.float16 and f["indices"].dtype == np.int16 and f["values"].shape == (30, 3)

    cache = load_cache(tmp_path / "c", x=x, augment_key=augment.key, seed=7, top_k=3,
                       teacher_identity=teacher.identity(), epochs=3)
    perm = np.random.default_rng(1).permutation(30)
    for epoch in range(3):
        built = np.concatenate(teacher.seen[epoch * 4:(epoch + 1) * 4])
        # the documented scheme: one generator per (seed, epoch, sample index)
        by_hand = np.concatenate([augment(x[i:i + 1], view_rng(7, epoch, i)) for i in range(30)])
        assert np.array_equal(built, by_hand)
        # a training loop visits samples in another order and other batch sizes: same views
        for batch in np.array_split(perm, 7):
            views = augment_views(x, batch, epoch=epoch, seed=7, augment=augment)
            assert np.array_equal(views, built[batch])
            values, indices = cache.lookup(epoch, batch)
            assert values.dtype == np.float32 and indices.dtype == np.int64 and values.shape == (len(batch), 3)
            z = _logits(model, views)
            assert np.array_equal(indices, np.argsort(-z, axis=1)[:, :3])
            top = -np.sort(-z, axis=1)[:, :3]
            assert np.allclose(values, top - top[:, :1], atol=1e-2)   # stored shifted: row max 0, float16
    assert not np.array_equal(augment_views(x, perm, epoch=0, seed=7, augment=augment),
                              augment_views(x, perm, epoch=1, seed=7, augment=augment))
    with pytest.raises(EdgekdError, match=r"holds epochs 0..2, asked for epoch 3"):
        cache.lookup(3, [0])
    with pytest.raises(EdgekdError, match="holds 3 augmented epochs, training runs 5"):
        load_cache(tmp_path / "c", x=x, augment_key=augment.key, seed=7, top_k=3, epochs=5)

    # rebuilding with the same key finds everything done; a damaged epoch file is redone alone
    again = RecordingTeacher(TorchTeacher(model))
    build_cache(again, x, tmp_path / "c", top_k=3, epochs=3, augment=augment, seed=7, batch_size=8)
    assert again.seen == []
    (tmp_path / "c" / "epoch-00002.npz").write_bytes(b"broken")
    with pytest.raises(EdgekdError, match=r"epoch-00002.npz fails its sha256 check"):
        load_cache(tmp_path / "c", x=x, augment_key=augment.key, seed=7, top_k=3)
    build_cache(again, x, tmp_path / "c", top_k=3, epochs=3, augment=augment, seed=7, batch_size=16)
    assert len(again.seen) == 2
    load_cache(tmp_path / "c", x=x, augment_key=augment.key, seed=7, top_k=3)


def test_cache_for_other_data_augment_seed_or_teacher_is_refused(model, x, tmp_path):
    augment = make_augment("flip")
    teacher = TorchTeacher(model)
    build_cache(teacher, x, tmp_path, top_k=2, epochs=2, augment=augment, seed=3)
    ok = {"x": x, "augment_key": "flip", "seed": 3, "top_k": 2}
    load_cache(tmp_path, **ok)
    other_x = x.copy()
    other_x[0, 0, 0, 0] += 1e-3
    with pytest.raises(EdgekdError, match=r"built for other data \(key x_sha256"):
        load_cache(tmp_path, **{**ok, "x": other_x})
    with pytest.raises(EdgekdError, match=r"built for other data .*this run has 29 of \(1, 6, 6\)"):
        load_cache(tmp_path, **{**ok, "x": x[:29]})
    with pytest.raises(EdgekdError, match=r"built with augment = 'flip', this run asks for 'flip,shift=2'"):
        load_cache(tmp_path, **{**ok, "augment_key": "flip,shift=2"})
    with pytest.raises(EdgekdError, match=r"built with seed = 3, this run asks for 4"):
        load_cache(tmp_path, **{**ok, "seed": 4})
    with pytest.raises(EdgekdError, match=r"built with top_k = 2, this run asks for 3"):
        load_cache(tmp_path, **{**ok, "top_k": 3})
    other = TorchTeacher(build_model("mlp:hidden=16", INPUT_SHAPE, CLASSES))
    with pytest.raises(EdgekdError, match=r"built with teacher = torch:\w+\.\.\., this run asks for torch:"):
        load_cache(tmp_path, **ok, teacher_identity=other.identity())
    with pytest.raises(EdgekdError, match=r"another key \(seed: folder has 3, this build 5\)"):
        build_cache(teacher, x, tmp_path, top_k=2, epochs=2, augment=augment, seed=5)
    with pytest.raises(EdgekdError, match="no manifest.json"):
        load_cache(tmp_path / "missing", **ok)


def test_unaugmented_cache_stores_one_epoch_and_matches_full_kd(model, x, tmp_path):
    teacher = RecordingTeacher(TorchTeacher(model))
    manifest = build_cache(teacher, x, tmp_path, top_k=CLASSES, epochs=10, augment=None, seed=0, batch_size=64)
    assert manifest["stored_epochs"] == 1 and manifest["augment"] == "none" and len(teacher.seen) == 1
    cache = load_cache(tmp_path, x=x, augment_key="none", seed=0, top_k=CLASSES, epochs=50)
    values, indices = cache.lookup(37, np.arange(30))   # any epoch: the views never change
    z = torch.from_numpy(_logits(model, x))
    s = torch.randn(30, CLASSES, generator=torch.Generator().manual_seed(0))
    # k = C: the cached top-k (float16, shifted) reproduces the full-logit KD loss
    loss = topk_soft_target_loss(s, torch.from_numpy(values), torch.from_numpy(indices), 4.0)
    assert torch.allclose(loss, soft_target_loss(s, z, 4.0), rtol=1e-2, atol=1e-3)


def test_probs_teacher_is_cached_as_log_probs_and_labels_teacher_is_refused(x, tmp_path):
    w = np.random.default_rng(2).standard_normal((36, CLASSES)).astype(np.float32)

    def probs(a):
        z = a.reshape(len(a), -1) @ w
        e = np.exp(z - z.max(1, keepdims=True))
        return TeacherOutput("probs", (e / e.sum(1, keepdims=True)).astype(np.float32))

    build_cache(FunctionTeacher(probs, identity="probs"), x, tmp_path / "p", top_k=2, epochs=1, augment=None, seed=0)
    values, indices = load_cache(tmp_path / "p", x=x, augment_key="none", seed=0, top_k=2).lookup(0, [0, 1])
    z = x[:2].reshape(2, -1) @ w
    top = -np.sort(-z, axis=1)[:, :2]
    assert np.allclose(values, top - top[:, :1], atol=2e-2) and np.array_equal(indices[:, 0], z[:].argmax(1))
    hard = FunctionTeacher(lambda a: TeacherOutput("labels", np.zeros(len(a), np.int64)), identity="zeros")
    with pytest.raises(EdgekdError, match="gives hard labels only; a teacher cache needs logits"):
        build_cache(hard, x, tmp_path / "h", top_k=2, epochs=1, augment=None, seed=0)


def test_augment_specs_and_keys(x):
    assert make_augment("none") is None and augment_key_of(None) == "none"
    aug = make_augment("flip, shift=2, noise=0.1")
    assert aug == ImageAugment(flip=True, shift=2, noise=0.1) and aug.key == "flip,shift=2,noise=0.1"
    with pytest.raises(EdgekdError, match="cannot read 'rotate=5'"):
        make_augment("flip,rotate=5")
    shift = ImageAugment(shift=1)
    views = augment_views(x, np.arange(10), epoch=0, seed=0, augment=shift)
    assert views.shape == (10, *INPUT_SHAPE) and not np.array_equal(views, x[:10])
    assert np.array_equal(views, augment_views(x, np.arange(10), epoch=0, seed=0, augment=shift))
    flipped = ImageAugment(flip=True)(x[:1], view_rng(0, 0, 0))
    assert np.array_equal(flipped, x[:1]) or np.array_equal(flipped, x[:1, ..., ::-1])
    with pytest.raises(EdgekdError, match="must return the same shape"):
        augment_views(x, [0], epoch=0, seed=0, augment=lambda a, rng: a[:, :, :3])


def test_topk_loss_equals_full_kd_for_k_equal_classes():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 7, generator=g), torch.randn(16, 7, generator=g) * 4
    for T in (1.0, 2.0, 8.0):
        vals, idx = t.sort(dim=1, descending=True)
        assert torch.allclose(topk_soft_target_loss(s, vals, idx, T), soft_target_loss(s, t, T), atol=1e-5)
        perm = torch.randperm(7, generator=g)   # order of the k entries does not matter
        assert torch.allclose(topk_soft_target_loss(s, t[:, perm], perm.expand(16, 7), T),
                              soft_target_loss(s, t, T), atol=1e-5)
    # k < C with logits: the unknown logits take the smallest known value, then the full softmax at T
    vals, idx = t.topk(3, dim=1)
    full = vals[:, -1:].expand(-1, 7).clone().scatter(1, idx, vals)
    p = torch.softmax(full / 2.0, dim=1)
    log_q = torch.log_softmax(s / 2.0, dim=1)
    hand = (p * (p.log() - log_q)).sum(1).mean() * 4.0
    sv = s.clone().requires_grad_(True)
    loss = topk_soft_target_loss(sv, vals, idx, 2.0)
    assert torch.allclose(loss, hand, atol=1e-5)
    loss.backward()
    assert torch.isfinite(sv.grad).all() and sv.grad.abs().sum() > 0
    y = torch.arange(16) % 7
    assert torch.allclose(compute(Batch(s, y, topk=(vals, idx)), ObjectiveConfig(2.0, 1.0)), hand, atol=1e-5)


def test_cache_of_a_streamed_folder_is_memory_mapped_and_keyed_to_its_files(tmp_path):
    """A teacher cache built on an image folder streamed from disk: lookups come from memory-mapped files
    and match the teacher on the same inputs; touching one image file changes the key."""
    import os

    from PIL import Image

    from edgekd.data import load_data
    from edgekd.recipe import DataConfig

    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            px = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(px).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    d = load_data(DataConfig(source=str(tmp_path / "imgs"), val_fraction=0.0, num_workers=0))
    torch.manual_seed(0)
    teacher = TorchTeacher(build_model("cnn:widths=4", d.input_shape, 2).eval(), identity="t")
    build_cache(teacher, d.x_train, tmp_path / "c", top_k=2, epochs=1, augment=None, seed=0)
    cache = load_cache(tmp_path / "c", x=d.x_train, augment_key="none", seed=0, top_k=2)
    assert isinstance(cache.values[0], np.memmap) and isinstance(cache.indices[0], np.memmap)
    values, classes = cache.lookup(0, [3, 1])
    logits = teacher.model(torch.from_numpy(d.x_train[np.array([3, 1])])).detach().numpy()
    np.testing.assert_array_equal(classes, np.argsort(-logits, axis=1))
    np.testing.assert_allclose(values[:, 1], np.sort(logits, axis=1)[:, 0] - logits.max(1), atol=1e-2)
    f = d.x_train.files()[0]
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    with pytest.raises(EdgekdError, match=r"built for other data \(key x_sha256"):
        load_cache(tmp_path / "c", x=d.x_train, augment_key="none", seed=0, top_k=2)


def test_cache_teacher_and_offline_kd_on_a_streamed_folder_decode_only_in_workers(tmp_path, monkeypatch):
    """cache-teacher over a streamed folder decodes in DataLoader workers and matches the cache of the same
    inputs in memory; distill --cache then takes each batch's views from the batch its feed read, so the
    training process decodes nothing."""
    import os

    from edgekd.distillation import cache_teacher, distill, train_teacher
    from edgekd.recipe import load_recipe
    from tests.test_streaming import _folder, record_decodes

    _folder(tmp_path / "imgs")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nsource = "imgs"\nnum_workers = 2\nmean = [0.5]\nstd = [0.25]\n'
                      '[teacher]\nmodel = "cnn:widths=4"\nepochs = 1\nbatch_size = 8\n'
                      '[student]\nmodel = "mlp:hidden=8"\nepochs = 2\nbatch_size = 8\n[distill]\nbaseline = false\n')
    r = load_recipe(recipe)
    train_teacher(r, tmp_path / "run", device="cpu", progress=False)
    decodes = record_decodes(monkeypatch, tmp_path / "decodes")
    manifest = cache_teacher(r, tmp_path / "run", top_k=2, epochs=2, augment="flip,shift=1", device="cpu",
                             progress=False)
    assert manifest["complete"] and os.getpid() not in decodes() and len(decodes()) == 2 * manifest["samples"]
    metrics = distill(r, tmp_path / "run", device="cpu", progress=False, cache=tmp_path / "run" / "teacher-cache")
    assert metrics["student"]["offline"]["source"] == "cache" and os.getpid() not in decodes()
    from edgekd.data import load_data

    d = load_data(r.data, r.base_dir)
    teacher = FunctionTeacher(lambda b: b.reshape(len(b), -1)[:, :4], identity="f")
    aug = make_augment("flip,shift=1")
    build_cache(teacher, d.x_train, tmp_path / "lazy", top_k=2, epochs=2, augment=aug, seed=3, batch_size=8)
    build_cache(teacher, d.x_train[:], tmp_path / "mem", top_k=2, epochs=2, augment=aug, seed=3, batch_size=8)
    lazy = load_cache(tmp_path / "lazy", x=d.x_train, augment_key=aug.key, seed=3, top_k=2)
    mem = load_cache(tmp_path / "mem", x=d.x_train[:], augment_key=aug.key, seed=3, top_k=2)
    for e in range(2):
        np.testing.assert_array_equal(lazy.values[e], mem.values[e])
        np.testing.assert_array_equal(lazy.indices[e], mem.indices[e])
