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
    assert p.strongly_typed and p.flags == () and p.onnx_variant == "as-is"
    p = plan(nano, "fp16", ONNX_SHAPE, trt_version="11.1.0.6")
    assert p.strongly_typed and p.flags == () and p.onnx_variant == "fp16"
    assert plan(nano, "fp16", ONNX_SHAPE, trt_version="10.3.0").onnx_variant == "as-is"


def test_dla_plan() -> None:
    dla = load_target("jetson-agx-orin-dla")
    p = plan(dla, "int8", ONNX_SHAPE, trt_version="10.3.0")
    assert p.device_type == "DLA" and p.dla_core == 0 and not p.strongly_typed
    assert p.flags == ("INT8", "FP16", "GPU_FALLBACK") and p.onnx_variant == "implicit-int8"
    assert p.profile == ((1, 3, 32, 32),) * 3
    fp16 = plan(dla, "fp16", ("batch", 3, 32, 32), trt_version="10.3.0")
    assert fp16.flags == ("FP16", "GPU_FALLBACK") and fp16.onnx_variant == "as-is"
    with pytest.raises(EdgekdError, match="static batch"):
        plan(replace(dla, dynamic_batch=True, max_batch=4), "fp16", ONNX_SHAPE, trt_version="10.3.0")
    assert plan(replace(dla, dla_core=1), "fp16", ONNX_SHAPE).dla_core == 1


def test_dla_on_tensorrt11_follows_the_11_4_1_notes() -> None:
    dla = load_target("jetson-agx-orin-dla")
    for version in ("11.0.0", "11.2.1", "11.4.0"):
        with pytest.raises(EdgekdError, match="has no DLA on Jetson.*>= 11.4.1 with JetPack 7.2.2"):
            plan(dla, "fp16", ONNX_SHAPE, trt_version=version)
    p = plan(dla, "fp16", ONNX_SHAPE, trt_version="11.4.1")
    assert p.strongly_typed and p.flags == ("GPU_FALLBACK",) and p.onnx_variant == "fp16" and p.device_type == "DLA"
    with pytest.raises(EdgekdError, match="int8 on DLA with TensorRT 11.4.1 is refused: .*TensorRT 10.x"):
        plan(dla, "int8", ONNX_SHAPE, trt_version="11.4.1")


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
    with pytest.raises(EdgekdError, match="10.2.0 is too old: edgekd builds with TensorRT 10.3 to 11.x"):
        plan(nano, "fp16", ONNX_SHAPE, trt_version="10.2.0")
    with pytest.raises(EdgekdError, match="12.0 is newer than edgekd supports"):
        plan(nano, "fp16", ONNX_SHAPE, trt_version="12.0")
    with pytest.raises(EdgekdError, match="cannot parse TensorRT version 'x.y'"):
        plan(nano, "fp16", ONNX_SHAPE, trt_version="x.y")
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


# ------------------------------------------------------------------------------------- fake TensorRT API
# tests/fake_tensorrt.py transcribes the 10.3 and 11.1 Python bindings; the CUDA driver check is the one
# thing replaced besides the `tensorrt` module itself (cuda_device_count -> one GPU), and device memory is
# HostCuda (the CudaPython interface over host memory). The fake engine executes the ONNX it was built from
# with onnxruntime, so the runner's results are checked against PyTorch.


@pytest.fixture
def fake_trt(monkeypatch):
    """fake_trt(version, **state) installs a fake `tensorrt` module of that version and returns it."""
    import sys

    import edgekd.engines
    from tests import fake_tensorrt

    monkeypatch.setattr(edgekd.engines, "cuda_device_count", lambda: (1, ""))

    def install(version: str = "10.3.0.26", **state):
        mod = fake_tensorrt.make(version, **state)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        return mod

    return install


def _nano(tmp_path: Path, **changes):
    base = replace(load_target("jetson-orin-nano-trt"), timing_cache=str(tmp_path / "nano.timing"), workspace_mb=256,
                   max_batch=64)
    return replace(base, **changes)


def _runner(bundle: Path, trt_mod):
    from edgekd import runtime
    from edgekd.bundle import read_manifest
    from edgekd.engines.trt import TrtRunner
    from tests.fake_tensorrt import HostCuda

    manifest = read_manifest(bundle, verify=True)
    return runtime.Engine(bundle, manifest, TrtRunner(bundle, manifest, cuda=HostCuda(trt_mod.fake)))


