import numpy as np
import pytest
import torch
from PIL import Image

from edgekd import streaming
from edgekd.data import labelled_subset, load_data
from edgekd.errors import EdgekdError
from edgekd.recipe import DataConfig


def arrays_source():
    """A `module:function` data source returning arrays (used as tests.test_data:arrays_source)."""
    rng = np.random.default_rng(0)
    return {"x_train": rng.random((40, 6), dtype=np.float32), "y_train": np.arange(40) % 3,
            "x_test": rng.random((12, 6), dtype=np.float32), "y_test": np.arange(12) % 3}


def datasets_source():
    """A `module:function` data source returning (train, test) torch Datasets."""
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.rand(30, 1, 4, 4, generator=g), torch.arange(30) % 2)
    test = torch.utils.data.TensorDataset(torch.rand(10, 1, 4, 4, generator=g), torch.arange(10) % 2)
    return train, test


def raising_source():
    raise RuntimeError("database offline")


def test_digits_splits_are_disjoint_and_normalized():
    d = load_data(DataConfig(test_fraction=0.25, val_fraction=0.1))
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    again = load_data(DataConfig(test_fraction=0.25, val_fraction=0.1))
    assert np.array_equal(d.x_test, again.x_test)


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (50, 5, 5), dtype=np.uint8), y_train=np.arange(50) % 4,
             x_test=rng.integers(0, 255, (20, 5, 5), dtype=np.uint8), y_test=np.arange(20) % 4,
             x_unlabeled=rng.integers(0, 255, (7, 5, 5), dtype=np.uint8), class_names=np.array(list("abcd")))
    d = load_data(DataConfig(source="d.npz", val_fraction=0.2), tmp_path)
    assert d.input_shape == (1, 5, 5) and d.class_names == ("a", "b", "c", "d")
    assert len(d.x_test) == 20 and len(d.x_val) == 10 and d.x_unlabeled.shape == (7, 1, 5, 5)


def test_a_sources_own_uint8_validation_split_is_scaled_like_train(tmp_path):
    rng = np.random.default_rng(0)
    x_val = rng.integers(0, 255, (6, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (12, 5, 5), dtype=np.uint8), y_train=np.arange(12) % 3,
             x_val=x_val, y_val=np.arange(6) % 3, x_test=rng.integers(0, 255, (6, 5, 5), dtype=np.uint8),
             y_test=np.arange(6) % 3)
    d = load_data(DataConfig(source="d.npz", normalize=False), tmp_path)
    assert d.x_val.shape == (6, 1, 5, 5) and d.x_val.dtype == np.float32
    np.testing.assert_allclose(d.x_val[:, 0], x_val / 255.0, rtol=1e-6)
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, int), x_val=np.zeros((2, 4)),
             y_val=np.zeros(2, int), x_test=np.zeros((2, 3)), y_test=np.zeros(2, int))
    with pytest.raises(EdgekdError, match=r"bad.npz: x_val samples have shape \(4,\), expected \(3,\)"):
        load_data(DataConfig(source="bad.npz"), tmp_path)


@pytest.mark.parametrize("arrays,fragment", [
    ({"x_train": np.zeros((4, 3))}, "missing arrays y_train, x_test, y_test"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 5)), "y_test": np.zeros(2, int)},
     "x_test samples have (5,)"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.array([0, 1, 2, 9]), "x_test": np.zeros((2, 3)),
      "y_test": np.array([0, -1])}, "y_test has labels in [-1, 0]"),
    ({"x_train": np.zeros((4, 3)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 3)), "y_test": np.zeros(2, int)},
     "y_train has shape (3,); expected (4,)"),
    ({"x_train": np.array([["a"] * 3] * 4), "y_train": np.zeros(4, int), "x_test": np.zeros((2, 3)),
      "y_test": np.zeros(2, int)}, "x_train has dtype <U1"),
])
def test_bad_npz_names_the_array(tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EdgekdError) as e:
        load_data(DataConfig(source=str(tmp_path / "bad.npz")))
    assert fragment in str(e.value) and "bad.npz" in str(e.value)


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    d = load_data(DataConfig(source="imgs", test_fraction=0.34, val_fraction=0.0, image_size=[8, 8]), tmp_path)
    assert d.class_names == ("cat", "dog") and d.input_shape == (3, 8, 8)
    assert len(d.x_test) == 4 and len(d.x_train) == 8
    grey = load_data(DataConfig(source=str(tmp_path / "imgs"), grayscale=True))
    assert grey.input_shape == (1, 10, 12)


