"""Smoke tests of the cost benchmarks (suites 3, 4 and 10 of benchmarks/): each script runs end to end in --quick
mode in a subprocess, as a user would run it, and writes JSON with the expected rows and sane numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
FASHION = Path("/usr/share/datasets/fashion-mnist")

needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file() and
                                   not (FASHION / "train-images-idx3-ubyte").is_file(),
                                   reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


SCRIPTS = {"test_engine_cost_quick": "bench_engine_cost.py", "test_training_cost_quick": "bench_training_cost.py",
           "test_distill_overhead_quick": "bench_distill_overhead.py"}


@pytest.fixture(scope="module")
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Start the selected suites' --quick runs at once: each runs on one thread, so on a 2-core machine the
    two run side by side in about the time of the longer one. Yields {test name: (process, out folder)}."""
    selected = {item.name for item in request.session.items}
    procs = {}
    for test, script in SCRIPTS.items():
        if test in selected:
            out = tmp_path_factory.mktemp(script.removesuffix(".py"))
            procs[test] = (subprocess.Popen([sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
                                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                           out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _result(launched: dict, test: str) -> tuple[dict, Path]:
    proc, out = launched[test]
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    name = SCRIPTS[test].removeprefix("bench_").removesuffix(".py") + "_quick"
    md = (out / f"{name}.md").read_text()
    data = json.loads((out / f"{name}.json").read_text())
    assert data["command"] in md and "--quick" in data["command"]
    env = data["environment"]
    assert env["threads"] == 1 and env["versions"]["torch"] and env["cpu"] and env["date"]
    return data, out


def _positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@needs_fashion
def test_engine_cost_quick(launched: dict) -> None:
    data, out = _result(launched, "test_engine_cost_quick")
    batches, widths, width_batches = data["settings"]["batches"], data["settings"]["widths"], \
        data["settings"]["width_batches"]
    bundles = data["run"]["bundles"]
    assert {"student-fp32", "student-int8-ptq"} <= set(bundles)
    assert [(r["bundle"], r["batch"]) for r in data["batch_sweep"]] == [(b, n) for b in bundles for n in batches]
    assert sorted((r["width"], r["precision"], r["batch"]) for r in data["width_sweep"]) == sorted(
        (w, p, n) for w in widths for p in ("fp32", "int8") for n in width_batches)
    assert _positive(data["peak"]["median_gflops"], data["peak"]["median_torch_gflops"])
    for r in data["batch_sweep"] + data["width_sweep"]:
        assert _positive(r["p50_ms"], r["p99_ms"], r["throughput_per_s"], r["flops_per_sample"],
                         r["achieved_gflops"], r["fraction_of_peak"], r["size_bytes"]), r
        assert r["p99_ms"] >= r["p50_ms"] and r["calls"] >= data["settings"]["min_runs"] * data["settings"]["rounds"]
        assert 0.0 <= r["accuracy"] <= 1.0
    flops = {r["width"]: r["flops_per_sample"] for r in data["width_sweep"]}
    assert flops[max(widths)] > flops[min(widths)]   # a wider student costs more
    for png in data["plots"]:
        assert (out / png).stat().st_size > 1000


@needs_fashion
def test_training_cost_quick(launched: dict) -> None:
    data, out = _result(launched, "test_training_cost_quick")
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == ["plain", "online KD", "QAT-KD", "cached-teacher KD"]
    rounds = data["setup"]["rounds"]
    for r in rows.values():
        assert len(r["epoch_s"]) == rounds and _positive(*r["epoch_s"], r["epoch_s_mean"], r["samples_per_s"],
                                                           r["ratio_mean"]), r
        assert math.isfinite(r["ratio_sd"]) and r["ratio_sd"] >= 0
    assert rows["plain"]["ratio_to_plain"] == [1.0] * rounds
    one = data["one_time"]
    assert _positive(one["cache_build_s"], one["qat_setup_s_mean"]) and one["qat_convert_s"] is None
    assert (out / data["plot"]).stat().st_size > 1000


def test_distill_overhead_quick(launched: dict) -> None:
    # digits in --quick mode: no Fashion-MNIST needed
    data, _ = _result(launched, "test_distill_overhead_quick")
    assert len(data["rounds"]) == 1 and data["budget"] == 1.3
    r = data["rounds"][0]
    assert _positive(r["edgekd_s"], r["plain_s"]) and r["ratio"] == pytest.approx(r["edgekd_s"] / r["plain_s"])
    assert data["ratio_median"] == r["ratio"]
    assert data["teacher_scores_reused"] is True   # [teacher].checkpoint's recorded scores, not a new pass
    assert all(0.0 <= a <= 1.0 for a in data["accuracy"].values())
    assert "load average" in data["uptime_before"] and "load average" in data["uptime_after"]
