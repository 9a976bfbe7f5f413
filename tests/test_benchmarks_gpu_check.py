"""benchmarks/gpu_check.py --dry-run: everything before the GPU runs here (models, ONNX, the export gate, the
TensorRT build plans for every target, precision and API generation, the DLA calibration cache), as a user runs
it, and the summary says where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("torchao")
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_stops_before_the_builds(dry: dict) -> None:
    assert dry["dry_run"] is True
    trt = dry["trt"]
    assert trt["stopped_before"] == "TensorRT engine builds" and trt["reason"] == "--dry-run"
    assert "engines" not in trt


def test_dry_run_checks_the_exports_and_the_dla_cache(dry: dict) -> None:
    prep = dry["trt"]["prepare"]
    assert prep["gate"] == {"fp32": [], "int8": []}
    assert 0.2 < prep["test_accuracy_pytorch"] <= 1.0, "the model learned something (10 classes)"
    assert prep["dla_calibration_cache_head"][0] == "TRT-100300-EntropyCalibration2"
    assert prep["dla_calibration_cache_tensors"] >= 4
    if not str(prep["fp16_onnx_gate"]).startswith("skipped"):
        assert prep["fp16_onnx_gate"] == []


def test_dry_run_plans_every_target_precision_and_generation(dry: dict) -> None:
    plans = {(p["target"], p["precision"], p["tensorrt"]): p for p in dry["trt"]["prepare"]["plans"]}
    assert len(plans) == 3 * 2 * 2  # T4, Orin Nano, AGX Orin DLA x fp16/int8 x TensorRT 10.3/11.4.1
    assert plans[("datacenter-t4-trt", "fp16", "10.3.0")]["flags"] == ["FP16"]
    assert plans[("datacenter-t4-trt", "fp16", "11.4.1")]["onnx"] == "fp16"
    assert plans[("jetson-orin-nano-trt", "int8", "11.4.1")]["flags"] == []
    assert plans[("jetson-agx-orin-dla", "int8", "10.3.0")]["onnx"] == "implicit-int8"
    assert "refused" in plans[("jetson-agx-orin-dla", "int8", "11.4.1")]
    assert plans[("jetson-agx-orin-dla", "fp16", "11.4.1")]["flags"] == ["GPU_FALLBACK"]
