"""Task contracts: what a model of each task takes and gives, and how its outputs are scored and reported.

One object per task owns the facts every stage reads instead of assuming them: the input/output signature
(tensor names, dtypes, which axes are dynamic), example and timing inputs, the evaluation metrics computed on
numpy outputs (the same function on PyTorch outputs, on the ONNX graph and on the built engine), the parity
figures of an export, and the columns it adds to the report. numpy only: the device runtime reads it.

    task = tasks.get("embedding")
    task.signature((64,), 384)   # {"input": {"name": "input_ids", "shape": ["batch", "seq"], ...}, "output": ...}

Adding a task (detection, regression) is one more `Task` subclass registered in TASKS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

EVAL_BATCH = 64   # samples per engine call when a task scores an engine on an eval set


class Task:
    """The contract of one task. Subclasses set the class attributes and the methods below."""

    name: str = ""
    input_name: str = ""
    output_name: str = ""
    input_dtype: str = "float32"
    dynamic_axes: tuple[str, ...] = ("batch",)   # the input's symbolic dimensions, from axis 0
    metric_keys: tuple[str, ...] = ()            # the metrics `evaluate` returns, in report order
    eval_arrays: dict[str, str] = {}             # an eval set's arrays (eval.npz) and their dtypes
    runtimes: tuple[str, ...] | None = None      # the runtimes that build its engines (None: all)

    def signature(self, input_shape: tuple[Any, ...], output_dim: int, *, batch: int | str = "batch",
                  **extra: Any) -> dict[str, dict[str, Any]]:
        """The manifest's "input" and "output" entries: name, shape (dynamic axes by name), dtype (+ extra)."""
        return {"input": {"name": self.input_name, "shape": [batch, *input_shape], "dtype": self.input_dtype,
                          **extra},
                "output": {"name": self.output_name, "shape": [batch, output_dim], "dtype": "float32"}}

    def sample_shape(self, manifest_shape: list[Any]) -> tuple[int | None, ...]:
        """The per-sample input shape of a manifest's input.shape; None for a dynamic axis."""
        return tuple(d if isinstance(d, int) else None for d in manifest_shape[1:])

    def zeros(self, batch: int, input_shape: tuple[Any, ...]) -> np.ndarray:
        """A smoke-test input: a batch of zeros, dynamic axes at length 1."""
        return np.zeros((batch, *(d if isinstance(d, int) else 1 for d in input_shape)), self.input_dtype)

    def check_eval(self, data: dict[str, Any], input_shape: tuple[Any, ...], output_dim: int) -> dict[str, Any]:
        """An eval set's arrays with their shapes checked (without reading them: they may be memory-mapped)."""
        raise NotImplementedError

    def parity(self, reference: np.ndarray, ours: np.ndarray) -> dict[str, float]:
        """How far an exported graph's outputs `ours` are from PyTorch's `reference` on the same inputs."""
        raise NotImplementedError

    def evaluate(self, run: Callable[[np.ndarray], np.ndarray], data: dict[str, np.ndarray],
                 size: int = EVAL_BATCH) -> dict[str, Any]:
        """Metrics of the outputs of `run` (an engine, a session) on an eval set."""
        raise NotImplementedError

    def timing_batch(self, data: dict[str, np.ndarray] | None, batch: int, sample_shape: tuple[Any, ...],
                     input_range: tuple[float, float] | None) -> np.ndarray:
        """One input batch to time: eval samples where the bundle has them, else seeded data of the right kind."""
        raise NotImplementedError


