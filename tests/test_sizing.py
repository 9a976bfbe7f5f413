"""edgekd size: the ladder of widths, the bisection over it with a fake target whose latencies come from a
measurements file (as from a remote device), the remote round trip, and the CLI on digits with real engines."""

import dataclasses
import json
import math
import shutil
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


def fake_latency(params: int, precision: str, batch: int = 1) -> float:
    """The fake board: latency grows with the parameter count; INT8 runs 0.6x as long plus a fixed quantize /
    dequantize cost, so it is slower than FP32 for the smallest candidates (where the pipeline ships FP32)."""
    ms = (0.02 + params * 1e-5) * batch ** 0.5
    return 0.6 * ms + 0.012 if precision == "int8" else ms


def shipped_latency(params: int) -> float:
    """Batch-1 latency of the engine that would ship: INT8 unless slower than FP32 (at batch 8 INT8 always wins)."""
    return min(fake_latency(params, "fp32"), fake_latency(params, "int8"))


def profile_result(spec: str, precision: str, params: int, target: str = "fake-board", scale: float = 1.0,
                   bundle: str | None = None) -> dict:
    """What `python -m edgekd.runtime profile BUNDLE --batch 1,8 --json` writes, with the fake board's latency."""
    rows = []
    for batch in (1, 8):
        ms = fake_latency(params, precision, batch) * scale
        rows.append({"batch": batch, "p50": ms, "p90": ms * 1.1, "p99": ms * 1.3, "mean": ms * 1.05, "runs": 100})
    return {"bundle": bundle or f"candidates/{spec}-{precision}", "model": spec, "target": target,
            "precision": precision, "quantization": "ptq" if precision == "int8" else "none", "accuracy": 0.1,
            "rows": rows}


def _ladder(recipe_path, budget=1.0):
    r = load_recipe(recipe_path)
    cfg = sizing.size_config(r, budget_ms=budget)
    return r, cfg, sizing.ladder(r.student.model, (1, 8, 8), 10, cfg)


def _measurements(tmp_path, cands, precisions=("fp32", "int8"), confirm_scale=1.0) -> Path:
    """A results folder as the device leaves it: the search's profiles, and the confirmation round's in confirm/
    (`confirm_scale` times the search's: how much the second measurement of each engine differs)."""
    path = tmp_path / "results"
    (path / "confirm").mkdir(parents=True)
    for folder, scale in ((path, 1.0), (path / "confirm", confirm_scale)):
        (folder / "all.json").write_text(json.dumps([profile_result(c.spec, p, c.params, scale=scale)
                                                     for c in cands for p in precisions]))
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


def test_search_brackets_the_budget_outside_the_noise_band():
    """Fits at <= low, over at >= high; candidates in between are neither chosen nor the comparison."""
    lat = {i: 1.0 + 0.1 * i for i in range(10)}          # 1.0 ... 1.9
    step = sizing.search(10, lat, low=1.32, high=1.58)
    assert step == {"chosen": 3, "larger": 6}             # 1.4 and 1.5 lie in the band
    assert sizing.search(10, lat, low=1.35, high=1.35) == {"chosen": 3, "larger": 4}
    assert sizing.search(10, lat, low=2.0, high=2.1) == {"chosen": 9, "larger": None}
    assert sizing.search(10, lat, low=0.9, high=1.0) == {"chosen": None, "larger": 0}
    assert sizing.search(10, lat, low=1.5, high=2.0) == {"chosen": 5, "larger": None}   # the rest within noise
    assert sizing.search(10, {0: 1.0}, 1.5, 1.6)["need"] == [9]
    assert sizing.search(10, {0: 1.0, 9: 1.9}, 1.5, 1.6)["need"] == [4]


def lat_fp32(c) -> float:
    return fake_latency(c.params, "fp32")


def _band_budget(cands, margin=0.05):
    """A budget with exactly one candidate within the noise band, the chosen one and the next larger outside it."""
    lat = [shipped_latency(c.params) for c in cands]
    for k in range(1, len(cands) - 2):
        budget = lat[k + 1]
        if lat[k] * (1 + margin) <= budget <= lat[k + 2] / (1 + margin):
            return k, budget
    raise AssertionError("no such budget on this ladder")


