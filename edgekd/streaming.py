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
    """What the lazy sources share: array-like indexing over `self.rows` (a lazy view of a base). Each gives
    `read(i)` (row i of the base, float32, fully preprocessed), `raw(i)` (row i scaled to [0, 1] but not
    normalized) and `normalized(mean, std)`; LazyConcat, of parts already normalized, only indexes them."""

    rows: np.ndarray
    item_shape: tuple[int, ...]
    options: LoaderOptions

    def view(self, rows: np.ndarray, **changes: Any) -> _Lazy:
        """A copy over `rows` of the base, with attributes `changes` replaced (nothing is read)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, rows=rows, **changes)
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
        return self.view(self.rows, options=options)


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
        x = self._apply(self.spec, i)
        if x.shape != self.item_shape:
            raise EdgekdError(f"image {self.name(i)}: gives an input of shape {x.shape}, other images give "
                              f"{self.item_shape}; set [data] image_size so every image is resized to one size")
        return x

    def raw(self, i: int) -> np.ndarray:
        return self._apply(replace(self.spec, mean=(0.0,), std=(1.0,)), i)

    def _apply(self, spec: PreprocessSpec, i: int) -> np.ndarray:
        """`apply` on base row i; preprocess names decoded bytes (tar shards) "image bytes": name the sample."""
        try:
            return apply(spec, self.image(i), self.max_pixels)
        except EdgekdError as e:
            if not str(e).startswith("image bytes"):
                raise
            raise EdgekdError(str(e).replace("image bytes", f"image {self.name(i)}", 1)) from None

    def identity(self) -> dict[str, Any]:
        """What the fingerprint hashes: the transform spec and each file's path, size and mtime, in row order."""
        stats = [(f, st.st_size, st.st_mtime_ns) for f in self.files() for st in [os.stat(f)]]
        return {"spec": self.spec.to_dict(), "files": stats, "max_pixels": self.max_pixels}

    def files(self) -> list[str]:
        return [self.paths[r] for r in self.rows]

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> LazyImages:
        return self.view(self.rows, spec=replace(self.spec, mean=mean, std=std))