def _key_calls(mod, keep: set[str]) -> list[str]:
    return [c[0] for c in mod.fake.calls if c[0] in keep]


BUILD_CALLS = {"Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config",
               "set_memory_pool_limit", "set_flag", "set_shape", "add_optimization_profile", "create_timing_cache",
               "set_timing_cache", "build_serialized_network"}
RUN_CALLS = {"set_input_shape", "cudaMalloc", "copy_to_device", "set_tensor_address", "execute_async_v3",
             "copy_to_host", "synchronize"}


@pytest.fixture(scope="module")
def trt_int8_source(edge_source, edge_eval, tmp_path_factory):
    """The edge CNN quantized with the `tensorrt` scheme (PTQ) and exported: an int8 EngineSource."""
    pytest.importorskip("torchao")
    import json

    import torch

    from edgekd import quantize as q
    from edgekd.export import export_onnx
    from edgekd.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn:widths=4,8", edge_source.input_shape, edge_source.num_classes).eval()
    x = torch.from_numpy(edge_eval[0])
    gm = q.ptq(model, x[:8], [x[:24], x[24:]], q.QuantConfig(scheme="tensorrt"))
    path = export_onnx(gm, x[:2], tmp_path_factory.mktemp("trt_int8") / "student.ptq.onnx",
                       metadata={"quant_scheme": "tensorrt", "class_names": json.dumps(edge_source.class_names)})
    return replace(edge_source, onnx_path=path, quantization="ptq")


def test_tensorrt10_fp16_build_and_run(fake_trt, edge_source, edge_eval, tmp_path: Path) -> None:
    from edgekd.bundle import read_manifest

    trt = fake_trt("10.3.0.26")
    out = build(edge_source, _nano(tmp_path), "fp16", tmp_path / "bundle", eval_data=edge_eval)
    assert _key_calls(trt, BUILD_CALLS) == [
        "Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config", "set_memory_pool_limit",
        "set_flag", "set_shape", "add_optimization_profile", "create_timing_cache", "set_timing_cache",
        "build_serialized_network"]
    calls = {c[0]: c[1:] for c in trt.fake.calls}
    assert calls["create_network"] == (0,) and calls["set_flag"] == ("FP16",)
    assert calls["set_memory_pool_limit"] == ("WORKSPACE", 256 << 20)
    assert calls["set_shape"] == ("input", (1, 1, 8, 8), (1, 1, 8, 8), (64, 1, 8, 8))
    manifest = read_manifest(out)
    assert manifest["engine"]["plan"]["flags"] == ["FP16"] and manifest["versions"]["tensorrt"] == "10.3.0.26"
    assert (tmp_path / "nano.timing").stat().st_size > 0

    trt.fake.calls.clear()
    engine = _runner(out, trt)
    logits = engine(edge_eval[0])
    np.testing.assert_allclose(logits, edge_eval[2], atol=1e-4)
    assert _key_calls(trt, RUN_CALLS) == [
        "set_input_shape", "cudaMalloc", "cudaMalloc", "copy_to_device", "set_tensor_address", "set_tensor_address",
        "execute_async_v3", "copy_to_host", "synchronize"]
    assert engine.info["cuda_binding"] == "HostCuda"
    engine(edge_eval[0][:4])  # smaller batch: the buffers are reused, not reallocated
    assert trt.fake.names().count("cudaMalloc") == 2
    with pytest.raises(EdgekdError, match=r"rejected input shape \(65, 1, 8, 8\)"):
        engine.runner(np.zeros((65, 1, 8, 8), np.float32))  # past the Engine's own check: set_input_shape says no
    trt.fake.execute_ok = False
    with pytest.raises(EdgekdError, match="TensorRT execution failed"):
        engine(edge_eval[0][:2])


