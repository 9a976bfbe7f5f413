import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data import load_data
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
