"""Data sources -> normalized numpy splits.

Sources: "digits" (scikit-learn's bundled 8x8 digits), an `.npz` with x_train, y_train, x_test, y_test
(optional x_unlabeled, class_names), a folder of images with one sub-folder per class, or
"package.module:function" returning such a dict or a (train, test) pair of torch Datasets.
Images are float32 (N, C, H, W) in [0, 1] before normalization; flat features stay (N, F).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.recipe import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_unlabeled: np.ndarray | None
    class_names: tuple[str, ...]
    mean: tuple[float, ...]     # per channel (or one value for flat features), applied to every split
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


def _digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return {"x": x, "y": d.target.astype(np.int64), "class_names": [str(c) for c in d.target_names]}


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")   # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not): big-endian magic 0x000008NN (uint8), dims, then data."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise EdgekdError(f"data {path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise EdgekdError(f"data {path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise EdgekdError(f"data {path}: header says {dims} ({int(np.prod(dims))} bytes), file holds {body.size}")
    return body.reshape(dims)


def _fashion_mnist(folder: Path) -> dict[str, Any]:
    """Fashion-MNIST's four idx files (60k train / 10k test, 28x28 grey) from `folder`."""
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    out: dict[str, Any] = {"class_names": list(FASHION_MNIST_CLASSES)}
    for key, stem in names.items():
        path = next((folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).is_file()), None)
        if path is None:
            raise EdgekdError(f"data fashion-mnist: {folder / stem}(.gz) not found; install Debian's "
                              "dataset-fashion-mnist or use source = \"fashion-mnist:/folder/with/idx/files\"")
        out[key] = read_idx(path)
    return out


