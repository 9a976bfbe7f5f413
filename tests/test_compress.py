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
    for kind in ("ptq", "qat"):
        bundle = f"engines/x86-cpu-ort/student-int8-{kind}"
        onnx_file = f"onnx/student.{kind}-{load_target('x86-cpu-ort').quant_scheme}.onnx"   # follows the CPU
        assert f"file:{onnx_file}" in made[bundle]["made_from"]
        assert {"file:student.safetensors", "[quantize]"} <= set(made[onnx_file]["made_from"])
        assert runfolder.stale(qat_run, bundle) == []


def test_bad_quantize_keys_are_refused(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[quantize]\nmode = "int4"\n')
    r = edgekd("distill", recipe, "--out", tmp_path / "o")
    assert r.returncode == 2 and "[quantize].mode: 'int4' is not one of none, ptq, qat" in r.stderr
    recipe.write_text('[quantize]\nmode = "ptq"\ncalibration = "nowhere.toml"\n')
    r = edgekd("qat", tmp_path / "o")
    assert r.returncode == 2 and "not a run folder" in r.stderr
