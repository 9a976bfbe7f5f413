"""edgekd size: the ladder of widths, the bisection over it with a fake target whose latencies come from a
measurements file (as from a remote device), the remote round trip, and the CLI on digits with real engines."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekd import sizing
from edgekd.errors import EdgekdError
from edgekd.models import scaled_spec
from edgekd.recipe import load_recipe
from tests.test_cli import edgekd

FAKE_TARGET = """
description = "a board that is not this machine: its latencies come from a measurements file"
runtime = "onnxruntime"
device = "cpu"
precisions = {precisions}
quant_scheme = "ort-cpu"
batch_sizes = [1]
threads = 1
graph_optimization_level = "extended"
"""

RECIPE = """
[data]
source = "digits"
test_fraction = 0.25
val_fraction = 0.1

[teacher]
model = "cnn:widths=8,16"
epochs = 1
batch_size = 128

[student]
model = "{family}"
epochs = 1
batch_size = 128

[distill]
baseline = false

[quantize]
mode = "ptq"
calibration_size = 64

[size]
target = "{target}"
min_multiplier = {lo}
max_multiplier = {hi}
divisor = 4
profile_seconds = 0.05
repeats = {repeats}
train = {train}
train_neighbours = false
"""


def _setup(tmp_path, family="cnn:widths=8,16", lo=0.5, hi=2.0, precisions='["fp32", "int8"]', train=False,
           repeats=1):
    target = tmp_path / "fake-board.toml"
    target.write_text(FAKE_TARGET.format(precisions=precisions))
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(family=family, target=target, lo=lo, hi=hi, train=str(train).lower(),
                                   repeats=repeats))
    return path, target


def fake_latency(params: int, precision: str) -> float:
    """The fake board: latency grows with the parameter count; INT8 is faster."""
    ms = 0.02 + params * 1e-5
    return ms * (0.6 if precision == "int8" else 1.0)


def profile_result(spec: str, precision: str, params: int, target: str = "fake-board", batch: int = 1) -> dict:
    """What `python -m edgekd.runtime profile BUNDLE --json` writes, with the fake board's latency."""
    ms = fake_latency(params, precision)
    return {"bundle": f"candidates/{spec}-{precision}", "model": spec, "target": target, "precision": precision,
            "quantization": "ptq" if precision == "int8" else "none", "accuracy": 0.1,
            "rows": [{"batch": batch, "p50": ms, "p90": ms * 1.1, "p99": ms * 1.3, "mean": ms * 1.05, "runs": 100}]}


def _ladder(recipe_path, budget=1.0):
    r = load_recipe(recipe_path)
    cfg = sizing.size_config(r, budget_ms=budget)
    return r, cfg, sizing.ladder(r.student.model, (1, 8, 8), 10, cfg)


def _measurements(tmp_path, cands, precisions=("fp32", "int8")) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps([profile_result(c.spec, p, c.params) for c in cands for p in precisions]))
    return path


def test_ladder_holds_every_architecture_of_the_multiplier_range(tmp_path):
    recipe, _ = _setup(tmp_path)
    _, cfg, cands = _ladder(recipe)
    assert [c.spec for c in cands][0] == scaled_spec("cnn:widths=8,16", 0.5, 4) == "cnn:widths=4,8"
    assert cands[-1].spec == scaled_spec("cnn:widths=8,16", 2.0, 4) == "cnn:widths=16,32"
    assert all(a.params < b.params for a, b in zip(cands, cands[1:], strict=False))
    dense = {scaled_spec("cnn:widths=8,16", m, 4) for m in np.linspace(0.5, 2.0, 2001)}
    assert dense == {c.spec for c in cands}   # nothing between the breakpoints, nothing missed
    for c in cands:
        assert scaled_spec("cnn:widths=8,16", c.multiplier, 4) == c.spec


