"""The patient-suite benchmark (benchmarks/bench_patient.py) end to end in --quick mode: 500 Fashion-MNIST training
images, 2 epochs, one seed, the MLP student, both arms in two parallel processes, then again to check it resumes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_patient.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(not any((FASHION / f"train-images-idx3-ubyte{z}").is_file() for z in (".gz", "")),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _run(work: Path, out: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--work", str(work), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_patient_quick_runs_both_arms_with_test_curves_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _run(work, out)
    data = json.loads((out / "patient_quick.json").read_text())
    rows = {r["arm"]: r for r in data["rows"]}
    assert set(rows) == {"fm", "ct"} and data["jobs"] == 2
    for arm, row in rows.items():
        assert row["student"] == "mlp" and row["seeds"] == [0] and row["student_epochs"] == 2
        assert (row["temperature"], row["alpha"]) == (1.0, 1.0)
        curves = row["curves"]["0"]
        for role, final in (("distilled", row["distilled"][0]), ("scratch", row["scratch"][0])):
            assert [h["epoch"] for h in curves[role]] == [1, 2]
            # the per-epoch evaluation split is the test split: the last point is the reported test accuracy
            assert curves[role][-1]["val_accuracy"] * 100 == pytest.approx(final)
        assert [e for e, _ in row["mean_curve"]["distilled"]] == [1, 2]
        assert row["seconds_per_epoch"]["distilled"] > 0
        recipe = tomllib.loads((work / "e2" / arm / "mlp" / "seed0" / "recipe.toml").read_text())
        mixed = arm == "fm"
        assert (recipe["augment"]["mixup"] > 0, recipe["augment"]["mix_scratch"]) == (mixed, mixed)
        assert recipe["augment"]["crop"] == 2 and recipe["augment"]["flip"] is True
        assert recipe["distill"]["function_matching"] is mixed
    with np.load(next((work / "data").glob("*.npz"))) as f:
        assert len(f["x_train"]) == 500 and np.bincount(f["y_train"]).tolist() == [50] * 10
        assert len(f["y_test"]) == 1000 and (f["y_val"] == f["y_test"]).all() and len(f["class_names"]) == 10
        assert np.array_equal(f["x_val"][:, 0], f["x_test"].astype(np.float32) / 255.0)
    assert (out / "patient_quick_mlp.png").read_bytes()[:4] == b"\x89PNG"

    weights = work / "e2" / "fm" / "mlp" / "seed0" / "student.safetensors"
    before = weights.stat().st_mtime_ns
    _run(work, out)   # finished runs are read, not trained again
    assert weights.stat().st_mtime_ns == before
    again = {r["arm"]: r for r in json.loads((out / "patient_quick.json").read_text())["rows"]}
    assert again["fm"]["curves"] == rows["fm"]["curves"]


def test_patient_deadline_stops_unfinished_runs_and_reports_them(tmp_path):
    """--deadline (the one-shot GPU command's safety net): a 5,000-epoch run cannot end in 15 s; the script
    still exits cleanly, reports no result row for it, and says how far it got (a checkpoint stays to resume from).
    (400 epochs of --quick's distilled MLP end in about 12 s on an idle 2-core machine, so fewer would race.)"""
    work, out = tmp_path / "work", tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--epochs", "5000", "--arms", "fm", "--deadline", "15",
                        "--work", str(work), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "patient_quick.json").read_text())
    assert data["rows"] == [] and list(data["unfinished"]) == ["fm / mlp / seed 0 / 5000 epochs"]
    progress = data["unfinished"]["fm / mlp / seed 0 / 5000 epochs"]
    assert "scratch" not in progress or not progress["scratch"]["finished"]
    if "distilled" in progress:   # epochs ended before the deadline: their checkpoint is there to resume from
        assert 0 < progress["distilled"]["epochs_done"] < 5000 and progress["distilled"]["seconds_per_epoch"] > 0
        assert (work / "e5000" / "fm" / "mlp" / "seed0" / "checkpoints" / "student.ckpt").is_file()
    assert "Stopped at the 15 s deadline" in (out / "patient_quick.md").read_text()
