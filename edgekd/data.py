"""Data sources -> normalized numpy splits.

Sources: "digits" (scikit-learn's bundled 8x8 digits), an `.npz` with x_train, y_train, x_test, y_test
(optional x_unlabeled, class_names), a folder of images with one sub-folder per class, or
"package.module:function" returning such a dict or a (train, test) pair of torch Datasets.
Images are float32 (N, C, H, W) in [0, 1] before normalization; flat features stay (N, F).

Image folders, memory-mapped .npz arrays and torch Datasets are not read into memory: their splits are lazy
sources (`edgekd.streaming`) that DataLoader workers read batch by batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import shards, streaming
from edgekd.errors import EdgekdError
from edgekd.preprocess import IMAGE_SUFFIXES, NAMED_STATS, PreprocessSpec, is_image_file
from edgekd.recipe import DataConfig


@dataclass(frozen=True)
class Dataset:
    """The splits. Each x_* is an array or, for streamed sources, a lazy source (edgekd.streaming) that
    indexes like one: len, shape, x[i], x[indices], x.take(indices, axis=0)."""

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
    preprocess: PreprocessSpec | None = None   # image folders: the eval transform (what a device must apply)
    report: dict[str, Any] = field(default_factory=dict)   # how the data was read (streamed, skipped files)

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


MMAP_AUTO_BYTES = 512 * 2**20   # [data] memory_map unset: .npz files larger than this are mapped, not loaded


def _npz(path: Path, cfg: DataConfig) -> dict[str, Any]:
    """An .npz written by numpy.savez, read whole; or, mapped ([data] memory_map, by default when larger than
    MMAP_AUTO_BYTES), with its x_* arrays mapped from disk as LazyArrays read row by row (labels and class
    names are small and read)."""
    import zipfile

    if not zipfile.is_zipfile(path):  # np.load would take anything else for a pickle
        raise EdgekdError(f"data {path}: not a readable .npz file (expected a zip of .npy arrays, as numpy.savez "
                          "writes)")
    mapped = cfg.memory_map if cfg.memory_map is not None else path.stat().st_size > MMAP_AUTO_BYTES
    arrays: dict[str, Any] = {"report": {"source": "memory-mapped .npz"}} if mapped else {}
    try:
        if mapped:
            for key, a in streaming.map_npz(path).items():
                arrays[key] = _mapped_inputs(a, f"data {path}: {key}", cfg) if key.startswith("x") else np.array(a)
        else:
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
    if missing and not mapped:
        raise EdgekdError(f"data {path}: missing arrays {', '.join(missing)} (an .npz needs x_train, y_train, "
                          f"x_test, y_test; optional x_unlabeled, class_names); found {', '.join(arrays) or 'none'}")
    if "class_names" in arrays:
        arrays["class_names"] = [str(c) for c in arrays["class_names"].tolist()]
    return arrays


def _mapped_inputs(a: np.ndarray, where: str, cfg: DataConfig) -> streaming.LazyArray:
    """A memory-mapped (samples, ...) array as a LazyArray read row by row (uint8 scaled by 1/255)."""
    if a.dtype.kind not in "fiu" or a.ndim < 2:
        raise EdgekdError(f"{where} is {a.dtype} of shape {a.shape}; expected numbers (float, or uint8 images) of "
                          "shape (samples, ...)")
    item = (1, *a.shape[1:]) if a.ndim == 3 else tuple(a.shape[1:])
    return streaming.LazyArray(a, item, 1 / 255 if a.dtype == np.uint8 else 1.0, options=loader_options(cfg))


def _class_folders(path: Path) -> dict[str, list[Path]]:
    """{class name: its image files}, classes sorted; hidden entries and other suffixes are ignored."""
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EdgekdError(f"data {path}: an image folder needs one sub-folder per class; found none")
    out = {}
    for name in classes:
        files = sorted(p for p in (path / name).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise EdgekdError(f"data {path / name}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        out[name] = files
    return out


SPLITS = ("train", "val", "test")


def _image_folder(path: Path, cfg: DataConfig) -> dict[str, Any]:
    """Index an image folder (paths and labels; nothing decoded): one folder of class folders, or train/,
    test/ (and optional val/) folders of the same class folders. Every header is read once, so a bad file or
    a folder of mixed sizes is reported before training."""
    folders, classes = folder_layout(path)
    spec = _spec(cfg)
    skipped: list[tuple[str, str]] = []
    kept = {split: _scan(f, classes, spec, cfg, skipped) for split, f in folders.items()}
    shapes = {shape for files in kept.values() for _, _, shape in files}
    if len(shapes) > 1:
        first = next(iter(kept.values()))[0]
        odd = next(f for files in kept.values() for f, _, shape in files if shape != first[2])
        raise EdgekdError(f"data {path}: images differ in size ({odd} gives {shapes - {first[2]}}, {first[0]} gives "
                          f"{first[2]}); set [data] image_size = [height, width] to resize every image to it")
    if not shapes:
        raise EdgekdError(f"data {path}: no readable images ({len(skipped)} skipped)")
    options = loader_options(cfg)
    out: dict[str, Any] = {"class_names": classes, "preprocess": spec, "report": {
        "source": "image folder", "layout": "class folders" if "" in kept else "/".join(kept),
        "images": sum(len(v) for v in kept.values()), "skipped": len(skipped),
        "skipped_files": [f"{f}: {why}" for f, why in skipped[:20]]}}
    for split, files in kept.items():
        if not files:
            raise EdgekdError(f"data {path / split}: no readable images ({len(skipped)} skipped)")
        x = streaming.LazyImages([f for f, _, _ in files], spec, files[0][2], cfg.max_pixels, options)
        y = np.asarray([label for _, label, _ in files], dtype=np.int64)
        out.update({"x": x, "y": y} if split == "" else {f"x_{split}": x, f"y_{split}": y})
    return out


def folder_layout(path: Path) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """({split: {class: image files}}, class names) of an image folder: split "" for one folder of class
    folders, else "train", "test" (and "val") for train/, test/, val/ folders of the same class folders."""
    subs = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    splits = {"": path} if not ("train" in subs and subs <= set(SPLITS)) else {s: path / s for s in SPLITS if s in subs}
    if "" not in splits and "test" not in splits:
        raise EdgekdError(f"data {path}: has train/ but no test/ folder; expected train/ and test/ (val/ optional), "
                          "each with one folder per class, or class folders only")
    folders = {split: _class_folders(p) for split, p in splits.items()}
    classes = list(folders.get("", folders.get("train")))
    for split, f in folders.items():
        if split not in ("", "train") and list(f) != classes:
            extra, missing = sorted(set(f) - set(classes)), sorted(set(classes) - set(f))
            raise EdgekdError(f"data {splits[split]}: class folders differ from {splits['train']}'s"
                              + (f"; not in train/: {', '.join(extra)}" if extra else "")
                              + (f"; missing here: {', '.join(missing)}" if missing else ""))
    return folders, classes


def _spec(cfg: DataConfig) -> PreprocessSpec:
    """The eval transform from [data]: image_size alone resizes to it; with resize it is the centre crop."""
    size = list(cfg.image_size) if cfg.image_size else None
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise EdgekdError(f"data.image_size: expected [height, width], got {size}")
    crop = cfg.crop if cfg.crop is not None else size if cfg.resize is not None else None
    if size is not None and cfg.crop is not None and list(cfg.crop) != size:
        raise EdgekdError(f"data.crop {list(cfg.crop)} and data.image_size {size} differ; set one of them")
    resize = cfg.resize if cfg.resize is not None else size if cfg.crop is None else None
    return PreprocessSpec.from_dict({"mode": "L" if cfg.grayscale else "RGB", "resize": resize, "crop": crop},
                                    where="[data]")


def _scan(folders: dict[str, list[Path]], classes: list[str], spec: PreprocessSpec, cfg: DataConfig,
          skipped: list[tuple[str, str]]) -> list[tuple[str, int, tuple[int, ...]]]:
    """(file, label, model input shape) of every readable image, from its header; anything else is an error
    naming the file, or with skip_bad_images is counted in `skipped`. Only regular files are read (a FIFO or
    device named like an image is skipped). With skip_bad_images every image is also decoded once here, so a
    truncated body is found before training rather than in the middle of it."""
    candidates = []
    for name, files in folders.items():
        for f in files:
            if is_image_file(f):   # follows links; FIFOs, sockets, devices are never opened
                candidates.append((str(f), classes.index(name)))
            else:
                skipped.append((str(f), "not a regular file"))
    checked = streaming.check_files([f for f, _ in candidates], spec, cfg.max_pixels, cfg.skip_bad_images,
                                    loader_options(cfg).num_workers)
    out = []
    for (f, label), got in zip(candidates, checked, strict=True):
        if isinstance(got, str):
            if not cfg.skip_bad_images:
                raise EdgekdError(f"{got}; set [data] skip_bad_images = true to skip such files")
            skipped.append((f, got.split(": ", 1)[-1]))
            continue
        oh, ow = spec.output_size(*got)
        out.append((f, label, (spec.channels, oh, ow)))
    return out


def loader_options(cfg: DataConfig) -> streaming.LoaderOptions:
    workers = cfg.num_workers if cfg.num_workers is not None else streaming.default_workers()
    return streaming.LoaderOptions(workers, cfg.pin_memory, cfg.prefetch_factor, cfg.persistent_workers)


def _dataset_source(ds: Any, where: str, cfg: DataConfig) -> tuple[streaming.LazyArray, np.ndarray]:
    """A map-style torch Dataset of (input, label) pairs, used as it is: inputs are read per batch by the
    DataLoader workers (uint8 inputs scaled by 1/255). Labels come from `ds.targets` (torchvision's convention)
    when it has them, else from reading each item once (one pass, nothing kept but the labels)."""
    import torch

    if isinstance(ds, torch.utils.data.IterableDataset):   # read in its own order; one counting pass here
        return streaming.stream_source(ds, where, loader_options(cfg))
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise EdgekdError(f"{where}: {type(ds).__name__} has no len() and indexing; return map-style Datasets of "
                          "(input, label) pairs")
    if not len(ds):
        raise EdgekdError(f"{where}: the dataset is empty")
    try:
        first = ds[0][0]
        targets = getattr(ds, "targets", None)
        labels = targets if targets is not None else [ds[i][1] for i in range(len(ds))]
        y = np.asarray([int(v) for v in labels], dtype=np.int64)
    except EdgekdError:
        raise
    except Exception as e:
        raise EdgekdError(f"{where}: could not read items as (input, label) pairs ({type(e).__name__}: {e})") from e
    return streaming.LazyArray(ds, *streaming.item_layout(first, where), options=loader_options(cfg)), y


def _function(ref: str, cfg: DataConfig) -> dict[str, Any]:
    from edgekd.models import load_factory

    fn = load_factory(ref, "data source")
    try:
        out = fn()
    except Exception as e:
        raise EdgekdError(f"data source {ref!r} raised {type(e).__name__}: {e}") from e
    if isinstance(out, tuple) and len(out) in (2, 3):   # (train, test) or (train, val, test)
        raw: dict[str, Any] = {"report": {"source": "torch Datasets"}}
        for split, ds in zip(("train", "test") if len(out) == 2 else SPLITS, out, strict=True):
            x, y = _dataset_source(ds, f"data source {ref!r} {split} dataset", cfg)
            raw.update({f"x_{split}": x, f"y_{split}": y})
        return raw
    if isinstance(out, dict):
        return dict(out)
    raise EdgekdError(f"data source {ref!r} returned {type(out).__name__}; expected a dict of arrays "
                      "(x_train, y_train, x_test, y_test) or a (train, test) or (train, val, test) tuple of Datasets")


def _as_inputs(x: Any, name: str, where: str) -> np.ndarray:
    if streaming.is_lazy(x):   # read, scaled and checked row by row when used
        return x
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


def pool_source(path: str | Path, cfg: DataConfig, spec: PreprocessSpec | None) -> Any:
    """An unlabelled pool in [0, 1] scale, not normalized, never read whole when large: a folder of images (any
    depth, every header checked like a source folder's) read through the source's eval transform `spec`; an
    .npz (x or x_unlabeled) or a bare .npy, memory-mapped under the data source's rule ([data] memory_map, or
    larger than MMAP_AUTO_BYTES), else loaded."""
    path = Path(path)
    if path.is_dir():
        if spec is None:
            raise EdgekdError(f"pool {path}: a folder of images needs an image folder (or shards) data source, "
                              "whose eval transform it is read through")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        skipped: list[tuple[str, str]] = []
        kept = _scan({"": files}, [""], spec, cfg, skipped)
        if not kept:
            raise EdgekdError(f"pool {path}: no readable images ({', '.join(IMAGE_SUFFIXES)}; {len(skipped)} skipped)")
        shapes = {shape for _, _, shape in kept}
        if len(shapes) > 1:
            raise EdgekdError(f"pool {path}: images differ in size ({sorted(shapes)}); set [data] image_size")
        return streaming.LazyImages([f for f, _, _ in kept], spec, kept[0][2], cfg.max_pixels, loader_options(cfg))
    if not path.is_file():
        raise EdgekdError(f"pool {path}: file not found")
    mapped = cfg.memory_map if cfg.memory_map is not None else path.stat().st_size > MMAP_AUTO_BYTES
    try:
        if path.suffix == ".npy":
            a = np.load(path, mmap_mode="r" if mapped else None, allow_pickle=False)
        else:
            with contextlib.nullcontext(streaming.map_npz(path)) if mapped else np.load(path, allow_pickle=False) as f:
                key = next((k for k in ("x", "x_unlabeled") if k in f), None)
                if key is None:
                    raise EdgekdError(f"pool {path}: expected an array 'x' or 'x_unlabeled', found {', '.join(f)}")
                a = f[key]
    except EdgekdError:
        raise
    except Exception as e:
        raise EdgekdError(f"pool {path}: not a readable .npz/.npy ({type(e).__name__}: {e})") from None
    return _mapped_inputs(a, f"pool {path}: x", cfg) if mapped else _as_inputs(a, "x", f"pool {path}")


def _numbered_classes(num_classes: int | None, splits: tuple[Any, ...], where: str) -> tuple[str, ...]:
    """Class names "0".."K-1" for a source without class_names. K is [data].num_classes when given; otherwise the
    labels must be 0..K-1 with none missing: one stray label (99 among 0..9) would silently make a 100-class task."""
    if num_classes is not None:
        return tuple(str(i) for i in range(num_classes))
    found = np.unique(np.concatenate([np.asarray(y).ravel() for y in splits if y is not None and len(y)]))
    if len(found) and found.min() >= 0 and len(found) != int(found.max()) + 1:
        missing = sorted(set(range(int(found.max()) + 1)) - set(found.tolist()))
        shown = ", ".join(map(str, found[:20].tolist())) + (", ..." if len(found) > 20 else "")
        raise EdgekdError(f"{where}: the labels use class ids {shown} ({len(found)} classes), but ids "
                          f"{', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''} have no "
                          "sample; give class_names in the data, or set [data] num_classes if those classes "
                          "really exist, or relabel to 0..K-1")
    return tuple(str(i) for i in range(int(found.max()) + 1 if len(found) else 0))


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
    elif shards.descriptors(path):   # WebDataset tar shards with wids descriptors (edgekd shards)
        raw = shards.load(path, cfg)
    elif src.endswith(".npz") or path.is_file():
        if not path.is_file():
            raise EdgekdError(f"data {path}: file not found")
        raw = _npz(path, cfg)
    elif path.is_dir():
        raw = _image_folder(path, cfg)
    elif ":" in src and not src.startswith((".", "/")):
        raw = _function(src, cfg)
        where = f"data source {src!r}"
    else:
        raise EdgekdError(f"data {path}: not found (expected 'digits', an .npz file, an image folder, "
                          "or 'package.module:function')")

    if "preprocess" not in raw and (cfg.resize is not None or cfg.crop is not None or cfg.skip_bad_images):
        raise EdgekdError(f"{where}: [data] resize, crop and skip_bad_images apply to image folders only")
    _check_stream_keys(raw, cfg, where)
    rng = np.random.default_rng(cfg.seed)
    if "x" in raw:  # one pool: carve the test split
        x = _as_inputs(raw["x"], "x", where)
        y = _as_labels(raw["y"], len(x), "y", where)
        tr, te = _split(len(x), cfg.test_fraction, rng, y)
        x_train, y_train, x_test, y_test = x.take(tr, axis=0), y[tr], x.take(te, axis=0), y[te]
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
        x_train, y_train = x_train.take(keep, axis=0), y_train[keep]
    if cfg.test_samples is not None:
        keep = _subset(y_test, cfg.test_samples, subset_rng)
        x_test, y_test = x_test.take(keep, axis=0), y_test[keep]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise EdgekdError(f"{where}: x_train samples have shape {x_train.shape[1:]} but x_test samples have "
                          f"{x_test.shape[1:]}; they must match")
    x_unl = raw.get("x_unlabeled")
    if cfg.unlabeled:
        x_unl = pool_source(Path(base_dir) / Path(cfg.unlabeled).expanduser(), cfg, raw.get("preprocess"))
    if x_unl is not None:
        x_unl = _as_inputs(x_unl, "x_unlabeled", where)
        if x_unl.shape[1:] != x_train.shape[1:]:
            raise EdgekdError(f"{where}: x_unlabeled samples have shape {x_unl.shape[1:]}, expected "
                              f"{x_train.shape[1:]} like x_train")

    if not len(y_train) or (not len(y_test) and cfg.test_fraction > 0):
        raise EdgekdError(f"{where}: {len(y_train)} training and {len(y_test)} test samples; each split needs at "
                          f"least one (test_fraction = {cfg.test_fraction}; more data, or another split)")
    names = raw.get("class_names")
    class_names = (tuple(str(c) for c in names) if names is not None else
                   _numbered_classes(cfg.num_classes, (y_train, y_test, raw.get("y_val")), where))
    if cfg.num_classes is not None and len(class_names) != cfg.num_classes:
        raise EdgekdError(f"{where}: [data].num_classes = {cfg.num_classes}, but the source names "
                          f"{len(class_names)} classes (class_names); remove one of them")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise EdgekdError(f"{where}: {name} has labels in [{y.min()}, {y.max()}]; "
                              f"expected 0..{len(class_names) - 1} for {len(class_names)} classes")

    if "x_val" in raw:   # the source's own validation split (an image folder's val/)
        x_val = _as_inputs(raw["x_val"], "x_val", where)   # scaled and shaped like x_train (uint8, no channel axis)
        y_val = _as_labels(raw["y_val"], len(x_val), "y_val", where)
        if x_val.shape[1:] != x_train.shape[1:]:
            raise EdgekdError(f"{where}: x_val samples have shape {x_val.shape[1:]}, expected {x_train.shape[1:]} "
                              "like x_train")
    elif streaming.is_stream(x_train):   # no carve (_check_stream_keys): no validation split
        x_val, y_val = np.zeros((0, *x_train.shape[1:]), np.float32), np.zeros(0, np.int64)
    else:
        tr, va = _split(len(x_train), cfg.val_fraction, rng, y_train)
        x_val, y_val = x_train.take(va, axis=0), y_train[va]
        x_train, y_train = x_train.take(tr, axis=0), y_train[tr]
    if len(x_train) == 0:
        raise EdgekdError(f"{where}: no training samples left after the test/validation splits")

    mean, std = _statistics(cfg, x_train, where)

    def norm(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        if streaming.is_lazy(a):
            return a.normalized(tuple(mean), tuple(std))
        shape = (1, -1, 1, 1) if a.ndim == 4 else (1, -1) if len(mean) > 1 else (1,) * a.ndim
        return ((a - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)

    x_train, x_unl = norm(x_train), norm(x_unl)
    if cfg.labelled is not None:
        keep = labelled_subset(y_train, cfg.labelled, cfg.seed, where)   # indexed: a lazy split stays lazy
        pool = x_train.take(np.setdiff1d(np.arange(len(x_train)), keep), axis=0)
        x_unl = pool if x_unl is None else streaming.concat([pool, x_unl])
        x_train, y_train = x_train.take(keep, axis=0), y_train[keep]
    stats = {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}
    spec = replace(raw["preprocess"], **stats) if raw.get("preprocess") is not None else None
    report = dict(raw.get("report", {}))
    if streaming.is_lazy(x_train):   # normalizing, subsets and the labelled carve keep a lazy split lazy
        report.update(streamed=True, workers=x_train.options.num_workers,
                      statistics=_stats_origin(cfg, len(x_train), streaming.is_stream(x_train)))
    return Dataset(x_train, y_train, norm(x_val), y_val, norm(x_test), y_test, x_unl, class_names, **stats,
                   preprocess=spec, report=report)


def _check_stream_keys(raw: dict[str, Any], cfg: DataConfig, where: str) -> None:
    """What an iterable (IterableDataset) source cannot do, refused naming the key: its samples have no index,
    so no carved validation split, no subsets, no labelled/unlabelled pools."""
    if not any(streaming.is_stream(raw.get(k)) for k in ("x_train", "x_val", "x_test")):
        return
    asked = {"val_fraction": "x_val" not in raw and cfg.val_fraction > 0, "train_samples": cfg.train_samples,
             "test_samples": cfg.test_samples, "labelled": cfg.labelled, "unlabeled": cfg.unlabeled}
    bad = next((k for k, v in asked.items() if v is not None and v is not False), None)
    if bad is not None:
        fix = ("set it to 0 or return (train, val, test) datasets" if bad == "val_fraction" else "remove it")
        raise EdgekdError(f"{where}: [data] {bad} needs samples by index, which an IterableDataset source does "
                          f"not have; {fix}")


def _statistics(cfg: DataConfig, x_train: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std: [data] mean/std if given (numbers or a name like "imagenet"), else from the
    training split (arrays: all of it; streamed sources: `stats_samples` inputs drawn at random), or 0/1
    with normalize = false."""
    channels = x_train.shape[1] if x_train.ndim == 4 else 1
    if (cfg.mean is None) != (cfg.std is None):
        raise EdgekdError(f"{where}: set both [data] mean and std (or neither, to estimate them)")
    if cfg.mean is not None:
        mean, std = (NAMED_STATS[v][k] if isinstance(v, str) and v in NAMED_STATS else v
                     for k, v in ((0, cfg.mean), (1, cfg.std)))
        for key, v in (("mean", mean), ("std", std)):
            if isinstance(v, str) or len(v) not in (1, channels):
                raise EdgekdError(f"{where}: [data] {key} = {v!r}; expected 1 or {channels} numbers or one of "
                                  f"{', '.join(NAMED_STATS)}")
    elif not cfg.normalize:
        mean, std = np.zeros(channels), np.ones(channels)
    elif streaming.is_stream(x_train):   # from the counting pass, over every training input
        mean, std = x_train.stats
    elif streaming.is_lazy(x_train):
        mean, std = streaming.channel_stats(x_train, cfg.stats_samples, cfg.seed)
    else:
        axes = (0, 2, 3) if x_train.ndim == 4 else tuple(range(x_train.ndim))
        mean, std = x_train.mean(axis=axes), x_train.std(axis=axes) + 1e-6
    exact = np.float64 if cfg.mean is not None else np.float32   # given numbers are kept as written
    return np.atleast_1d(mean).astype(exact), np.atleast_1d(std).astype(exact)


def _stats_origin(cfg: DataConfig, n: int, stream: bool = False) -> str:
    if cfg.mean is not None:
        return "[data] mean/std"
    if not cfg.normalize:
        return "none (normalize = false)"
    if stream:
        return f"computed over all {n} training inputs (the iterable source's counting pass)"
    return f"estimated from {min(n, cfg.stats_samples)} training inputs (seeded draw)"


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
    """Apply the training split's normalization to another array of raw inputs (an unlabelled pool); a lazy
    pool (`pool_source`) stays lazy, normalized as it is read."""
    x = _as_inputs(x, "x", "pool")
    if x.shape[1:] != data.input_shape:
        raise EdgekdError(f"pool: samples have shape {x.shape[1:]}, the model expects {data.input_shape}")
    if streaming.is_lazy(x):
        return x.normalized(tuple(data.mean), tuple(data.std))
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1) if len(mean) > 1 else (1,) * x.ndim
    return ((x - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
