"""Kill a real training process mid-epoch, resume it, and get the same weights as an uninterrupted run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import edgekd

RECIPE = """
[data]
source = "digits"
[teacher]
model = "cnn:widths=8,16"
epochs = 1
batch_size = 128
[student]
model = "cnn:widths=8,16"
epochs = 3
batch_size = 16
checkpoint_every = 5
[distill]
baseline = false
"""


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    (folder / "recipe.toml").write_text(RECIPE)
    r = edgekd("teacher", folder / "recipe.toml", "--out", folder / "base", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return folder


def test_killed_run_resumes_to_identical_weights(teacher_run):
    recipe = teacher_run / "recipe.toml"
    full, killed = teacher_run / "full", teacher_run / "killed"
    shutil.copytree(teacher_run / "base", full)
    shutil.copytree(teacher_run / "base", killed)
    r = edgekd("distill", recipe, "--out", full, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr

    proc = subprocess.Popen([sys.executable, "-m", "edgekd", "distill", str(recipe), "--out", str(killed),
                             "--device", "cpu", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = killed / "checkpoints" / "student.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)   # let it run on past the checkpoint, mid-epoch
    assert proc.poll() is None, "training finished before it could be killed; make the test run longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "student.safetensors").exists()
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) != (0, 0)

    r = edgekd("distill", recipe, "--out", killed, "--device", "cpu", "--quiet", "--resume")
    assert r.returncode == 0, r.stderr
    a, b = load_file(full / "student.safetensors"), load_file(killed / "student.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert not ckpt.exists()   # a finished role leaves no checkpoint behind


def test_nan_loss_keeps_the_last_good_checkpoint(teacher_run, tmp_path):
    out = tmp_path / "nan"
    shutil.copytree(teacher_run / "base", out)
    (tmp_path / "r.toml").write_text(RECIPE.replace("checkpoint_every = 5", "checkpoint_every = 2\nlr = 1e6"))
    r = edgekd("distill", tmp_path / "r.toml", "--out", out, "--device", "cpu", "--quiet")
    assert r.returncode == 2 and "NaN" in r.stderr and "last good checkpoint" in r.stderr, r.stderr
    assert not (out / "student.safetensors").exists()
    ckpt = out / "checkpoints" / "student.ckpt"
    if ckpt.exists():   # the checkpoint left behind is a good one: finite weights
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_checkpoint_of_another_run_is_refused(teacher_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(teacher_run / "base", out)
    (out / "checkpoints").mkdir(exist_ok=True)
    torch.save({"fingerprint": "something else"}, out / "checkpoints" / "student.ckpt")
    r = edgekd("distill", teacher_run / "recipe.toml", "--out", out, "--device", "cpu", "--quiet", "--resume")
    assert r.returncode == 2 and "was written by a different run" in r.stderr
