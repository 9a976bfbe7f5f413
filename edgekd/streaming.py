"""Inputs read from disk on demand, and the DataLoader that feeds them to training.

A lazy source looks like the (N, *input_shape) float32 array the rest of edgekd expects: `len`, `shape`,
`x[i]` (one input), `x[indices]` / `x[a:b]` (a stacked batch of just those), `x.take(indices, axis=0)` (a
lazy view: how splits and subsets are carved without reading anything). Two kinds:

- `LazyImages`: image files, each decoded and put through the eval transform (`edgekd.preprocess.apply`,
  the same function the device runtime calls) when asked for.
- `LazyArray`: rows of a memory-mapped .npy/.npz array or of a torch Dataset, scaled and normalized per row.

`batches(x, chunks)` yields the batches of a list of index chunks as tensors: a plain array is indexed in
the training process; a lazy source is read by DataLoader worker processes (`LoaderOptions`), which keep
running across epochs (persistent workers) because the chunks of every epoch go through one sampler.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.preprocess import MAX_PIXELS, PreprocessSpec, apply


def default_workers() -> int:
    """DataLoader workers when [data] num_workers is not set: the cores this process may use, less one for the
    training loop, at most 8 (decoding rarely needs more to keep one training process fed)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


@dataclass(frozen=True)
class LoaderOptions:
    """How lazy sources are read: worker processes, pinned memory (default: when training on CUDA),
    batches prefetched per worker, workers kept alive across epochs."""

    num_workers: int = 0
    pin_memory: bool | None = None
    prefetch_factor: int = 2
    persistent_workers: bool = True


