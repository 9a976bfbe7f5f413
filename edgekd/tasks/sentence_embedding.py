"""Sentence embeddings: (N, seq) int64 token ids -> (N, dim) float32, scored by agreement with the teacher's
embeddings of the same held-out sentences; the numpy helpers that batch sentences and score embeddings."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.plugins import lazy
from edgekd.tasks import EVAL_BATCH, Task


class SentenceEmbedding(Task):
    """(N, seq) int64 token ids, right-padded with pad_id -> (N, dim) float32 L2-normalized sentence embeddings;
    scored by agreement with the teacher's embeddings of the same sentences (`embedding_metrics`). Eval set: ids
    (N, max_length) padded, lengths (N,), reference (N, dim) teacher embeddings. Batches are cut from sentences
    of similar length and padded to their longest (what sentence-embedding servers do)."""

    name = "embedding"
    input_name = "input_ids"
    output_name = "sentence_embedding"   # not "embedding": the exporter already names a node that in BERT graphs
    input_dtype = "int64"
    dynamic_axes = ("batch", "seq")
    metric_keys = ("cosine", "retrieval_top1", "retrieval_top5", "teacher_top1_in_student_top5",
                   "similarity_spearman")
    eval_arrays = {"ids": "int64", "lengths": "int64", "reference": "float32", "pad_id": "int64"}
    runtimes = ("onnxruntime",)   # TensorRT profiles and the torch builder take one fixed-shape float input
    recipe_section = "embedding"
    context = lazy("edgekd.embedding:TextContext")
    teacher_command = lazy("edgekd.embedding:teacher_command")
    distill_command = lazy("edgekd.embedding:distill_command")
    title = "sentence-embedding distillation"
    sample = "sentence"
    details = ("quantization", "export_parity", "history")

    def check_eval(self, data: dict[str, Any], input_shape: tuple[Any, ...], output_dim: int) -> dict[str, Any]:
        ids, lengths, ref = (np.asarray(data[k]) for k in ("ids", "lengths", "reference"))
        n = len(ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or lengths.shape != (n,) or ref.shape != (n, output_dim) \
                or (n and not 1 <= lengths.min() <= lengths.max() <= ids.shape[1]):
            raise EdgekdError(f"build: eval ids {ids.shape} {ids.dtype}, lengths {lengths.shape}, reference "
                              f"{ref.shape}; expected integer ids (N, longest), lengths (N,) in 1..longest, "
                              f"reference (N, {output_dim})")
        return {"ids": ids, "lengths": lengths, "reference": ref, "pad_id": np.asarray(data.get("pad_id", 0))}

    def parity(self, reference: np.ndarray, ours: np.ndarray) -> dict[str, float]:
        return {"max_abs_diff": float(np.max(np.abs(reference - ours))),
                "min_cosine": float(np.min(np.sum(_normalized(reference) * _normalized(ours), axis=1)))}

    def evaluate(self, run: Callable[[np.ndarray], np.ndarray], data: dict[str, np.ndarray],
                 size: int = EVAL_BATCH) -> dict[str, Any]:
        rows = unpad(data["ids"], data["lengths"])
        metrics = embedding_metrics(embed(run, rows, int(data.get("pad_id", 0)), size), data["reference"])
        return {**metrics, "samples": metrics["sentences"]}

    def timing_batch(self, data: dict[str, np.ndarray] | None, batch: int, sample_shape: tuple[Any, ...],
                     input_range: tuple[float, float] | None) -> np.ndarray:
        """The first `batch` held-out sentences (repeated when fewer), padded to their longest."""
        if data is None or not len(data.get("ids", ())):
            raise EdgekdError("profiling a sentence-embedding bundle needs its eval set (held-out sentences)")
        rows = unpad(data["ids"], data["lengths"])
        return pad_batch([rows[i % len(rows)] for i in range(batch)], int(data.get("pad_id", 0)))

    def report(self, run_dir: Path, skipped: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """The shared report plus what the embedding stages wrote: the teacher and student (teacher.json,
        student.json), the corpus, PyTorch agreement of the student and its Q/DQ graphs, export parity, quantization
        and training histories."""
        if not (run_dir / "student.json").is_file():
            raise EdgekdError(f"{run_dir}: no student.json; run `edgekd distill` into it first")
        student = _json(run_dir / "student.json")
        quantization = {f.stem.removeprefix("quantize-"): _json(f)
                        for f in sorted(run_dir.glob("onnx/quantize-*.json"))}
        pytorch = {**student["pytorch"], **{f"student {k.upper()} int8 ({scheme}, PyTorch Q/DQ)": m
                                            for scheme, info in quantization.items()
                                            for k, m in info.get("pytorch_metrics", {}).items()}}
        parity = {m: r["parity"] for m in ("teacher", "student") if (r := _json(run_dir / "onnx" / f"{m}.parity.json"))}
        parity.update({f"student-{k}-{s}": v for s, info in quantization.items()
                       for k, v in info.get("parity", {}).items()})
        return {**super().report(run_dir, skipped), "teacher": _json(run_dir / "teacher.json"),
                "student": student["student"], "corpus": (_json(run_dir / "corpus.json") or {}).get("info", {}),
                "pytorch": pytorch, "export_parity": parity,
                "quantization": {s: {k: v for k, v in i.items() if k not in ("qat_history", "parity")}
                                 for s, i in quantization.items()},
                "history": {"student": student["history"],
                            **{f"qat-{s}": i["qat_history"] for s, i in quantization.items() if "qat_history" in i}}}

    def headline_text(self, engine: str, metrics: dict[str, Any], speed: str) -> str:
        return (f"the {engine} engine reproduces the teacher's embeddings of unseen sentences with mean cosine "
                f"{metrics['cosine']:.3f} (nearest-neighbour agreement top-1 {metrics['retrieval_top1']:.3f}, top-5 "
                f"{metrics['retrieval_top5']:.3f}) and {speed}")

    def report_sections(self, report: dict[str, Any]) -> list[str]:
        """The teacher, the student and the corpus in words, and the student's agreement in PyTorch."""
        c, t, s = report["corpus"], report["teacher"] or {}, report["student"]
        shape = f", {t['layers']} layers x {t['hidden']}" if t.get("layers") else ""
        return [f"Teacher `{t.get('name')}` ({t.get('params', 0):,} params{shape}); student {s['layers']} layers x "
                f"{s['hidden']} ({s['params']:,} params, {s['params_without_embeddings']:,} without the "
                f"token-embedding table). Corpus {c.get('corpus')}: {c.get('train_sentences')} training sentences, "
                f"{c.get('heldout_sentences')} held-out sentences from {', '.join(c.get('heldout_documents', []))} "
                f"(documents never trained on). Student: {s['epochs']} epochs in {s['train_seconds']} s; teacher "
                f"embeddings of the corpus took {t.get('encode_seconds')} s.", "",
                "## Agreement with the teacher on held-out sentences (PyTorch)", "",
                *self.metrics_table(report["pytorch"]), ""]


