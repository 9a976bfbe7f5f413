"""Sentence-embedding bundles where they run: load, embed, compare with the teacher, profile per sentence.

numpy + onnxruntime only (no torch), like edgekd.runtime, so `python -m edgekd.embedding_runtime profile
BUNDLE` measures a bundle in a fresh process. A bundle holds the engine (onnxruntime, input `input_ids`
int64 (batch, seq) padded with the manifest's pad_id, output `sentence_embedding` (batch, dim) float32,
L2-normalized), the teacher's tokenizer files, eval.npz (held-out token ids and the PyTorch teacher's
embeddings of them) and manifest.json with a sha256 per file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

MAX_RUNS = 2000
EVAL_BATCH = 64


# ------------------------------------------------------------------------------------------------ metrics


def _normalized(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _neighbours(a: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k nearest other rows by cosine similarity, nearest first (the row itself excluded)."""
    sim = a @ a.T
    np.fill_diagonal(sim, -np.inf)
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def embedding_metrics(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """How well `student` embeddings reproduce `teacher` embeddings of the same sentences (rows).

    cosine: mean over sentences of cos(s_i, t_i) (needs the same dimension).
    retrieval_top1: fraction of sentences whose nearest other sentence is the same in both spaces.
    retrieval_top5: mean of |top5_student(i) & top5_teacher(i)| / 5, neighbour sets without order.
    teacher_top1_in_student_top5: fraction of sentences whose teacher nearest neighbour is in the student's top 5.
    """
    s, t = _normalized(student), _normalized(teacher)
    if s.shape != t.shape or s.ndim != 2:
        raise EdgekdError(f"embedding metrics: student embeddings {s.shape} and teacher embeddings {t.shape} "
                          "must both be (sentences, dim)")
    if len(s) < 6:
        raise EdgekdError(f"embedding metrics: top-5 retrieval needs at least 6 sentences, got {len(s)}")
    ns, nt = _neighbours(s, 5), _neighbours(t, 5)
    overlap5 = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ns, nt, strict=True)])
    return {"cosine": float(np.mean(np.sum(s * t, axis=1))),
            "retrieval_top1": float(np.mean(ns[:, 0] == nt[:, 0])),
            "retrieval_top5": float(overlap5),
            "teacher_top1_in_student_top5": float(np.mean([b[0] in a for a, b in zip(ns, nt, strict=True)])),
            "sentences": int(len(s))}


# -------------------------------------------------------------------------------------------------- batches


