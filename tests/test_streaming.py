"""Lazy sources and their DataLoader feed (edgekd.streaming), through real image files written here."""

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd.data import load_data
from edgekd.models import build_model
from edgekd.recipe import DataConfig, ModelConfig
from edgekd.train import fit


def _folder(root, per_class=20):
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 120, (8, 8, 3), dtype=np.uint8) + np.uint8(120 * c)
            Image.fromarray(px).save(root / f"c{c}" / f"{i}.png")
    return root


def record_decodes(monkeypatch, log):
    """Every image decode appends its process id to `log` (DataLoader workers are forked and inherit the
    patch); returns a function listing them."""
    import os

    import edgekd.streaming as st

    real = st.apply

    def apply(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)
    monkeypatch.setattr(st, "apply", apply)
    return lambda: [int(p) for p in log.read_text().split()] if log.exists() else []


class _Crash(Exception):
    pass


def _crash_at_call(module, n):
    """Raise _Crash on the module's n-th forward call (as a killed process would stop); never with n None."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] == n:
            raise _Crash
    module.register_forward_hook(hook)


def test_a_run_interrupted_mid_epoch_resumes_with_workers_to_the_same_weights(tmp_path):
    """Training from a streamed folder through a DataLoader worker, stopped in the middle of epoch 2 (the
    teacher raises, as a killed process would stop), resumed from the step checkpoint: same weights as a run
    that was never interrupted."""
    d = load_data(DataConfig(source=str(_folder(tmp_path / "imgs")), image_size=[8, 8], num_workers=1))
    cfg = ModelConfig(epochs=3, batch_size=4, checkpoint_every=3, lr=1e-2)

    def run(ckpt, crash_at=None, resume=False):
        torch.manual_seed(0)
        student = build_model("cnn:widths=4", d.input_shape, d.num_classes)
        teacher = build_model("cnn:widths=6", d.input_shape, d.num_classes)
        _crash_at_call(teacher, crash_at)
        from edgekd.objective import Objective, ObjectiveConfig

        fit(student, d.x_train, d.y_train, cfg, device=torch.device("cpu"), desc="s", progress=False,
            objective=Objective(ObjectiveConfig(4.0, 0.9), teacher=teacher), checkpoint=ckpt, resume=resume)
        return torch.cat([p.detach().flatten() for p in student.parameters()])

    full = run(tmp_path / "full.ckpt")
    steps = -(-len(d.x_train) // cfg.batch_size)
    with pytest.raises(_Crash):
        run(tmp_path / "cut.ckpt", crash_at=steps + 5)   # epoch 2, step 5: after the step-3 checkpoint
    state = torch.load(tmp_path / "cut.ckpt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 3)
    assert torch.equal(run(tmp_path / "cut.ckpt", resume=True), full)


def test_feed_batches_follow_the_chunks_and_errors_in_workers_are_one_line(tmp_path):
    from edgekd.errors import EdgekdError
    from edgekd.streaming import Feed

    root = _folder(tmp_path / "imgs", per_class=4)
    d = load_data(DataConfig(source=str(root), num_workers=2, test_fraction=0.0, val_fraction=0.0))
    chunks = [np.array([5, 0, 2]), np.array([7]), np.array([1, 3])]
    feed = Feed(d.x_train)
    for _ in range(2):   # persistent workers serve a second epoch with other chunks
        got = list(feed(chunks))
        for c, b in zip(chunks, got, strict=True):
            np.testing.assert_array_equal(b.numpy(), d.x_train[c])
        chunks = chunks[::-1]
    (root / "c1" / "2.png").write_bytes(b"\x89PNG broken after indexing")
    with pytest.raises(EdgekdError, match=r"^image .*c1/2.png: not a readable image") as e:
        list(Feed(d.x_train)([np.arange(8)]))
    assert "\n" not in str(e.value)


def test_the_folder_scan_runs_in_workers_and_keeps_file_order(tmp_path):
    from edgekd.preprocess import PreprocessSpec
    from edgekd.streaming import check_files

    files = []
    for i in range(600):
        f = tmp_path / f"{i:03d}.png"
        Image.fromarray(np.full((4 + i % 3, 5, 3), i % 255, np.uint8)).save(f)
        files.append(str(f))
    (tmp_path / "007.png").write_bytes(b"")
    got = check_files(files, PreprocessSpec(), 10**6, decode=True, workers=2)
    assert got == check_files(files, PreprocessSpec(), 10**6, decode=True, workers=0)
    assert got[7].endswith("007.png: empty file (0 bytes)") and got[8] == (6, 5) and got[9] == (4, 5)


class DigitStream(torch.utils.data.IterableDataset):
    """digits as an IterableDataset of (uint8 image, label): no index, optionally no len()."""

    def __init__(self, part, sized=True, extra=0):
        from sklearn.datasets import load_digits

        d = load_digits()
        cut = {"train": slice(0, 300), "val": slice(300, 360), "test": slice(360, 460)}[part]
        self.x, self.y = (d.images[cut] * 15).astype(np.uint8), d.target[cut]
        self.sized, self.extra = sized, extra

    def __iter__(self):
        for i in range(len(self.x) + self.extra):
            yield torch.from_numpy(self.x[i % len(self.x)]), int(self.y[i % len(self.y)])

    def __len__(self):
        if not self.sized:
            raise TypeError("no len")
        return len(self.x)


def stream_splits():
    return DigitStream("train", sized=False), DigitStream("val"), DigitStream("test")


def stream_pair():
    return DigitStream("train"), DigitStream("test")


def lying_stream():
    s = DigitStream("train")
    s.__len__ = None
    return s, DigitStream("test", extra=3)


def _stream_data(**kw):
    return load_data(DataConfig(source="tests.test_streaming:stream_splits", num_workers=2, **kw))


def test_an_iterable_source_is_counted_once_and_read_in_order_never_materialized():
    from edgekd.streaming import LazyStream

    d = _stream_data()
    raw = DigitStream("train")
    assert isinstance(d.x_train, LazyStream) and (len(d.x_train), len(d.x_val), len(d.x_test)) == (300, 60, 100)
    np.testing.assert_array_equal(d.y_train, raw.y)   # labels from the counting pass (no len(): counted)
    x = raw.x.astype(np.float32)[:, None] / 255
    np.testing.assert_allclose(d.mean + d.std, (x.mean(), x.std() + 1e-6), rtol=1e-5)   # over every input
    np.testing.assert_allclose(d.x_train[[4, 1]], (x[[4, 1]] - d.mean[0]) / d.std[0], atol=1e-5)
    assert d.report["statistics"].startswith("computed over all 300 training inputs")
    with pytest.raises(Exception, match="cannot be split or subset by index"):
        d.x_train.take([0, 1])


def test_workers_and_ranks_split_a_stream_into_its_blocks_in_order():
    from edgekd.distributed import StreamBlocks
    from edgekd.streaming import Feed, stream_order

    d = _stream_data()
    x = d.x_train
    order = stream_order(x, 32, 0, 1)
    assert order.tolist() == list(range(300))
    got = list(Feed(x, batch_size=32)([order[i:i + 32] for i in range(0, 300, 32)], torch.from_numpy(d.y_train)))
    np.testing.assert_allclose(torch.cat([b for b, _ in got]).numpy(), x[:], atol=1e-6)
    np.testing.assert_array_equal(torch.cat([y for _, y in got]).numpy(), d.y_train)
    # three DDP ranks: 10 blocks (the last of 12) dealt 0,3,6,9 | 1,4,7 | 2,5,8, disjoint and covering the
    # stream; the ranks without block 9 repeat their first block, so every rank takes 4 steps
    ranks = [stream_order(x, 32, r, 3).tolist() for r in range(3)]
    assert [len(r) for r in ranks] == [108, 128, 128]
    assert sorted(set().union(*ranks)) == list(range(300)) and ranks[1][96:] == list(range(32, 64))
    loader = torch.utils.data.DataLoader(StreamBlocks(x, 32, 1, 3), batch_size=None, num_workers=2)   # rank 1
    assert [(s, len(b)) for s, b, _ in loader] == [(32, 32), (128, 32), (224, 32)]


def test_fit_trains_on_an_iterable_source_and_evaluates_it_streamed():
    from edgekd.models import build_model
    from edgekd.train import accuracy, predict_logits

    d = _stream_data()
    model = build_model("mlp:hidden=16", d.input_shape, d.num_classes)
    history = fit(model, d.x_train, d.y_train, ModelConfig(epochs=3, batch_size=32, lr=1e-2),
                  device=torch.device("cpu"), desc="s", progress=False, x_val=d.x_val, y_val=d.y_val)
    assert len(history) == 3 and history[-1]["train_accuracy"] > 0.5
    arrays = np.stack([d.x_test[i] for i in range(len(d.x_test))])
    assert accuracy(model, d.x_test, d.y_test) == float((predict_logits(model, arrays).argmax(1) == d.y_test).mean())
    assert history[-1]["val_accuracy"] == accuracy(model, d.x_val, d.y_val)


def test_a_stream_resumes_mid_epoch_to_the_same_weights(tmp_path):
    """The stream cannot seek: a resumed epoch reads and drops the batches before the checkpoint's step."""
    d = _stream_data()
    cfg = ModelConfig(epochs=2, batch_size=32, checkpoint_every=4, lr=1e-2)

    def run(ckpt, crash_at=None, resume=False):
        torch.manual_seed(0)
        model = build_model("mlp:hidden=8", d.input_shape, d.num_classes)
        _crash_at_call(model, crash_at)
        fit(model, d.x_train, d.y_train, cfg, device=torch.device("cpu"), desc="s", progress=False,
            checkpoint=ckpt, resume=resume)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    full = run(tmp_path / "full.ckpt")
    with pytest.raises(_Crash):
        run(tmp_path / "cut.ckpt", crash_at=10 + 6)   # epoch 2, step 6: after the step-4 checkpoint
    assert torch.equal(run(tmp_path / "cut.ckpt", resume=True), full)


