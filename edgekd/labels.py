"""Data distillation: label an input pool with a (black-box) teacher, resumably, then filter and balance.

`label_pool` writes `out_dir/shard-00000.npz`, ... and `out_dir/manifest.json`. Shard i covers pool samples
[i * shard_size, min((i + 1) * shard_size, N)) and holds:

    indices       int64 (n,)         pool sample indices
    labels        int64 (n,)         hard label: the teacher's argmax, or the label it gave
    confidence    float16 (n,)       top-1 probability at T = 1 (absent when the teacher gives labels only)
    topk_probs    float16 (n, k)     soft targets: the k largest probabilities at `temperature`, descending
    topk_indices  int16/int32 (n, k) their class ids

Soft targets are stored when the teacher exposes logits, probs or top-k outputs (`keep="auto"`/"topk"); a
labels-only teacher (or `keep="labels"`) gives hard labels only. From logits, probabilities at T are
softmax(z / T); from probs, p^(1/T) renormalized (the same thing for p = softmax(z)). Both are exact: the
mass 1 - sum(topk_probs) belongs to the classes outside the top-k. From a top-k teacher the rest of the
distribution is unknown, so the k probabilities are renormalized to sum to 1 (manifest `renormalized`
true); at T = 1 top-k probabilities are kept as given. Train on them with
`edgekd.losses.topk_soft_target_loss(..., temperature=manifest temperature, values_are="probs")`.

Every shard is written atomically and the manifest, rewritten after each shard, records its sha256, so an
interrupted run resumes: shards whose file is present and verifies are skipped, the rest are redone. A
manifest written for another teacher, pool or settings is refused rather than mixed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import fileio, manifest_folder, streaming
from edgekd.errors import EdgekdError
from edgekd.teachers import TeacherOutput, teacher_identity, teacher_name, validate_output

FORMAT = "edgekd-labels/1"
MANIFEST = manifest_folder.MANIFEST
KEEP = ("auto", "topk", "labels")


@dataclass(frozen=True, eq=False)   # holds arrays: compare fields yourself
class Labels:
    """Teacher labels for (a subset of) a pool: row j describes pool sample `indices[j]`."""

    indices: np.ndarray                  # int64 (n,)
    labels: np.ndarray                   # int64 (n,)
    confidence: np.ndarray | None        # float32 (n,) top-1 probability at T = 1
    topk_probs: np.ndarray | None        # float32 (n, k) at `temperature`, descending
    topk_indices: np.ndarray | None      # int64 (n, k)
    temperature: float
    num_classes: int | None
    manifest: dict[str, Any] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, rows: np.ndarray) -> Labels:
        """The labels of the given rows (a boolean mask or row positions, not pool indices)."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)

        def take(a: Any) -> Any:   # LazyConcat (memory-mapped top-k) stay views
            return None if a is None else a.take(rows, axis=0)
        return replace(self, indices=self.indices[rows], labels=self.labels[rows], confidence=take(self.confidence),
                       topk_probs=take(self.topk_probs), topk_indices=take(self.topk_indices))


def index_dtype(num_classes: int | None, max_index: int) -> type:
    """How stored class ids are typed: int16 when the class count and the largest id fit, else int32."""
    top = max(num_classes or 0, max_index + 1)
    return np.int16 if top <= np.iinfo(np.int16).max else np.int32


def soft_targets(out: TeacherOutput, temperature: float, top_k: int
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, bool]:
    """(hard labels, confidence at T=1, top-k probs at T, top-k indices, renormalized) from one teacher batch.

    Probabilities at T: softmax(z / T) from logits, p^(1/T) / sum(p^(1/T)) from probs. A top-k teacher's
    k values are renormalized over the k known classes unless they are probabilities and T == 1.
    """
    from scipy.special import softmax  # exp(z - max) / sum, row-wise

    if out.kind == "labels":
        return out.values, None, None, None, False
    v = out.values.astype(np.float64)
    if out.kind in ("logits", "probs"):
        z = v if out.kind == "logits" else np.log(np.maximum(v, 1e-45))
        p1 = softmax(z, axis=1)
        pt = p1 if temperature == 1.0 else softmax(z / temperature, axis=1)
        idx = np.argsort(-pt, axis=1, kind="stable")[:, :top_k]   # at most the classes there are
        probs = np.take_along_axis(pt, idx, axis=1)
        return idx[:, 0].astype(np.int64), p1.max(axis=1), probs, idx.astype(np.int64), False
    order = np.argsort(-v, axis=1, kind="stable")
    v = np.take_along_axis(v, order, axis=1)[:, :top_k]
    idx = np.take_along_axis(out.indices, order, axis=1)[:, :top_k]
    if out.values_are == "probs":
        confidence = v[:, 0]
        if temperature == 1.0:
            return idx[:, 0], confidence, v, idx, False
        probs = softmax(np.log(np.maximum(v, 1e-45)) / temperature, axis=1)
    else:
        confidence = softmax(v, axis=1)[:, 0]   # over the known classes only: an upper bound
        probs = softmax(v / temperature, axis=1)
    return idx[:, 0], confidence, probs, idx, True