class LazyArray(_Lazy):
    """Rows of `base` (a memory-mapped array, or a torch Dataset of (input, label) pairs) read when indexed:
    x = (row * scale - mean) / std per channel, float32."""

    def __init__(self, base: Any, item_shape: tuple[int, ...], scale: float = 1.0,
                 options: LoaderOptions = LoaderOptions()) -> None:
        self.base, self.item_shape, self.scale, self.options = base, tuple(item_shape), float(scale), options
        self.mean, self.std = (0.0,), (1.0,)   # until `normalized`
        self.rows = np.arange(len(base))

    def raw(self, i: int) -> np.ndarray:
        """Row i of the base, scaled but not normalized."""
        return self.scaled(self.base[i], i)

    def scaled(self, row: Any, i: int) -> np.ndarray:
        """One row (or a Dataset's (input, label) item) as float32 times `scale`, shape checked."""
        if isinstance(row, (tuple, list)):     # a Dataset's (input, label)
            row = row[0]
        row = row.numpy() if hasattr(row, "numpy") else np.asarray(row)
        x = row.astype(np.float32) * np.float32(self.scale)
        x = x[None] if len(self.item_shape) == 3 and x.ndim == 2 else x
        if x.shape != self.item_shape:
            raise EdgekdError(f"data row {i}: has shape {x.shape}, expected {self.item_shape} like the first row")
        return x

    def norm(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel."""
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if x.ndim == 3:
            mean, std = mean.reshape(-1, 1, 1), std.reshape(-1, 1, 1)
        return ((x - mean) / std).astype(np.float32)

    def read(self, i: int) -> np.ndarray:
        return self.norm(self.raw(i))

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> LazyArray:
        return self.view(self.rows, mean=tuple(mean), std=tuple(std))


class LazyStream(LazyArray):
    """A torch IterableDataset of (input, label) pairs used as it is: read in its own order, never by index.

    Its length, labels (and, for training, mean/std: `stats`) come from one counting pass at load (`stream_source`); a
    training epoch reads it in blocks of `batch_size` through DataLoader workers (`distributed.StreamBlocks`).
    `x[indices]` reads one pass up to the largest index, for small draws (an example batch, calibration, a spot
    check); carving splits or subsets by index (`take`) is refused."""

    def __init__(self, base: Any, item_shape: tuple[int, ...], scale: float, options: LoaderOptions) -> None:
        super().__init__([], item_shape, scale, options)   # rows and stats: set by stream_source's counting pass
        self.base = base
        self.token = os.urandom(16).hex()   # its fingerprint: what is keyed on this load is not reused by another

    def raw(self, i: int) -> np.ndarray:
        raise EdgekdError("an iterable data source is read in order, not by index")

    def take(self, indices: Any, axis: int = 0) -> LazyStream:
        raise EdgekdError(f"a {type(self.base).__name__} (IterableDataset) source cannot be split or subset by "
                          "index; give it its own splits")

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        pos = np.arange(len(self))[key if isinstance(key, slice) else np.asarray(key, dtype=np.int64)]
        if not len(pos):
            return np.zeros((0, *self.item_shape), np.float32)
        wanted, got = set(pos.tolist()), {}
        import itertools

        for k, item in enumerate(itertools.islice(iter(self.base), int(pos.max()) + 1)):
            if k in wanted:
                got[k] = self.norm(self.scaled(stream_item(item, k)[0], k))
        if len(got) < len(wanted):
            raise EdgekdError(f"data stream {type(self.base).__name__}: ended after {k + 1 if got else 0} samples; "
                              f"the counting pass at load saw {len(self)}")
        return np.stack([got[p] for p in pos.tolist()])


def stream_item(item: Any, k: int) -> tuple[Any, int]:
    """(input, int label) of stream item k."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise EdgekdError(f"data stream item {k}: is a {type(item).__name__}; expected an (input, label) pair")
    try:
        return item[0], int(item[1])
    except (TypeError, ValueError):
        raise EdgekdError(f"data stream item {k}: label {item[1]!r} is not an integer class index") from None


def stream_source(ds: Any, where: str, options: LoaderOptions) -> tuple[LazyStream, np.ndarray]:
    """(lazy stream, labels) of an IterableDataset of (input, label) pairs, from one counting pass in
    DataLoader workers that keeps only the labels (8 bytes a sample) and running sums, whose per-channel
    (mean, std) over every input (+1e-6 on std, as the array path) become the stream's `stats`. uint8 inputs
    are scaled by 1/255. A `len()` that disagrees with the count is an error."""
    import torch

    from edgekd import distributed

    try:
        first, _ = stream_item(next(iter(ds)), 0)
    except StopIteration:
        raise EdgekdError(f"{where}: the stream is empty") from None
    x = LazyStream(ds, *item_layout(first, where), options)
    loader = torch.utils.data.DataLoader(distributed.StreamBlocks(x, 256, summary=True), batch_size=None,
                                         num_workers=options.num_workers)
    labels, total, total_sq, count = [], 0.0, 0.0, 0
    for _, y, s, sq, c in _one_line_errors(iter(loader)):
        labels.append(np.asarray(y))
        total, total_sq, count = total + np.asarray(s), total_sq + np.asarray(sq), count + int(c)
    y = np.concatenate(labels)
    try:
        declared = len(ds)
    except TypeError:   # IterableDataset without __len__
        declared = None
    if declared is not None and declared != len(y):
        raise EdgekdError(f"{where}: len() says {declared} samples, one pass over the stream gave {len(y)}")
    x.rows, x.stats = np.arange(len(y)), _mean_std(total, total_sq, count)
    return x, y


def item_layout(first: Any, where: str) -> tuple[tuple[int, ...], float]:
    """(item shape, scale) of a lazy source from its first input: a grey (H, W) image gets a channel axis,
    uint8 inputs are scaled by 1/255; anything but numbers is refused."""
    first = first.numpy() if hasattr(first, "numpy") else np.asarray(first)
    if first.dtype.kind not in "fiu" or first.ndim < 1:
        raise EdgekdError(f"{where}: inputs are {first.dtype} of shape {first.shape}; expected numbers (float, or "
                          "uint8 images)")
    return ((1, *first.shape) if first.ndim == 2 else first.shape), 1 / 255 if first.dtype == np.uint8 else 1.0


def _mean_std(total: Any, total_sq: Any, count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (+1e-6, as the array path) from sums, sums of squares and the value count."""
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 0.0)) + 1e-6
    return tuple(float(v) for v in np.atleast_1d(mean)), tuple(float(v) for v in np.atleast_1d(std))


def stream_order(x: LazyStream, batch: int, rank: int, world: int) -> Any:
    """This rank's positions in the stream for one epoch: its blocks of `batch` (block j on rank j % world),
    padded with its first block to ceil(N / (batch * world)) blocks so every rank takes the same steps (as
    DistributedSampler repeats samples)."""
    import torch

    n = len(x)
    blocks = [np.arange(j * batch, min((j + 1) * batch, n)) for j in range(rank, -(-n // batch), world)]
    if not blocks:
        raise EdgekdError(f"data stream: {n} samples make fewer than one batch of {batch} per rank ({world} ranks); "
                          "use a smaller batch_size or fewer ranks")
    blocks += [blocks[0]] * (-(-n // (batch * world)) - len(blocks))
    return torch.from_numpy(np.concatenate(blocks))


class LazyConcat(_Lazy):
    """Samples of several parts (arrays, memory-mapped arrays or lazy sources, each already normalized) one
    after another, never concatenated: the training split followed by an unlabelled pool, or the top-k columns
    of a labels folder's shards. Row r of the base is sample r - offset[p] of part p, read as `dtype`."""

    def __init__(self, parts: Sequence[Any], options: LoaderOptions = LoaderOptions(),
                 dtype: Any = np.float32) -> None:
        self.parts = tuple(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.item_shape = tuple(self.parts[0].shape[1:])
        self.rows, self.options, self.dtype = np.arange(int(self.offsets[-1])), options, np.dtype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        """The rows `key` selects, read part by part (one indexing of each part they fall in)."""
        rows = np.atleast_1d(self.rows[key])
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), *self.item_shape), self.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][rows[sel] - self.offsets[p]]
        return out if np.ndim(self.rows[key]) else out[0]


