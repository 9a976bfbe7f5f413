"""Task contracts (edgekd.tasks): signatures, metrics by hand on numpy outputs, parity figures, the manifest's task
(recorded, signed, and refused by the runtime when unknown), and numpy-only imports."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgekd import runtime, tasks
from edgekd.bundle import read_manifest, write_manifest
from edgekd.errors import EdgekdError


def test_signatures_name_dtypes_and_dynamic_axes() -> None:
    assert tasks.CLASSIFICATION.signature((3, 8, 8), 10) == {
        "input": {"name": "input", "shape": ["batch", 3, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"}}
    assert tasks.EMBEDDING.signature(("seq",), 384, batch=4, pad_id=0, max_length=64) == {
        "input": {"name": "input_ids", "shape": [4, "seq"], "dtype": "int64", "pad_id": 0, "max_length": 64},
        "output": {"name": "sentence_embedding", "shape": [4, 384], "dtype": "float32"}}
    assert tasks.EMBEDDING.sample_shape(["batch", "seq"]) == (None,)
    assert tasks.EMBEDDING.zeros(2, ("seq",)).dtype == np.int64 and tasks.CLASSIFICATION.zeros(2, (3,)).shape == (2, 3)
    with pytest.raises(EdgekdError, match="unknown task 'detection'.*classification, embedding"):
        tasks.get("detection", "bundle b")


def test_classification_metrics_and_parity_by_hand() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]], np.float32)
    data = {"x": logits, "y": np.array([0, 1, 1, 1]), "reference_logits": np.array([[1, 0], [1, 0], [1, 0], [0, 1.]])}
    got = tasks.CLASSIFICATION.evaluate(lambda x: x, data, size=3)   # the "engine" returns its input
    assert got == {"accuracy": 0.75, "agreement": 0.75, "samples": 4, "input_range": [0.0, 5.0],
                   "per_class": {"samples": [1, 3], "correct": [1, 2], "accuracy": [1.0, 2 / 3]}}
    assert tasks.CLASSIFICATION.evaluate(lambda x: x, {"x": logits, "y": data["y"]})["agreement"] is None
    ours = logits + np.array([[0, 0], [0, 0], [0, 0], [1.5, 0]], np.float32)
    assert tasks.CLASSIFICATION.parity(logits, ours) == {"max_abs_diff": 1.5, "top1_agreement": 0.75}


def test_embedding_metrics_and_parity_by_hand() -> None:
    ref = np.eye(8, dtype=np.float32)[:, :8]
    rows = [np.arange(1, 2 + i) for i in range(8)]
    data = {"ids": tasks.pad_batch(rows, 0), "lengths": np.array([len(r) for r in rows]), "reference": ref,
            "pad_id": np.asarray(0)}
    seen = []

    def run(ids: np.ndarray) -> np.ndarray:          # embeds sentence i (length i + 1) as e_i, or -e_0 for i = 0
        seen.append(ids.shape)
        out = ref[(ids != 0).sum(1) - 1].copy()
        out[(ids != 0).sum(1) == 1] *= -1
        return out

    got = tasks.EMBEDDING.evaluate(run, data, size=3)
    assert got["cosine"] == pytest.approx(6 / 8) and got["samples"] == got["sentences"] == 8
    assert seen == [(3, 3), (3, 6), (2, 8)]          # batches of similar length, padded to their longest
    assert tasks.EMBEDDING.parity(ref, -ref)["min_cosine"] == pytest.approx(-1.0)
    batch = tasks.EMBEDDING.timing_batch(data, 10, (None,), None)
    assert batch.shape == (10, 8) and (batch[8] == data["ids"][0]).all()   # repeated to fill the batch


def test_manifest_records_the_task_and_an_unknown_one_is_refused(edge_ort_bundle, tmp_path) -> None:
    manifest = read_manifest(edge_ort_bundle)
    assert manifest["task"] == "classification" and manifest["input"]["name"] == "input"
    bad = tmp_path / "bad"
    shutil.copytree(edge_ort_bundle, bad)
    write_manifest(bad, {**manifest, "task": "detection"})         # signed: only a rewrite can change it
    with pytest.raises(EdgekdError, match=f"bundle {bad}: manifest.json task: unknown task 'detection'"):
        runtime.load(bad)
    old = {k: v for k, v in manifest.items() if k != "task"}          # bundles from before tasks were recorded
    write_manifest(bad, old)
    assert runtime.load(bad).task is tasks.CLASSIFICATION
    text = (bad / "manifest.json").read_text()
    (bad / "manifest.json").write_text(text.replace('"format"', '"task": "embedding", "format"', 1))
    with pytest.raises(EdgekdError, match="checksum|signature|edited"):
        runtime.load(bad)


def test_tasks_import_without_torch() -> None:
    code = "import sys, edgekd.tasks; assert 'torch' not in sys.modules, 'torch'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
