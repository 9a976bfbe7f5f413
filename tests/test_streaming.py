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


class _Crash(Exception):
    pass


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
        calls = [0]

        def hook(*_):
            calls[0] += 1
            if calls[0] == crash_at:
                raise _Crash
        teacher.register_forward_hook(hook)
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
