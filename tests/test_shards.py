import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd import streaming
from edgekd.data import load_data
from edgekd.errors import EdgekdError
from edgekd.recipe import DataConfig
from edgekd.shards import LazyShards, write_shards
from tests.test_cli import edgekd

pytest.importorskip("webdataset")   # the optional extra edgekd[shards]
pytest.importorskip("wids")


def _folder(root, splits=("train", "test"), classes=("cat", "dog", "eel"), per_class=5, size=(12, 10)):
    """Real PNG and JPEG files; every image is one grey level (a running number), so a read-back input names
    the file it came from."""
    k = 0
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                k += 1
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(np.full(size, k, np.uint8)).save(root / split / name / f"{i}{suffix}", quality=100)
    return root


def test_shards_hold_the_folder_and_stream_exactly_as_the_image_folder(tmp_path):
    import webdataset
    import wids

    _folder(tmp_path / "imgs", splits=("train", "val", "test"))
    s = write_shards(tmp_path / "imgs", tmp_path / "sh", shard_size=4, workers=0)
    assert s["classes"] == ["cat", "dog", "eel"]
    assert s["splits"] == {n: {"samples": 15, "shards": 4} for n in ("train", "val", "test")}
    assert sorted(p.name for p in (tmp_path / "sh").iterdir())[:5] == [
        "test-000000.tar", "test-000001.tar", "test-000002.tar", "test-000003.tar", "test.json"]
    cfg = dict(resize=8, crop=[6, 6], grayscale=True, mean=[0.5], std=[0.25], num_workers=0)
    d = load_data(DataConfig(source="sh", **cfg), tmp_path)
    ref = load_data(DataConfig(source="imgs", **cfg), tmp_path)
    assert isinstance(d.x_train, LazyShards) and d.class_names == ref.class_names
    assert d.report["source"] == "webdataset shards" and d.report["layout"] == "train/val/test"
    for split in ("train", "val", "test"):
        x, x_ref = getattr(d, f"x_{split}"), getattr(ref, f"x_{split}")
        assert np.array_equal(getattr(d, f"y_{split}"), getattr(ref, f"y_{split}"))
        assert np.array_equal(np.asarray(x), np.asarray(x_ref))   # the same bytes through the same transform
    assert d.preprocess == ref.preprocess
    # the format is WebDataset's and wids', not ours: both libraries read the shards as written
    ds = wids.ShardListDataset(str(tmp_path / "sh" / "train.json"), cache_dir=str(tmp_path / "wcache"),
                               transformations=[])
    assert len(ds) == 15 and ds[7][".cls"].read() == str(d.y_train[7]).encode()
    labels = [int(smp["cls"]) for smp in webdataset.WebDataset(str(tmp_path / "sh" / "train-{000000..000003}.tar"),
                                                               shardshuffle=False)]
    assert labels == d.y_train.tolist()


def test_a_shard_pool_is_carved_by_the_same_stratified_split_as_the_folder(tmp_path):
    _folder(tmp_path / "imgs", splits=("pool",), per_class=8)
    write_shards(tmp_path / "imgs" / "pool", tmp_path / "sh", shard_size=5, workers=0)
    assert json.loads((tmp_path / "sh" / "all.json").read_text())["edgekd"]["class_names"] == ["cat", "dog", "eel"]
    cfg = dict(test_fraction=0.25, val_fraction=0.2, normalize=False, num_workers=0, seed=4)
    d = load_data(DataConfig(source="sh", **cfg), tmp_path)
    ref = load_data(DataConfig(source="imgs/pool", **cfg), tmp_path)
    for split in ("train", "val", "test"):
        assert np.array_equal(np.asarray(getattr(d, f"x_{split}")), np.asarray(getattr(ref, f"x_{split}")))
    # a descriptor file is a source too
    one = load_data(DataConfig(source="sh/all.json", **cfg), tmp_path)
    assert np.array_equal(one.y_test, ref.y_test)


def test_ranks_and_workers_read_each_sample_once_per_epoch(tmp_path):
    """fit's data split: DistributedSampler over the sample indices per rank, batches of those indices to
    DataLoader workers (each opening its own memory-mapped shards)."""
    from torch.utils.data.distributed import DistributedSampler

    _folder(tmp_path / "imgs", splits=("pool",), per_class=7)
    write_shards(tmp_path / "imgs" / "pool", tmp_path / "sh", shard_size=4, workers=0)
    d = load_data(DataConfig(source="sh", test_fraction=0.0, val_fraction=0.0, normalize=False, num_workers=2,
                             grayscale=True), tmp_path)
    x = d.x_train
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(range(len(x)), num_replicas=2, rank=rank, shuffle=True, seed=1)
        sampler.set_epoch(3)
        order = torch.tensor(list(sampler))
        chunks = [order[i:i + 3] for i in range(0, len(order), 3)]
        for xb in streaming.Feed(x)(chunks):
            seen += (xb[:, 0, 0, 0] * 255).round().int().tolist()
    # 21 images on 2 ranks: every grey level is read, and only DistributedSampler's padding repeats one (it
    # tops the ranks up to equal length, 11 each, so DDP ranks step in lock-step)
    assert sorted(set(seen)) == list(range(1, 22)) and len(seen) == 22


