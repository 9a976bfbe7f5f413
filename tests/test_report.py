"""The report's arithmetic: gap recovered only when the teacher beats scratch, Wilson intervals, dominated
engines, INT8 slower than FP32 said in words, per-class retention (on a run made here)."""

from __future__ import annotations

import json

import pytest

from edgekd.errors import EdgekdError
from edgekd.report import (
    accuracy_ci,
    build_report,
    distillation_summary,
    dominated,
    int8_notes,
    markdown,
    per_class,
)
from edgekd.tasks import per_class_accuracy
from tests.test_cli import edgekd


def _engine(model: str, precision: str, p50: float, accuracy: float, quantization: str = "none") -> dict:
    name = f"{model}-t-{precision}" + ("" if quantization == "none" else f"-{quantization}")
    return {"name": name, "model": model, "target": "t", "runtime": "onnxruntime", "precision": precision,
            "quantization": quantization, "path": name, "size_bytes": 4096 if precision == "int8" else 8192,
            "accuracy": accuracy, "agreement": 1.0, "accuracy_ci": accuracy_ci(accuracy, 400), "eval_samples": 400,
            "latency_ms": {"batch": 1, "p50": p50, "p90": p50, "p99": p50, "mean": p50}, "throughput_per_s": 1e3 / p50,
            "per_batch": [{"batch": 1, "p50": p50, "p90": p50, "p99": p50, "mean": p50, "throughput_per_s": 1e3 / p50}],
            "peak_rss_mb": 100.0, "budgets": {"memory_mb": {"budget": 400.0, "measured": 100.0, "pass": True,
                                                            "metric": "peak RSS of the profiling process"}}}


def _models(teacher: float, student: float, scratch: float) -> dict:
    return {k: {"accuracy": a, "params": 10, "test_samples": 400}
            for k, a in (("teacher", teacher), ("student", student), ("scratch", scratch))}


def test_scratch_beating_the_teacher_has_no_gap_to_recover() -> None:
    d = distillation_summary(_models(0.84, 0.825, 0.8575))   # the numbers: formerly "186%"
    assert d["gap_recovered"] is None and d["scratch_beat_teacher"] and d["gain"] == pytest.approx(-0.0325)
    d = distillation_summary(_models(0.90, 0.85, 0.80))
    assert d["gap_recovered"] == pytest.approx(0.5) and not d["scratch_beat_teacher"]
    md = markdown(build_report(_models(0.84, 0.825, 0.8575), [], [], []))
    assert "scratch beat the teacher" in md and "gap recovered" not in md


def test_wilson_interval_matches_the_textbook_formula() -> None:
    low, high = accuracy_ci(0.825, 400)   # 330/400
    z, p, n = 1.959963984540054, 0.825, 400
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert (low, high) == pytest.approx((centre - half, centre + half))
    # the "about +-1.9 points" is one standard error; the 95% interval is about 1.96 of them each way
    assert (high - low) / 2 == pytest.approx(1.96 * (p * (1 - p) / n) ** 0.5, rel=0.05)
    assert accuracy_ci(None, 400) is None and accuracy_ci(0.5, 0) is None


def test_dominated_engines_and_slow_int8_are_named() -> None:
    engines = [_engine("teacher", "fp32", 3.0, 0.90), _engine("student", "fp32", 1.0, 0.85),
               _engine("student", "int8", 1.5, 0.84, "ptq")]
    assert dominated(engines) == {"student-t-int8-ptq": "student-t-fp32"}
    notes = int8_notes(engines)
    assert len(notes) == 1 and "INT8 is slower than FP32" in notes[0] and "1.50x" in notes[0]
    rep = build_report(_models(0.9, 0.85, 0.8), engines, [], ["t"])
    md = markdown(rep)
    assert "dominated by student-t-fp32" in md and "INT8 is slower than FP32" in md
    assert "100/400 MiB PASS" in md and "85.00% [" in md
    assert "1.50 points" not in md and "5.00 points over the same student trained without the teacher" in md
    engines[2] = _engine("student", "int8", 0.5, 0.84, "ptq")   # faster int8: nothing said, nothing dominated
    assert int8_notes(engines) == [] and dominated(engines) == {}