def concat(parts: Sequence[Any]) -> Any:
    """The parts one after another: np.concatenate for arrays, a LazyConcat (nothing read) when one is lazy."""
    lazy = [p for p in parts if is_lazy(p)]
    if not lazy:
        return np.concatenate(parts)
    return LazyConcat(parts, lazy[0].options)


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


def data_key(x: Any) -> str:
    """sha256 naming inputs for a cache or labels key: an array's float32 bytes (teachers.array_sha256), or
    a lazy source's fingerprint, so a folder is never read to check a key."""
    from edgekd.teachers import array_sha256

    return fingerprint(x) if is_lazy(x) else array_sha256(np.ascontiguousarray(x, np.float32))


def fingerprint(x: Any) -> str:
    """sha256 naming what a lazy source reads: for image files the transform spec and each file's path, size
    and modification time (in the source's row order); for a mapped array its file, layout, rows and scaling.
    Keys caches built on the source without reading its data."""
    import hashlib
    import json

    if isinstance(x, LazyImages):   # image files, or samples of tar shards (edgekd.shards.LazyShards)
        payload = x.identity()
    elif isinstance(x, LazyStream):   # cannot be named without reading it: a key of this load only, never reused
        payload = {"stream": type(x.base).__name__, "load": x.token}
    elif isinstance(x, LazyConcat):   # the parts' keys (fingerprints, or sha256 of arrays) and this view's rows
        from edgekd.teachers import array_sha256

        payload = {"concat": [data_key(p) for p in x.parts] + [array_sha256(x.rows)]}
    elif isinstance(x, LazyArray) and isinstance(x.base, np.memmap):
        st = os.stat(x.base.filename)
        payload = {"file": [str(x.base.filename), st.st_size, st.st_mtime_ns], "offset": x.base.offset,
                   "shape": list(x.base.shape), "dtype": x.base.dtype.str, "rows": x.rows.tolist(),
                   "scale": float(x.scale), "mean": [float(v) for v in x.mean],
                   "std": [float(v) for v in x.std]}
    else:
        raise EdgekdError(f"a {type(getattr(x, 'base', x)).__name__} source has no fingerprint for a cache; use "
                          "arrays, an .npz or an image folder")
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _check(files: Sequence[str], spec: PreprocessSpec, max_pixels: int, decode: bool) -> list[tuple[int, int] | str]:
    """Per file: (height, width) from its header (also fully decoded with `decode`), or the one-line error
    naming it. The collate function of check_files' DataLoader, so the folder scan runs in its workers."""
    from edgekd.preprocess import probe_image

    out: list[tuple[int, int] | str] = []
    for f in files:
        try:
            size = probe_image(f, max_pixels)
            if decode:
                apply(spec, f, max_pixels)
            out.append(size)
        except EdgekdError as e:
            out.append(str(e))
    return out


def check_files(files: Sequence[str], spec: PreprocessSpec, max_pixels: int, decode: bool,
                workers: int) -> list[tuple[int, int] | str]:
    """`_check` of every file, in order, spread over `workers` processes (in this one for small folders)."""
    import functools

    check = functools.partial(_check, spec=spec, max_pixels=max_pixels, decode=decode)
    if workers == 0 or len(files) < 512:
        return check(files)
    import torch

    loader = torch.utils.data.DataLoader(list(files), batch_size=64, num_workers=workers, collate_fn=check)
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
    return _mean_std(total, total_sq, count)