REMEDY = "delete the labels folder and rerun `edgekd label`"
SHARD_FIELDS = {"file": "str", "start": "index", "stop": "count", "sha256": "sha256"}


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    """The labels manifest, checked (manifest_folder.read_manifest) for the fields this module reads."""
    return manifest_folder.read_manifest(
        out_dir, kind="labels", fmt=FORMAT, remedy=REMEDY, entries="shards", entry_fields=SHARD_FIELDS,
        missing=" (make labels with `edgekd label`)",
        fields={"samples": "count", "shard_size": "count", "temperature": "positive", "top_k": "count",
                "input_shape": "shape", "pool_sha256": "sha256", "shards": "list", "num_classes": "count",
                "top_k_stored": "count", "teacher": "str", "keep": "str", "output_kind": "str", "stored": "str"},
        optional=("num_classes", "top_k_stored", "output_kind", "stored"))


def label_pool(teacher: Any, pool: np.ndarray, out_dir: str | Path, *, shard_size: int = 1024,
               temperature: float = 1.0, top_k: int = 5, keep: str = "auto", batch_size: int = 256,
               num_classes: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Label every sample of `pool` with `teacher`; write shards and manifest.json in `out_dir`; return the manifest.

    Resumes an interrupted run with the same teacher, pool and settings (verified shards are kept); refuses a
    folder labelled with a different teacher, pool or settings. The teacher is called on batches of at most
    `batch_size` samples, never across a shard boundary. `num_classes`, when given, is checked against what
    the teacher returns.
    """
    out_dir = Path(out_dir)
    pool = pool if streaming.is_lazy(pool) else np.ascontiguousarray(np.asarray(pool), dtype=np.float32)
    if pool.ndim < 2 or len(pool) == 0:
        raise EdgekdError(f"labels {out_dir}: the pool has shape {pool.shape}; expected (samples, *input_shape)")
    if keep not in KEEP:
        raise EdgekdError(f"labels {out_dir}: keep={keep!r}; expected one of {', '.join(KEEP)}")
    manifest_folder.check_counts(f"labels {out_dir}", shard_size=shard_size, top_k=top_k, batch_size=batch_size)
    if not temperature > 0:
        raise EdgekdError(f"labels {out_dir}: temperature must be > 0, got {temperature}")
    who = teacher_name(teacher)
    settings = {"teacher": teacher_identity(teacher), "pool_sha256": streaming.data_key(pool),
                "samples": int(len(pool)),   # each must match for a rerun to resume into the folder
                "temperature": float(temperature), "top_k": top_k, "keep": keep, "shard_size": shard_size}
    n_shards = -(-len(pool) // shard_size)
    if os.path.lexists(out_dir / MANIFEST):
        manifest = _read_manifest(out_dir)
        differ = [k for k in settings if manifest.get(k) != settings[k]]
        if differ:
            what = "; ".join(f"{k}: folder has {manifest.get(k)!r}, this run {settings[k]!r}" for k in differ)
            raise EdgekdError(f"labels {out_dir}: already holds labels made with other settings ({what}); use "
                              "another folder or delete this one (labels from different runs are never mixed)")
    else:
        manifest = manifest_folder.new(FORMAT, **settings, input_shape=list(pool.shape[1:]), output_kind=None,
                                       stored=None, top_k_stored=None, num_classes=num_classes, renormalized=None,
                                       shards=[])
    done = {e["file"]: e for e in manifest["shards"] if manifest_folder.entry_ok(out_dir, e, "labels", REMEDY)}
    manifest["shards"] = [e for e in manifest["shards"] if e["file"] in done]
    if len(done) == n_shards and manifest.get("complete"):
        return manifest
    manifest["complete"] = False
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    todo = [s for s in range(n_shards) if f"shard-{s:05d}.npz" not in done]
    chunks = [slice(b, min(b + batch_size, (s + 1) * shard_size, len(pool)))
              for s in todo for b in range(s * shard_size, min((s + 1) * shard_size, len(pool)), batch_size)]
    parts: list[tuple] = []
    with tqdm(total=len(todo), desc="label", unit="shard", disable=not progress) as bar:
        for rows, xb in zip(chunks, streaming.batches(pool, chunks), strict=True):   # lazy: decoded in workers
            out = validate_output(teacher(xb.numpy()), len(xb), who, num_classes=manifest["num_classes"])
            _record_kind(manifest, out, keep, who)
            parts.append(soft_targets(out, temperature, top_k))
            shard = rows.start // shard_size
            if rows.stop == min((shard + 1) * shard_size, len(pool)):   # the shard's last batch: write it
                manifest = _write_shard(out_dir, shard, shard_size, len(pool), parts, manifest)
                parts = []
                bar.update()
    return manifest_folder.finish(out_dir, manifest)


def _write_shard(out_dir: Path, shard: int, shard_size: int, n: int, parts: list[tuple],
                 manifest: dict[str, Any]) -> dict[str, Any]:
    """Write shard `shard` atomically and record it (sha256) in the manifest, rewritten (so a kill resumes)."""
    name = f"shard-{shard:05d}.npz"
    start, stop = shard * shard_size, min((shard + 1) * shard_size, n)
    labels = np.concatenate([p[0] for p in parts]).astype(np.int64)
    arrays = {"indices": np.arange(start, stop, dtype=np.int64), "labels": labels}
    if parts[0][1] is not None:
        arrays["confidence"] = np.concatenate([p[1] for p in parts]).astype(np.float16)
    if manifest["stored"] == "topk":
        probs = np.concatenate([p[2] for p in parts])
        idx = np.concatenate([p[3] for p in parts])
        k = probs.shape[1]
        if manifest["top_k_stored"] is None:
            manifest["top_k_stored"] = k
        elif manifest["top_k_stored"] != k:
            raise EdgekdError(f"labels: the teacher returned top-{k} outputs for samples {start}..{stop - 1} but "
                              f"top-{manifest['top_k_stored']} before; it must return the same k every time")
        arrays["topk_probs"] = probs.astype(np.float16)
        arrays["topk_indices"] = idx.astype(index_dtype(manifest["num_classes"], int(idx.max())))
    path = out_dir / name
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    manifest["shards"].append({"file": name, "start": start, "stop": stop, "sha256": fileio.sha256_file(path)})
    manifest["shards"].sort(key=lambda e: e["start"])
    return fileio.write_signed_json(out_dir / MANIFEST, manifest)


def _record_kind(manifest: dict[str, Any], out: TeacherOutput, keep: str, who: str) -> None:
    """Fix the output kind, class count and storage on the first batch; refuse a teacher that changes them."""
    kind = out.kind if out.kind != "topk" else f"topk-{out.values_are}"
    if manifest["output_kind"] is None:
        if keep == "topk" and out.kind == "labels":
            raise EdgekdError(f"{who}: gives hard labels only; keep='topk' needs logits, probs or top-k outputs "
                              "(use keep='auto' or 'labels')")
        manifest["output_kind"] = kind
        manifest["stored"] = "labels" if out.kind == "labels" or keep == "labels" else "topk"
        manifest["renormalized"] = manifest["stored"] == "topk" and out.kind == "topk" and not (
            out.values_are == "probs" and manifest["temperature"] == 1.0)
        if out.kind in ("logits", "probs"):
            manifest["num_classes"] = int(out.values.shape[1])
    elif manifest["output_kind"] != kind:
        raise EdgekdError(f"{who}: returned {kind} outputs, but earlier batches (or the run being resumed) gave "
                          f"{manifest['output_kind']}; a teacher must answer every batch the same way")


def read_labels(out_dir: str | Path, *, pool: np.ndarray | None = None) -> Labels:
    """Read a complete labels folder, verifying every shard's sha256 (and, given `pool`, that it is the pool
    that was labelled)."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    n_shards = -(-manifest["samples"] // manifest["shard_size"])
    if not manifest.get("complete") or len(manifest["shards"]) != n_shards:
        raise EdgekdError(f"labels {out_dir}: incomplete ({len(manifest['shards'])} of {n_shards} shards); rerun "
                          "the same `edgekd label` command to finish it")
    if pool is not None and streaming.data_key(pool) != manifest["pool_sha256"]:
        raise EdgekdError(f"labels {out_dir}: were made for another pool ({manifest['samples']} samples of shape "
                          f"{tuple(manifest['input_shape'])}; given {len(pool)} of {tuple(pool.shape[1:])}, "
                          "and the sha256 differs); label this pool or pass the one that was labelled")
    cols: dict[str, list[np.ndarray]] = {}
    for entry in manifest["shards"]:
        for key, a in _read_shard(out_dir, entry, manifest).items():
            cols.setdefault(key, []).append(a)
    small = {k: np.concatenate(v) for k, v in cols.items() if not k.startswith("topk")}
    has_conf = "confidence" in small and len(small["confidence"]) == manifest["samples"]
    topk = {k: streaming.LazyConcat(cols[k], dtype=t) for k, t in (("topk_probs", np.float32),
                                                                  ("topk_indices", np.int64)) if k in cols}
    return Labels(indices=small["indices"].astype(np.int64), labels=small["labels"].astype(np.int64),
                  confidence=small["confidence"].astype(np.float32) if has_conf else None,
                  topk_probs=topk.get("topk_probs"), topk_indices=topk.get("topk_indices"),
                  temperature=float(manifest["temperature"]), num_classes=manifest.get("num_classes"),
                  manifest=manifest)