def _pickle_bomb(marker):
    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    return pickle.dumps(Bomb())


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, __import__("io").BytesIO(data))


def _descriptor(folder, shardlist, name="all"):
    (folder / f"{name}.json").write_text(json.dumps({"wids_version": 1, "shardlist": shardlist,
                                                    "edgekd": {"class_names": ["a", "b"]}}))


def test_pickles_in_a_shard_are_never_decoded(tmp_path):
    import io

    marker = tmp_path / "pwned"
    png = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(png, format="PNG")
    folder = tmp_path / "sh"
    folder.mkdir()
    bomb = _pickle_bomb(marker)
    members = []
    for k in range(4):
        members += [(f"{k:03d}.png", png.getvalue()), (f"{k:03d}.cls", str(k % 2).encode()),
                    (f"{k:03d}.pyd", bomb), (f"{k:03d}.pth", bomb)]
    _tar(folder / "s0.tar", members)
    _tar(folder / "s1.tar", [("100.pyd", bomb), ("100.cls", b"1"), ("101.png", png.getvalue()),
                             ("101.pkl", bomb), ("101.cls", b"0")])
    _descriptor(folder, [{"url": "s0.tar", "nsamples": 4}, {"url": "s1.tar", "nsamples": 2}])
    cfg = DataConfig(source="sh", test_fraction=0.0, val_fraction=0.0, normalize=False, num_workers=0)
    d = load_data(cfg, tmp_path)
    assert d.y_train.tolist() == [0, 1, 0, 1, 1, 0] and not marker.exists()
    assert np.allclose(np.asarray(d.x_train[[0, 1, 2, 3, 5]]), 9 / 255)
    with pytest.raises(EdgekdError, match=r"s1.tar:100: sample has no image member .* never decoded"):
        d.x_train[4]
    assert not marker.exists()


def test_oversized_members_are_refused_before_they_are_read(tmp_path, monkeypatch):
    from edgekd import shards

    folder = tmp_path / "sh"
    folder.mkdir()
    png = __import__("io").BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
    _tar(folder / "s0.tar", [("0.png", png.getvalue()), ("0.cls", b"0" * 40), ("1.png", png.getvalue()),
                             ("1.cls", b"1")])
    _descriptor(folder, [{"url": "s0.tar", "nsamples": 2}])
    x = LazyShards([(str(folder / "s0.tar"), 2)], shards.PreprocessSpec(mode="L"), (1, 4, 4))
    with pytest.raises(EdgekdError, match=r"s0.tar:0: .cls member of 40 bytes; expected a class index"):
        x.label(0)
    assert x.label(1) == 1 and x.read(1).shape == (1, 4, 4)
    _tar(folder / "s1.tar", [("7.png", b"not an image"), ("7.cls", b"1")])   # a corrupt member names its sample
    with pytest.raises(EdgekdError, match=r"^image .*s1.tar:7: not a readable image"):
        LazyShards([(str(folder / "s1.tar"), 1)], shards.PreprocessSpec(mode="L"), (1, 4, 4)).read(0)
    monkeypatch.setattr(shards, "MAX_IMAGE_BYTES", 16)
    with pytest.raises(EdgekdError, match=r"s0.tar:1: .png member of \d+ bytes, more than 16; refused"):
        x.read(1)
    (folder / "all.json").write_bytes(b"{" + b" " * 64 + b"}")
    monkeypatch.setattr(shards, "MAX_INDEX_BYTES", 32)
    with pytest.raises(EdgekdError, match=r"all.json: descriptor larger than 32 bytes; refused"):
        load_data(DataConfig(source="sh"), tmp_path)


@pytest.mark.parametrize("url", ["../outside.tar", "pipe:touch {marker}", "/etc/passwd", "sub/s0.tar",
                                 "http://example.com/s0.tar"])