class Feed:
    """Batches of `x` for lists of index chunks; one per training run, so the workers outlive epochs. An
    iterable source (LazyStream) is read in blocks of `batch_size` for this DDP rank; its chunks must come
    from `stream_order` (or be consecutive blocks from 0 with ranks = (0, 1))."""

    def __init__(self, x: Any, pin: bool = False, batch_size: int | None = None,
                 ranks: tuple[int, int] | None = None) -> None:
        import torch

        self.x = x
        self.loader = None
        if not is_lazy(x):
            self.x_t = torch.from_numpy(np.ascontiguousarray(x))
            return
        o = x.options
        workers = o.num_workers
        if isinstance(x, LazyStream):   # this DDP rank's blocks (`ranks`: (rank, world); default: torchrun's)
            from edgekd import distributed

            rank, world = ranks or (distributed.rank(), distributed.world_size())
            dataset, self.sampler = distributed.StreamBlocks(x, batch_size, rank, world), None
        else:   # the batch sampler: a list the epoch's chunks are put in (a persistent loader iterates it anew)
            dataset, self.sampler = x, []
        batching = {"batch_size": None} if self.sampler is None else {"batch_sampler": self.sampler}
        self.loader = torch.utils.data.DataLoader(
            dataset, **batching, num_workers=workers,
            pin_memory=pin if o.pin_memory is None else o.pin_memory,
            prefetch_factor=o.prefetch_factor if workers else None,
            persistent_workers=o.persistent_workers and workers > 0)

    def __call__(self, chunks: Sequence[Any], y: Any = None) -> Iterator[Any]:
        """The batches of `chunks`: inputs, or with labels `y` (a tensor) (inputs, labels); a stream gives its
        own labels."""
        if self.loader is None:   # an array: slices stay views
            xs = (self.x_t[c] for c in chunks)
        else:
            every = np.arange(len(self.x))
            chunks = [every[c] if isinstance(c, slice) else np.asarray(c, dtype=np.int64) for c in chunks]
            if self.sampler is None:
                pairs = self._stream(chunks)
                return pairs if y is not None else (xb for xb, _ in pairs)
            self.sampler[:] = chunks
            xs = _one_line_errors(iter(self.loader))
        if y is None:
            return xs
        import torch

        y = torch.as_tensor(y)
        return ((xb, y[c]) for xb, c in zip(xs, chunks, strict=True))

    def _stream(self, chunks: list[np.ndarray]) -> Iterator[tuple[Any, Any]]:
        """The stream's blocks that start where the chunks start; a chunk that starts at or before a block
        already read is a padding step and gets the rank's first block again. Reads the stream to its end, so
        a stream that changed length since the counting pass is an error."""
        it = _one_line_errors(iter(self.loader))
        first, seen = None, -1
        name = type(self.x.base).__name__
        for c in chunks:
            if len(c) and int(c[0]) <= seen:
                yield first
                continue
            for start, xb, yb in it:
                first, seen = first or (xb, yb), start
                if start == int(c[0]):
                    break
            else:
                raise EdgekdError(f"data stream {name}: ended before sample {int(c[0])}; the counting pass at load "
                                  f"saw {len(self.x)} (an iterable source must give the same samples every pass)")
            if len(xb) != len(c):
                raise EdgekdError(f"data stream {name}: gave {len(xb)} samples from {int(c[0])} where {len(c)} "
                                  f"were expected; the counting pass at load saw {len(self.x)} (an iterable "
                                  "source must give the same samples every pass)")
            yield xb, yb
        for start, _, _ in it:
            if start >= len(self.x):
                raise EdgekdError(f"data stream {name}: gave more than the {len(self.x)} samples the counting "
                                  "pass at load saw (an iterable source must give the same samples every pass)")


def _one_line_errors(it: Iterator[Any]) -> Iterator[Any]:
    """A worker's EdgekdError comes back wrapped in its traceback; keep only its own one-line message."""
    try:
        yield from it
    except EdgekdError as e:
        lines = str(e).strip().splitlines()
        tail = next((ln.split("EdgekdError: ", 1)[1] for ln in reversed(lines) if "EdgekdError: " in ln), None)
        if tail is None:
            raise
        raise EdgekdError(tail) from None


def batches(x: Any, chunks: Sequence[Any], y: Any = None) -> Iterator[Any]:
    """One pass over `chunks` of `x` (a fresh, non-persistent feed: for evaluation and one-off passes);
    with labels `y`, (inputs, labels) pairs (a stream's own labels). A stream's chunks are consecutive
    slices of one size from 0."""
    if is_lazy(x):
        x = x.with_options(replace(x.options, persistent_workers=False))
    size = max((len(range(len(x))[c]) if isinstance(c, slice) else len(c) for c in chunks), default=1)
    return Feed(x, batch_size=size, ranks=(0, 1))(chunks, y)   # every rank reads all of it


def is_stream(x: Any) -> bool:
    return isinstance(x, LazyStream)