def test_budget_in_the_middle_picks_the_largest_that_fits(tmp_path):
    recipe, _ = _setup(tmp_path)
    r, _, cands = _ladder(recipe)
    k, budget = _band_budget(cands)
    cfg = sizing.size_config(r, budget_ms=budget)
    rep = sizing.size(r, tmp_path / "out", cfg, measurements=_measurements(tmp_path, cands), progress=False)
    assert rep["decision_precision"] == "shipped"
    assert rep["chosen"]["ships"] == ("int8" if fake_latency(cands[k].params, "int8") < lat_fp32(cands[k]) else "fp32")
    assert rep["chosen"]["index"] == k and rep["chosen"]["spec"] == cands[k].spec
    assert rep["next_larger"]["index"] == k + 2 and rep["within_noise_between"] == [cands[k + 1].spec]
    assert rep["chosen"]["decision_ms"] * 1.05 <= budget <= rep["next_larger"]["decision_ms"] / 1.05
    assert rep["next_smaller"]["spec"] == cands[k - 1].spec
    assert len(rep["candidates"]) <= 2 + 2 * math.ceil(math.log2(len(cands)))   # bisections, not the ladder
    assert rep["confirm_rounds"] == 1 and rep["settled"]
    assert rep["noise"]["max"] == 0.0 and rep["margin"] == 0.05   # identical remeasurements: the configured margin
    assert {e["index"] for e in rep["noise"]["engines"]} == {k, k + 2}
    md = (tmp_path / "out" / "size-report.md").read_text()
    assert f"**Chosen:** {cands[k].spec}" in md
    assert "is 0.0%; the margin is the larger of it and the configured 5%" in md
    assert f"Next larger: {cands[k + 2].spec}" in md and f"Between them, {cands[k + 1].spec} measured within" in md
    assert (tmp_path / "out" / "size-report.png").stat().st_size > 1000


def test_measured_noise_widens_the_margin_and_moves_the_pair(tmp_path):
    """The confirmation round measures every engine 12% slower than the search did: the noise is 12%, the margin
    grows to it, and the pair moves until both measurements of the chosen one fit and both of the next larger
    are over the budget by the margin."""
    recipe, _ = _setup(tmp_path)
    r, _, cands = _ladder(recipe)
    k, budget = _band_budget(cands)
    cfg = sizing.size_config(r, budget_ms=budget)
    rep = sizing.size(r, tmp_path / "out", cfg, measurements=_measurements(tmp_path, cands, confirm_scale=1.12),
                      progress=False)
    assert rep["noise"]["max"] == pytest.approx(0.12) and rep["margin"] == pytest.approx(0.12)
    c, n = rep["chosen"], rep["next_larger"]
    assert c["index"] < k and rep["confirm_rounds"] >= 2 and rep["settled"]
    assert max(c["latency_ms"][c["ships"]]["p50"], c["confirm_ms"][c["ships"]]) * 1.12 <= budget * (1 + 1e-9)
    assert min(n["latency_ms"][n["ships"]]["p50"], n["confirm_ms"][n["ships"]]) >= budget * 1.12 * (1 - 1e-9)
    assert shipped_latency(cands[c["index"] + 1].params) * 1.12 * 1.12 > budget   # the largest whose slower
    assert [x["index"] for x in rep["candidates"] if x["within_noise"]] == list(range(c["index"] + 1, n["index"]))


def test_search_decides_on_the_engine_that_would_ship(tmp_path):
    """Where INT8 is slower than FP32 at one of the profiled batch sizes, the pipeline ships FP32, so FP32's
    latency decides (the smallest candidates of the fake board); ship_slower_int8 keeps INT8."""
    rows = {1: 1.0, 8: 5.0}
    assert sizing.ships({"fp32": {"per_batch": rows}, "int8": {"per_batch": {1: 0.9, 8: 5.1}}}, "shipped") == "fp32"
    assert sizing.ships({"fp32": {"per_batch": rows}, "int8": {"per_batch": {1: 0.9, 8: 4.0}}}, "shipped") == "int8"
    assert sizing.ships({"fp32": {"per_batch": rows}, "int8": {"per_batch": {1: 2.0, 8: 9.0}}}, "int8") == "int8"
    recipe, _ = _setup(tmp_path)
    r, _, cands = _ladder(recipe)
    assert fake_latency(cands[0].params, "int8") > lat_fp32(cands[0])
    assert fake_latency(cands[-1].params, "int8") < lat_fp32(cands[-1])
    cfg = sizing.size_config(r, budget_ms=lat_fp32(cands[0]) * 1.07)   # the smallest fits in FP32 only
    rep = sizing.size(r, tmp_path / "out", cfg, measurements=_measurements(tmp_path, cands), progress=False)
    rows = {c["index"]: c for c in rep["candidates"]}
    assert rows[0]["ships"] == "fp32" and rows[0]["decision_ms"] == pytest.approx(lat_fp32(cands[0]))
    assert rows[len(cands) - 1]["ships"] == "int8" and rep["chosen"]["index"] == 0 and rep["chosen"]["ships"] == "fp32"
    assert "on the engine that would ship" in (tmp_path / "out" / "size-report.md").read_text()
    pinned = dataclasses.replace(r, quantize=dataclasses.replace(r.quantize, ship_slower_int8=True))
    with pytest.raises(EdgekdError, match=r"fastest candidate, cnn:widths=4,8 .* measured int8 p50"):
        sizing.size(pinned, tmp_path / "out2", cfg, measurements=_measurements(tmp_path / "m2", cands),
                    progress=False)


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
    fastest = shipped_latency(cands[0].params)
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