def _npz(path: Path) -> dict[str, Any]:
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load would take anything else for a pickle
        raise EdgekdError(f"data {path}: not a readable .npz file (expected a zip of .npy arrays, as numpy.savez "
                          "writes)")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for k in f.files:
                try:
                    arrays[k] = f[k]
                except ValueError as e:
                    raise EdgekdError(f"data {path}: cannot read array {k!r} ({e}); object arrays/pickles are "
                                      "not loaded, store numbers (float or uint8 inputs, integer labels)") from None
    except EdgekdError:
        raise
    except Exception as e:
        raise EdgekdError(f"data {path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise EdgekdError(f"data {path}: missing arrays {', '.join(missing)} (an .npz needs x_train, y_train, "
                          f"x_test, y_test; optional x_unlabeled, class_names); found {', '.join(arrays) or 'none'}")
    if "class_names" in arrays:
        arrays["class_names"] = [str(c) for c in arrays["class_names"].tolist()]
    return arrays


def _image_folder(path: Path, cfg: DataConfig) -> dict[str, Any]:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EdgekdError(f"data {path}: an image folder needs one sub-folder per class; found none")
    size = tuple(cfg.image_size) if cfg.image_size else None
    if size is not None and len(size) != 2:
        raise EdgekdError(f"data.image_size: expected [height, width], got {list(size)}")
    images, labels = [], []
    mode = "L" if cfg.grayscale else "RGB"
    for label, name in enumerate(classes):
        files = sorted(p for p in (path / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EdgekdError(f"data {path / name}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if size is None:
                        size = (im.height, im.width)
                    if (im.height, im.width) != size:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as e:
                raise EdgekdError(f"data {f}: not a readable image ({e})") from None
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(label)
    return {"x": np.stack(images), "y": np.asarray(labels, dtype=np.int64), "class_names": classes}


def _dataset_to_arrays(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    try:
        for i in range(len(ds)):
            x, y = ds[i]
            xs.append(np.asarray(x, dtype=np.float32))
            ys.append(int(y))
    except Exception as e:
        raise EdgekdError(f"{where}: could not read items as (input, label) pairs ({type(e).__name__}: {e})") from e
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _function(ref: str) -> dict[str, Any]:
    from edgekd.models import load_factory

    fn = load_factory(ref, "data source")
    try:
        out = fn()
    except Exception as e:
        raise EdgekdError(f"data source {ref!r} raised {type(e).__name__}: {e}") from e
    if isinstance(out, tuple) and len(out) == 2:
        x_train, y_train = _dataset_to_arrays(out[0], f"data source {ref!r} train dataset")
        x_test, y_test = _dataset_to_arrays(out[1], f"data source {ref!r} test dataset")
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    if isinstance(out, dict):
        return dict(out)
    raise EdgekdError(f"data source {ref!r} returned {type(out).__name__}; expected a dict of arrays "
                      "(x_train, y_train, x_test, y_test) or a (train, test) pair of Datasets")


def _as_inputs(x: Any, name: str, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise EdgekdError(f"{where}: {name} has dtype {x.dtype}; expected numbers (float, or uint8 images)")
    if x.ndim < 2:
        raise EdgekdError(f"{where}: {name} has shape {x.shape}; expected (samples, features) or (samples, [C,] H, W)")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / scale
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    if not np.isfinite(x).all():
        raise EdgekdError(f"{where}: {name} contains NaN or Inf values")
    return x


def _as_labels(y: Any, n: int, name: str, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and y.size and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise EdgekdError(f"{where}: {name} has dtype {y.dtype}; expected integer class indices")
    if y.shape != (n,):
        raise EdgekdError(f"{where}: {name} has shape {y.shape}; expected ({n},), one label per input")
    return y.astype(np.int64)


def _split(n: int, fraction: float, rng: np.random.Generator, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices: about `fraction` of each class goes to the second part."""
    first, second = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * fraction))
        second.append(idx[:k])
        first.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _subset(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of exactly min(n, len(y)) samples, stratified: each class keeps its share of n (largest
    remainders get the leftover samples), drawn at random within the class."""
    if n >= len(y):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    share = counts * n / len(y)
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take), kind="stable")[:n - int(take.sum())]:
        take[i] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picked))


def load_pool(path: str | Path, raw_scale: bool = False) -> np.ndarray:
    """An unlabelled pool: an .npz with `x` or `x_unlabeled` (or a bare .npy). Not normalized here."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"pool {path}: file not found")
    try:
        if path.suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                key = next((k for k in ("x", "x_unlabeled") if k in f.files), None)
                if key is None:
                    raise EdgekdError(f"pool {path}: expected an array 'x' or 'x_unlabeled', "
                                      f"found {', '.join(f.files)}")
                x = f[key]
    except EdgekdError:
        raise
    except Exception as e:
        raise EdgekdError(f"pool {path}: not a readable .npz/.npy ({type(e).__name__}: {e})") from None
    return _as_inputs(x, "x", f"pool {path}") if raw_scale else x


def load_data(cfg: DataConfig, base_dir: str | Path = ".") -> Dataset:
    """Load, split (test, then validation from train) and normalize a data source."""
    src = cfg.source
    path = Path(src).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    where = f"data {src}"
    if src == "digits":
        raw = _digits()
    elif src == "fashion-mnist" or src.startswith("fashion-mnist:"):
        folder = src.partition(":")[2]
        raw = _fashion_mnist(Path(folder).expanduser() if folder else FASHION_MNIST_DIR)
    elif src.endswith(".npz") or path.is_file():
        if not path.is_file():
            raise EdgekdError(f"data {path}: file not found")
        raw = _npz(path)
    elif path.is_dir():
        raw = _image_folder(path, cfg)
    elif ":" in src and not src.startswith((".", "/")):
        raw = _function(src)
        where = f"data source {src!r}"
    else:
        raise EdgekdError(f"data {path}: not found (expected 'digits', an .npz file, an image folder, "
                          "or 'package.module:function')")

    rng = np.random.default_rng(cfg.seed)
    if "x" in raw:  # one pool: carve the test split
        x = _as_inputs(raw["x"], "x", where)
        y = _as_labels(raw["y"], len(x), "y", where)
        tr, te = _split(len(x), cfg.test_fraction, rng, y)
        x_train, y_train, x_test, y_test = x[tr], y[tr], x[te], y[te]
    else:
        for k in ("x_train", "y_train", "x_test", "y_test"):
            if k not in raw:
                raise EdgekdError(f"{where}: missing {k!r} (expected x_train, y_train, x_test, y_test)")
        x_train = _as_inputs(raw["x_train"], "x_train", where)
        x_test = _as_inputs(raw["x_test"], "x_test", where)
        y_train = _as_labels(raw["y_train"], len(x_train), "y_train", where)
        y_test = _as_labels(raw["y_test"], len(x_test), "y_test", where)
    subset_rng = np.random.default_rng([cfg.seed, 1])   # its own stream: the splits below stay as without subsets
    if cfg.train_samples is not None:
        keep = _subset(y_train, cfg.train_samples, subset_rng)
        x_train, y_train = x_train[keep], y_train[keep]
    if cfg.test_samples is not None:
        keep = _subset(y_test, cfg.test_samples, subset_rng)
        x_test, y_test = x_test[keep], y_test[keep]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise EdgekdError(f"{where}: x_train samples have shape {x_train.shape[1:]} but x_test samples have "
                          f"{x_test.shape[1:]}; they must match")
    x_unl = raw.get("x_unlabeled")
    if cfg.unlabeled:
        x_unl = load_pool(Path(base_dir) / Path(cfg.unlabeled).expanduser(), raw_scale=True)
    if x_unl is not None:
        x_unl = _as_inputs(x_unl, "x_unlabeled", where)
        if x_unl.shape[1:] != x_train.shape[1:]:
            raise EdgekdError(f"{where}: x_unlabeled samples have shape {x_unl.shape[1:]}, expected "
                              f"{x_train.shape[1:]} like x_train")

    if not len(y_train) or not len(y_test):
        raise EdgekdError(f"{where}: {len(y_train)} training and {len(y_test)} test samples; each split needs at "
                          f"least one (test_fraction = {cfg.test_fraction}; more data, or another split)")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    names = raw.get("class_names")
    class_names = tuple(str(c) for c in names) if names is not None else tuple(str(i) for i in range(num_classes))
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y.min() < 0 or y.max() >= len(class_names):
            raise EdgekdError(f"{where}: {name} has labels in [{y.min()}, {y.max()}]; "
                              f"expected 0..{len(class_names) - 1} for {len(class_names)} classes")

    tr, va = _split(len(x_train), cfg.val_fraction, rng, y_train)
    x_val, y_val = x_train[va], y_train[va]
    x_train, y_train = x_train[tr], y_train[tr]
    if len(x_train) == 0:
        raise EdgekdError(f"{where}: no training samples left after the test/validation splits")

    axes = (0, 2, 3) if x_train.ndim == 4 else tuple(range(x_train.ndim))
    if cfg.normalize:
        mean = x_train.mean(axis=axes)
        std = x_train.std(axis=axes) + 1e-6
    else:
        mean = np.zeros(x_train.shape[1] if x_train.ndim == 4 else 1, np.float32)
        std = np.ones_like(mean)
    mean, std = np.atleast_1d(mean).astype(np.float32), np.atleast_1d(std).astype(np.float32)

    def norm(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        shape = (1, -1, 1, 1) if a.ndim == 4 else (1, -1) if len(mean) > 1 else (1,) * a.ndim
        return ((a - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)

    x_train, x_unl = norm(x_train), norm(x_unl)
    if cfg.labelled is not None:
        keep = labelled_subset(y_train, cfg.labelled, cfg.seed, where)
        pool = x_train[np.setdiff1d(np.arange(len(x_train)), keep)]
        x_unl = pool if x_unl is None else np.concatenate([pool, x_unl])
        x_train, y_train = x_train[keep], y_train[keep]
    return Dataset(x_train, y_train, norm(x_val), y_val, norm(x_test), y_test, x_unl, class_names,
                   tuple(float(v) for v in mean), tuple(float(v) for v in std))


def labelled_subset(y: np.ndarray, labelled: int | float, seed: int, where: str) -> np.ndarray:
    """Sorted indices of the training samples that keep their labels: a stratified, seeded draw of N (or a
    fraction) from the training split only, so it never touches the validation or test split."""
    from sklearn.model_selection import train_test_split

    n = int(round(labelled * len(y))) if isinstance(labelled, float) else int(labelled)
    classes = len(np.unique(y))
    if n > len(y) or n < classes:
        raise EdgekdError(f"{where}: [data].labelled = {labelled!r} keeps {n} labels; expected between {classes} "
                          f"(one per class) and {len(y)} (the training split)")
    if n == len(y):
        return np.arange(len(y))
    keep, _ = train_test_split(np.arange(len(y)), train_size=n, stratify=y, random_state=seed)
    return np.sort(keep)


def normalize_like(data: Dataset, x: np.ndarray) -> np.ndarray:
    """Apply the training split's normalization to another array of raw inputs (an unlabelled pool)."""
    x = _as_inputs(x, "x", "pool")
    if x.shape[1:] != data.input_shape:
        raise EdgekdError(f"pool: samples have shape {x.shape[1:]}, the model expects {data.input_shape}")
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1) if len(mean) > 1 else (1,) * x.ndim
    return ((x - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
