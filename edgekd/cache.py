"""A teacher-output cache for offline KD: run the teacher once per (epoch, augmented view), train many times.

Views. The augmented view of sample i in epoch e is

    augment_views(x, [i], epoch=e, seed=seed, augment=augment)
        == augment(x[i:i+1], view_rng(seed, e, i))      with view_rng = np.random.default_rng([seed, e, i])

i.e. one generator per (seed, epoch, sample index), so a view depends on nothing else: not on the batch size,
the batch composition or the order in which the training loop visits samples. `build_cache` and the training
loop both call `augment_views`, so the student sees exactly the view the teacher saw. With `augment=None`
every epoch sees x itself and only one epoch of outputs is stored (any epoch looks it up).

Storage. A folder: `manifest.json` and `epoch-00000.npz`, ... each holding
    values   float16 (N, k)          the teacher's top-k logits for the epoch's views, row i = sample i,
                                     descending, shifted so each row's maximum is 0 (softmax is shift-invariant
                                     and float16 is most precise near 0); probabilities are stored as log p
    indices  int16/int32 (N, k)      their class ids
written atomically, with the manifest (rewritten after every epoch, so a killed build resumes) recording
their sha256 and the cache key: sha256 of x (for a streamed source, `streaming.fingerprint`: file list, sizes,
modification times, transform spec), augment key, seed, epochs, top_k and the teacher's identity. The arrays
are memory-mapped when a run loads the cache, so it takes no RAM beyond the pages batches touch.
`load_cache` refuses a cache whose key differs from what the training run asks for, naming the key.

Training loss: `edgekd.losses.topk_soft_target_loss(s, values, indices, T, values_are="logits")`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import fileio, manifest_folder, streaming
from edgekd.errors import EdgekdError
from edgekd.labels import index_dtype
from edgekd.teachers import TeacherOutput, teacher_identity, teacher_name, validate_output

FORMAT = "edgekd-teacher-cache/1"
MANIFEST = manifest_folder.MANIFEST
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def view_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for sample `index`'s view in `epoch`: np.random.default_rng([seed, epoch, index])."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def augment_views(x: np.ndarray, indices: Sequence[int] | np.ndarray, *, epoch: int, seed: int,
                  augment: Augment | None, batch: np.ndarray | None = None) -> np.ndarray:
    """The views of samples `indices` in `epoch`: augment(x[i:i+1], view_rng(seed, epoch, i)) stacked, float32.

    The one function both the cache builder and the training loop use, so their views are identical.
    `batch`, when given, is x[indices] already read (by a DataLoader: a streamed source is decoded once,
    in its workers, never again here).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    src = np.asarray(x[indices] if batch is None else batch, dtype=np.float32)
    if augment is None:
        return np.ascontiguousarray(src)
    out = np.empty((len(indices), *x.shape[1:]), np.float32)
    for j, i in enumerate(indices):
        view = np.asarray(augment(src[j:j + 1], view_rng(seed, epoch, i)))
        if view.shape != (1, *x.shape[1:]):
            raise EdgekdError(f"augment {augment_key_of(augment)!r}: returned shape {view.shape} for an input of "
                              f"shape {(1, *x.shape[1:])}; it must return the same shape")
        out[j] = view[0]
    return out


# --- Built-in augmentations (named, so a CLI flag and a manifest can refer to them) --------------------------


@dataclass(frozen=True)
class ImageAugment:
    """Random horizontal flip (p = 0.5), random translation by up to `shift` pixels (zero fill) and Gaussian
    noise of std `noise`, in that order, for (N, C, H, W) inputs; `noise` alone also works on flat features."""

    flip: bool = False
    shift: int = 0
    noise: float = 0.0

    @property
    def key(self) -> str:
        parts = (["flip"] if self.flip else []) + ([f"shift={self.shift}"] if self.shift else []) + (
            [f"noise={self.noise:g}"] if self.noise else [])
        return ",".join(parts) or "none"

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.array(x, dtype=np.float32, copy=True)
        if (self.flip or self.shift) and x.ndim != 4:
            raise EdgekdError(f"augment {self.key!r}: flip and shift need (N, C, H, W) images, got shape {x.shape}")
        n = len(x)
        if self.flip:
            flips = rng.random(n) < 0.5
            x[flips] = x[flips, ..., ::-1]
        if self.shift:
            h, w = x.shape[2:]
            shifted = np.zeros_like(x)
            for j, (dy, dx) in enumerate(rng.integers(-self.shift, self.shift + 1, size=(n, 2))):
                ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
                xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
                shifted[j, :, yd, xd] = x[j, :, ys, xs]
            x = shifted
        if self.noise:
            x = x + rng.normal(0.0, self.noise, size=x.shape).astype(np.float32)
        return x