def _run_device_command(command: str, cwd: Path, results: Path, cands, disturbed=(3.0, 1.0)) -> list[Path]:
    """Run a device command here as the device would (real bundles, real onnxruntime profiles), then give each
    result the fake board's latencies; another process slowed the first session down."""
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    files = sorted(results.glob("*.json"))
    for file in files:
        result = json.loads(file.read_text())
        session = int(file.name.rsplit(".", 2)[-2])
        params = next((c.params for c in cands if c.spec == result["model"]), 400)
        fake = profile_result(result["model"], result["precision"], params, target="fake-board",
                              scale=disturbed[session - 1])
        result["rows"] = fake["rows"]
        file.write_text(json.dumps(result))
    return files


def test_remote_rounds_write_bundles_and_one_device_command(tmp_path, monkeypatch):
    """No measurements yet: the bundles a round needs and one command. The command is run here as the device
    would run it, then the fake board's latencies replace the timings, and `--measurements` continues the search
    (its confirmation round from results/confirm/) until it settles; the distilled student's bundles get their
    own command, and its results are read back from the measurements folder's students/."""
    monkeypatch.setattr(sizing, "ROUND_BUNDLES", 3)
    recipe, _ = _setup(tmp_path, family="mlp:hidden=8", lo=0.5, hi=4.0, precisions='["fp32"]', train=True,
                       repeats=2)
    r, _, cands = _ladder(recipe)
    lat = [fake_latency(c.params, "fp32") for c in cands]
    k = 2
    cfg = sizing.size_config(r, budget_ms=(lat[k] * 1.05 + lat[k + 1] / 1.05) / 2)
    assert lat[k] * 1.05 < cfg.budget_ms < lat[k + 1] / 1.05
    out = tmp_path / "out"
    results = out / "candidates" / "results"
    phases = []
    rep = sizing.size(r, out, cfg, remote=True, progress=False)
    while rep.get("status") == "needs measurements":
        phases.append(rep["phase"])
        assert len(rep["bundles"]) <= 3 and all((out / "candidates" / b / "manifest.json").is_file()
                                                for b in rep["bundles"])
        assert "for r in 1 2; do for b in" in rep["command"]   # sessions interleaved across bundles
        folder = results / "confirm" if rep["phase"] == "confirm" else results
        files = _run_device_command(rep["command"], out, folder, cands)
        assert {f.name.rsplit(".", 2)[0] for f in files} >= set(rep["bundles"])
        assert rep["then"].endswith(f"--measurements {results}")
        rep = sizing.size(r, out, cfg, measurements=results, progress=False)
    assert phases.count("search") >= 2 and phases[-1] == "confirm"
    assert rep["chosen"]["spec"] == cands[k].spec and rep["next_larger"]["spec"] == cands[k + 1].spec
    assert rep["chosen"]["decision_ms"] == pytest.approx(lat[k])   # the undisturbed session counts
    assert rep["noise"]["max"] == pytest.approx(0.0, abs=1e-9)
    (trained,) = rep["trained"]   # distilled and built here, left for the device to profile
    assert trained["spec"] == cands[k].spec and trained["engines"] == []
    assert trained["bundles"] == ["engines/fake-board/student-fp32"]
    assert (Path(trained["run_dir"]) / trained["bundles"][0] / "manifest.json").is_file()
    assert "profile-fake-board.json" not in {p.name for p in Path(trained["run_dir"]).iterdir()}
    command = (out / "students" / "MEASURE.txt").read_text().splitlines()[1]
    assert "students/MEASURE.txt" in rep["note"] and "results/students" in command
    _run_device_command(command, out, out / "results" / "students", cands, disturbed=(1.0, 2.0))
    shutil.copytree(out / "results" / "students", results / "students")
    rep = sizing.size(r, out, cfg, measurements=results, progress=False)
    (trained,) = rep["trained"]
    (engine,) = trained["engines"]
    assert engine["precision"] == "fp32" and engine["shipped"] and engine["path"] == trained["bundles"][0]
    assert engine["latency_ms"]["p50"] == pytest.approx(fake_latency(400, "fp32"))   # the undisturbed session
    assert rep["verdict"]["chosen"]["ms"] == engine["latency_ms"]["p50"] and rep["verdict"]["chosen_meets"]
    assert "measured on the device" in rep["note"]
    bad = json.loads(next((results / "students").glob("*.json")).read_text())
    (results / "students" / "bad.json").write_text(json.dumps({**bad, "target": "jetson"}))
    with pytest.raises(EdgekdError, match="students/bad.json: measured a bundle built for target 'jetson'"):
        sizing.size(r, out, cfg, measurements=results, progress=False)


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
    assert rep["target"] == "x86-cpu-ort" and rep["decision_precision"] == "shipped" and rep["all_fit"]
    assert rep["chosen"]["spec"] == "mlp:hidden=16"
    for c in rep["candidates"]:
        assert set(c["latency_ms"]) == {"fp32", "int8"} and c["latency_ms"]["int8"]["p50"] > 0
    (trained,) = rep["trained"]
    assert {(e["precision"], e["quantization"]) for e in trained["engines"]} == {("fp32", "none"), ("int8", "ptq")}
    assert sum(e["shipped"] for e in trained["engines"]) == 1 and rep["verdict"]["chosen_meets"]
    assert rep["confirm_rounds"] == 1 and rep["onnx_exports"] == 2 * len(rep["candidates"])   # one float, one Q/DQ
    assert rep["drift"]["median"] > 0 and len(rep["drift"]["engines"]) == 2
    assert all(0.3 < e["accuracy"] <= 1.0 and e["meets_budget"] for e in trained["engines"])
    assert "## Distilled students" in r.stdout and "mlp:hidden=16" in r.stdout
    if not Path("/sys/class/powercap").is_dir():
        assert rep["energy"]["available"] is False and "Not measured: energy counters not readable" in r.stdout


