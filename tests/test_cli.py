import json
import os
import subprocess
import sys


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


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    """One representative case; tests/test_bad_inputs.py holds the corpus."""
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[data]\nsorce = 'digits'\n")
    r = edgekd("distill", recipe, "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown key 'sorce'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_debug_env_shows_traceback(tmp_path):
    r = edgekd("distill", tmp_path / "none.toml", "--out", tmp_path / "o", env={"EDGEKD_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_recipe_and_bad_option(tmp_path):
    r = edgekd("distill", tmp_path / "none.toml", "--out", tmp_path / "o")
    assert r.returncode == 2 and "none.toml: file not found" in r.stderr
    r = edgekd("distill", "digits", "--out", tmp_path / "o", "--device", "tpu")
    assert r.returncode == 2 and "tpu" in r.stderr


def test_embedding_recipe_through_every_stage_command(tmp_path, embedding_recipe):
    """teacher, distill, export, quantize, build, profile and report on an [embedding] recipe, as on a classifier
    (a tiny encoder teacher from tests/tinytext.py: no download, no transformers)."""
    out = tmp_path / "run"
    r = edgekd("teacher", embedding_recipe, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "224 sentences embedded" in r.stdout and (out / "teacher-embeddings.npz").is_file()
    r = edgekd("distill", embedding_recipe, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| student (distilled) |" in r.stdout and (out / "student.safetensors").is_file()
    for model in ("student", "teacher"):
        r = edgekd("export", out, "--model", model)
        assert r.returncode == 0, r.stderr
        assert f"onnx/{model}.onnx" in r.stdout and "min cosine 1.0000" in r.stdout
    r = edgekd("build", out, "--target", "x86-cpu-ort")
    assert r.returncode == 0, r.stderr
    assert "built teacher fp32" in r.stdout and "skipped student int8: no quantized student" in r.stdout
    r = edgekd("quantize", out, "--target", "x86-cpu-ort", "--quiet")
    assert r.returncode == 0, r.stderr
    r = edgekd("build", out, "--target", "x86-cpu-ort")
    assert r.returncode == 0, r.stderr
    assert "built student int8 (ptq" in r.stdout
    manifest = json.loads((out / "engines" / "x86-cpu-ort" / "student-int8-ptq" / "manifest.json").read_text())
    assert manifest["task"] == "embedding" and manifest["input"]["shape"] == ["batch", "seq"]
    assert manifest["metrics"]["test"]["sentences"] == 24
    r = edgekd("profile", out, "--target", "x86-cpu-ort", "--quick")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| x86-cpu-ort |") == 6 and "reproduces the teacher's embeddings" in r.stdout
    (out / "report.md").unlink()
    r = edgekd("report", out)
    assert r.returncode == 0, r.stderr
    assert "# edgekd report: sentence-embedding distillation" in r.stdout and (out / "report.md").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["task"] == "embedding" and len(rep["engines"]) == 3 and len(rep["latency_ratios"]) == 4