def test_the_int8_fallback_decision_is_said_in_words_with_its_layer_times() -> None:
    decision = {"engine": "student-t-int8-ptq", "speedup_vs_fp32": {"1": 0.5}, "slower_at_batches": [1],
                "layer_ms": {"batch": 1, "rows": [{"layer": "features.0", "int8_ms": 0.02, "fp32_ms": 0.01},
                                                  {"layer": "head", "int8_ms": 0.001, "fp32_ms": 0.002}]},
                "kept_float_for_speed": ["features.0"], "chose": "int8 with float layers",
                "why": "kept ['features.0'] in float"}
    md = markdown(build_report(_models(0.9, 0.85, 0.8), [], [], [], {"int8_fallback": {"t": decision}}))
    assert ("- t: student-t-int8-ptq ran at 0.50x at batch 1 of the FP32 engine's speed; chose **int8 with float "
            "layers**: kept ['features.0'] in float.") in md
    rows = [line.split("|")[1:5] for line in md.splitlines() if line.startswith("| features.0") or
            line.startswith("| head")]
    assert [[c.strip() for c in r] for r in rows] == [["features.0", "0.01", "0.02", "yes"],
                                                      ["head", "0.002", "0.001", ""]]
    assert "## int8_fallback" not in md   # not dumped again as JSON


def _per_class_entry(labels: list[int], predicted: list[int], classes: tuple[str, ...]) -> dict:
    return {"classes": list(classes), **per_class_accuracy(labels, predicted, len(classes))}


def test_per_class_accuracy_counts_each_class_and_says_none_without_samples() -> None:
    pc = per_class_accuracy([0, 0, 0, 1, 1, 3], [0, 1, 0, 1, 2, 0], 4)
    assert pc == {"samples": [3, 2, 0, 1], "correct": [2, 1, 0, 0], "accuracy": [2 / 3, 0.5, None, 0.0]}
    with pytest.raises(EdgekdError, match="3 labels but 2 predictions"):
        per_class_accuracy([0, 1, 1], [0, 1], 2)
    with pytest.raises(EdgekdError, match="labels range 0..5; expected class ids 0..2"):
        per_class_accuracy([0, 5], [0, 0], 3)


def test_per_class_retention_names_the_classes_lost_most() -> None:
    names = ("cat", "dog", "eel", "fox", "gnu")
    labels = [0] * 4 + [1] * 4 + [3] * 4 + [4] * 2   # no "eel" in the test split
    models = _models(0.9, 0.8, 0.7)
    models["teacher"]["per_class"] = _per_class_entry(labels, [0] * 4 + [1] * 4 + [3, 3, 0, 0] + [0, 0], names)
    models["student"]["per_class"] = _per_class_entry(labels, [0] * 4 + [1, 1, 0, 0] + [3, 0, 0, 0] + [4, 0], names)
    models["scratch"]["per_class"] = _per_class_entry(labels, [1] * 14, names)
    pc = per_class(models, [])
    rows = {r["class"]: r for r in pc["rows"]}
    assert rows["dog"] == {"class": "dog", "samples": 4, "teacher": 1.0, "student": 0.5, "scratch": 1.0,
                           "retention": 0.5}
    assert rows["fox"]["retention"] == 0.5 and rows["cat"]["retention"] == 1.0
    assert rows["eel"]["teacher"] is None and rows["eel"]["retention"] is None
    assert rows["gnu"]["retention"] is None   # the teacher got none of it right: no ratio
    assert pc["loses_most"] == ["dog", "fox"]   # equal retention: the class with more points lost first
    assert pc["no_test_samples"] == ["eel"] and pc["not_recorded"] == []
    md = markdown(build_report(models, [], [], []))
    assert "The student loses most on: **dog** keeps 50.0% (teacher 100.0%, student 50.0%); **fox**" in md
    assert "- class eel has no test samples: no accuracy or retention" in md
    del models["scratch"]["per_class"]   # e.g. a run made before per-class counts were recorded
    assert per_class(models, [])["not_recorded"] == ["scratch"]
    assert "scratch: no per-class counts recorded" in markdown(build_report(models, [], [], []))
    assert per_class(_models(0.9, 0.8, 0.7), []) is None


def test_many_classes_show_the_lowest_retention_in_the_table() -> None:
    names = tuple(f"c{i}" for i in range(30))
    labels = list(range(30)) * 2
    models = _models(0.9, 0.8, 0.7)
    for role in ("teacher", "student", "scratch"):
        models[role]["per_class"] = _per_class_entry(labels, labels, names)
    lost = [3, 17]   # the student gets one of the two samples of c3 and c17 wrong
    student = [(c + 1) % 30 if c in lost and i < 30 else c for i, c in enumerate(labels)]
    models["student"]["per_class"] = _per_class_entry(labels, student, names)
    md = markdown(build_report(models, [], [], []))
    assert "The 20 classes with the lowest retention of 30 (all in report.json):" in md
    assert "**c3** keeps 50.0%" in md and "**c17** keeps 50.0%" in md
    table = [line for line in md.splitlines() if line.startswith("| c") and not line.startswith("| class")]
    assert len(table) == 20 and table[0].startswith("| c3 ") and table[1].startswith("| c17 ")


