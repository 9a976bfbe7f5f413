"""TensorRT: the build plan is tested everywhere; a real build/run only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgekd.engines import build, cuda_device_count
from edgekd.engines.trt import TrtBuildPlan, plan
from edgekd.errors import EdgekdError
from edgekd.targets import load_target

ONNX_SHAPE = ("batch", 3, 32, 32)


def test_fp16_plan_for_orin_nano() -> None:
    nano = load_target("jetson-orin-nano-trt")
    p = plan(nano, "fp16", ONNX_SHAPE, trt_version="10.3.0")
    assert isinstance(p, TrtBuildPlan)
    assert p.trt_major == 10 and not p.strongly_typed
    assert p.flags == ("FP16",)
    assert p.device_type == "GPU" and p.dla_core is None
    assert p.workspace_bytes == 1024 * 1024 * 1024
    assert p.builder_optimization_level == 3
    assert p.profile == ((1, 3, 32, 32), (1, 3, 32, 32), (16, 3, 32, 32))
    assert p.input_name == "input"
    assert p.timing_cache == str(Path("~/.cache/edgekd/jetson-orin-nano.timing").expanduser())


def test_int8_plan_tensorrt10_uses_int8_and_fp16_flags() -> None:
    p = plan(load_target("jetson-orin-nano-trt"), "int8", ONNX_SHAPE, trt_version="10.3.0")
    assert not p.strongly_typed and p.flags == ("INT8", "FP16")


def test_fp32_plan_has_no_precision_flags() -> None:
    t4 = replace(load_target("datacenter-t4-trt"), precisions=("fp32", "fp16", "int8"))
    p = plan(t4, "fp32", [-1, 3, 32, 32], trt_version="10.8.0.43")
    assert p.flags == () and p.workspace_bytes == 4096 << 20 and p.builder_optimization_level == 4
    assert p.profile == ((1, 3, 32, 32), (32, 3, 32, 32), (128, 3, 32, 32))


def test_tensorrt11_is_strongly_typed() -> None:
    nano = load_target("jetson-orin-nano-trt")
    p = plan(nano, "int8", ONNX_SHAPE, trt_version="11.0.0")
    assert p.strongly_typed and p.flags == ()
    with pytest.raises(EdgekdError, match="removed BuilderFlag.FP16"):
        plan(nano, "fp16", ONNX_SHAPE, trt_version="11.0.0")


def test_dla_plan() -> None:
    dla = load_target("jetson-agx-orin-dla")
    p = plan(dla, "int8", ONNX_SHAPE, trt_version="10.3.0")
    assert p.device_type == "DLA" and p.dla_core == 0
    assert p.flags == ("INT8", "FP16", "GPU_FALLBACK")
    assert p.profile == ((1, 3, 32, 32),) * 3
    assert plan(dla, "fp16", ("batch", 3, 32, 32), trt_version="10.3.0").flags == ("FP16", "GPU_FALLBACK")
    with pytest.raises(EdgekdError, match="DLA builds need TensorRT 10"):
        plan(dla, "fp16", ONNX_SHAPE, trt_version="11.2.0")
    with pytest.raises(EdgekdError, match="static batch"):
        plan(replace(dla, dynamic_batch=True, max_batch=4), "fp16", ONNX_SHAPE, trt_version="10.3.0")
    assert plan(replace(dla, dla_core=1), "fp16", ONNX_SHAPE).dla_core == 1


def test_static_batch_onnx() -> None:
    dla = load_target("jetson-agx-orin-dla")
    assert plan(dla, "fp16", (1, 3, 32, 32)).profile == ((1, 3, 32, 32),) * 3
    with pytest.raises(EdgekdError, match="fixed batch of 4"):
        plan(dla, "fp16", (4, 3, 32, 32))
    with pytest.raises(EdgekdError, match="wants a dynamic batch .* fixed batch of 2"):
        plan(load_target("jetson-orin-nano-trt"), "fp16", (2, 3, 32, 32))


def test_plan_errors() -> None:
    nano = load_target("jetson-orin-nano-trt")
    with pytest.raises(EdgekdError, match="precision 'fp32' is not offered"):
        plan(nano, "fp32", ONNX_SHAPE)
    with pytest.raises(EdgekdError, match="too old"):
        plan(nano, "fp16", ONNX_SHAPE, trt_version="8.6.1")
    with pytest.raises(EdgekdError, match="only the batch dimension may be dynamic"):
        plan(nano, "fp16", ("batch", 3, "h", 32))
    with pytest.raises(EdgekdError, match="not 'tensorrt'"):
        plan(load_target("x86-cpu-ort"), "fp32", ONNX_SHAPE)
    assert plan(replace(nano, timing_cache=None), "fp16", ONNX_SHAPE).timing_cache is None


def _trt_and_gpu() -> str:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT needs an NVIDIA GPU; not installable on this CPU machine"
    count, reason = cuda_device_count()
    return "" if count else f"TensorRT is installed but {reason}"


def test_build_without_tensorrt_says_why(edge_source, tmp_path: Path) -> None:
    if not _trt_and_gpu():
        pytest.skip("TensorRT and a GPU are present; the error path is not reachable")
    with pytest.raises(EdgekdError, match="TensorRT|GPU|driver"):
        build(edge_source, load_target("jetson-orin-nano-trt"), "fp16", tmp_path / "trt")
    assert not list(tmp_path.iterdir())


def test_real_tensorrt_build_and_run(edge_source, edge_eval, tmp_path: Path) -> None:
    reason = _trt_and_gpu()
    if reason:
        pytest.skip(reason)
    from edgekd import runtime
    from edgekd.bundle import read_manifest

    target = replace(load_target("jetson-orin-nano-trt"), timing_cache=str(tmp_path / "cache.timing"),
                     workspace_mb=256, max_batch=64)
    out = build(edge_source, target, "fp16", tmp_path / "bundle", eval_data=edge_eval)
    manifest = read_manifest(out)
    assert manifest["engine"]["file"] == "model.engine" and manifest["versions"]["tensorrt"]
    assert (tmp_path / "cache.timing").stat().st_size > 0
    engine = runtime.load(out)
    logits = engine(edge_eval[0])
    np.testing.assert_allclose(logits, edge_eval[2], atol=5e-2)
    with pytest.raises(EdgekdError, match="outside the engine's batch range"):
        engine(np.zeros((65, 1, 8, 8), np.float32))
