"""onnxruntime-gpu with the TensorRT execution provider as a target: the provider options edgekd generates
(names checked against onnxruntime's TensorRT EP option list), the target rules, and bundles built on a host
without the TensorRT EP (the graph is saved portable; the device applies the options)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgekd.bundle import read_manifest
from edgekd.engines import build, check_target
from edgekd.engines.ort import TRT_EP, TRT_EP_OPTION_NAMES, _provider_options, trt_ep_options
from edgekd.errors import EdgekdError
from edgekd.targets import load_target

TARGET = "datacenter-l4-ort-trt"


def test_l4_target_orders_tensorrt_then_cuda_then_cpu() -> None:
    t = load_target(TARGET)
    assert t.runtime == "onnxruntime" and t.device == "cuda"
    assert t.providers == (TRT_EP, "CUDAExecutionProvider", "CPUExecutionProvider")
    assert t.precisions == ("fp32", "fp16", "int8") and t.quant_scheme == "tensorrt"


@pytest.mark.parametrize(("precision", "fp16", "int8"), [("fp32", "false", "false"), ("fp16", "true", "false"),
                                                         ("int8", "true", "true")])
def test_generated_options_per_precision(precision: str, fp16: str, int8: str) -> None:
    opts = trt_ep_options(load_target(TARGET), precision, "input", (3, 32, 32))
    assert set(opts) <= TRT_EP_OPTION_NAMES
    assert opts == {
        "trt_fp16_enable": fp16, "trt_int8_enable": int8,
        "trt_engine_cache_enable": "true", "trt_engine_cache_path": f"~/.cache/edgekd/ort-trt/{TARGET}",
        "trt_timing_cache_enable": "true", "trt_timing_cache_path": f"~/.cache/edgekd/ort-trt/{TARGET}",
        "trt_max_workspace_size": str(4096 << 20), "trt_builder_optimization_level": "3",
        "trt_profile_min_shapes": "input:1x3x32x32", "trt_profile_opt_shapes": "input:8x3x32x32",
        "trt_profile_max_shapes": "input:64x3x32x32"}
    assert all(isinstance(v, str) for v in opts.values()), "onnxruntime's Python API takes strings"


def test_target_options_win_but_cannot_contradict_the_precision() -> None:
    t = load_target(TARGET)
    options = {"trt_engine_cache_path": "/opt/cache", "trt_cuda_graph_enable": True}
    custom = replace(t, provider_options={TRT_EP: options})
    opts = trt_ep_options(custom, "fp16", "input", (3, 32, 32))
    assert opts["trt_engine_cache_path"] == "/opt/cache" and opts["trt_cuda_graph_enable"] == "true"
    wrong = replace(t, provider_options={TRT_EP: {"trt_fp16_enable": False}})
    with pytest.raises(EdgekdError, match="trt_fp16_enable = False contradicts precision fp16"):
        trt_ep_options(wrong, "fp16", "input", (3, 32, 32))


def test_target_file_rules(tmp_path: Path) -> None:
    body = ('runtime = "onnxruntime"\ndevice = "cuda"\nprecisions = ["fp16"]\nquant_scheme = "tensorrt"\n'
            'providers = ["CUDAExecutionProvider"]\n')
    (tmp_path / "a.toml").write_text(body)
    with pytest.raises(EdgekdError, match="a.toml: precision 'fp16' .* without 'TensorrtExecutionProvider' first"):
        load_target(str(tmp_path / "a.toml"))
    (tmp_path / "b.toml").write_text(body.replace('["CUDAExecutionProvider"]', f'["{TRT_EP}"]') +
                                     f"[provider_options.{TRT_EP}]\ntrt_fp16_enabled = true\n")
    with pytest.raises(EdgekdError, match=r"b.toml: provider_options.TensorrtExecutionProvider.trt_fp16_enabled is "
                                          "not a TensorRT execution provider option"):
        load_target(str(tmp_path / "b.toml"))


def test_cache_paths_are_expanded_and_created_on_the_device(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (opts,) = _provider_options([TRT_EP], {TRT_EP: {"trt_engine_cache_path": "~/c/engines", "trt_fp16_enable": True}})
    assert opts == {"trt_engine_cache_path": str(tmp_path / "c" / "engines"), "trt_fp16_enable": "true"}
    assert (tmp_path / "c" / "engines").is_dir()


def test_fp16_bundle_built_on_a_host_without_the_tensorrt_ep(edge_source, edge_eval, tmp_path: Path) -> None:
    import onnxruntime as ort

    if TRT_EP in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT EP: the portable-graph path is not taken")
    target = load_target(TARGET)
    assert "TensorrtExecutionProvider" in check_target(target), "the pipeline skips it here, saying why"
    out = build(edge_source, target, "fp16", tmp_path / "bundle", eval_data=edge_eval)
    engine = read_manifest(out)["engine"]
    assert engine["providers"] == list(target.providers)
    assert engine["provider_options"][TRT_EP]["trt_fp16_enable"] == "true"
    assert engine["provider_options"][TRT_EP]["trt_profile_max_shapes"] == "input:64x1x8x8"
    assert engine["saved_optimization_level"] == "basic"
    from edgekd import runtime

    loaded = runtime.load(out)  # here: falls back to the CPU provider, with a note
    assert loaded.info["providers"] == ["CPUExecutionProvider"]
    assert any("requested, using ['CPUExecutionProvider']" in n for n in loaded.info["notes"])
    np.testing.assert_allclose(loaded(edge_eval[0]), edge_eval[2], atol=1e-4)


def test_fp16_is_refused_without_the_tensorrt_ep(edge_source, tmp_path: Path) -> None:
    cpu = replace(load_target("x86-cpu-ort"), precisions=("fp32", "fp16"))
    with pytest.raises(EdgekdError, match="fp16 is not offered without the TensorrtExecutionProvider first"):
        build(edge_source, cpu, "fp16", tmp_path / "b")
