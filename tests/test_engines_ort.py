"""onnxruntime engine builds: bundle layout, the saved optimized graph, precision rules, atomic output."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgekd import runtime
from edgekd.bundle import read_manifest
from edgekd.engines import available_runtimes, build, check_target
from edgekd.engines.ort import host_fingerprint
from edgekd.errors import EdgekdError
from edgekd.fileio import sha256_file, write_signed_json
from edgekd.targets import load_target


def test_bundle_layout_and_manifest(edge_ort_bundle: Path, edge_eval) -> None:
    names = sorted(p.name for p in edge_ort_bundle.iterdir())
    assert names == ["eval.npz", "manifest.json", "model.onnx", "model.opt.onnx"]
    m = read_manifest(edge_ort_bundle)
    assert (m["model"], m["target"], m["runtime"], m["device"]) == ("student", "x86-cpu-ort", "onnxruntime", "cpu")
    assert (m["precision"], m["quantization"]) == ("fp32", "none")
    assert m["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    # no image spec (array inputs): the range of the normalized test split, for the runtime's wrong-scale check
    assert m["preprocessing"] == {"normalization": {"mean": [0.5], "std": [0.25]}, "layout": "NCHW",
                                  "input_range": [float(edge_eval[0].min()), float(edge_eval[0].max())]}
    assert m["class_names"][:2] == ["class0", "class1"]
    assert m["budgets"] == {"latency_ms": 5.0, "memory_mb": 400.0}
    assert m["versions"]["onnxruntime"] == ort.__version__ and m["versions"]["edgekd"]
    assert m["eval"] == {"file": "eval.npz", "samples": len(edge_eval[0]), "has_reference_logits": True}
    assert set(m["files"]) == {"eval.npz", "model.onnx", "model.opt.onnx"}
    for name, digest in m["files"].items():
        assert sha256_file(edge_ort_bundle / name) == digest
    engine = m["engine"]
    assert engine["file"] == "model.opt.onnx" and engine["fallback_file"] == "model.onnx"
    assert engine["saved_optimization_level"] == "all" and engine["hardware_specific"]
    assert engine["build_fingerprint"] == host_fingerprint()
    assert any("CPU-specific" in note for note in m["build"]["notes"])
    with np.load(edge_ort_bundle / "eval.npz") as data:
        np.testing.assert_array_equal(data["y"], edge_eval[1])
        np.testing.assert_allclose(data["reference_logits"], edge_eval[2])


def test_optimized_graph_is_loaded_without_reoptimizing(edge_ort_bundle: Path, edge_onnx: Path, edge_eval) -> None:
    engine = runtime.load(edge_ort_bundle)
    assert engine.info["file"] == "model.opt.onnx"
    assert engine.info["optimization_level_at_load"] == "disable"
    assert engine.info["threads"] == 2
    # The saved graph is really optimized: fused/relaid-out ops differ from the exported graph's.
    import onnx

    raw_ops = [n.op_type for n in onnx.load(str(edge_onnx)).graph.node]
    opt = onnx.load(str(edge_ort_bundle / "model.opt.onnx"))
    assert [n.op_type for n in opt.graph.node] != raw_ops
    assert {p.key for p in opt.metadata_props} >= {"input_name", "class_names"}
    session = ort.InferenceSession(str(edge_onnx), providers=["CPUExecutionProvider"])
    x = edge_eval[0][:9]
    np.testing.assert_allclose(engine(x), session.run(None, {"input": x})[0], atol=1e-5)


def test_other_host_falls_back_to_portable_model(edge_ort_bundle: Path, tmp_path: Path, edge_eval) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(edge_ort_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["engine"]["build_fingerprint"]["isa"] = ["avx512f", "avx512_vnni"]  # built on another CPU
    write_signed_json(copy / "manifest.json", manifest)  # as that other host's build wrote it
    engine = runtime.load(copy)
    assert engine.info["file"] == "model.onnx" and engine.info["optimization_level_at_load"] == "all"
    assert "differs from the build host" in engine.info["notes"][0]
    np.testing.assert_allclose(engine(edge_eval[0][:4]), edge_eval[2][:4], atol=1e-5)


def test_extended_level_saves_only_the_portable_optimized_graph(edge_source, tmp_path: Path, edge_eval) -> None:
    target = replace(load_target("arm64-cpu-ort"), threads=1)
    assert target.graph_optimization_level == "extended"
    out = build(edge_source, target, "fp32", tmp_path / "arm")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.opt.onnx"]
    m = read_manifest(out)
    assert not m["engine"]["hardware_specific"] and m["engine"]["fallback_file"] is None
    assert m["eval"] is None
    engine = runtime.load(out)
    assert engine.info["optimization_level_at_load"] == "disable"
    np.testing.assert_allclose(engine(edge_eval[0][:3]), edge_eval[2][:3], atol=1e-5)


def test_int8_from_qdq_onnx(edge_source, edge_qdq, tmp_path: Path, edge_eval) -> None:
    import torch

    gm, qdq_path = edge_qdq
    source = replace(edge_source, onnx_path=qdq_path, quantization="ptq")
    # the fixture's graph is labelled ort-cpu-avx2: pin that scheme (x86-cpu-ort's follows the CPU since issue 17)
    x86 = replace(load_target("x86-cpu-ort"), quant_scheme="ort-cpu-avx2")
    out = build(source, x86, "int8", tmp_path / "int8", eval_data=edge_eval)
    m = read_manifest(out)
    assert (m["precision"], m["quantization"]) == ("int8", "ptq")
    logits = runtime.load(out)(edge_eval[0])
    with torch.no_grad():
        want = gm(torch.from_numpy(edge_eval[0])).numpy()
    # fused integer kernels differ from the reference Q/DQ arithmetic by ~1e-3..1e-2 in logits (the untrained
    # model's logits are too close together for a meaningful top-1 agreement check)
    assert np.abs(logits - want).max() < 0.1


def test_precision_rules(edge_source, edge_qdq, tmp_path: Path) -> None:
    x86 = load_target("x86-cpu-ort")
    with pytest.raises(EdgekdError, match="precision 'fp16' is not offered"):
        build(edge_source, x86, "fp16", tmp_path / "a")
    fp16_target = replace(x86, precisions=("fp32", "fp16"))  # bypassing the file checks to reach the builder
    with pytest.raises(EdgekdError, match="fp16 is not offered"):
        build(edge_source, fp16_target, "fp16", tmp_path / "b")
    with pytest.raises(EdgekdError, match="does not match quantization 'none'"):
        build(edge_source, x86, "int8", tmp_path / "c")
    with pytest.raises(EdgekdError, match="has none"):
        build(replace(edge_source, quantization="ptq"), x86, "int8", tmp_path / "d")
    with pytest.raises(EdgekdError, match="contains QuantizeLinear/DequantizeLinear nodes but precision is fp32"):
        build(replace(edge_source, onnx_path=edge_qdq[1]), x86, "fp32", tmp_path / "e")
    with pytest.raises(EdgekdError, match="quantized with scheme 'ort-cpu-avx2' but target .* expects 'tensorrt'"):
        build(replace(edge_source, onnx_path=edge_qdq[1], quantization="qat"), replace(x86, quant_scheme="tensorrt"),
              "int8", tmp_path / "f")
    assert not list(tmp_path.iterdir())


def test_failed_build_leaves_nothing(edge_source, tmp_path: Path, edge_eval) -> None:
    x86 = load_target("x86-cpu-ort")
    wrong_shape = replace(edge_source, input_shape=(3, 8, 8))
    with pytest.raises(EdgekdError, match=r"has shape \['batch', 1, 8, 8\], expected \(batch, 3, 8, 8\)"):
        build(wrong_shape, x86, "fp32", tmp_path / "x")
    with pytest.raises(EdgekdError, match=r"eval x has shape \(48, 1, 8, 8\), expected \(N, 3, 8, 8\)"):
        build(wrong_shape, x86, "fp32", tmp_path / "x", eval_data=edge_eval)
    with pytest.raises(EdgekdError, match=r"eval y has shape \(3,\)"):
        build(edge_source, x86, "fp32", tmp_path / "x", eval_data=(edge_eval[0], edge_eval[1][:3], None))
    with pytest.raises(EdgekdError, match="ONNX file .*missing.onnx: not found"):
        build(replace(edge_source, onnx_path=tmp_path / "missing.onnx"), x86, "fp32", tmp_path / "x")
    assert not list(tmp_path.iterdir()), "no half-built bundle or temp folder is left"


def test_rebuild_replaces_the_bundle(edge_source, tmp_path: Path) -> None:
    target = replace(load_target("x86-cpu-ort"), graph_optimization_level="disable")
    out = build(edge_source, target, "fp32", tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    (out / "stale.txt").write_text("from an older build")
    build(edge_source, target, "fp32", out)
    assert not (out / "stale.txt").exists()
    assert read_manifest(out)["engine"]["file"] == "model.onnx"


def test_cuda_provider_target_built_on_a_cpu_machine(edge_source, tmp_path: Path, edge_eval) -> None:
    """Providers missing at build time: the portable "basic" graph is saved, the device optimizes at load."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    target_file = tmp_path / "gpu-ort.toml"
    target_file.write_text('runtime = "onnxruntime"\ndevice = "cuda"\nprecisions = ["fp32"]\n'
                           '[provider_options.CUDAExecutionProvider]\ndevice_id = 0\n')
    target = load_target(str(target_file))
    assert target.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert "CUDAExecutionProvider" in check_target(target)
    out = build(edge_source, target, "fp32", tmp_path / "b")
    m = read_manifest(out)
    assert m["engine"]["saved_optimization_level"] == "basic" and not m["engine"]["hardware_specific"]
    assert any("not available on the build host" in note for note in m["build"]["notes"])
    engine = runtime.load(out)
    assert engine.info["providers"] == ["CPUExecutionProvider"]
    assert engine.info["optimization_level_at_load"] == "all"
    np.testing.assert_allclose(engine(edge_eval[0][:2]), edge_eval[2][:2], atol=1e-5)