def test_a_descriptor_names_only_files_in_its_own_folder(tmp_path, url):
    marker = tmp_path / "ran"
    (tmp_path / "sh" / "sub").mkdir(parents=True)
    _tar(tmp_path / "outside.tar", [("0.cls", b"0")])
    _tar(tmp_path / "sh" / "sub" / "s0.tar", [("0.cls", b"0")])
    _descriptor(tmp_path / "sh", [{"url": url.format(marker=marker), "nsamples": 1}])
    with pytest.raises(EdgekdError, match="is not a file name in .*no URLs, paths or pipe: commands"):
        load_data(DataConfig(source="sh"), tmp_path)
    assert not marker.exists()


def test_a_rewritten_or_miscounted_shard_is_refused_and_changes_the_fingerprint(tmp_path):
    _folder(tmp_path / "imgs", splits=("pool",), per_class=4)
    write_shards(tmp_path / "imgs" / "pool", tmp_path / "sh", shard_size=20, workers=0)
    cfg = DataConfig(source="sh", normalize=False, num_workers=0, test_fraction=0.25)
    before = streaming.fingerprint(load_data(cfg, tmp_path).x_train)
    desc = json.loads((tmp_path / "sh" / "all.json").read_text())
    desc["shardlist"][0]["nsamples"] = 13
    (tmp_path / "sh" / "all.json").write_text(json.dumps(desc))
    with pytest.raises(EdgekdError, match="all-000000.tar: holds 12 samples, its descriptor says 13"):
        load_data(cfg, tmp_path)
    desc["shardlist"][0]["nsamples"] = 12
    (tmp_path / "sh" / "all.json").write_text(json.dumps(desc))
    shard = tmp_path / "sh" / "all-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert streaming.fingerprint(load_data(cfg, tmp_path).x_train) != before
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(EdgekdError, match="all-000000.tar' has .* bytes, the descriptor says"):
        load_data(cfg, tmp_path)


def test_bad_images_are_refused_when_writing_and_nothing_looks_valid(tmp_path):
    _folder(tmp_path / "imgs", splits=("pool",), per_class=3)
    (tmp_path / "imgs" / "pool" / "dog" / "9.png").write_bytes(b"not a png")
    with pytest.raises(EdgekdError, match=r"dog/9.png: not a readable image"):
        write_shards(tmp_path / "imgs" / "pool", tmp_path / "sh", workers=0)
    assert not (tmp_path / "sh").exists() or not list((tmp_path / "sh").glob("*.json"))
    (tmp_path / "imgs" / "pool" / "dog" / "9.png").unlink()
    write_shards(tmp_path / "imgs" / "pool", tmp_path / "sh", workers=0)
    with pytest.raises(EdgekdError, match="skip_bad_images applies to image folders"):
        load_data(DataConfig(source="sh", skip_bad_images=True), tmp_path)


def test_cli_writes_shards_that_train_a_teacher(tmp_path):
    _folder(tmp_path / "imgs", per_class=6, size=(8, 8))
    r = edgekd("shards", tmp_path / "imgs", "--out", tmp_path / "sh", "--shard-size", "7")
    assert r.returncode == 0, r.stderr
    assert "3 classes; train: 18 samples in 3 shard(s), test: 18 samples in 3 shard(s)" in r.stdout
    (tmp_path / "r.toml").write_text('[data]\nsource = "sh"\nnum_workers = 1\ngrayscale = true\n'
                                     '[teacher]\nmodel = "cnn:widths=4,8"\nepochs = 1\nbatch_size = 8\n')
    r = edgekd("teacher", tmp_path / "r.toml", "--out", tmp_path / "run", "--device", "cpu", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "teacher.safetensors").is_file()
    r = edgekd("shards", tmp_path / "nope", "--out", tmp_path / "sh2")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: shards: ")


def test_torchrun_ranks_train_in_step_on_shards_with_workers(tmp_path):
    """2 DDP processes (gloo), each with a DataLoader worker reading its DistributedSampler's samples from the
    shards, with per-batch resized crops: the run ends with identical replicas."""
    import subprocess
    import sys

    _folder(tmp_path / "imgs", per_class=6, size=(8, 8))
    write_shards(tmp_path / "imgs", tmp_path / "sh", shard_size=5, workers=0)
    (tmp_path / "r.toml").write_text('[data]\nsource = "sh"\nnum_workers = 1\ngrayscale = true\n'
                                     '[teacher]\nmodel = "cnn:widths=4,8"\nepochs = 2\nbatch_size = 4\n'
                                     '[augment]\nresized_crop = [0.5, 1.0]\n')
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*torchrun, "-m", "edgekd", "teacher", "r.toml", "--out", "run", "--device", "cpu", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["teacher"]
    assert m["world_size"] == 2 and m["max_param_divergence"] == 0.0