class _Lazy:
    """What LazyImages and LazyArray share: array-like indexing over `self.rows` (a lazy view of a base)."""

    rows: np.ndarray
    item_shape: tuple[int, ...]
    options: LoaderOptions

    def read(self, i: int) -> np.ndarray:   # row i of the base, float32, fully preprocessed
        raise NotImplementedError

    def raw(self, i: int) -> np.ndarray:    # row i of the base, scaled to [0, 1] but not normalized
        raise NotImplementedError

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> _Lazy:
        raise NotImplementedError

    def view(self, rows: np.ndarray) -> _Lazy:
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, rows=rows)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.item_shape)

    dtype = np.dtype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.read(int(self.rows[key]))
        rows = self.rows[np.asarray(key) if not isinstance(key, slice) else key]
        if not len(rows):
            return np.zeros((0, *self.item_shape), np.float32)
        return np.stack([self.read(int(r)) for r in rows])

    def take(self, indices: Any, axis: int = 0) -> _Lazy:
        """A lazy view of these samples (np.ndarray.take's signature, so splits treat arrays and us alike)."""
        if axis != 0:
            raise ValueError("lazy sources are only indexed along the sample axis")
        return self.view(self.rows[np.asarray(indices, dtype=np.int64)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Everything read into one array: only for consumers that need all of it at once (small splits)."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def with_options(self, options: LoaderOptions) -> _Lazy:
        out = self.view(self.rows)
        out.options = options
        return out


class LazyImages(_Lazy):
    """Image files read when indexed; `spec` is the eval transform. With no resize and no crop every image
    must have the size of the first (`item_shape`); a different one is an error naming the file."""

    def __init__(self, paths: Sequence[str], spec: PreprocessSpec, item_shape: tuple[int, ...],
                 max_pixels: int = MAX_PIXELS, options: LoaderOptions = LoaderOptions()) -> None:
        self.paths = tuple(str(p) for p in paths)
        self.rows = np.arange(len(self.paths))
        self.spec, self.item_shape, self.max_pixels, self.options = spec, tuple(item_shape), max_pixels, options

    def image(self, i: int) -> Any:
        """What `apply` decodes for base row i: a path here (encoded bytes for tar shards)."""
        return self.paths[i]

    def name(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> np.ndarray:
        x = apply(self.spec, self.image(i), self.max_pixels)
        if x.shape != self.item_shape:
            raise EdgekdError(f"image {self.name(i)}: gives an input of shape {x.shape}, other images give "
                              f"{self.item_shape}; set [data] image_size so every image is resized to one size")
        return x

    def raw(self, i: int) -> np.ndarray:
        return apply(replace(self.spec, mean=(0.0,), std=(1.0,)), self.image(i), self.max_pixels)

    def identity(self) -> dict[str, Any]:
        """What the fingerprint hashes: the transform spec and each file's path, size and mtime, in row order."""
        files = [self.paths[r] for r in self.rows]
        stats = [(f, st.st_size, st.st_mtime_ns) for f in files for st in [os.stat(f)]]
        return {"spec": self.spec.to_dict(), "files": stats, "max_pixels": self.max_pixels}

    def files(self) -> list[str]:
        return [self.paths[r] for r in self.rows]

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> LazyImages:
        out = self.view(self.rows)
        out.spec = replace(self.spec, mean=mean, std=std)
        return out


class LazyArray(_Lazy):
    """Rows of `base` (a memory-mapped array, or a torch Dataset of (input, label) pairs) read when indexed:
    x = (row * scale - mean) / std per channel, float32."""

    def __init__(self, base: Any, item_shape: tuple[int, ...], scale: float = 1.0,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 options: LoaderOptions = LoaderOptions()) -> None:
        self.base, self.item_shape, self.scale, self.options = base, tuple(item_shape), float(scale), options
        self.mean, self.std = tuple(mean), tuple(std)
        self.rows = np.arange(len(base))

    def raw(self, i: int) -> np.ndarray:
        """Row i of the base, scaled but not normalized."""
        row = self.base[i]
        if isinstance(row, tuple):     # a Dataset's (input, label)
            row = row[0]
        row = row.numpy() if hasattr(row, "numpy") else np.asarray(row)
        x = row.astype(np.float32) * np.float32(self.scale)
        x = x[None] if len(self.item_shape) == 3 and x.ndim == 2 else x
        if x.shape != self.item_shape:
            raise EdgekdError(f"data row {i}: has shape {x.shape}, expected {self.item_shape} like the first row")
        return x

    def read(self, i: int) -> np.ndarray:
        x = self.raw(i)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if x.ndim == 3:
            mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        return ((x - mean) / std).astype(np.float32)

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> LazyArray:
        out = self.view(self.rows)
        out.mean, out.std = tuple(mean), tuple(std)
        return out


def map_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz written by numpy.savez, each memory-mapped from the zip (members are stored, not
    compressed: a member's bytes are an .npy file at a fixed offset). Compressed members are refused."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            key = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise EdgekdError(f"data {path}: array {key!r} is compressed (numpy.savez_compressed) and cannot "
                                  "be memory-mapped; write it with numpy.savez")
            f.seek(info.header_offset + 26)   # the local header: 30 bytes, then the name and extra field
            name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise EdgekdError(f"data {path}: array {key!r} holds Python objects; only numbers are read")
            out[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                 order="F" if fortran else "C")
    return out


def fingerprint(x: Any) -> str:
    """sha256 naming what a lazy source reads: for image files the transform spec and each file's path, size
    and modification time (in the source's row order); for a mapped array its file, layout, rows and scaling.
    Keys caches built on the source without reading its data."""
    import hashlib
    import json

    if isinstance(x, LazyImages):   # image files, or samples of tar shards (edgekd.shards.LazyShards)
        payload = x.identity()
    elif isinstance(x, LazyArray) and isinstance(x.base, np.memmap):
        st = os.stat(x.base.filename)
        payload = {"file": [x.base.filename, st.st_size, st.st_mtime_ns], "offset": x.base.offset,
                   "shape": list(x.base.shape), "dtype": x.base.dtype.str, "rows": x.rows.tolist(),
                   "scale": x.scale, "mean": list(x.mean), "std": list(x.std)}
    else:
        raise EdgekdError(f"a {type(getattr(x, 'base', x)).__name__} source has no fingerprint for a cache; use "
                          "arrays, an .npz or an image folder")
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


class _Check:
    """Item i: (height, width) of file i from its header (also fully decoded with `decode`), or the one-line
    error naming it. A Dataset, so the folder scan runs in the DataLoader workers."""

    def __init__(self, files: Sequence[str], spec: PreprocessSpec, max_pixels: int, decode: bool) -> None:
        self.files, self.spec, self.max_pixels, self.decode = files, spec, max_pixels, decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, int] | str:
        from edgekd.preprocess import probe_image

        try:
            size = probe_image(self.files[i], self.max_pixels)
            if self.decode:
                apply(self.spec, self.files[i], self.max_pixels)
            return size
        except EdgekdError as e:
            return str(e)


def check_files(files: Sequence[str], spec: PreprocessSpec, max_pixels: int, decode: bool,
                workers: int) -> list[tuple[int, int] | str]:
    """`_Check` of every file, in order, spread over `workers` processes (in this one for small folders)."""
    check = _Check(files, spec, max_pixels, decode)
    if workers == 0 or len(files) < 512:
        return [check[i] for i in range(len(files))]
    import torch

    loader = torch.utils.data.DataLoader(check, batch_size=64, num_workers=workers, collate_fn=list)
    return [item for batch in loader for item in batch]


def is_lazy(x: Any) -> bool:
    return isinstance(x, _Lazy)


def channel_stats(x: _Lazy, samples: int, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (+1e-6, as the array path) of up to `samples` inputs of `x` drawn at random
    (seeded), before normalization: a bounded estimate, never the whole split in memory."""
    pick = np.sort(np.random.default_rng([seed, 2]).permutation(len(x))[:samples])
    total = total_sq = 0.0
    count = 0
    for i in pick:
        a = x.raw(int(x.rows[i])).astype(np.float64)
        a = a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(1, -1)
        total, total_sq, count = total + a.sum(1), total_sq + (a * a).sum(1), count + a.shape[1]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 0.0)) + 1e-6
    return tuple(float(v) for v in np.atleast_1d(mean)), tuple(float(v) for v in np.atleast_1d(std))


class _EpochSampler:
    """The batch sampler of a persistent DataLoader: yields whatever chunks `set` gave it last."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []

    def set(self, chunks: list[np.ndarray]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[list[int]]:
        return (c.tolist() for c in self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class Feed:
    """Batches of `x` for lists of index chunks; one per training run, so the workers outlive epochs."""

    def __init__(self, x: Any, pin: bool = False) -> None:
        import torch

        self.x = x
        self.loader = None
        if not is_lazy(x):
            self.x_t = torch.from_numpy(np.ascontiguousarray(x))
            return
        o = x.options
        self.sampler = _EpochSampler()
        workers = o.num_workers
        self.loader = torch.utils.data.DataLoader(
            x, batch_sampler=self.sampler, num_workers=workers, collate_fn=_collate,
            pin_memory=pin if o.pin_memory is None else o.pin_memory,
            prefetch_factor=o.prefetch_factor if workers else None,
            persistent_workers=o.persistent_workers and workers > 0)

    def __call__(self, chunks: Sequence[Any]) -> Iterator[Any]:
        if self.loader is None:
            return (self.x_t[c] for c in chunks)
        every = np.arange(len(self.x))
        self.sampler.set([every[c] if isinstance(c, slice) else np.asarray(c, dtype=np.int64) for c in chunks])
        return _one_line_errors(iter(self.loader))


def _collate(items: list[np.ndarray]) -> Any:
    import torch

    return torch.from_numpy(np.stack(items))


def _one_line_errors(it: Iterator[Any]) -> Iterator[Any]:
    """A worker's EdgekdError comes back wrapped in its traceback; keep only its own one-line message."""
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except EdgekdError as e:
            lines = str(e).strip().splitlines()
            tail = next((ln.split("EdgekdError: ", 1)[1] for ln in reversed(lines) if "EdgekdError: " in ln), None)
            if tail is None:
                raise
            raise EdgekdError(tail) from None
        yield batch


def batches(x: Any, chunks: Sequence[Any]) -> Iterator[Any]:
    """One pass over `chunks` of `x` (a fresh, non-persistent feed: for evaluation and one-off passes)."""
    if is_lazy(x):
        x = x.with_options(replace(x.options, persistent_workers=False))
    return Feed(x)(chunks)
