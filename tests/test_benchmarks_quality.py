"""The distillation-quality benchmark's --quick mode: every suite's code path, on digits, in about a minute."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_distill_quality.py"


def test_quality_benchmark_quick_writes_every_suite(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--seeds", "0,1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "distill_quality_quick.json").read_text())
    rows = {(row["suite"], row["student"]): row for row in data["rows"]}
    assert set(rows) == {(s, m) for s in ("hinton", "scarce", "patient", "consistent") for m in ("cnn", "mlp")}
    for row in rows.values():
        assert row["seeds"] == [0, 1] and len(row["scratch"]) == len(row["distilled"]) == 2
        assert 0 < row["teacher_accuracy"] <= 100
        diffs = [a - b for a, b in zip(row["distilled"], row["scratch"], strict=True)]
        assert row["gain_mean"] == pytest.approx(sum(diffs) / 2)
    assert rows[("scarce", "cnn")]["labelled"] == 100 and rows[("patient", "cnn")]["alpha"] == 1.0
    chosen = rows[("hinton", "cnn")]["search"]["chosen"]
    assert chosen["temperature"] in (2.0, 4.0)
    assert (rows[("consistent", "cnn")]["temperature"], rows[("consistent", "cnn")]["alpha"]) == \
        (chosen["temperature"], chosen["alpha"])
    engine = data["engine"]
    assert {e["target"] for e in engine["engines"]} == {"x86-cpu-ort", "x86-cpu-torch"}
    assert {(e["precision"], e["quantization"]) for e in engine["engines"]} >= {("fp32", "none"), ("int8", "ptq")}
    assert data["environment"] and "bench_distill_quality.py" in data["command"]
    for png in ("distill_quality_quick.png", "distill_quality_quick_engines.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
