"""WebDataset tar shards with wids descriptors: image data that outgrows one folder, disk or machine.

Format (no edgekd-only format): each split is a set of POSIX tar shards in WebDataset's convention (sample
`KEY.jpg` + `KEY.cls`, the image's own encoded bytes and its class index as ASCII decimal) written by
webdataset's `TarWriter`, and one wids dataset descriptor per split (`train.json`, `val.json`, `test.json`,
or `all.json` for a folder without splits): `{"wids_version": 1, "shardlist": [{"url", "nsamples",
"filesize"}]}` plus an "edgekd" entry with the class names. wids (indexed WebDataset) reads such a set by
sample index, which is what edgekd's training needs: a shuffled index order per epoch, DistributedSampler
shards across DDP ranks, DataLoader workers given disjoint batches, resume at a step, teacher caches keyed
by index.

Shard files are data. The descriptor is parsed here, not by `wids.ShardListDataset` (which would download
URLs and run `pipe:` commands): every shard must be a plain relative file name inside the descriptor's
folder, of the recorded size and sample count. Members are read through wids' memory-mapped tar index
(`wids.wids.IndexedTarSamples`), never extracted; only image members (at most MAX_IMAGE_BYTES, through
`edgekd.preprocess` with its pixel limit) and a `.cls` of at most MAX_LABEL_BYTES are decoded. Anything
else in a sample (.pyd, .pth, .pkl, ...) is never read, so a pickle in a shard cannot run.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import streaming
from edgekd.errors import EdgekdError
from edgekd.preprocess import IMAGE_SUFFIXES, MAX_PIXELS, PreprocessSpec

SPLIT_NAMES = {"": "all", "train": "train", "val": "val", "test": "test"}   # folder split -> descriptor name
MAX_INDEX_BYTES = 64 * 2**20   # a descriptor larger than this is refused before parsing
MAX_LABEL_BYTES = 32
MAX_IMAGE_BYTES = 256 * 2**20   # an image member larger than this is refused before it is copied out of the map
MAX_OPEN_SHARDS = 16           # tar indexes kept open per process (least recently used closed first)


def write_shards(folder: str | Path, out: str | Path, shard_size: int = 1000,
                 workers: int | None = None) -> dict[str, Any]:
    """Write an image folder (class folders, or train/ val/ test/ of class folders) as WebDataset tar shards
    of at most `shard_size` samples plus one wids descriptor per split in `out`. Every image's header is
    checked first (a bad file is an error naming it); images are stored as they are (no re-encoding), in
    the folder's sorted order. Each shard is written atomically and the descriptors last, so an interrupted
    write leaves no descriptor that names a missing or partial shard. Returns a summary."""
    from edgekd.data import folder_layout
    from edgekd.fileio import write_json

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise EdgekdError(f"shards: {folder} is not a folder (expected class folders, or train/ and test/)")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise EdgekdError(f"shards: --shard-size {shard_size!r}; expected a positive number of samples")
    folders, classes = folder_layout(folder)
    items = {split: [(f, label) for label, name in enumerate(classes) for f in by_class[name]]
             for split, by_class in folders.items()}
    checked = streaming.check_files([str(f) for files in items.values() for f, _ in files], PreprocessSpec(),
                                    MAX_PIXELS, False, streaming.default_workers() if workers is None else workers)
    bad = next((got for got in checked if isinstance(got, str)), None)   # every header, before anything is written
    if bad is not None:
        raise EdgekdError(f"shards: {bad}; fix or remove the file, then write the shards again")
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES.values():   # a stale descriptor must not outlive the shards it names
        (out / f"{name}.json").unlink(missing_ok=True)
    summary: dict[str, Any] = {"out": str(out), "classes": classes, "splits": {}}
    descriptors = {}
    for split, files in items.items():
        name = SPLIT_NAMES[split]
        shardlist = [_write_shard(out / f"{name}-{k // shard_size:06d}.tar", files[k:k + shard_size], k)
                     for k in range(0, len(files), shard_size)]
        descriptors[name] = {"wids_version": 1, "name": name, "shardlist": shardlist,
                             "edgekd": {"class_names": classes, "split": name, "source": str(folder)}}
        summary["splits"][name] = {"samples": len(files), "shards": len(shardlist)}
    for name, desc in descriptors.items():
        write_json(out / f"{name}.json", desc)
    return summary


def _write_shard(path: Path, files: list[tuple[Path, int]], first: int) -> dict[str, Any]:
    """One tar of `files` (keys numbered from `first`), written atomically; its wids shardlist entry."""
    from edgekd.fileio import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, _need("webdataset").TarWriter(f) as sink:
            for k, (file, label) in enumerate(files, start=first):
                sink.write({"__key__": f"{k:09d}", file.suffix.lower().lstrip("."): file.read_bytes(),
                            "cls": str(label).encode("ascii")})
    return {"url": path.name, "nsamples": len(files), "filesize": path.stat().st_size}


def _need(module: str) -> Any:
    """The shards extra's module, or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgekdError(f"tar shards need the {module.split('.')[0]} package: pip install 'edgekd[shards]'") from None


