"""What a new user does, through the real CLI (issue 17): their own data file and `mymodels.py` beside a recipe with
relative paths, a copy of x86-cpu-ort with one thread given as a path, and stage commands run from working
directories that are neither the recipe's folder nor the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgekd.targets import cpu_quant_scheme, targets_dir
from tests.test_cli import edgekd

FACTORY = '''from torch import nn


def student(input_shape, num_classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 24), nn.ReLU(), nn.Linear(24, num_classes))
'''

RECIPE = '''[data]
source = "../data/digits.npz"
val_fraction = 0.1

[teacher]
model = "cnn:widths=8,16"
epochs = 2
batch_size = 128

[student]
model = "mymodels:student"
epochs = 2
batch_size = 128

[quantize]
mode = "ptq"
calibration_size = 64
'''


def _project(root: Path) -> dict[str, Path]:
    """proj/data/digits.npz + pool.npz, proj/recipes/{recipe.toml, mymodels.py}, proj/x86-1t.toml, proj/work/."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    (root / "data").mkdir(parents=True)
    np.savez(root / "data" / "digits.npz", x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])
    np.savez(root / "data" / "pool.npz", x=x[1400:1600])
    (root / "recipes").mkdir()
    (root / "recipes" / "recipe.toml").write_text(RECIPE)
    (root / "recipes" / "mymodels.py").write_text(FACTORY)
    target = (targets_dir() / "x86-cpu-ort.toml").read_text().replace("threads = 2", "threads = 1")
    (root / "x86-1t.toml").write_text(target)
    for d in ("work", "elsewhere"):
        (root / d).mkdir()
    return {"root": root, "work": root / "work", "elsewhere": root / "elsewhere", "run": root / "runs" / "f5"}


def _ok(r) -> str:
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """distill from proj/work, then export/quantize/build/profile/report from proj/elsewhere."""
    p = _project(tmp_path_factory.mktemp("user"))
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}   # the worktree only: mymodels.py is found by edgekd
    logs = {"distill": _ok(edgekd("distill", "../recipes/recipe.toml", "--out", "../runs/f5", "--device", "cpu",
                                  "--quiet", cwd=p["work"], env=env))}
    run = "../runs/f5"   # relative to proj/elsewhere too
    for name, args in (("export", ("export", run)),
                       ("quantize", ("quantize", run, "--mode", "ptq", "--target", "../x86-1t.toml", "--quiet")),
                       ("build", ("build", run, "--target", "../x86-1t.toml")),
                       ("profile", ("profile", run, "--target", "../x86-1t.toml", "--quick")),
                       ("report", ("report", p["run"]))):
        logs[name] = _ok(edgekd(*args, cwd=p["elsewhere"], env=env))
    p["logs"] = logs
    return p


def test_stage_commands_give_int8_engines_from_any_directory(project):
    scheme = cpu_quant_scheme()[0]
    run = project["run"]
    assert json.loads((run / "recipe-source.json").read_text())["recipe_dir"] == str(project["root"] / "recipes")
    assert (run / "onnx" / f"student.ptq-{scheme}.onnx").is_file()
    build = project["logs"]["build"]
    assert f"built student int8 (ptq, scheme {scheme}: this CPU" in build and "built teacher fp32" in build
    names = {e["name"] for e in json.loads((run / "report.json").read_text())["engines"]}
    assert {"teacher-x86-1t-fp32", "student-x86-1t-fp32", "student-x86-1t-int8-ptq"} <= names
    manifest = json.loads((run / "engines" / "x86-1t" / "student-int8-ptq" / "manifest.json").read_text())
    assert manifest["quant_scheme"]["scheme"] == scheme and "VNNI" in manifest["quant_scheme"]["reason"].upper()
    assert manifest["engine"]["threads"] == 1   # the copied target file, not the catalog's x86-cpu-ort
    assert not any("torchvision" in log for log in project["logs"].values())


def test_build_says_why_int8_was_skipped(project, tmp_path):
    """A run folder with no quantized student: build makes the float engines and names the missing step."""
    import shutil

    run = tmp_path / "r"
    shutil.copytree(project["run"], run, ignore=shutil.ignore_patterns("engines", "*.ptq-*.onnx", "quantize-*"))
    out = _ok(edgekd("build", run, "--target", project["root"] / "x86-1t.toml", cwd=tmp_path))
    assert "built student fp32" in out
    assert "skipped student int8: no quantized student" in out and "edgekd quantize" in out


def test_run_resume_skips_complete_stages(project):
    run = project["run"]
    teacher_mtime = (run / "teacher.safetensors").stat().st_mtime
    r = edgekd("run", "../recipes/recipe.toml", "--out", "../runs/f5", "--target", "../x86-1t.toml", "--resume",
               "--device", "cpu", cwd=project["work"])   # not --quiet: one progress line per stage
    out = _ok(r)
    assert (run / "teacher.safetensors").stat().st_mtime == teacher_mtime
    for stage in ("export student:", "quantize ptq", "build x86-1t:", "profile x86-1t:", "report:"):
        assert stage in r.stderr, stage
    assert "student int8/ptq (kept)" in r.stderr and "torchvision" not in out