def test_tensorrt11_fp16_parses_an_fp16_typed_onnx(fake_trt, edge_source, edge_eval, tmp_path: Path) -> None:
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common is in the 'trt-check' extra")
    import onnx

    trt = fake_trt("11.1.0.6")
    assert not hasattr(trt.BuilderFlag, "FP16"), "the fake is strict: 11.x has no FP16 flag"
    out = build(edge_source, _nano(tmp_path), "fp16", tmp_path / "bundle", eval_data=edge_eval)
    (parsed,) = [c[1] for c in trt.fake.calls if c[0] == "parse_from_file"]
    assert parsed.endswith("model.fp16.onnx")
    assert "set_flag" not in trt.fake.names()
    import base64
    import json

    engine_plan = json.loads((out / "model.engine").read_bytes())  # the fake engine keeps the parsed ONNX
    built_from = onnx.load_from_string(base64.b64decode(engine_plan["onnx"]))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in built_from.graph.initializer}
    assert engine_plan["inputs"][0][2] == "FLOAT" and engine_plan["strongly_typed"], "float32 I/O, fp16 inside"
    logits = _runner(out, trt)(edge_eval[0])
    np.testing.assert_allclose(logits, edge_eval[2], atol=2e-2)  # fp16 compute


def test_int8_qdq_on_both_generations(fake_trt, trt_int8_source, edge_eval, tmp_path: Path) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(trt_int8_source.onnx_path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": edge_eval[0]})[0]
    for version, flags in (("10.3.0.26", ["FP16", "INT8"]), ("11.1.0.6", [])):
        trt = fake_trt(version)
        out = build(trt_int8_source, _nano(tmp_path), "int8", tmp_path / version, eval_data=edge_eval)
        assert sorted(c[1] for c in trt.fake.calls if c[0] == "set_flag") == flags
        (parsed,) = [c[1] for c in trt.fake.calls if c[0] == "parse_from_file"]
        assert parsed == str(trt_int8_source.onnx_path), "explicit Q/DQ parsed as exported"
        np.testing.assert_allclose(_runner(out, trt)(edge_eval[0]), ref, atol=1e-4)


def test_timing_cache_reuse_fallback_and_error(fake_trt, edge_source, tmp_path: Path) -> None:
    from edgekd.bundle import read_manifest
    from tests import fake_tensorrt

    cache = tmp_path / "nano.timing"
    fake_trt("10.3.0.26")
    first = read_manifest(build(edge_source, _nano(tmp_path), "fp16", tmp_path / "a"))
    assert not any("timing cache" in n for n in first["build"]["notes"])
    second = read_manifest(build(edge_source, _nano(tmp_path), "fp16", tmp_path / "b"))
    assert f"reused timing cache {cache}" in second["build"]["notes"]
    # A cache from another GPU: set_timing_cache returns False -> a fresh cache, which replaces the file.
    other = fake_tensorrt.make("10.3.0.26", gpu="OtherGPU")
    cfg = other.Builder(other.Logger()).create_builder_config()
    cache.write_bytes(cfg.create_timing_cache(b"").serialize())
    trt = fake_trt("10.3.0.26")
    third = read_manifest(build(edge_source, _nano(tmp_path), "fp16", tmp_path / "c"))
    assert any("was rejected" in n for n in third["build"]["notes"])
    assert [c[1] for c in trt.fake.calls if c[0] == "set_timing_cache"] == [False, True]
    assert trt.fake.gpu.encode() in cache.read_bytes(), "the file now holds this GPU's cache"
    cache.write_bytes(b"\x00corrupt")  # create_timing_cache returns None for a corrupt blob
    fourth = read_manifest(build(edge_source, _nano(tmp_path), "fp16", tmp_path / "d"))
    assert any("was rejected" in n for n in fourth["build"]["notes"])
    fake_trt("10.3.0.26", refuse_empty_timing_cache=True)
    with pytest.raises(EdgekdError, match="refused even an empty timing cache"):
        build(edge_source, _nano(tmp_path), "fp16", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_parse_errors_name_the_node(fake_trt, edge_source, tmp_path: Path) -> None:
    fake_trt("10.3.0.26", parse_errors=["Unsupported ONNX op Foo"])
    with pytest.raises(EdgekdError, match=r"cannot parse .*student.onnx: In node 0: Unsupported ONNX op Foo"):
        build(edge_source, _nano(tmp_path), "fp16", tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_dla_int8_on_tensorrt10_builds_implicit_int8_from_the_qdq_scales(fake_trt, trt_int8_source, edge_eval,
                                                                         tmp_path: Path) -> None:
    import json

    from edgekd.bundle import read_manifest
    from edgekd.engines.trt_onnx import read_calibration_cache, strip_qdq

    dla = replace(load_target("jetson-agx-orin-dla"), timing_cache=str(tmp_path / "dla.timing"))
    trt = fake_trt("10.3.0.26", num_dla_cores=2)
    out = build(trt_int8_source, dla, "int8", tmp_path / "bundle", eval_data=edge_eval)
    manifest = read_manifest(out)
    (parsed,) = [c[1] for c in trt.fake.calls if c[0] == "parse_from_file"]
    assert parsed.endswith("model.float.onnx")
    cache = (out / "dla_int8.cache").read_bytes()
    assert cache.startswith(b"TRT-100300-EntropyCalibration2\n")
    assert read_calibration_cache(cache) == pytest.approx(strip_qdq(trt_int8_source.onnx_path)[1])
    engine_plan = json.loads((out / "model.engine").read_bytes())
    assert engine_plan["calibration_cache"] == cache.decode(), "the builder read the cache through the calibrator"
    assert engine_plan["device"] == "DLA" and engine_plan["dla_core"] == 0
    assert engine_plan["flags"] == ["FP16", "GPU_FALLBACK", "INT8"]
    fallback = manifest["engine"]["dla"]
    assert fallback["gpu_fallback_layers"] >= 1 and fallback["layers"] > fallback["gpu_fallback_layers"]
    assert any(f"{fallback['gpu_fallback_layers']} of {fallback['layers']} layers fall back" in n
               for n in manifest["build"]["notes"])
    assert fallback["int8_scales"] == len(read_calibration_cache(cache)) > 0
    engine = _runner(out, trt)
    assert engine.info["dla"] == fallback, "profiles and reports see the fallback count"
    logits = engine(edge_eval[0][:1])  # the fake runs the stripped float model
    assert logits.shape == (1, 10)


def test_dla_core_checks(fake_trt, edge_source, edge_eval, tmp_path: Path) -> None:
    dla = replace(load_target("jetson-agx-orin-dla"), timing_cache=None, dla_core=1)
    fake_trt("10.3.0.26", num_dla_cores=1)
    with pytest.raises(EdgekdError, match="asks for DLA core 1, this device has 1 DLA cores"):
        build(edge_source, dla, "fp16", tmp_path / "a")
    pytest.importorskip("onnxconverter_common", reason="DLA fp16 on 11.x parses an fp16 ONNX ('trt-check' extra)")
    trt = fake_trt("11.4.1.3", num_dla_cores=2)
    out = build(edge_source, dla, "fp16", tmp_path / "b", eval_data=edge_eval)
    assert [c[1] for c in trt.fake.calls if c[0] == "set_flag"] == ["GPU_FALLBACK"]
    trt.fake.num_dla_cores = 1
    with pytest.raises(EdgekdError, match="runs on DLA core 1, this device has 1 DLA cores"):
        _runner(out, trt)


def test_engine_from_another_tensorrt_is_refused(fake_trt, edge_source, tmp_path: Path) -> None:
    fake_trt("10.3.0.26")
    out = build(edge_source, _nano(tmp_path), "fp16", tmp_path / "bundle")
    trt = fake_trt("10.4.0.26")
    with pytest.raises(EdgekdError, match="cannot deserialize model.engine .*TensorRT 10.3.0.26"):
        _runner(out, trt)


def test_fake_names_exist_in_the_real_tensorrt() -> None:
    """On a machine with TensorRT: every name the fake defines exists in the real module (no drift)."""
    try:
        import tensorrt as real
    except ImportError:
        pytest.skip(GPU_ONLY)
    if getattr(real, "fake", None) is not None:
        pytest.skip("the fake is installed as tensorrt")
    from tests.fake_tensorrt import FAKE_NAMES

    missing = []
    for path in FAKE_NAMES[str(int(real.__version__.split(".")[0]))]:
        obj = real
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(path)
                break
    assert not missing, f"names in tests/fake_tensorrt.py missing from tensorrt {real.__version__}: {missing}"


GPU_ONLY = "needs the real tensorrt module (NVIDIA GPU host or Jetson); it is not installable on CPU machines"