def descriptors(path: Path) -> dict[str, Path]:
    """{folder split: descriptor} of a shard set: a folder with all.json or train.json/test.json (val.json
    optional), or one descriptor .json (a pool the stratified split carves). Empty when `path` is neither."""
    if path.is_file() and path.suffix == ".json":
        return {"": path}
    if not path.is_dir():
        return {}
    found = {split: path / f"{name}.json" for split, name in SPLIT_NAMES.items() if (path / f"{name}.json").is_file()}
    if "" in found:
        return {"": found[""]}
    return found


def read_descriptor(path: Path) -> tuple[list[str] | None, list[tuple[str, int]]]:
    """(class names or None, [(shard file, samples)]) of a wids descriptor, every shard confined to its
    folder: a relative file name (no URL, no `pipe:`, no `..`), a regular file of the recorded filesize."""
    where = f"shards {path}"
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise EdgekdError(f"{where}: descriptor larger than {MAX_INDEX_BYTES} bytes; refused")
        desc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise EdgekdError(f"{where}: not a readable wids descriptor ({type(e).__name__}: {e})") from None
    if not isinstance(desc, dict) or desc.get("wids_version") != 1 or not isinstance(desc.get("shardlist"), list):
        raise EdgekdError(f"{where}: expected a wids descriptor {{\"wids_version\": 1, \"shardlist\": [...]}}")
    if desc.get("datasets"):
        raise EdgekdError(f"{where}: \"datasets\" (references to other descriptors) are not followed; list the "
                          "shards in one shardlist")
    if not desc["shardlist"]:
        raise EdgekdError(f"{where}: the shardlist is empty")
    root = path.parent.resolve()
    shards = []
    for entry in desc["shardlist"]:
        url, n = (entry.get("url"), entry.get("nsamples")) if isinstance(entry, dict) else (None, None)
        if not isinstance(url, str) or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise EdgekdError(f"{where}: shardlist entry {entry!r}; expected {{\"url\": file name, \"nsamples\": "
                              "a positive int}")
        file = (root / url).resolve()
        if ":" in url or Path(url).is_absolute() or file.parent != root:
            raise EdgekdError(f"{where}: shard {url!r} is not a file name in {root}; shards are read from the "
                              "descriptor's folder only (no URLs, paths or pipe: commands)")
        if not file.is_file():
            raise EdgekdError(f"{where}: shard {url!r} not found in {root}")
        size = entry.get("filesize")
        if size is not None and file.stat().st_size != size:
            raise EdgekdError(f"{where}: shard {url!r} has {file.stat().st_size} bytes, the descriptor says {size} "
                              "(rewritten or truncated); write the shards again")
        shards.append((str(file), n))
    names = desc.get("edgekd", {}).get("class_names") if isinstance(desc.get("edgekd"), dict) else None
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)):
        raise EdgekdError(f"{where}: edgekd.class_names must be a list of strings")
    return names, shards


