"""edgekd label / distill --labels / cache-teacher / distill --cache through the real CLI."""

import json
import shutil

import numpy as np
import pytest

from tests.test_cli import edgekd


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dd")
    rng = np.random.default_rng(0)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    idx = rng.permutation(len(x))
    lab, pool, test = idx[:300], idx[300:1400], idx[1400:]
    np.savez(folder / "d.npz", x_train=x[lab], y_train=d.target[lab], x_test=x[test], y_test=d.target[test])
    np.savez(folder / "pool.npz", x=x[pool])
    (folder / "recipe.toml").write_text(
        '[data]\nsource = "d.npz"\nunlabeled = "pool.npz"\nval_fraction = 0.0\n'
        '[teacher]\nmodel = "cnn:widths=8,16"\nepochs = 30\nbatch_size = 32\n'
        '[student]\nmodel = "mlp:hidden=32"\nepochs = 6\n[distill]\nbaseline = false\n')
    r = edgekd("teacher", folder / "recipe.toml", "--out", folder / "run", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return folder


def test_label_then_distill_from_labels(run):
    out = run / "run" / "labels"
    r = edgekd("label", run / "recipe.toml", "--teacher", run / "run" / "teacher.safetensors", "--out", out,
               "--shard-size", "400", "--min-confidence", "0.5", "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 1100 and len(manifest["shards"]) == 3
    assert "wrote" in r.stdout
    # resuming a finished labelling redoes nothing and leaves the shards untouched
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    r = edgekd("label", run / "recipe.toml", "--teacher", run / "run" / "teacher.safetensors", "--out", out,
               "--shard-size", "400", "--quiet")
    assert r.returncode == 0 and before == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    student_dir = run / "from-labels"
    shutil.copytree(run / "run", student_dir)
    r = edgekd("distill", run / "recipe.toml", "--labels", out, "--out", student_dir, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((student_dir / "metrics.json").read_text())["student"]
    assert m["offline"]["source"] == "labels" and m["offline"]["samples"] == 1100 and m["offline"]["soft"]
    assert m["accuracy"] > 0.5   # learnt the task from the teacher's outputs alone


def test_cache_teacher_then_offline_kd(run):
    online, cached, augmented = run / "online", run / "cached", run / "augmented"
    for folder in (online, cached, augmented):
        shutil.copytree(run / "run", folder)
    r = edgekd("distill", run / "recipe.toml", "--out", online, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    # all 10 classes cached, no augmentation: offline KD reproduces online KD exactly
    r = edgekd("cache-teacher", run / "recipe.toml", "--out", cached, "--top-k", "10", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    r = edgekd("distill", run / "recipe.toml", "--cache", cached / "teacher-cache", "--out", cached, "--device",
               "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    m_online = json.loads((online / "metrics.json").read_text())["student"]
    m_cached = json.loads((cached / "metrics.json").read_text())["student"]
    assert m_cached["offline"]["source"] == "cache"
    assert abs(m_cached["accuracy"] - m_online["accuracy"]) < 0.01, (m_cached["accuracy"], m_online["accuracy"])
    # augmented views, one per epoch, regenerated from the seed at training time
    r = edgekd("cache-teacher", run / "recipe.toml", "--out", augmented, "--top-k", "5", "--epochs", "6",
               "--augment", "noise=0.05", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    r = edgekd("distill", run / "recipe.toml", "--cache", augmented / "teacher-cache", "--out", augmented,
               "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((augmented / "metrics.json").read_text())["student"]["accuracy"] > 0.4


def test_bad_data_distillation_input(run, tmp_path):
    r = edgekd("distill", run / "recipe.toml", "--labels", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    r = edgekd("label", run / "recipe.toml", "--teacher", "cmd:false", "--out", tmp_path / "l", "--quiet")
    assert r.returncode == 2 and "false" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = edgekd("distill", run / "recipe.toml", "--cache", tmp_path, "--out", tmp_path / "o")
    assert r.returncode == 2 and "no manifest.json" in r.stderr


def test_label_a_folder_pool_then_distill_from_it_streamed(tmp_path):
    """edgekd label --pool FOLDER (images read through the source's eval transform in DataLoader workers),
    then distill --labels: the pool is found again from the labels folder, as a lazy source, and checked
    against the manifest's key (its files and transform)."""
    import os

    from tests.test_streaming import _folder

    _folder(tmp_path / "imgs")
    _folder(tmp_path / "pool", per_class=12)
    (tmp_path / "r.toml").write_text('[data]\nsource = "imgs"\nnum_workers = 1\n'
                                     '[teacher]\nmodel = "cnn:widths=4"\nepochs = 3\nbatch_size = 8\n'
                                     '[student]\nmodel = "mlp:hidden=8"\nepochs = 2\nbatch_size = 8\n'
                                     '[distill]\nbaseline = false\n')
    run = tmp_path / "run"
    r = edgekd("teacher", tmp_path / "r.toml", "--out", run, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    r = edgekd("label", tmp_path / "r.toml", "--teacher", run / "teacher.safetensors", "--pool", tmp_path / "pool",
               "--out", run / "labels", "--shard-size", "10", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "labels" / "manifest.json").read_text())["samples"] == 24
    r = edgekd("distill", tmp_path / "r.toml", "--labels", run / "labels", "--out", run, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((run / "metrics.json").read_text())["student"]
    assert m["offline"]["source"] == "labels" and m["offline"]["samples"] == 24
    f = tmp_path / "pool" / "c0" / "3.png"   # a pool file changed since labelling: refused, naming the key
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    r = edgekd("distill", tmp_path / "r.toml", "--labels", run / "labels", "--out", run, "--device", "cpu", "--quiet")
    assert r.returncode == 2 and "were made for another pool" in r.stderr, r.stderr