def test_budget_in_the_middle_picks_the_largest_that_fits(tmp_path):
    recipe, _ = _setup(tmp_path)
    r, _, cands = _ladder(recipe)
    k = len(cands) // 2 + 1
    lat = [fake_latency(c.params, "int8") for c in cands]   # the recipe quantizes: INT8 decides
    budget = (lat[k] + lat[k + 1]) / 2 * 1.05
    cfg = sizing.size_config(r, budget_ms=budget)
    rep = sizing.size(r, tmp_path / "out", cfg, measurements=_measurements(tmp_path, cands), progress=False)
    assert rep["decision_precision"] == "int8"
    assert rep["chosen"]["index"] == k and rep["chosen"]["spec"] == cands[k].spec
    assert rep["next_larger"]["index"] == k + 1
    assert rep["chosen"]["decision_ms"] * 1.05 <= budget < rep["next_larger"]["decision_ms"] * 1.05
    assert rep["next_smaller"]["spec"] == cands[k - 1].spec
    assert len(rep["candidates"]) <= 2 + math.ceil(math.log2(len(cands)))   # a bisection, not the whole ladder
    md = (tmp_path / "out" / "size-report.md").read_text()
    assert f"**Chosen:** {cands[k].spec}" in md and "Margin for measurement noise: 5%" in md
    assert f"Next larger: {cands[k + 1].spec}" in md
    assert (tmp_path / "out" / "size-report.png").stat().st_size > 1000


def test_budget_every_candidate_meets(tmp_path):
    recipe, _ = _setup(tmp_path)
    r, _, cands = _ladder(recipe)
    cfg = sizing.size_config(r, budget_ms=10.0)
    rep = sizing.size(r, tmp_path / "out", cfg, measurements=_measurements(tmp_path, cands), progress=False)
    assert rep["all_fit"] and rep["chosen"]["spec"] == cands[-1].spec and rep["next_larger"] is None
    assert [c["index"] for c in rep["candidates"]] == [0, len(cands) - 1]
    assert "Every candidate meets the budget" in (tmp_path / "out" / "size-report.md").read_text()


def test_budget_no_candidate_meets_names_the_fastest(tmp_path):
    recipe, target = _setup(tmp_path)
    _, _, cands = _ladder(recipe)
    results = _measurements(tmp_path, cands)
    fastest = fake_latency(cands[0].params, "int8")
    r = edgekd("size", recipe, "--budget-ms", fastest / 2, "--out", tmp_path / "out", "--measurements", results,
               "--quiet")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no student of cnn:widths=8,16 meets the budget")
    assert f"the fastest candidate, {cands[0].spec}" in lines[0] and f"p50 {fastest:.4f} ms" in lines[0]
    rep = json.loads((tmp_path / "out" / "size-report.json").read_text())
    assert rep["chosen"] is None and len(rep["candidates"]) == 2


def test_measurements_are_checked_as_data(tmp_path):
    good = profile_result("cnn:widths=4,8", "fp32", 400)
    cases = [({**good, "target": "jetson"}, "built for target 'jetson', expected 'fake-board'"),
             ({**good, "rows": [{**good["rows"][0], "batch": 8}]}, "no row for batch 1"),
             ({**good, "rows": [{**good["rows"][0], "p50": float("nan")}]}, "p50 must be a positive number"),
             ({**good, "precision": "int4"}, "precision 'int4' is not one of"),
             ([1, 2], "expected a profile result")]
    for entry, message in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(entry))
        with pytest.raises(EdgekdError, match=message):
            sizing.read_measurements(path, "fake-board", 1)
    with pytest.raises(EdgekdError, match="not found"):
        sizing.read_measurements(tmp_path / "missing", "fake-board", 1)


