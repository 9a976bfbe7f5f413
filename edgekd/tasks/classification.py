"""Image classification: (N, *input_shape) float32 -> (N, num_classes) logits, scored by top-1 accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.plugins import lazy
from edgekd.tasks import EVAL_BATCH, Task


class Classification(Task):
    """(N, *input_shape) float32, normalized -> (N, num_classes) logits; scored by top-1 accuracy against the labels
    and top-1 agreement with the PyTorch reference logits. Eval set: x, y, reference_logits (optional)."""

    name = "classification"
    input_name = "input"
    output_name = "logits"
    metric_keys = ("accuracy", "agreement")
    eval_arrays = {"x": "float32", "y": "int64", "reference_logits": "float32"}
    context = lazy("edgekd.pipeline:RunContext")

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
            head = np.asarray(x[:batch])
            return np.resize(head, (batch, *head.shape[1:]))
        rng, shape = np.random.default_rng(0), (batch, *sample_shape)
        out = rng.uniform(*input_range, size=shape) if input_range else rng.standard_normal(shape)
        return out.astype(np.float32)

    # its report is edgekd.report's: accuracy with confidence intervals, per class, the distillation gain, plots
    report = lazy("edgekd.report:classification_report")
    markdown = lazy("edgekd.report:markdown")
    engines_table = lazy("edgekd.report:engines_table")
    figures = lazy("edgekd.report:figures")


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


TASK = Classification()