TASK = SentenceEmbedding()


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


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
    similarity_spearman: Spearman's rank correlation of the pairwise cosine similarities (all pairs i < j) in the
    two spaces: whether the student orders sentence pairs by closeness as the teacher does.
    """
    s, t = _normalized(student), _normalized(teacher)
    if s.shape != t.shape or s.ndim != 2:
        raise EdgekdError(f"embedding metrics: student embeddings {s.shape} and teacher embeddings {t.shape} "
                          "must both be (sentences, dim)")
    if len(s) < 6:
        raise EdgekdError(f"embedding metrics: top-5 retrieval needs at least 6 sentences, got {len(s)}")
    ns, nt = _neighbours(s, 5), _neighbours(t, 5)
    return {"cosine": float(np.mean(np.sum(s * t, axis=1))),
            "retrieval_top1": float(np.mean(ns[:, 0] == nt[:, 0])),
            "retrieval_top5": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ns, nt, strict=True)])),
            "teacher_top1_in_student_top5": float(np.mean([b[0] in a for a, b in zip(ns, nt, strict=True)])),
            "similarity_spearman": _spearman(*((x @ x.T)[np.triu_indices(len(x), 1)] for x in (s, t))),
            "sentences": int(len(s))}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (float similarities: ties have measure zero)."""
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pad_batch(rows: list[np.ndarray], pad_id: int) -> np.ndarray:
    """Token-id rows -> (len(rows), longest) int64, right-padded with pad_id."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def unpad(ids: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """An eval set's (N, max_length) padded ids and lengths -> one array per sentence."""
    return [ids[i, :int(n)] for i, n in enumerate(lengths)]


def embed(run: Callable[[np.ndarray], np.ndarray], rows: list[np.ndarray], pad_id: int,
          batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Embeddings of token-id rows with `run(ids (b, seq) int64) -> (b, dim)`, in batches of similar length
    (sorted by length, so little padding), returned in the rows' order."""
    if not rows:
        raise EdgekdError("embed: no sentences")
    order = np.argsort([len(r) for r in rows], kind="stable")
    parts: list[np.ndarray] = []
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        parts.append(np.asarray(run(pad_batch([rows[j] for j in chunk], pad_id)), dtype=np.float32))
    out = np.empty((len(rows), parts[0].shape[1]), np.float32)
    out[order] = np.concatenate(parts)
    return out