class Classification(Task):
    """(N, *input_shape) float32, normalized -> (N, num_classes) logits; scored by top-1 accuracy against the labels
    and top-1 agreement with the PyTorch reference logits. Eval set: x, y, reference_logits (optional)."""

    name = "classification"
    input_name = "input"
    output_name = "logits"
    metric_keys = ("accuracy", "agreement")
    eval_arrays = {"x": "float32", "y": "int64", "reference_logits": "float32"}

    def check_eval(self, data: dict[str, Any], input_shape: tuple[Any, ...], output_dim: int) -> dict[str, Any]:
        x, y, ref = (a if a is None or hasattr(a, "shape") else np.asarray(a)
                     for a in (data["x"], data["y"], data.get("reference_logits")))
        if x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
            raise EdgekdError(f"build: eval x has shape {x.shape}, expected (N, {', '.join(map(str, input_shape))})")
        if y.shape != (len(x),):
            raise EdgekdError(f"build: eval y has shape {y.shape}, expected ({len(x)},) to match x")
        if ref is not None and ref.shape != (len(x), output_dim):
            raise EdgekdError(f"build: eval reference_logits have shape {ref.shape}, expected ({len(x)}, "
                              f"{output_dim})")
        return {"x": x, "y": y, **({} if ref is None else {"reference_logits": ref})}

    def parity(self, reference: np.ndarray, ours: np.ndarray) -> dict[str, float]:
        return {"max_abs_diff": float(np.max(np.abs(reference - ours))),
                "top1_agreement": float(np.mean(reference.argmax(axis=1) == ours.argmax(axis=1)))}

    def evaluate(self, run: Callable[[np.ndarray], np.ndarray], data: dict[str, np.ndarray],
                 size: int = EVAL_BATCH) -> dict[str, Any]:
        """accuracy = mean(argmax(run(x)) == y), agreement = mean(argmax(run(x)) == argmax(reference_logits)),
        streamed in slices of `size` (x may be memory-mapped or a lazy source that decodes only the rows it is
        indexed with); input_range: the smallest and largest input value seen; per_class: per_class_accuracy
        (None when a label is not a class id)."""
        x, y, ref = data["x"], data["y"], data.get("reference_logits")
        correct = agree = classes = 0
        lo, hi = np.inf, -np.inf
        labels, predicted = [], []
        for i in range(0, len(x), size):
            xb = np.ascontiguousarray(x[i:i + size], dtype=np.float32)
            logits = np.asarray(run(xb))
            top1, classes = logits.argmax(axis=1), logits.shape[1]
            labels.append(np.asarray(y[i:i + size]).ravel())
            predicted.append(top1)
            correct += int(np.sum(top1 == labels[-1]))
            if ref is not None:
                agree += int(np.sum(top1 == np.asarray(ref[i:i + size]).argmax(axis=1)))
            if len(xb):
                lo, hi = min(lo, float(np.min(xb))), max(hi, float(np.max(xb)))
        n = len(x)
        try:
            per_class = per_class_accuracy(np.concatenate(labels), np.concatenate(predicted), classes) if n else None
        except (EdgekdError, TypeError, ValueError):   # labels that are not class ids: no per-class figures
            per_class = None
        return {"accuracy": correct / n if n else None, "agreement": agree / n if n and ref is not None else None,
                "samples": n, "input_range": [lo, hi] if n else None, "per_class": per_class}

    def timing_batch(self, data: dict[str, np.ndarray] | None, batch: int, sample_shape: tuple[Any, ...],
                     input_range: tuple[float, float] | None) -> np.ndarray:
        """eval.npz samples (repeated to fill the batch), else seeded noise in the engine's input range (standard
        normal where the bundle records none)."""
        x = None if data is None else data.get("x")
        if x is not None and len(x):
            reps = -(-batch // len(x))
            return np.ascontiguousarray(np.concatenate([x] * reps)[:batch] if reps > 1 else x[:batch])
        rng, shape = np.random.default_rng(0), (batch, *sample_shape)
        out = rng.uniform(*input_range, size=shape) if input_range else rng.standard_normal(shape)
        return out.astype(np.float32)


def per_class_accuracy(labels: Any, predictions: Any, num_classes: int) -> dict[str, list]:
    """Per class c: samples[c] = #(label == c), correct[c] = #(label == c and prediction == c) and
    accuracy[c] = correct[c] / samples[c] (None for a class with no test sample: nothing to divide by)."""
    y, p = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    if y.shape != p.shape:
        raise EdgekdError(f"per-class accuracy: {len(y)} labels but {len(p)} predictions; expected one each")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise EdgekdError(f"per-class accuracy: labels range {y.min()}..{y.max()}; expected class ids "
                          f"0..{num_classes - 1}")
    samples = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[p == y], minlength=num_classes)
    return {"samples": samples.tolist(), "correct": correct.tolist(),
            "accuracy": [c / n if n else None for c, n in zip(correct.tolist(), samples.tolist(), strict=True)]}


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


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), SentenceEmbedding())}
CLASSIFICATION = TASKS["classification"]
EMBEDDING = TASKS["embedding"]


def get(name: Any, where: str = "task") -> Task:
    """The task named `name`; a bundle or ONNX file naming another is refused (it was made by another edgekd)."""
    if name not in TASKS:
        raise EdgekdError(f"{where}: unknown task {name!r} (this edgekd knows {', '.join(TASKS)}); use an edgekd "
                          "that made it, or rebuild it with this one")
    return TASKS[name]


def of_manifest(manifest: dict[str, Any], where: str) -> Task:
    """A bundle manifest's task; bundles written before tasks were recorded are classifiers."""
    return get(manifest.get("task", CLASSIFICATION.name), f"{where}: manifest.json task")


# ----------------------------------------------------------------------------------- sentence embeddings


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
    overlap5 = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ns, nt, strict=True)])
    return {"cosine": float(np.mean(np.sum(s * t, axis=1))),
            "retrieval_top1": float(np.mean(ns[:, 0] == nt[:, 0])),
            "retrieval_top5": float(overlap5),
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
