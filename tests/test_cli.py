import json
import os
import subprocess
import sys

import pytest


def edgekd(*args, cwd=None, env=None):
    """Run the real console entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=300)


def test_help_lists_commands():
    r = edgekd("--help")
    assert r.returncode == 0
    assert "distill" in r.stdout and "teacher" in r.stdout


def test_teacher_then_distill(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    r = edgekd("teacher", tiny_recipe, "--out", out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "teacher" in r.stdout and (out / "teacher.safetensors").is_file()
    r = edgekd("distill", tiny_recipe, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "distillation gain over scratch" in r.stdout
    assert "student (KD)" in r.stderr   # progress bars / epoch lines go to stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student", "scratch"}
    assert (out / "recipe.toml").read_text().count("[distill]") == 1


@pytest.mark.parametrize("recipe_text,fragment", [
    ("[data]\nsorce = 'digits'\n", "unknown key 'sorce'"),
    ("[student\nmodel = 1", "not valid TOML"),
    ("[data]\nsource = 'missing.npz'\n", "missing.npz: file not found"),
    ("[student]\nmodel = 'tests.test_distillation:wrong_head'\n[teacher]\nepochs = 1\n",
     "outputs shape (3,) per sample"),
    ("[teacher]\nmodel = 'nosuchpkg.models:big'\n", "cannot import module 'nosuchpkg.models'"),
    ("[teacher]\ncheckpoint = 'gone.safetensors'\n", "gone.safetensors: file not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, recipe_text, fragment):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    r = edgekd("distill", recipe, "--out", out, "--device", "cpu", "--quiet", cwd=os.getcwd())
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "student.safetensors").exists()


def test_debug_env_shows_traceback(tmp_path):
    r = edgekd("distill", tmp_path / "none.toml", "--out", tmp_path / "o", env={"EDGEKD_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_recipe_and_bad_option(tmp_path):
    r = edgekd("distill", tmp_path / "none.toml", "--out", tmp_path / "o")
    assert r.returncode == 2 and "none.toml: file not found" in r.stderr
    r = edgekd("distill", "digits", "--out", tmp_path / "o", "--device", "tpu")
    assert r.returncode == 2 and "tpu" in r.stderr