def _read_shard(out_dir: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """A verified shard's arrays, memory-mapped (pages are read as rows are looked up)."""
    path = fileio.verify_confined(out_dir, entry["file"], entry["sha256"],
                                  what=f"labels shard {out_dir / entry['file']} (named by {out_dir / MANIFEST})",
                                  remedy="rerun `edgekd label` to redo it")
    try:
        arrays = streaming.map_npz(path)
    except Exception as e:
        raise EdgekdError(f"labels shard {path}: not a readable .npz without pickles ({type(e).__name__}); "
                          f"{REMEDY}") from None
    n = entry["stop"] - entry["start"]
    want = ["indices", "labels"] + (["topk_probs", "topk_indices"] if manifest["stored"] == "topk" else [])
    for key in want:
        if key not in arrays or len(arrays[key]) != n:
            raise EdgekdError(f"labels shard {path}: array {key!r} missing or not {n} rows")
    if not np.array_equal(arrays["indices"], np.arange(entry["start"], entry["stop"])):
        raise EdgekdError(f"labels shard {path}: indices are not samples {entry['start']}..{entry['stop'] - 1}")
    return arrays


def filter_labels(labels: Labels, *, min_confidence: float = 0.0, balance: bool | int = False,
                  seed: int = 0) -> tuple[Labels, dict[str, Any]]:
    """Keep confident pseudo-labels, then optionally balance classes by down-sampling; returns (kept, report).

    Confidence is the teacher's top-1 probability at T = 1; samples below `min_confidence` are dropped.
    `balance=True` down-samples every class to the size of the rarest class still present; an int caps each
    class at that many samples. Which samples a class keeps is drawn with `seed`; kept rows stay in pool order.
    The report lists per class how many samples there were before, after the confidence filter and at the end.
    """
    if min_confidence > 0 and labels.confidence is None:
        raise EdgekdError("filter_labels: min_confidence needs teacher confidences, but these labels came from a "
                          "teacher that gives hard labels only")
    if not isinstance(balance, int) or (not isinstance(balance, bool) and balance < 1):
        raise EdgekdError(f"filter_labels: balance must be true/false or a per-class cap >= 1, got {balance!r}")
    keep = np.ones(len(labels), bool)
    if min_confidence > 0:
        keep &= labels.confidence >= min_confidence
    after_conf = labels.labels[keep]
    n_classes = labels.num_classes or int(labels.labels.max(initial=-1)) + 1
    before_counts = np.bincount(labels.labels, minlength=n_classes)
    conf_counts = np.bincount(after_conf, minlength=n_classes)
    target = balance or None   # False: no balancing; an int: that cap
    if balance is True:
        present = conf_counts[conf_counts > 0]
        target = int(present.min()) if len(present) else 0
    if target is not None:
        rng = np.random.default_rng(seed)
        for c in range(n_classes):
            rows = np.flatnonzero(keep & (labels.labels == c))
            if len(rows) > target:
                keep[rng.choice(rows, len(rows) - target, replace=False)] = False
    kept = labels.subset(np.flatnonzero(keep))
    final_counts = np.bincount(kept.labels, minlength=n_classes)
    report = {
        "min_confidence": float(min_confidence), "balance": balance, "per_class_target": target, "seed": seed,
        "per_class": [{"class": c, "before": int(before_counts[c]), "after_confidence": int(conf_counts[c]),
                       "after": int(final_counts[c])} for c in range(n_classes)],
        "total": {"before": int(len(labels)), "after_confidence": int(len(after_conf)), "after": int(len(kept))},
    }
    return kept, report


def format_filter_report(report: dict[str, Any], class_names: tuple[str, ...] | None = None) -> str:
    """The filter report as a table (class, before, after confidence, after balance)."""
    from tabulate import tabulate

    rows = [[class_names[r["class"]] if class_names and r["class"] < len(class_names) else r["class"],
             r["before"], r["after_confidence"], r["after"]] for r in report["per_class"]]
    t = report["total"]
    rows.append(["total", t["before"], t["after_confidence"], t["after"]])
    return tabulate(rows, headers=["class", "before", f"conf >= {report['min_confidence']:g}", "kept"],
                    tablefmt="github")