def test_what_an_iterable_source_cannot_do_is_refused_naming_the_key():
    from edgekd.errors import EdgekdError

    for kw, key in (({}, "val_fraction"), ({"val_fraction": 0.0, "train_samples": 50}, "train_samples"),
                    ({"val_fraction": 0.0, "labelled": 20}, "labelled")):
        with pytest.raises(EdgekdError, match=rf"\[data\] {key} needs samples by index, which an IterableDataset"):
            load_data(DataConfig(source="tests.test_streaming:stream_pair", num_workers=0, **kw))
    d = load_data(DataConfig(source="tests.test_streaming:stream_pair", num_workers=0, val_fraction=0.0))
    assert len(d.x_val) == 0 and len(d.x_train) == 300
    d.x_train.base.extra = 5   # the stream grew since the counting pass
    model = build_model("mlp:hidden=4", d.input_shape, d.num_classes)
    with pytest.raises(EdgekdError, match=r"gave 49 samples from 256 where 44 were expected; the counting pass"):
        fit(model, d.x_train, d.y_train, ModelConfig(epochs=1, batch_size=64), device=torch.device("cpu"),
            desc="s", progress=False)
    with pytest.raises(EdgekdError, match=r"len\(\) says 100 samples, one pass over the stream gave 103"):
        load_data(DataConfig(source="tests.test_streaming:lying_stream", num_workers=0, val_fraction=0.0))


