"""Profiling a bundle: result shape, ordered percentiles, accuracy that matches the engine's own logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgekd import runtime
from edgekd.bundle import read_manifest, update_metrics
from edgekd.fileio import write_signed_json
from edgekd.profile import format_table, profile_bundle

KEYS = {"bundle", "model", "target", "runtime", "precision", "quantization", "size_bytes", "accuracy", "agreement",
        "peak_rss_mb", "rss_growth_mb", "rows", "budgets"}


def test_profile_result(edge_ort_bundle: Path, edge_eval) -> None:
    result = profile_bundle(edge_ort_bundle, warmup=2, min_runs=12, min_seconds=0.05)
    assert KEYS <= set(result)
    assert (result["target"], result["runtime"], result["precision"]) == ("x86-cpu-ort", "onnxruntime", "fp32")
    assert [r["batch"] for r in result["rows"]] == [1, 8]
    for row in result["rows"]:
        assert set(row) == {"batch", "p50", "p90", "p99", "mean", "throughput_per_s", "runs"}
        assert 0 < row["p50"] <= row["p90"] <= row["p99"]
        assert 12 <= row["runs"] <= 2000
        assert abs(row["throughput_per_s"] - row["batch"] / (row["mean"] / 1000)) < 1e-6 * row["throughput_per_s"]
    assert result["size_bytes"] == (edge_ort_bundle / "model.opt.onnx").stat().st_size
    assert result["peak_rss_mb"] > 0 and result["rss_growth_mb"] is not None
    # accuracy and agreement equal what the engine's own logits give
    x, y, ref = edge_eval
    logits = runtime.load(edge_ort_bundle)(x)
    assert result["accuracy"] == float(np.mean(logits.argmax(1) == y))
    assert result["agreement"] == float(np.mean(logits.argmax(1) == ref.argmax(1))) == 1.0
    assert 0.5 < result["accuracy"] < 1.0  # a quarter of the labels were flipped
    json.dumps(result)  # plain JSON types only


def test_budgets(edge_ort_bundle: Path) -> None:
    result = profile_bundle(edge_ort_bundle, batch_sizes=(2,), warmup=1, min_runs=5, min_seconds=0.0)
    budgets = result["budgets"]
    assert budgets["latency_ms"]["budget"] == 5.0 and budgets["latency_ms"]["metric"] == "p99 at batch 2"
    assert budgets["latency_ms"]["pass"] == (result["rows"][0]["p99"] <= 5.0)
    assert budgets["memory_mb"]["measured"] == result["peak_rss_mb"]
    assert budgets["memory_mb"]["pass"] == (result["peak_rss_mb"] <= 400.0)
    assert budgets["pass"] == (budgets["latency_ms"]["pass"] and budgets["memory_mb"]["pass"])
    assert "budget latency_ms" in format_table(result)


def test_profile_without_eval_set_and_metrics(edge_ort_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(edge_ort_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "eval.npz").unlink()
    del manifest["files"]["eval.npz"]
    manifest["eval"] = None
    manifest["budgets"] = {"latency_ms": None, "memory_mb": None}
    write_signed_json(copy / "manifest.json", manifest)  # a bundle built without an eval set
    result = profile_bundle(copy, batch_sizes=(3,), warmup=1, min_runs=3, min_seconds=0.0)
    assert result["accuracy"] is None and result["agreement"] is None
    assert result["budgets"] == {"pass": None}
    assert "n/a" in format_table(result)
    update_metrics(copy, {"profile": result})
    assert read_manifest(copy)["metrics"]["profile"]["rows"][0]["batch"] == 3


def test_pipeline_profile_memory_is_the_profiling_process_own(edge_ort_bundle: Path, tmp_path: Path) -> None:
    """`edgekd profile` from a process holding ~500 MiB reports what a standalone `python -m edgekd.runtime profile`
    of the same bundle reports (within 20%), not the parent's peak (ru_maxrss is inherited across fork+exec)."""
    import subprocess
    import sys

    from edgekd import pipeline

    run = tmp_path / "run"
    shutil.copytree(edge_ort_bundle, run / "engines" / "x86-cpu-ort" / "student-fp32")
    ballast = np.ones(500 * 2**20 // 8)   # touched: the parent's RSS and peak are >= 500 MiB
    (piped,) = pipeline.profile(run, "x86-cpu-ort", quick=True)
    del ballast
    out = tmp_path / "alone.json"
    # `; exit $?` keeps the shell between: the profiler is forked from a small shell, not exec'd over this process
    subprocess.run(["/bin/sh", "-c", f'"{sys.executable}" -m edgekd.runtime profile "$0" --json "$1" --warmup 3 '
                    '--min-runs 10 --min-seconds 0.2 >/dev/null; exit $?', run / "engines" / "x86-cpu-ort" /
                    "student-fp32", out], check=True)
    alone = json.loads(out.read_text())
    assert piped["peak_rss_mb"] < 400
    assert abs(piped["peak_rss_mb"] - alone["peak_rss_mb"]) <= 0.2 * alone["peak_rss_mb"]