def test_verdict_on_the_trained_engines_and_at_the_search_speed():
    """The machine ran 25% faster when the trained engines were profiled than during the search: as measured the
    next larger one is within the budget, at the search's speed (its untrained candidate's ratio) it is over."""
    def engine(precision, ms, shipped):
        return {"precision": precision, "quantization": "ptq" if precision == "int8" else "none", "shipped": shipped,
                "latency_ms": {"p50": ms}}

    rep = {"metric": "p50", "budget_ms": 1.0, "trained": [
        {"role": "chosen", "spec": "a", "engines": [engine("fp32", 1.2, False), engine("int8", 0.72, True)]},
        {"role": "next larger", "spec": "b", "engines": [engine("fp32", 1.5, False), engine("int8", 0.84, True)]}],
        "drift": {"median": 0.75, "engines": [
            {"spec": "a", "precision": "int8", "search_ms": 0.96, "now_ms": 0.72},
            {"spec": "b", "precision": "int8", "search_ms": 1.1, "now_ms": 0.825}]}}
    v = sizing._verdict(rep)
    assert v["chosen"] == {"precision": "int8", "quantization": "ptq", "ms": 0.72} and v["chosen_meets"]
    assert v["larger_exceeds"] is False and not v["brackets"]
    s = v["at_search_speed"]
    assert s["chosen_ms"] == pytest.approx(0.96) and s["larger_ms"] == pytest.approx(0.84 * 1.1 / 0.825)
    assert s["brackets"]
    rep["drift"] = None
    assert "at_search_speed" not in sizing._verdict(rep)


def test_factory_family_ladder_steps_the_width_and_skips_equal_models(tmp_path):
    recipe, _ = _setup(tmp_path, family="tests.test_models:scalable_mlp", lo=0.5, hi=2.0)
    _, _, cands = _ladder(recipe)
    assert cands[0].spec == "tests.test_models:scalable_mlp,width=0.5"
    assert cands[-1].spec == "tests.test_models:scalable_mlp,width=2"
    assert all(a.params < b.params for a, b in zip(cands, cands[1:], strict=False))


def test_a_rerun_reuses_verified_candidate_bundles_and_rebuilds_a_tampered_one(tmp_path):
    """A remote round's bundles are verified on the next run: a good one is kept as it is, one whose files no
    longer match its manifest is built again in its place."""
    from edgekd.bundle import read_manifest

    recipe, _ = _setup(tmp_path, family="mlp:hidden=8", lo=0.5, hi=2.0, precisions='["fp32"]')
    r, _, _ = _ladder(recipe)
    cfg = sizing.size_config(r, budget_ms=1.0)
    out = tmp_path / "out"
    rep = sizing.size(r, out, cfg, remote=True, progress=False)
    good, bad = (out / "candidates" / name for name in rep["bundles"][:2])
    stamp = (good / "manifest.json").stat().st_mtime_ns
    engine = next(p for p in sorted(bad.iterdir()) if p.name != "manifest.json" and p.is_file())
    engine.write_bytes(engine.read_bytes() + b"tampered")
    with pytest.raises(EdgekdError):
        read_manifest(bad)
    assert sizing.size(r, out, cfg, remote=True, progress=False)["bundles"] == rep["bundles"]
    read_manifest(bad)
    assert (good / "manifest.json").stat().st_mtime_ns == stamp