@pytest.fixture(scope="module")
def classified_run(tmp_path_factory):
    """A tiny digits run made through the CLI: distill, then the student's and teacher's fp32 engines built and
    profiled on onnxruntime (int8 is skipped: the run is not quantized)."""
    folder = tmp_path_factory.mktemp("classes")
    recipe = folder / "recipe.toml"
    recipe.write_text('[data]\nsource = "digits"\ntest_fraction = 0.25\n[teacher]\nmodel = "cnn:widths=8,16"\n'
                      'epochs = 2\n[student]\nmodel = "mlp:hidden=16"\nepochs = 2\n[distill]\nseed = 3\n')
    out = folder / "run"
    for args in (("distill", recipe, "--out", out, "--device", "cpu", "--quiet"),
                 ("build", out, "--target", "x86-cpu-ort"), ("profile", out, "--target", "x86-cpu-ort", "--quick")):
        r = edgekd(*args)
        assert r.returncode == 0, r.stderr
    return recipe, out


def _independent_per_class(recipe, out, role: str) -> tuple[list[str], list[float | None], list[int]]:
    """Per-class accuracy recomputed from the saved checkpoint: the model's own argmax on the test split, counted
    class by class in plain Python."""
    import torch

    from edgekd.data import load_data
    from edgekd.models import build_model, load_weights
    from edgekd.recipe import load_recipe

    r = load_recipe(recipe)
    data = load_data(r.data, r.base_dir)
    model = build_model(r.teacher.model if role == "teacher" else r.student.model, data.input_shape, data.num_classes)
    load_weights(model, out / f"{role}.safetensors")
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(data.x_test)).argmax(1).tolist()
    labels = data.y_test.tolist()
    samples = [labels.count(c) for c in range(data.num_classes)]
    hits = [sum(1 for y, p in zip(labels, predicted, strict=True) if y == p == c) for c in range(data.num_classes)]
    return list(data.class_names), [h / n if n else None for h, n in zip(hits, samples, strict=True)], samples


def test_edgekd_report_shows_per_class_retention_of_a_run_made_here(classified_run) -> None:
    recipe, out = classified_run
    r = edgekd("report", out)
    assert r.returncode == 0, r.stderr
    assert "## Per class (test split; retention = student accuracy / teacher accuracy)" in r.stdout
    assert str(out / "report_classes.png") in r.stdout
    assert (out / "report_classes.png").read_bytes()[:4] == b"\x89PNG"
    pc = json.loads((out / "report.json").read_text())["per_class"]
    assert pc["columns"] == ["teacher", "student", "scratch", "student_engine"]
    expected = {role: _independent_per_class(recipe, out, role) for role in ("teacher", "student", "scratch")}
    names, _, samples = expected["teacher"]
    assert [row["class"] for row in pc["rows"]] == names and [row["samples"] for row in pc["rows"]] == samples
    for role, (_, accuracy, _) in expected.items():
        assert [row[role] for row in pc["rows"]] == pytest.approx(accuracy, abs=1e-12)
    teacher, student = expected["teacher"][1], expected["student"][1]
    retention = [s / t if t else None for s, t in zip(student, teacher, strict=True)]
    assert [row["retention"] for row in pc["rows"]] == pytest.approx(retention, abs=1e-12)
    worst = sorted((v, s - t, c) for c, v, s, t in zip(names, retention, student, teacher, strict=True)
                   if v is not None and v < 1)
    assert pc["loses_most"] == [c for _, _, c in worst[:3]]
    md = (out / "report.md").read_text()
    if pc["loses_most"]:
        assert f"The student loses most on: **{pc['loses_most'][0]}** keeps" in md
    # the shipped student engine (fp32 here) was scored on the whole test split by the build host; it agrees with
    # PyTorch sample for sample, so its per-class accuracy is the student's
    rep = json.loads((out / "report.json").read_text())
    assert pc["student_engine"] == rep["headline"]["student_engine"] == "student-x86-cpu-ort-fp32"
    assert [row["student_engine"] for row in pc["rows"]] == pytest.approx(student, abs=1e-12)