class LazyShards(streaming.LazyImages):
    """Samples of tar shards read by index (base row i = the i-th sample over the shards in order): the image
    member's encoded bytes go through the same eval transform as an image file."""

    def __init__(self, shards: list[tuple[str, int]], spec: PreprocessSpec, item_shape: tuple[int, ...],
                 max_pixels: int = MAX_PIXELS, options: streaming.LoaderOptions | None = None) -> None:
        super().__init__([], spec, item_shape, max_pixels, options or streaming.LoaderOptions())
        self.shards = tuple((str(f), int(n)) for f, n in shards)
        self.ends = np.cumsum([n for _, n in self.shards])
        self.rows = np.arange(int(self.ends[-1]))
        self._open: OrderedDict[str, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:   # workers open their own memory maps
        return {**self.__dict__, "_open": OrderedDict()}

    def _tar(self, file: str) -> Any:
        """wids' indexed tar of `file` (opened once per process; nsamples checked against the descriptor)."""
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        IndexedTarSamples = _need("wids.wids").IndexedTarSamples
        expected = dict(self.shards)[file]
        try:
            tar = IndexedTarSamples(path=file)
        except Exception as e:   # a corrupt header: wids raises ValueError, UnicodeDecodeError, struct.error
            raise EdgekdError(f"shard {file}: not a readable tar ({type(e).__name__}: {e})") from None
        if len(tar) != expected:
            raise EdgekdError(f"shard {file}: holds {len(tar)} samples, its descriptor says {expected}")
        self._open[file] = tar
        while len(self._open) > MAX_OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return tar

    def _members(self, i: int, image: bool = True) -> tuple[str, dict[str, bytes]]:
        """(name for messages, {"image": bytes, "cls": bytes}) of base row i: the first image member (only when
        `image`) and the .cls member; no other member is read."""
        k = int(np.searchsorted(self.ends, i, side="right"))
        file, inner = self.shards[k][0], i - (int(self.ends[k - 1]) if k else 0)
        tar = self._tar(file)
        out, name = {}, f"{file}[{inner}]"
        for j in tar.samples[inner]:
            member, offset, size = tar.reader.by_index[j]
            ext = "." + member.rsplit(".", 1)[-1].lower()
            name = f"{file}:{member.rsplit('.', 1)[0]}"
            if image and ext in IMAGE_SUFFIXES and "image" not in out:
                if size > MAX_IMAGE_BYTES:
                    raise EdgekdError(f"shard {name}: {ext} member of {size} bytes, more than {MAX_IMAGE_BYTES}; "
                                      "refused")
                out["image"] = tar.reader.get_at_offset(offset)[1]
            elif ext == ".cls":
                if size > MAX_LABEL_BYTES:
                    raise EdgekdError(f"shard {name}: .cls member of {size} bytes; expected a class index")
                out["cls"] = tar.reader.get_at_offset(offset)[1]
        return name, out

    def image(self, i: int) -> Any:
        name, members = self._members(i)
        if "image" not in members:
            raise EdgekdError(f"shard {name}: sample has no image member ({', '.join(IMAGE_SUFFIXES)}); other members "
                              "(.pyd, .pth, .pkl, ...) are never decoded")
        return members["image"]

    def name(self, i: int) -> str:
        return self._members(i, image=False)[0]

    def label(self, i: int) -> int:
        name, members = self._members(i, image=False)
        raw = members.get("cls")
        text = raw.decode("ascii", "replace").strip() if raw is not None else ""
        if not text.isdigit():
            raise EdgekdError(f"shard {name}: sample has no .cls class index (got {text!r}); expected the class "
                              "number as ASCII digits")
        return int(text)

    def files(self) -> list[str]:
        raise EdgekdError("tar shards have no image files to list; use an image folder")

    def identity(self) -> dict[str, Any]:
        stats = [(f, n, st.st_size, st.st_mtime_ns) for f, n in self.shards for st in [os.stat(f)]]
        return {"spec": self.spec.to_dict(), "shards": stats, "rows": self.rows.tolist(),
                "max_pixels": self.max_pixels}


def load(path: Path, cfg: Any) -> dict[str, Any]:
    """A shard set as load_data's raw dict: lazy inputs and labels per split, class names, the eval spec."""
    from edgekd.data import _spec, loader_options

    found = descriptors(path)
    if set(found) - {""} and "test" not in found:
        raise EdgekdError(f"data {path}: has train.json but no test.json; expected train.json and test.json "
                          "(val.json optional), or all.json")
    if set(found) - {""} and "train" not in found:
        raise EdgekdError(f"data {path}: has no train.json or all.json shard descriptor")
    if cfg.skip_bad_images:
        raise EdgekdError(f"data {path}: [data] skip_bad_images applies to image folders; shards are checked "
                          "when written (edgekd shards)")
    spec, options = _spec(cfg), loader_options(cfg)
    out: dict[str, Any] = {"preprocess": spec}
    names_seen = None
    total = 0
    for split, desc in found.items():
        names, shards = read_descriptor(desc)
        if names_seen is not None and names != names_seen:
            raise EdgekdError(f"data {desc}: class names differ from the other splits' ({names} vs {names_seen})")
        names_seen = names
        x = LazyShards(shards, spec, (spec.channels, 1, 1), cfg.max_pixels, options)
        x.item_shape = x.raw(0).shape   # [data] image_size makes every sample this size
        y = np.asarray([x.label(i) for i in range(len(x))], dtype=np.int64)
        total += len(y)
        out.update({"x": x, "y": y} if split == "" else {f"x_{split}": x, f"y_{split}": y})
    if names_seen is not None:
        out["class_names"] = names_seen
    out["report"] = {"source": "webdataset shards", "layout": "/".join(SPLIT_NAMES[s] for s in found),
                     "images": total}
    return out