def test_available_runtimes_and_check_target() -> None:
    status = available_runtimes()
    assert set(status) == {"onnxruntime", "tensorrt", "torch"}
    assert status["onnxruntime"] == "ok" and status["torch"] == "ok"
    assert check_target(load_target("x86-cpu-ort")) == "ok"
    if status["tensorrt"] != "ok":
        assert "jetson-orin-nano-trt" in check_target(load_target("jetson-orin-nano-trt"))


def test_eval_npz_is_a_bounded_sample_and_the_host_scores_the_whole_test_split(edge_source, edge_eval,
                                                                                tmp_path: Path) -> None:
    """eval.npz keeps `eval_samples` rows of the test split (0: none); metrics["test"] is the engine's accuracy
    and agreement on all of it, measured at build time. The test split may be memory-mapped."""
    from edgekd.profile import profile_bundle
    from edgekd.report import engine_entry

    x, y, ref = edge_eval
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    target = replace(load_target("x86-cpu-ort"), eval_samples=10)
    out = build(edge_source, target, "fp32", tmp_path / "b", eval_data=(mapped, y, ref))
    m = read_manifest(out)
    assert m["eval"] == {"file": "eval.npz", "samples": 10, "has_reference_logits": True}
    with np.load(out / "eval.npz") as data:
        rows = [int(np.flatnonzero((x == row).all(axis=(1, 2, 3)))[0]) for row in data["x"]]
        assert len(set(rows)) == 10 and rows == sorted(rows)  # distinct test rows, in order
        np.testing.assert_array_equal(data["y"], y[rows])
        np.testing.assert_array_equal(data["reference_logits"], ref[rows])
    top1 = runtime.load(out)(x).argmax(1)
    test = m["metrics"]["test"]
    assert test["samples"] == 48 and test["accuracy"] == float(np.mean(top1 == y)) and test["agreement"] == 1.0
    assert 0.5 < test["accuracy"] < 1.0   # a quarter of the labels were flipped

    result = profile_bundle(out, batch_sizes=(1,), warmup=1, min_runs=2, min_seconds=0.0)
    assert result["eval_samples"] == 10 and result["accuracy"] == float(np.mean(top1[rows] == y[rows]))
    assert (result["test_accuracy"], result["test_samples"]) == (test["accuracy"], 48)
    entry = engine_entry(result, tmp_path)
    assert (entry["accuracy"], entry["test_samples"], entry["spot_samples"]) == (test["accuracy"], 48, 10)

    none = build(edge_source, replace(target, eval_samples=0), "fp32", tmp_path / "none", eval_data=edge_eval)
    assert not (none / "eval.npz").exists() and read_manifest(none)["eval"] is None
    assert read_manifest(none)["metrics"]["test"]["accuracy"] == test["accuracy"]


def test_segment_times_split_float_and_int8_graphs_alike(tmp_path: Path) -> None:
    """Per-layer kernel time: the float and Q/DQ exports of one model split into the same layers, named after
    the student's quantizable layers, each with a measured (non-negative, not all zero) time."""
    import torch

    from edgekd import quantize as q
    from edgekd.engines.ort import segment_layers, segment_times
    from edgekd.export import export_onnx
    from edgekd.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn:widths=8,16", (1, 8, 8), 10).eval()
    x = torch.randn(16, 1, 8, 8)
    layers = q.quantizable_layers(model)
    fp32 = export_onnx(model, x, tmp_path / "fp32.onnx", metadata={})
    int8 = export_onnx(q.ptq(model, x, [x], q.QuantConfig()), x, tmp_path / "int8.onnx", metadata={})
    assert segment_layers(int8, layers) == layers == ["features.0", "features.4", "head"]
    for path in (fp32, int8):
        times = segment_times(path, x.numpy(), threads=1, runs=5)
        assert len(times) == len(layers) and min(times) >= 0 and sum(times) > 0, times