def test_function_sources():
    d = load_data(DataConfig(source="tests.test_data:arrays_source", val_fraction=0.0))
    assert d.input_shape == (6,) and d.num_classes == 3 and len(d.x_train) == 40
    d = load_data(DataConfig(source="tests.test_data:datasets_source", val_fraction=0.0))
    assert d.input_shape == (1, 4, 4) and len(d.x_test) == 10
    with pytest.raises(EdgekdError, match="raised RuntimeError: database offline"):
        load_data(DataConfig(source="tests.test_data:raising_source"))
    with pytest.raises(EdgekdError, match="no callable 'missing'"):
        load_data(DataConfig(source="tests.test_data:missing"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(EdgekdError, match="nothere.npz: file not found"):
        load_data(DataConfig(source="nothere.npz"), tmp_path)


def _write_idx(path, array):
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_source_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fm"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 28, 28)))
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    d = load_data(DataConfig(source=f"fashion-mnist:{folder}", val_fraction=0.0))
    assert d.input_shape == (1, 28, 28) and len(d.x_train) == 40 and len(d.x_test) == 20
    assert d.class_names[0] == "T-shirt/top" and d.num_classes == 10
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(EdgekdError, match="t10k-labels-idx1-ubyte"):
        load_data(DataConfig(source=f"fashion-mnist:{folder}"))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(EdgekdError, match="header says"):
        load_data(DataConfig(source=f"fashion-mnist:{folder}"))


# --- Image folders, streamed from disk --------------------------------------------------------------------------

def _folder(root, classes=("cat", "dog"), per_class=6, size=(10, 12), seed=0, suffix=".png"):
    """Real image files: one folder per class, class c brighter than the others so a model can learn it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = rng.integers(0, 120, (*size, 3), dtype=np.uint8) + np.uint8(120 * c)
            Image.fromarray(px).save(root / name / f"{i}{suffix}")
    return root


def test_image_folder_is_indexed_not_loaded_and_reads_through_the_eval_transform(tmp_path):
    from edgekd.preprocess import apply
    from edgekd.streaming import LazyImages

    _folder(tmp_path / "imgs", per_class=10)
    d = load_data(DataConfig(source="imgs", test_fraction=0.2, val_fraction=0.25, resize=8, crop=[8, 8],
                             stats_samples=6), tmp_path)
    assert isinstance(d.x_train, LazyImages) and isinstance(d.x_test, LazyImages)
    assert d.input_shape == (3, 8, 8) and (len(d.x_train), len(d.x_val), len(d.x_test)) == (12, 4, 4)
    files = [set(x.files()) for x in (d.x_train, d.x_val, d.x_test)]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert sorted(np.bincount(d.y_test)) == [2, 2]                # stratified
    assert d.preprocess.mean == d.mean and d.preprocess.resize == 8 and d.preprocess.crop == (8, 8)
    assert d.report["statistics"] == "estimated from 6 training inputs (seeded draw)"
    # an input is exactly the shared eval transform of its file, with the run's statistics
    np.testing.assert_array_equal(d.x_test[1], apply(d.preprocess, d.x_test.files()[1]))
    batch = d.x_train[np.array([0, 3])]
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == np.float32
    again = load_data(DataConfig(source="imgs", test_fraction=0.2, val_fraction=0.25, resize=8, crop=[8, 8],
                                 stats_samples=6), tmp_path)
    assert again.x_test.files() == d.x_test.files() and again.mean == d.mean
    named = load_data(DataConfig(source="imgs", image_size=[8, 8], mean="imagenet", std="imagenet"), tmp_path)
    assert named.mean == (0.485, 0.456, 0.406) and named.report["statistics"] == "[data] mean/std"


def test_train_val_test_layout_and_mismatched_class_folders(tmp_path):
    root = tmp_path / "split"
    for split, n in (("train", 8), ("val", 2), ("test", 3)):
        _folder(root / split, per_class=n, seed=len(split))
    d = load_data(DataConfig(source=str(root), image_size=[8, 8], val_fraction=0.5))
    assert (len(d.x_train), len(d.x_val), len(d.x_test)) == (16, 4, 6)   # val/ is used, not carved
    assert d.report["layout"] == "train/val/test" and d.class_names == ("cat", "dog")
    _folder(root / "test", classes=("emu",), per_class=1)
    with pytest.raises(EdgekdError, match=r"test: class folders differ from .*train's; not in train/: emu"):
        load_data(DataConfig(source=str(root), image_size=[8, 8]))
    (root / "test").rename(tmp_path / "elsewhere")
    with pytest.raises(EdgekdError, match="has train/ but no test/ folder"):
        load_data(DataConfig(source=str(root), image_size=[8, 8]))


def test_mixed_sizes_need_image_size_and_are_each_resized_to_it(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=3)
    Image.fromarray(np.zeros((20, 7, 3), np.uint8)).save(root / "dog" / "tall.png")
    with pytest.raises(EdgekdError, match=r"images differ in size \(.*tall.png gives .*set \[data\] image_size"):
        load_data(DataConfig(source=str(root)))
    d = load_data(DataConfig(source=str(root), image_size=[6, 5], test_fraction=0.0, val_fraction=0.0))
    assert d.input_shape == (3, 6, 5) and d.x_train[:].shape == (7, 3, 6, 5)
    d = load_data(DataConfig(source=str(root), image_size=[6, 5], resize=8, test_fraction=0.0, val_fraction=0.0))
    assert (d.preprocess.resize, d.preprocess.crop) == (8, (6, 5)) and d.input_shape == (3, 6, 5)
    with pytest.raises(EdgekdError, match=r"data.crop \[4, 4\] and data.image_size \[6, 5\] differ"):
        load_data(DataConfig(source=str(root), image_size=[6, 5], crop=[4, 4]))


def _bad_files(root):
    """One of each bad input next to good images."""
    import io
    import os

    (root / "cat" / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 12, 3), np.uint8)).save(buf, "PNG")
    (root / "cat" / "cut.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    Image.fromarray((np.arange(120, dtype=np.uint16) * 500).reshape(10, 12)).save(root / "dog" / "deep.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).convert("CMYK").save(root / "dog" / "cmyk.jpg")   # accepted
    Image.fromarray(np.zeros((10, 12, 4), np.uint8)).save(root / "dog" / "rgba.png")                   # accepted
    os.mkfifo(root / "dog" / "x.png")


def test_bad_images_stop_the_run_naming_the_file_or_are_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=6)
    _bad_files(root)
    # the first file whose header is bad (a truncated body, cut.png, only shows when decoded: see below)
    with pytest.raises(EdgekdError, match=r"empty.png: empty file \(0 bytes\); set \[data\] skip_bad_images") as e:
        load_data(DataConfig(source=str(root)))
    assert "\n" not in str(e.value)
    d = load_data(DataConfig(source=str(root), skip_bad_images=True, test_fraction=0.0, val_fraction=0.0))
    assert len(d.x_train) == 14 and d.report["skipped"] == 4    # 12 good + CMYK + RGBA
    why = " ".join(d.report["skipped_files"])
    for fragment in ("empty.png: empty file", "cut.png: not a readable image", "deep.png: mode I",
                     "x.png: not a regular file"):
        assert fragment in why
    assert d.x_train[:].shape == (14, 3, 10, 12)


def test_bomb_limit_and_empty_class_folder(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=2)
    with pytest.raises(EdgekdError, match=r"0.png: 12x10 is 120 pixels, more than the limit of 100"):
        load_data(DataConfig(source=str(root), max_pixels=100))
    (root / "emu").mkdir()
    with pytest.raises(EdgekdError, match=r"emu: class folder has no images"):
        load_data(DataConfig(source=str(root)))


def test_training_on_a_streamed_folder_through_workers_matches_the_same_arrays_in_memory(tmp_path):
    """Two DataLoader workers decoding per batch give the very weights that training on the same inputs,
    read into one array, gives: the streamed path changes where data comes from, not what is learned."""
    from edgekd.models import build_model
    from edgekd.recipe import ModelConfig
    from edgekd.streaming import LoaderOptions
    from edgekd.train import accuracy, fit

    _folder(tmp_path / "imgs", per_class=12)
    d = load_data(DataConfig(source="imgs", image_size=[8, 8], num_workers=2), tmp_path)
    cfg = ModelConfig(model="cnn:widths=4", epochs=2, batch_size=5, lr=1e-2)
    weights = []
    for x in (d.x_train, np.asarray(d.x_train)):
        torch.manual_seed(0)
        model = build_model(cfg.model, d.input_shape, d.num_classes)
        fit(model, x, d.y_train, cfg, device=torch.device("cpu"), desc="t", progress=False,
            x_val=d.x_val, y_val=d.y_val)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert accuracy(model, d.x_test.with_options(LoaderOptions(num_workers=1)), d.y_test) == \
        accuracy(model, np.asarray(d.x_test), d.y_test)


def test_cli_distills_a_streamed_folder_skipping_and_counting_bad_images(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = _folder(tmp_path / "imgs", per_class=10)
    _bad_files(root)
    recipe = tmp_path / "r.toml"
    body = """
[data]
source = "imgs"
image_size = [8, 8]
num_workers = 1
{extra}
[teacher]
model = "cnn:widths=4"
epochs = 1
batch_size = 8
[student]
model = "mlp:hidden=8"
epochs = 1
batch_size = 8
[distill]
baseline = false
"""

    def run(extra):
        recipe.write_text(body.format(extra=extra))
        return subprocess.run([sys.executable, "-m", "edgekd", "distill", str(recipe), "--out", str(tmp_path / "run"),
                               "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    r = run("")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: image {root / 'cat' / 'empty.png'}: empty file (0 bytes); set [data] skip_bad_images = true to "
        "skip such files"]
    r = run("skip_bad_images = true")
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert data["skipped"] == 4 and data["images"] == 22 and data["streamed"] and data["workers"] == 1


def test_large_npz_is_memory_mapped_and_reads_like_the_loaded_one(tmp_path):
    from edgekd.streaming import LazyArray

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (50, 5, 6), dtype=np.uint8), y_train=np.arange(50) % 4,
             x_test=rng.integers(0, 255, (20, 5, 6), dtype=np.uint8), y_test=np.arange(20) % 4,
             class_names=np.array(list("abcd")))
    loaded = load_data(DataConfig(source="d.npz", val_fraction=0.2), tmp_path)
    mapped = load_data(DataConfig(source="d.npz", val_fraction=0.2, memory_map=True, stats_samples=1000), tmp_path)
    assert isinstance(mapped.x_train, LazyArray) and isinstance(mapped.x_train.base, np.memmap)
    assert mapped.class_names == loaded.class_names and mapped.input_shape == loaded.input_shape == (1, 5, 6)
    np.testing.assert_allclose(mapped.mean + mapped.std, loaded.mean + loaded.std, rtol=1e-5)
    np.testing.assert_allclose(mapped.x_test[:], loaded.x_test, atol=1e-4)
    np.testing.assert_array_equal(mapped.y_val, loaded.y_val)
    assert streaming.fingerprint(mapped.x_train) == streaming.fingerprint(mapped.x_train)   # caches key on it
    assert streaming.fingerprint(mapped.x_train) != streaming.fingerprint(mapped.x_test)
    np.savez_compressed(tmp_path / "c.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, int),
                        x_test=np.zeros((2, 3)), y_test=np.zeros(2, int))
    with pytest.raises(EdgekdError, match=r"c.npz: array 'x_train' is compressed"):
        load_data(DataConfig(source="c.npz", memory_map=True), tmp_path)


def iterable_source():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])
    return Stream(), Stream()


def test_torch_dataset_sources_are_used_as_they_are(tmp_path):
    from edgekd.models import build_model
    from edgekd.recipe import ModelConfig
    from edgekd.streaming import LazyArray
    from edgekd.train import fit

    d = load_data(DataConfig(source="tests.test_data:datasets_source", val_fraction=0.2, num_workers=1))
    assert isinstance(d.x_train, LazyArray) and isinstance(d.x_train.base, torch.utils.data.TensorDataset)
    assert d.input_shape == (1, 4, 4) and (len(d.x_train), len(d.x_val), len(d.x_test)) == (24, 6, 10)
    train, _ = datasets_source()
    row = d.x_train.rows[0]
    np.testing.assert_allclose(d.x_train[0], (train[row][0].numpy() - d.mean[0]) / d.std[0], atol=1e-6)
    model = build_model("cnn:widths=4", d.input_shape, d.num_classes)
    history = fit(model, d.x_train, d.y_train, ModelConfig(epochs=1, batch_size=8), device=torch.device("cpu"),
                  desc="t", progress=False, x_val=d.x_val, y_val=d.y_val)
    assert 0.0 <= history[0]["val_accuracy"] <= 1.0
    with pytest.raises(EdgekdError, match=r"train dataset: the stream is empty"):
        load_data(DataConfig(source="tests.test_data:iterable_source", val_fraction=0.0))


def test_image_keys_on_other_sources_are_refused():
    with pytest.raises(EdgekdError, match=r"resize, crop and skip_bad_images apply to image folders only"):
        load_data(DataConfig(source="tests.test_data:arrays_source", resize=8))


def test_labelled_and_unlabeled_pools_of_a_streamed_folder_are_indexed_not_read(tmp_path):
    from edgekd.distillation import transfer_set
    from edgekd.models import build_model
    from edgekd.preprocess import apply
    from edgekd.recipe import ModelConfig
    from edgekd.streaming import LazyConcat, LazyImages
    from edgekd.train import fit

    root = _folder(tmp_path / "imgs", per_class=12)
    pool = _folder(tmp_path / "pool" / "any" / "depth", classes=("a",), per_class=5, seed=3)
    cfg = dict(source=str(root), num_workers=1, val_fraction=0.0)
    full = load_data(DataConfig(**cfg))
    d = load_data(DataConfig(**cfg, labelled=6, unlabeled=str(tmp_path / "pool")))
    assert isinstance(d.x_train, LazyImages) and isinstance(d.x_unlabeled, LazyConcat)
    keep = labelled_subset(full.y_train, 6, 0, "t")
    np.testing.assert_array_equal(d.x_train[:], full.x_train[keep])
    rest = np.setdiff1d(np.arange(len(full.y_train)), keep)
    assert len(d.x_unlabeled) == len(rest) + 5
    np.testing.assert_array_equal(d.x_unlabeled[:len(rest)], full.x_train[rest])
    first_pool = sorted(str(p) for p in pool.rglob("*.png"))[0]
    np.testing.assert_allclose(d.x_unlabeled[len(rest)], apply(d.preprocess, first_pool), atol=1e-6)
    x, y = transfer_set(d)
    assert isinstance(x, LazyConcat) and len(x) == len(y) == 6 + len(rest) + 5 and (y == -1).sum() == len(rest) + 5
    model = build_model("cnn:widths=4", d.input_shape, d.num_classes)
    fit(model, x, y, ModelConfig(epochs=1, batch_size=8), device=torch.device("cpu"), desc="t", progress=False)
    # a large .npy pool is memory-mapped (memory_map = true forces it), uint8 scaled by 1/255
    px = np.random.default_rng(1).integers(0, 255, (7, 3, 10, 12), dtype=np.uint8)
    np.save(tmp_path / "pool.npy", px)
    m = load_data(DataConfig(**cfg, unlabeled=str(tmp_path / "pool.npy"), memory_map=True))
    assert isinstance(m.x_unlabeled.base, np.memmap)
    mean, std = np.asarray(m.mean, np.float32)[:, None, None], np.asarray(m.std, np.float32)[:, None, None]
    np.testing.assert_allclose(m.x_unlabeled[2], (px[2] / np.float32(255) - mean) / std, atol=1e-5)
    with pytest.raises(EdgekdError, match=r"pool .*: a folder of images needs an image folder"):
        load_data(DataConfig(source="digits", unlabeled=str(tmp_path / "pool")))