def test_distill_runs_on_an_iterable_source_and_the_teacher_cache_refuses_it(tmp_path):
    from edgekd.cache import build_cache
    from edgekd.distillation import distill
    from edgekd.errors import EdgekdError
    from edgekd.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text("""
[data]
source = "tests.test_streaming:stream_splits"
num_workers = 1
[teacher]
model = "mlp:hidden=32"
epochs = 15
batch_size = 32
[student]
model = "mlp:hidden=8"
epochs = 15
batch_size = 32
""")
    metrics = distill(load_recipe(recipe), tmp_path / "run", device="cpu", progress=False)
    assert metrics["teacher"]["test_samples"] == 100 and metrics["teacher"]["accuracy"] > 0.6
    assert metrics["student"]["accuracy"] > 0.3 and metrics["scratch"]["accuracy"] > 0.3
    assert metrics["data"]["streamed"] is True
    d = _stream_data()
    with pytest.raises(EdgekdError, match=r"teacher cache: a DigitStream \(IterableDataset\) source has no sample"):
        build_cache(lambda x: x, d.x_train, tmp_path / "c", top_k=2, epochs=1, augment=None, seed=0)


def test_two_ddp_ranks_train_on_an_iterable_source_in_step_and_each_evaluates_all_of_it(tmp_path):
    """torchrun, 2 CPU processes: 5 blocks of 64, each rank reads its own (rank 1 repeats its first), the ranks
    take the same steps (no hang, replicas identical) and the test split is scored whole."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "r.toml").write_text('[data]\nsource = "tests.test_streaming:stream_splits"\nnum_workers = 1\n'
                                     '[teacher]\nmodel = "mlp:hidden=32"\nepochs = 20\nbatch_size = 64\n'
                                     '[student]\nmodel = "mlp:hidden=8"\n')
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = subprocess.run([*torchrun, "-m", "edgekd", "teacher", str(tmp_path / "r.toml"), "--out", str(tmp_path / "t"),
                        "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())["teacher"]
    assert m["world_size"] == 2 and m["max_param_divergence"] == 0.0
    assert m["test_samples"] == 100 and m["accuracy"] > 0.5