def test_report_is_honest(project):
    run = project["run"]
    rep = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    t, s, b = (rep["models"][k]["accuracy"] for k in ("teacher", "student", "scratch"))
    if b >= t:
        assert "scratch beat the teacher" in md and "gap recovered" not in md
        assert rep["distillation"]["gap_recovered"] is None
    else:
        assert "gap recovered" in md
    assert "trained without the teacher" in rep["headline"]["text"]
    for e in [*rep["models"].values(), *rep["engines"]]:
        low, high = e["accuracy_ci"]
        assert low < e["accuracy"] < high or e["accuracy"] in (0.0, 1.0)
    assert "[95% CI]" in md and ("MiB PASS" in md or "MiB FAIL" in md)
    assert "int8 scheme on x86-1t" in md
    for e in rep["engines"]:   # memory is the profiling process's own: far below a training process's ~1 GB
        assert e["peak_rss_mb"] < 400


def test_model_spec_typos_fail_before_the_data_loads(project, tmp_path):
    recipes = project["root"] / "recipes"
    bad = recipes / "typo.toml"
    bad.write_text(RECIPE.replace("mymodels:student", "mymodels:studnet").replace("digits.npz", "missing.npz"))
    r = edgekd("distill", bad, "--out", tmp_path / "o", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and "'studnet'" in r.stderr and "missing.npz" not in r.stderr
    bad.write_text(RECIPE.replace("mymodels:student", "nomodels:student"))
    r = edgekd("distill", bad, "--out", tmp_path / "o", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert r.returncode == 2 and "cannot import module 'nomodels'" in r.stderr
    assert f"looked in {recipes}" in r.stderr and "beside the recipe" in r.stderr


def test_labels_pool_comes_from_the_labels_folder(project):
    """`label --pool` then `distill --labels` with a recipe that names no pool; the teacher comes from a
    checkpoint (no training time shown) and baseline = false (only the student is written)."""
    recipes = project["root"] / "recipes"
    (recipes / "ck.toml").write_text(RECIPE.replace('model = "cnn:widths=8,16"', 'model = "cnn:widths=8,16"\n'
                                                    'checkpoint = "../runs/f5/teacher.safetensors"')
                                     + "\n[distill]\nbaseline = false\n")
    work = project["work"]
    _ok(edgekd("label", "../recipes/ck.toml", "--teacher", "../runs/f5/teacher.safetensors", "--pool",
               "../data/pool.npz", "--out", "../labels", "--quiet", cwd=work))
    out = _ok(edgekd("distill", "../recipes/ck.toml", "--labels", "../labels", "--out", "../runs/lab", "--device",
                     "cpu", "--quiet", cwd=work))
    assert "{student}.safetensors" in out and "scratch" not in out
    metrics = json.loads((project["root"] / "runs" / "lab" / "metrics.json").read_text())
    assert metrics["student"]["offline"]["source"] == "labels" and metrics["student"]["offline"]["samples"] == 200
    # the same labels with another pool named by the recipe: refused by the manifest's checksum
    np.savez(project["root"] / "data" / "other.npz", x=np.zeros((200, 1, 8, 8), np.float32))
    (recipes / "other.toml").write_text(RECIPE.replace('val_fraction = 0.1', 'val_fraction = 0.1\n'
                                                       'unlabeled = "../data/other.npz"'))
    r = edgekd("distill", "../recipes/other.toml", "--labels", "../labels", "--out", "../runs/lab2", "--device",
               "cpu", "--quiet", cwd=work)
    assert r.returncode == 2 and "another pool" in r.stderr


def test_teacher_from_checkpoint_shows_no_training_time(project, tmp_path):
    recipes = project["root"] / "recipes"
    (recipes / "ck2.toml").write_text(RECIPE.replace('model = "cnn:widths=8,16"', 'model = "cnn:widths=8,16"\n'
                                                     'checkpoint = "../runs/f5/teacher.safetensors"')
                                      + "\n[distill]\nbaseline = false\n")
    out = _ok(edgekd("distill", recipes / "ck2.toml", "--out", tmp_path / "ck", "--device", "cpu", "--quiet",
                     cwd=tmp_path))
    assert "wrote" in out and "{student}.safetensors" in out
    metrics = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    assert "train_seconds" not in metrics["teacher"] and metrics["teacher"]["epochs"] == 0


def test_help_and_doctor_say_what_a_new_user_needs():
    assert "'digits'" in _ok(edgekd("run", "--help"))
    doctor = _ok(edgekd("doctor"))
    assert "int8 scheme" in doctor and "avx2" in doctor.split("cpu", 1)[1]