def make_augment(spec: str) -> ImageAugment | None:
    """Parse "none" | comma-separated "flip", "shift=N", "noise=STD" (e.g. "flip,shift=2") into an augment."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    kwargs: dict[str, Any] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, _, value = part.partition("=")
        try:
            if name == "flip" and not value:
                kwargs["flip"] = True
            elif name in ("shift", "noise") and value:
                kwargs[name] = int(value) if name == "shift" else float(value)
                if kwargs[name] < 0:
                    raise ValueError
            else:
                raise ValueError
        except ValueError:
            raise EdgekdError(f"augment {spec!r}: cannot read {part!r}; expected 'none' or comma-separated "
                              "flip, shift=PIXELS, noise=STD") from None
    return ImageAugment(**kwargs)


def augment_key_of(augment: Augment | None) -> str:
    """The string recorded for an augmentation: 'none', its `key` attribute, or module.qualname (+ partial args)."""
    if augment is None:
        return "none"
    key = getattr(augment, "key", None)
    if isinstance(key, str) and key:
        return key
    import functools

    if isinstance(augment, functools.partial):
        return f"{augment_key_of(augment.func)}(*{augment.args!r}, **{augment.keywords!r})"
    return f"{getattr(augment, '__module__', '?')}.{getattr(augment, '__qualname__', type(augment).__qualname__)}"


# --- Build and load ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)   # holds arrays: compare fields yourself
class TeacherCache:
    """Cached top-k teacher logits: `lookup(epoch, indices)` for the samples of a training batch."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    values: tuple[np.ndarray, ...] = field(repr=False)    # per stored epoch: float16 (N, k), memory-mapped
    indices: tuple[np.ndarray, ...] = field(repr=False)   # per stored epoch: int16/int32 (N, k), memory-mapped

    def lookup(self, epoch: int, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(top-k logits float32 (B, k), class ids int64 (B, k)) of samples `indices` in `epoch`."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.manifest["augment"] == "none":
            stored = 0
        elif 0 <= epoch < self.manifest["epochs"]:
            stored = epoch
        else:
            raise EdgekdError(f"teacher cache {self.path}: holds epochs 0..{self.manifest['epochs'] - 1}, asked for "
                              f"epoch {epoch}; rebuild it with at least as many epochs as training runs")
        n = self.values[0].shape[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise EdgekdError(f"teacher cache {self.path}: sample index {int(idx.max())} out of range for "
                              f"{n} cached samples")
        return self.values[stored][idx].astype(np.float32), self.indices[stored][idx].astype(np.int64)


def _as_topk_logits(out: TeacherOutput, top_k: int, who: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Top-k logits (descending, row max shifted to 0) and indices from a teacher batch."""
    if out.kind == "labels":
        raise EdgekdError(f"{who}: gives hard labels only; a teacher cache needs logits, probs or top-k outputs "
                          "(label the data with `edgekd label` instead)")
    v = out.values.astype(np.float64)
    if out.kind == "probs" or (out.kind == "topk" and out.values_are == "probs"):
        v = np.log(np.maximum(v, 1e-30))
    order = np.argsort(-v, axis=1, kind="stable")[:, :top_k]
    idx = np.take_along_axis(out.indices, order, axis=1) if out.kind == "topk" else order
    kind = f"topk-{out.values_are}" if out.kind == "topk" else out.kind
    vals = np.take_along_axis(v, order, axis=1)
    vals = vals - vals[:, :1]
    vals = np.maximum(vals, -60000.0)   # float16 range; exp(-60000 / T) is 0 for any sane T
    return vals.astype(np.float16), idx.astype(np.int64), kind


REMEDY = "delete the cache folder and rebuild it with `edgekd cache-teacher`"


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of a cache folder (what it was built for: augment, seed, top_k, epochs, teacher), checked
    (manifest_folder.read_manifest) for the fields this module reads."""
    return manifest_folder.read_manifest(
        Path(cache_dir), kind="teacher cache", fmt=FORMAT, remedy=REMEDY, entries="files",
        missing="; build it with `edgekd cache-teacher`",
        fields={"x_sha256": "sha256", "samples": "count", "input_shape": "shape", "epochs": "count",
                "stored_epochs": "count", "top_k": "count", "seed": "index", "augment": "str", "teacher": "str",
                "files": "list", "top_k_stored": "count", "num_classes": "count", "teacher_output": "str"},
        optional=("top_k_stored", "num_classes", "teacher_output"),
        entry_fields={"epoch": "index", "file": "str", "sha256": "sha256"})


def _describe(key: str, value: Any) -> str:
    return f"{value[:12]}..." if key in ("x_sha256", "teacher") and isinstance(value, str) else repr(value)


def build_cache(teacher: Any, x: np.ndarray, out_path: str | Path, *, top_k: int, epochs: int,
                augment: Augment | None, seed: int, batch_size: int = 256, augment_key: str | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Run `teacher` on every sample's view for each epoch and store the top-k logits; returns the manifest.

    Views follow `augment_views` (see the module docstring), so they do not depend on `batch_size`. The
    teacher is called on batches of consecutive sample indices, ceil(N / batch_size) times per stored epoch
    (one stored epoch when `augment` is None). A killed build resumes: epochs whose file verifies are kept.
    A folder holding a cache with another key is refused. `augment_key` defaults to augment_key_of(augment).
    """
    out = Path(out_path)
    x = x if streaming.is_lazy(x) else np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise EdgekdError(f"teacher cache {out}: inputs have shape {x.shape}; expected (samples, *input_shape)")
    manifest_folder.check_counts(f"teacher cache {out}", top_k=top_k, epochs=epochs, batch_size=batch_size)
    if not isinstance(seed, int) or seed < 0:
        raise EdgekdError(f"teacher cache {out}: seed must be an integer >= 0, got {seed!r}")
    who = teacher_name(teacher)
    key = {"x_sha256": data_key(x), "augment": augment_key or augment_key_of(augment), "seed": seed,
           "epochs": epochs, "top_k": top_k, "teacher": teacher_identity(teacher)}
    mpath = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise EdgekdError(f"teacher cache {out}: exists and is not a folder")
    if os.path.lexists(mpath):
        manifest = read_manifest(out)
        differ = [k for k in key if manifest.get(k) != key[k]]
        if differ:
            what = "; ".join(f"{k}: folder has {_describe(k, manifest.get(k))}, this build {_describe(k, key[k])}"
                             for k in differ)
            raise EdgekdError(f"teacher cache {out}: already holds a cache with another key ({what}); use another "
                              "path or delete it")
    else:
        manifest = manifest_folder.new(FORMAT, **key, samples=int(len(x)), input_shape=list(x.shape[1:]),
                                       stored_epochs=1 if augment is None else epochs, values="logits",
                                       teacher_output=None, top_k_stored=None, num_classes=None, files=[])
    files = {e["epoch"]: e for e in manifest["files"] if manifest_folder.entry_ok(out, e, "teacher cache", REMEDY)}
    manifest["files"] = sorted(files.values(), key=lambda e: e["epoch"])
    if manifest.get("complete") and len(files) == manifest["stored_epochs"]:
        return manifest
    manifest["complete"] = False
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    for epoch in tqdm(range(manifest["stored_epochs"]), desc="cache", unit="epoch", disable=not progress):
        if epoch in files:
            continue
        name = f"epoch-{epoch:05d}.npz"
        with fileio.atomic_path(out / name) as tmp:
            _write_epoch(teacher, x, tmp, epoch, manifest, top_k=top_k, seed=seed, augment=augment,
                         batch_size=batch_size, who=who)
        files[epoch] = {"epoch": epoch, "file": name, "sha256": fileio.sha256_file(out / name)}
        manifest["files"] = sorted(files.values(), key=lambda e: e["epoch"])
        manifest = fileio.write_signed_json(mpath, manifest)
    return manifest_folder.finish(out, manifest)


def _write_epoch(teacher: Any, x: Any, path: Path, epoch: int, manifest: dict[str, Any], *, top_k: int, seed: int,
                 augment: Augment | None, batch_size: int, who: str) -> None:
    """One epoch file at `path`: the teacher on every view, batches of consecutive samples read by
    `streaming.batches` (a lazy source: decoded in DataLoader workers), each batch's top-k written straight
    into memory-mapped .npy files beside it, then stored (not compressed) in the .npz, so memory stays flat
    whatever N. Index dtype: int16 when the class count (or the largest index seen) fits, else int32."""
    import zipfile

    chunks = [slice(b, min(b + batch_size, len(x))) for b in range(0, len(x), batch_size)]
    parts = {k: path.with_name(f"{path.name}.{k}.npy") for k in ("values", "indices")}
    values = indices = None
    try:
        for rows, xb in zip(chunks, streaming.batches(x, chunks), strict=True):
            views = augment_views(x, np.arange(rows.start, rows.stop), epoch=epoch, seed=seed, augment=augment,
                                  batch=xb.numpy())
            got = validate_output(teacher(views), len(views), who, num_classes=manifest["num_classes"])
            v, i, kind = _as_topk_logits(got, top_k, who)
            if manifest["teacher_output"] is None:
                manifest["teacher_output"] = kind
                manifest["top_k_stored"] = v.shape[1]
                if got.kind in ("logits", "probs"):
                    manifest["num_classes"] = int(got.values.shape[1])
            elif manifest["teacher_output"] != kind or manifest["top_k_stored"] != v.shape[1]:
                raise EdgekdError(f"{who}: returned {kind} top-{v.shape[1]} outputs for epoch {epoch}, samples "
                                  f"{rows.start}..{rows.stop - 1}, but {manifest['teacher_output']} top-"
                                  f"{manifest['top_k_stored']} before; a teacher must answer every batch the same way")
            if values is None:
                dtype = index_dtype(manifest["num_classes"], int(i.max())) if manifest["num_classes"] else np.int32
                values = np.lib.format.open_memmap(parts["values"], "w+", np.float16, (len(x), v.shape[1]))
                indices = np.lib.format.open_memmap(parts["indices"], "w+", dtype, (len(x), v.shape[1]))
            values[rows], indices[rows] = v, i
        for a in (values, indices):
            a.flush()
        del values, indices
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:   # what numpy.savez writes, streamed from disk
            for k, part in parts.items():
                z.write(part, f"{k}.npy")
    finally:
        for part in parts.values():
            part.unlink(missing_ok=True)


def load_cache(path: str | Path, *, x: np.ndarray, augment_key: str, seed: int, top_k: int,
               teacher_identity: str | None = None, epochs: int | None = None) -> TeacherCache:
    """Open a cache for a training run, refusing one built for other data, augmentation, seed, top_k or teacher
    (or, given `epochs`, with fewer augmented epochs than training needs). Verifies every file's sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    if not manifest.get("complete"):
        raise EdgekdError(f"teacher cache {path}: incomplete ({len(manifest.get('files', []))} of "
                          f"{manifest.get('stored_epochs')} epochs); rerun the same `edgekd cache-teacher` to finish")
    if manifest["x_sha256"] != data_key(x):
        raise EdgekdError(f"teacher cache {path}: built for other data (key x_sha256: cache has "
                          f"{manifest['samples']} samples of shape {tuple(manifest['input_shape'])}, sha256 "
                          f"{manifest['x_sha256'][:12]}...; this run has {len(x)} of {tuple(x.shape[1:])}, sha256 "
                          f"{data_key(x)[:12]}...); rebuild the cache on this data")
    asked = {"augment": augment_key, "seed": seed, "top_k": top_k}
    if teacher_identity is not None:
        asked["teacher"] = teacher_identity
    for k, v in asked.items():
        if manifest.get(k) != v:
            raise EdgekdError(f"teacher cache {path}: built with {k} = {_describe(k, manifest.get(k))}, this run "
                              f"asks for {_describe(k, v)}; rebuild the cache or use the same {k}")
    if epochs is not None and manifest["augment"] != "none" and manifest["epochs"] < epochs:
        raise EdgekdError(f"teacher cache {path}: holds {manifest['epochs']} augmented epochs, training runs {epochs}; "
                          "rebuild it with --epochs at least that")
    values, indices = [], []
    for entry in manifest["files"]:
        fpath = path / entry["file"]
        fpath = fileio.verify_confined(path, entry["file"], entry["sha256"],
                                       what=f"teacher cache file {fpath} (named by {path / MANIFEST})", remedy=REMEDY)
        try:
            mapped = streaming.map_npz(fpath)   # top-k stays on disk: pages are read as batches look them up
            v, i = mapped["values"], mapped["indices"]
        except (EdgekdError, KeyError, ValueError, OSError) as e:
            raise EdgekdError(f"teacher cache file {fpath}: not a readable cache file ({e}); {REMEDY}") from None
        if v.shape != (manifest["samples"], manifest["top_k_stored"]) or i.shape != v.shape:
            raise EdgekdError(f"teacher cache file {fpath}: arrays have shapes {v.shape}/{i.shape}; expected "
                              f"({manifest['samples']}, {manifest['top_k_stored']})")
        values.append(v)
        indices.append(i)
    if len(values) != manifest["stored_epochs"]:
        raise EdgekdError(f"teacher cache {path}: manifest lists {len(values)} of {manifest['stored_epochs']} epochs")
    return TeacherCache(path, manifest, tuple(values), tuple(indices))


def data_key(x: Any) -> str:
    """The cache key of the inputs: sha256 of an array's bytes, or a streamed source's fingerprint (file list,
    sizes, modification times, transform spec), so a folder is never read to check a key. An iterable
    (IterableDataset) source is refused: cached outputs are looked up by sample index, which it has not."""
    if streaming.is_stream(x):
        raise EdgekdError(f"teacher cache: a {type(x.base).__name__} (IterableDataset) source has no sample "
                          "index to look cached teacher outputs up by; distill it online, or use a map-style "
                          "Dataset, files or tar shards")
    return streaming.data_key(x)