def test_remote_rounds_write_bundles_and_one_device_command(tmp_path, monkeypatch):
    """No measurements yet: the bundles a round needs and one command. The command is run here as the device
    would run it (real bundles, real onnxruntime profiles), then the fake board's latencies replace the timings,
    and `--measurements` continues the search until it settles."""
    monkeypatch.setattr(sizing, "ROUND_BUNDLES", 3)
    recipe, _ = _setup(tmp_path, family="mlp:hidden=8", lo=0.5, hi=4.0, precisions='["fp32"]', train=True,
                       repeats=2)
    r, _, cands = _ladder(recipe)
    lat = [fake_latency(c.params, "fp32") for c in cands]
    k = 2
    cfg = sizing.size_config(r, budget_ms=(lat[k] + lat[k + 1]) / 2 * 1.05)
    out = tmp_path / "out"
    results = out / "candidates" / "results"
    rounds = 0
    rep = sizing.size(r, out, cfg, remote=True, progress=False)
    while rep.get("status") == "needs measurements":
        rounds += 1
        assert len(rep["bundles"]) <= 3 and all((out / "candidates" / b / "manifest.json").is_file()
                                                for b in rep["bundles"])
        proc = subprocess.run(["bash", "-c", rep["command"]], cwd=out, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        for name in rep["bundles"]:   # the device's real profiles, with the fake board's latencies
            for session, disturbed in ((1, 3.0), (2, 1.0)):   # another process slowed the first session down
                file = results / f"{name}.{session}.json"
                result = json.loads(file.read_text())
                params = next(c.params for c in cands if c.spec == result["model"])
                (row,) = profile_result(result["model"], "fp32", params, target="fake-board")["rows"]
                result["rows"] = [{**row, **{k: row[k] * disturbed for k in ("p50", "p90", "p99", "mean")}}]
                file.write_text(json.dumps(result))
        assert rep["then"].endswith(f"--measurements {results}")
        rep = sizing.size(r, out, cfg, measurements=results, progress=False)
    assert rounds >= 2
    assert rep["chosen"]["spec"] == cands[k].spec and rep["next_larger"]["spec"] == cands[k + 1].spec
    assert rep["chosen"]["decision_ms"] == pytest.approx(lat[k])   # the undisturbed session counts
    (trained,) = rep["trained"]   # distilled and built here, left for the device to profile
    assert trained["spec"] == cands[k].spec and trained["engines"] == []
    assert trained["bundles"] == ["engines/fake-board/student-fp32"]
    assert (Path(trained["run_dir"]) / trained["bundles"][0] / "manifest.json").is_file()
    assert "python -m edgekd.runtime profile" in rep["note"] and "profile-fake-board.json" not in \
        {p.name for p in Path(trained["run_dir"]).iterdir()}


def test_cli_sizes_digits_on_real_engines(tmp_path):
    """Through the real entry point on this machine: untrained candidates built and profiled on x86-cpu-ort,
    the chosen student distilled, quantized, built and profiled; energy is said to be unreadable here."""
    recipe, _ = _setup(tmp_path, family="mlp:hidden=8", lo=1.0, hi=2.0, train=True)
    text = recipe.read_text().replace(f'target = "{tmp_path / "fake-board.toml"}"', 'target = "x86-cpu-ort"')
    text = text.replace("epochs = 1", "epochs = 4\nlr = 0.01")
    recipe.write_text(text)
    out = tmp_path / "size"
    r = edgekd("size", recipe, "--budget-ms", 1000, "--out", out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "size-report.json").read_text())
    assert rep["target"] == "x86-cpu-ort" and rep["decision_precision"] == "int8" and rep["all_fit"]
    assert rep["chosen"]["spec"] == "mlp:hidden=16"
    for c in rep["candidates"]:
        assert set(c["latency_ms"]) == {"fp32", "int8"} and c["latency_ms"]["int8"]["p50"] > 0
    (trained,) = rep["trained"]
    assert {(e["precision"], e["quantization"]) for e in trained["engines"]} == {("fp32", "none"), ("int8", "ptq")}
    assert all(0.3 < e["accuracy"] <= 1.0 and e["meets_budget"] for e in trained["engines"])
    assert "## Distilled students" in r.stdout and "mlp:hidden=16" in r.stdout
    if not Path("/sys/class/powercap").is_dir():
        assert rep["energy"]["available"] is False and "Not measured: energy counters not readable" in r.stdout


def test_factory_family_ladder_steps_the_width_and_skips_equal_models(tmp_path):
    recipe, _ = _setup(tmp_path, family="tests.test_models:scalable_mlp", lo=0.5, hi=2.0)
    _, _, cands = _ladder(recipe)
    assert cands[0].spec == "tests.test_models:scalable_mlp,width=0.5"
    assert cands[-1].spec == "tests.test_models:scalable_mlp,width=2"
    assert all(a.params < b.params for a, b in zip(cands, cands[1:], strict=False))
