"""Task contracts (edgekd.tasks): signatures, metrics by hand on numpy outputs, parity figures, the manifest's task
(recorded, signed, and refused by the runtime when unknown), and numpy-only imports."""

from __future__ import annotations

import json
import os
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


# A task added the way the README says: one module in edgekd/tasks defining TASK, nothing else changed.
REGRESSION = '''"""Regression: (N, features) float32 -> (N, 1), scored by r2 = 1 - SSE / SST against the targets y."""

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.tasks import EVAL_BATCH, Task


class Regression(Task):
    name = "regression"
    input_name = "features"
    output_name = "value"
    metric_keys = ("r2",)
    eval_arrays = {"x": "float32", "y": "float32"}

    def check_eval(self, data, input_shape, output_dim):
        x, y = np.asarray(data["x"]), np.asarray(data["y"])
        if x.shape[1:] != tuple(input_shape) or y.shape != (len(x),):
            raise EdgekdError(f"build: eval x {x.shape}, y {y.shape}; expected (N, {input_shape}) and (N,)")
        return {"x": x, "y": y}

    def evaluate(self, run, data, size=EVAL_BATCH):
        x, y = data["x"], data["y"]
        pred = np.concatenate([np.asarray(run(x[i:i + size])).ravel() for i in range(0, len(x), size)])
        return {"r2": float(1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2)), "samples": len(y)}

    def timing_batch(self, data, batch, sample_shape, input_range):
        return np.resize(data["x"], (batch, *data["x"].shape[1:]))


TASK = Regression()
'''

# What the one-module task goes through, in a fresh interpreter on a copy of edgekd with the module added: the
# registry, a bundle built for it from an ONNX (y = x @ w) with its manifest check on load, profiling, the report.
THROUGH_THE_STAGES = '''
import json, sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekd import report, tasks
from edgekd.engines import EngineSource, build
from edgekd.profile import profile_bundle
from edgekd.runtime import load
from edgekd.targets import load_target

src, run = Path(sys.argv[1]), Path(sys.argv[2])
task = tasks.get("regression")
w = np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
y = (x @ w).ravel()
for model, scale in (("teacher", 1.0), ("student", 0.9)):   # the student's weights are 10% short: r2 < 1
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "w"], ["value"])], model,
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
                              [numpy_helper.from_array(w * scale, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(run / f"{model}.onnx"))
    source = EngineSource(model, run / f"{model}.onnx", None, None, (4,), 1, (), {}, task="regression")
    bundle = build(source, load_target(str(src / "targets" / "x86-cpu-ort.toml")), "fp32", run / "bundles" / model,
                   eval_data={"x": x, "y": y})
    assert tasks.of_manifest(load(bundle).manifest, str(bundle)) is task
    prof = profile_bundle(bundle, batch_sizes=(1, 8), warmup=1, min_runs=3, min_seconds=0)
    (run / f"profile-{model}.json").write_text(json.dumps([{**prof, "target": "cpu"}]))
rep = report.write(run, task, [{"target": "jetson", "reason": "no GPU here"}])
print(json.dumps({"tasks": list(tasks.TASKS), "file": tasks.__file__, "report": rep}))
'''


def test_a_new_task_is_one_module(tmp_path) -> None:
    """Adding a task is one file in edgekd/tasks: the registry lists it, a bundle records it and loads as its task,
    the profiler scores the engine with its metric, and the report (report.json, report.md) shows it, with the
    headline naming the student engine and its r2 = 1 - SSE/SST (by hand: y = x @ w, student 0.9 w -> r2 = 0.99)."""
    from tests.test_runtime import ROOT

    src = tmp_path / "src"
    shutil.copytree(ROOT / "edgekd", src / "edgekd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "targets", src / "targets")
    (src / "edgekd" / "tasks" / "regression.py").write_text(REGRESSION)
    (tmp_path / "run").mkdir()
    done = subprocess.run([sys.executable, "-c", THROUGH_THE_STAGES, str(src), str(tmp_path / "run")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(src)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["tasks"] == ["classification", "regression", "embedding"] and out["file"].startswith(str(src))
    rep = out["report"]
    assert rep["task"] == "regression" and [e["model"] for e in rep["engines"]] == ["student", "teacher"]
    r2 = {e["model"]: e["metrics"]["r2"] for e in rep["engines"]}
    assert r2["teacher"] == pytest.approx(1.0, abs=1e-6) and r2["student"] == pytest.approx(0.99, abs=1e-5)
    assert rep["headline"]["engine"] == "student fp32 none" and rep["headline"]["metrics"]["r2"] == r2["student"]
    assert [r["batch"] for r in rep["latency_ratios"]] == [1, 8]
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.startswith("# edgekd report: regression") and "| target | model | precision | quant | r2 |" in md
    assert f"| cpu | student | fp32 | none | {r2['student']:.4f} |" in md and "- jetson: no GPU here" in md
