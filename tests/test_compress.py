"""PTQ and QAT-distillation through the pipeline on a tiny digits run; accuracy measured on the engine."""

import json

import pytest

from edgekd.targets import load_target
from tests.test_cli import edgekd

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qat")
    recipe = folder / "recipe.toml"
    recipe.write_text('[data]\nsource = "digits"\n[teacher]\nmodel = "cnn:widths=8,16"\nepochs = 3\n'
                      '[student]\nmodel = "cnn:widths=8,8"\nepochs = 3\n'
                      '[quantize]\nmode = "qat"\nepochs = 2\nfreeze_fraction = 0.5\ncalibration_size = 128\n')
    out = folder / "run"
    r = edgekd("run", recipe, "--out", out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_fp32_ptq_and_qat_engines_side_by_side(qat_run):
    rep = json.loads((qat_run / "report.json").read_text())
    students = {e["quantization"]: e for e in rep["engines"] if e["model"] == "student"}
    assert {"none", "ptq", "qat"} <= set(students)
    assert students["ptq"]["precision"] == students["qat"]["precision"] == "int8"
    q = rep["quantization"][load_target("x86-cpu-ort").quant_scheme]   # chosen from this CPU
    assert q["calibration"]["samples"] == 128 and q["calibration"]["split"] == "train"
    # the INT8 engine reproduces the converted PyTorch model's accuracy (within a few samples of the test split)
    for kind in ("ptq", "qat"):
        assert abs(students[kind]["accuracy"] - q["pytorch_accuracy"][kind]) <= 0.02
    # the engines really are integer graphs
    import onnx

    for kind in ("ptq", "qat"):
        bundle = qat_run / students[kind]["path"]
        ops = {n.op_type for f in bundle.glob("*.onnx") for n in onnx.load(f).graph.node}
        assert ops & {"QuantizeLinear", "QLinearConv", "DequantizeLinear"}, ops


def test_int8_engines_record_what_they_were_made_from(qat_run):
    """Each INT8 bundle records its quantized ONNX, which records the student and the [quantize] section
    (edgekd.runfolder), so a later student or recipe makes them stale."""
    from edgekd import runfolder

    made = json.loads((qat_run / runfolder.PROVENANCE).read_text())["artifacts"]
    scheme = load_target("x86-cpu-ort").quant_scheme   # follows the CPU
    # the PTQ engine is rebuilt from a keep-float ONNX when it profiled slower than FP32 on this machine (load
    # decides that, so both branches are checked): then the bundle records that file instead
    rebuilt = "after" in json.loads((qat_run / "report.json").read_text()).get("int8_fallback", {}).get(
        "x86-cpu-ort", {})
    for kind in ("ptq", "qat"):
        bundle = f"engines/x86-cpu-ort/student-int8-{kind}"
        keep_float = kind == "ptq" and rebuilt
        onnx_file = f"onnx/student.{kind}-{scheme}{'-keep-float' if keep_float else ''}.onnx"
        assert f"file:{onnx_file}" in made[bundle]["made_from"]
        assert {"file:student.safetensors", "[quantize]"} <= set(made[onnx_file]["made_from"])
        assert runfolder.stale(qat_run, bundle) == []


def test_int8_never_ships_slower_than_fp32(qat_run):
    """Each INT8 engine is compared with the FP32 one as profiled; a slower PTQ engine triggers the per-layer
    fallback (layers whose INT8 kernels took longer kept in float) and the headline never picks a slower INT8."""
    rep = json.loads((qat_run / "report.json").read_text())
    verdicts = {v["engine"]: v for v in rep["int8_vs_fp32"]}
    assert set(verdicts) == {e["name"] for e in rep["engines"] if e["precision"] == "int8"}
    for v in verdicts.values():
        assert v["fp32_engine"] == "student-x86-cpu-ort-fp32" and set(v["speedup_vs_fp32"]) == {"1", "8"}
        assert v["slower_at_batches"] == sorted(int(b) for b, s in v["speedup_vs_fp32"].items() if s < 1)
    assert rep["headline"]["student_engine"] not in {n for n, v in verdicts.items() if v["slower_at_batches"]}
    fallback = rep.get("int8_fallback", {}).get("x86-cpu-ort")
    if fallback is not None:   # the PTQ engine profiled slower than FP32 at some batch size on this machine
        assert fallback["chose"] in ("fp32", "int8 with float layers") and fallback["why"]
        layers = [r["layer"] for r in fallback["layer_ms"]["rows"]]
        assert sorted(layers) == ["features.0", "features.4", "head"]
        assert fallback["kept_float_for_speed"] == [r["layer"] for r in fallback["layer_ms"]["rows"]
                                                    if r["int8_ms"] > r["fp32_ms"]]


def test_bad_quantize_keys_are_refused(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[quantize]\nmode = "int4"\n')
    r = edgekd("distill", recipe, "--out", tmp_path / "o")
    assert r.returncode == 2 and "[quantize].mode: 'int4' is not one of none, ptq, qat" in r.stderr
    recipe.write_text('[quantize]\nmode = "ptq"\ncalibration = "nowhere.toml"\n')
    r = edgekd("qat", tmp_path / "o")
    assert r.returncode == 2 and "not a run folder" in r.stderr
