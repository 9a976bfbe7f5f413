"""The whole pipeline through the real CLI: run -> report.json with engines measured on onnxruntime."""

import json

import pytest

from tests.test_cli import edgekd

ENGINE_KEYS = {"name", "model", "target", "runtime", "precision", "quantization", "path", "size_bytes", "accuracy",
               "agreement", "latency_ms", "throughput_per_s"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = folder / "recipe.toml"
    recipe.write_text('[data]\nsource = "digits"\n[teacher]\nmodel = "cnn:widths=8,16"\nepochs = 2\n'
                      '[student]\nmodel = "mlp:hidden=16"\nepochs = 2\n')
    out = folder / "run"
    r = edgekd("run", recipe, "--out", out, "--device", "cpu", "--quiet", "--target", "x86-cpu-ort",
               "--target", "jetson-orin-nano-trt")
    assert r.returncode == 0, r.stderr
    assert "Headline" in r.stdout
    return out


def test_run_writes_report_with_engines_measured_on_the_engine(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    assert set(rep["models"]) == {"teacher", "student", "scratch"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert rep["models"]["student"]["accuracy"] == metrics["student"]["accuracy"]
    names = {(e["model"], e["precision"]) for e in rep["engines"]}
    assert {("teacher", "fp32"), ("student", "fp32")} <= names
    for e in rep["engines"]:
        assert ENGINE_KEYS <= set(e)
        assert (run_dir / e["path"] / "manifest.json").is_file()
        assert e["latency_ms"]["p50"] <= e["latency_ms"]["p90"] <= e["latency_ms"]["p99"]
        # fp32 engines must agree with PyTorch and reproduce its accuracy on the test split
        if e["precision"] == "fp32":
            assert e["agreement"] == 1.0
            assert abs(e["accuracy"] - rep["models"][e["model"]]["accuracy"]) < 1e-9
    h = rep["headline"]
    student = next(e for e in rep["engines"] if e["name"] == h["student_engine"])
    teacher = next(e for e in rep["engines"] if e["name"] == h["teacher_engine"])
    assert h["target"] == "x86-cpu-ort"
    assert h["accuracy_retention"] == pytest.approx(student["accuracy"] / teacher["accuracy"])
    assert h["latency_ratio"] == pytest.approx(student["latency_ms"]["p50"] / teacher["latency_ms"]["p50"])
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "report_batch.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "report.md").read_text()
    assert "the student keeps" in md
    d = rep["distillation"]
    t, s, b = (metrics[k]["accuracy"] for k in ("teacher", "student", "scratch"))
    assert d["gain"] == pytest.approx(s - b)
    # issue 17: the gap ratio only when the teacher beats scratch (its sign flips otherwise)
    if t > b:
        assert "teacher-student gap recovered" in md and d["gap_recovered"] == pytest.approx((s - b) / (t - b))
    else:
        assert "scratch beat the teacher" in md and d["gap_recovered"] is None
    # TensorRT cannot run here: the target is reported as skipped with the reason, not silently dropped.
    assert any(s["target"] == "jetson-orin-nano-trt" and "tensorrt" in s["reason"].lower() for s in rep["skipped"])


def test_pareto_front_keeps_only_points_nothing_beats():
    from edgekd.report import pareto_front

    points = [(1.0, 0.80), (2.0, 0.90), (2.0, 0.85), (0.5, 0.70), (3.0, 0.90), (float("nan"), 0.99), (1.0, 0.80)]
    # (2.0, 0.85) loses to (2.0, 0.90); (3.0, 0.90) to (2.0, 0.90); NaN is never on the front; ties both stay
    assert pareto_front(points) == [3, 0, 6, 1]
    assert pareto_front([]) == []


def test_stage_commands_on_a_run_folder(run_dir):
    r = edgekd("export", run_dir, "--model", "scratch")
    assert r.returncode == 0, r.stderr
    assert "top-1 agreement 1.0000" in r.stdout and (run_dir / "onnx" / "scratch.onnx").is_file()
    r = edgekd("profile", run_dir, "--target", "x86-cpu-ort", "--quick")
    assert r.returncode == 0, r.stderr
    assert "p50 ms" in r.stdout
    r = edgekd("report", run_dir)
    assert r.returncode == 0 and "Headline" in r.stdout


@pytest.mark.parametrize("args,fragment", [
    (["build", "{run}", "--target", "no-such-target"], "no-such-target"),
    (["profile", "{run}", "--target", "arm64-cpu-ort"], "no engines built for target arm64-cpu-ort"),
    (["export", "{tmp}"], "not a run folder"),
    (["run", "digits", "--out", "{tmp}/o", "--target", "nowhere"], "nowhere"),
])
def test_bad_stage_input_is_one_line(run_dir, tmp_path, args, fragment):
    r = edgekd(*[a.format(run=run_dir, tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error: ") and fragment in r.stderr and "Traceback" not in r.stderr


def test_targets_and_doctor():
    r = edgekd("targets")
    assert r.returncode == 0 and "x86-cpu-ort" in r.stdout and "jetson-orin-nano-trt" in r.stdout
    r = edgekd("doctor")
    assert r.returncode == 0 and "onnxruntime" in r.stdout and "tensorrt" in r.stdout
