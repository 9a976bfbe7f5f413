"""The report's arithmetic: gap recovered only when the teacher beats scratch, Wilson intervals, dominated
engines, INT8 slower than FP32 said in words."""

from __future__ import annotations

import pytest

from edgekd.report import accuracy_ci, build_report, distillation_summary, dominated, int8_notes, markdown


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