def pad_batch(rows: list[np.ndarray], pad_id: int) -> np.ndarray:
    """Token-id rows -> (len(rows), longest) int64, right-padded with pad_id."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def unpad(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """eval.npz stores (N, max_length) padded ids and the lengths; back to one array per sentence."""
    return [ids[i, :int(n)] for i, n in enumerate(lengths)]


def embed(run: Any, rows: list[np.ndarray], pad_id: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Embeddings of token-id rows with `run(ids (b, seq) int64) -> (b, dim)`, in batches of similar length
    (sorted by length, so little padding), returned in the rows' order."""
    order = np.argsort([len(r) for r in rows], kind="stable")
    parts: list[np.ndarray] = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        parts.append(np.asarray(run(pad_batch([rows[j] for j in chunk], pad_id)), dtype=np.float32))
    out = np.empty((len(rows), parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out


# --------------------------------------------------------------------------------------------------- bundles


def load(bundle_dir: str | Path, *, threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Verify a bundle's checksums and open its onnxruntime engine: (run(ids) -> embeddings, manifest)."""
    from edgekd.bundle import read_manifest
    from edgekd.engines.ort import OrtRunner

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=True)
    if manifest.get("task") != "embedding" or manifest.get("runtime") != "onnxruntime":
        raise EdgekdError(f"bundle {bundle_dir}: not an onnxruntime sentence-embedding bundle (task "
                          f"{manifest.get('task')!r}, runtime {manifest.get('runtime')!r})")
    runner = OrtRunner(bundle_dir, manifest, threads)
    return runner, manifest


def _time_passes(run: Any, batches: list[np.ndarray], min_passes: int, min_seconds: float) -> np.ndarray:
    """(passes, batches) milliseconds: one untimed warm-up pass, then whole passes over the same batches until
    both `min_passes` and `min_seconds` are reached (at most MAX_RUNS timed batches)."""
    for x in batches:
        run(x)
    passes: list[list[float]] = []
    start = time.perf_counter()
    while not passes or (len(passes) < min_passes or time.perf_counter() - start < min_seconds) \
            and (len(passes) + 1) * len(batches) <= MAX_RUNS:
        row = []
        for x in batches:
            t0 = time.perf_counter()
            run(x)
            row.append((time.perf_counter() - t0) * 1000.0)
        passes.append(row)
    return np.asarray(passes)


def profile_bundle(bundle_dir: str | Path, *, batch_sizes: tuple[int, ...] | None = None, sentences: int = 128,
                   min_passes: int = 3, min_seconds: float = 1.0, threads: int | None = None) -> dict[str, Any]:
    """Latency per batch and per sentence, and agreement with the teacher, on the held-out sentences.

    Timing uses the first `sentences` held-out sentences (at least 4 batches' worth) for every batch size and
    every bundle of a run: for batch b they are sorted by length and cut into batches of b, each padded to its
    longest sentence (what sentence-embedding servers do to avoid padding). Each batch's latency is the median
    over the passes (robust to other load on the machine); per_sentence_ms = the sum of those medians / the
    number of sentences. p50/p90 are over every timed batch. Metrics compare the engine's embeddings of all
    held-out sentences with the PyTorch teacher's (embedding_metrics).
    """
    import os

    bundle_dir = Path(bundle_dir)
    run, manifest = load(bundle_dir, threads=threads)
    from edgekd.bundle import read_eval

    data = read_eval(bundle_dir, manifest) or {}   # the listed eval file, verified on the bytes that are used
    if not {"ids", "lengths", "reference"} <= set(data):
        raise EdgekdError(f"bundle {bundle_dir}: no eval set with ids, lengths and reference; rebuild the bundle")
    rows = unpad(data["ids"], data["lengths"])
    reference = data["reference"]
    pad_id = int(manifest["input"]["pad_id"])
    sizes = tuple(batch_sizes or manifest.get("batch_sizes") or (1,))
    timing = []
    for b in sizes:
        if b < 1 or b > len(rows):
            raise EdgekdError(f"profile {bundle_dir}: batch sizes must be in 1..{len(rows)} (held-out sentences), "
                              f"got {list(sizes)}")
        n = min(len(rows), max(sentences, 4 * b)) // b * b
        order = sorted(range(n), key=lambda i: len(rows[i]))
        batches = [pad_batch([rows[i] for i in order[k:k + b]], pad_id) for k in range(0, n, b)]
        times = _time_passes(run, batches, min_passes, min_seconds)
        per_batch = np.median(times, axis=0)
        per_sentence = float(per_batch.sum() / n)
        timing.append({"batch": int(b), "p50": float(np.percentile(times, 50)),
                       "p90": float(np.percentile(times, 90)), "mean": float(times.mean()),
                       "per_sentence_ms": per_sentence, "sentences_per_s": 1000.0 / per_sentence,
                       "sentences": int(n), "passes": int(times.shape[0]), "runs": int(times.size),
                       "tokens_per_sentence": float(np.mean([len(rows[i]) for i in range(n)])),
                       "padded_tokens_per_sentence": float(sum(x.size for x in batches) / n)})
    emb = embed(run, rows, pad_id)
    engine_file = manifest["engine"]["file"]
    return {"bundle": str(bundle_dir), "model": manifest["model"], "target": manifest["target"],
            "runtime": manifest["runtime"], "precision": manifest["precision"],
            "quantization": manifest["quantization"], "size_bytes": (bundle_dir / engine_file).stat().st_size,
            "metrics": embedding_metrics(emb, reference), "rows": timing, "threads": run.info.get("threads"),
            "engine_info": run.info, "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    """`python -m edgekd.embedding_runtime profile BUNDLE [--json OUT]`."""
    parser = argparse.ArgumentParser(prog="python -m edgekd.embedding_runtime",
                                     description="profile a sentence-embedding bundle on this machine")
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile")
    prof.add_argument("bundle", type=Path)
    prof.add_argument("--json", type=Path, default=None)
    prof.add_argument("--batch", type=lambda t: tuple(int(v) for v in t.split(",") if v), default=None)
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--sentences", type=int, default=128, help="held-out sentences timed per batch size")
    prof.add_argument("--min-passes", type=int, default=3)
    prof.add_argument("--min-seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        result = profile_bundle(args.bundle, batch_sizes=args.batch, sentences=args.sentences,
                                min_passes=args.min_passes, min_seconds=args.min_seconds, threads=args.threads)
        if args.json is not None:
            from edgekd.fileio import write_json

            write_json(args.json, result)
    except EdgekdError as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    m = result["metrics"]
    print(f"{result['model']} {result['precision']} {result['quantization']}: cosine {m['cosine']:.4f}, "
          f"top-1 {m['retrieval_top1']:.3f}, top-5 {m['retrieval_top5']:.3f}")
    for r in result["rows"]:
        print(f"  batch {r['batch']:>3}: p50 {r['p50']:.2f} ms per batch, {r['per_sentence_ms']:.3f} ms per sentence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
