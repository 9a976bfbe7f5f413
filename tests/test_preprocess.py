"""The eval preprocessing spec and the safe image opener, on real image files written here."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgekd.errors import EdgekdError
from edgekd.preprocess import PreprocessSpec, apply, open_image


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_spec_round_trips_and_resolves_named_statistics():
    spec = PreprocessSpec(resize=256, crop=[224, 224], mean="imagenet", std="imagenet")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    d = spec.to_dict()
    assert d == {"mode": "RGB", "resize": 256, "crop": [224, 224], "scale": 1 / 255,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "version": 1}
    assert PreprocessSpec.from_dict(d) == spec
    assert PreprocessSpec.from_dict({"mode": "L", "resize": [8, 6]}).resize == (8, 6)


@pytest.mark.parametrize(("d", "message"), [
    ({"colour": "RGB"}, "unknown key(s) colour"),
    ({"mode": "CMYK"}, "preprocessing.mode: 'CMYK'"),
    ({"resize": [0, 4]}, "preprocessing.resize"),
    ({"crop": 224}, "preprocessing.crop: 224; expected [height, width]"),
    ({"mean": "cifar"}, "unknown statistics 'cifar'"),
    ({"mean": [0.1, 0.2]}, "expected 1 or 3 finite values"),
    ({"std": [0.0]}, "must be positive"),
    ({"version": 2}, "spec version 2 is not supported"),
])
def test_bad_spec_keys_are_one_line_errors(d, message):
    with pytest.raises(EdgekdError, match="^preprocessing") as e:
        PreprocessSpec.from_dict(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_apply_resizes_shorter_side_crops_centre_and_normalizes(tmp_path):
    px = _rgb(40, 60)
    Image.fromarray(px).save(tmp_path / "a.png")
    spec = PreprocessSpec(resize=20, crop=[16, 16], mean=[0.5], std=[0.25])
    x = apply(spec, tmp_path / "a.png")
    assert x.dtype == np.float32 and x.shape == (3, 16, 16) and x.flags.c_contiguous
    # the same steps by hand with Pillow: shorter side 40 -> 20, so 60 -> 30; centre crop at (2, 7)
    ref = np.asarray(Image.fromarray(px).resize((30, 20), Image.BILINEAR), np.float32)[2:18, 7:23] / 255
    np.testing.assert_allclose(x, (ref.transpose(2, 0, 1) - 0.5) / 0.25, atol=1e-5)
    # the same result from bytes, a PIL image and a uint8 array
    raw = (tmp_path / "a.png").read_bytes()
    for source in (raw, Image.fromarray(px), px, str(tmp_path / "a.png")):
        np.testing.assert_array_equal(apply(spec, source), x)
    assert spec.output_size(40, 60) == (16, 16)
    assert PreprocessSpec(resize=[12, 10]).output_size(40, 60) == (12, 10)


def test_modes_follow_the_documented_rule(tmp_path):
    px = _rgb(8, 8)
    grey = apply(PreprocessSpec(mode="L"), Image.fromarray(px))
    assert grey.shape == (1, 8, 8)
    rgba = np.dstack([px, np.zeros((8, 8), np.uint8)])      # alpha dropped, not composited
    np.testing.assert_array_equal(apply(PreprocessSpec(), rgba), apply(PreprocessSpec(), px))
    Image.fromarray(px).convert("P").save(tmp_path / "p.png")
    Image.fromarray(px).convert("CMYK").save(tmp_path / "c.jpg")
    assert apply(PreprocessSpec(), tmp_path / "p.png").shape == (3, 8, 8)
    assert apply(PreprocessSpec(), tmp_path / "c.jpg").shape == (3, 8, 8)
    Image.fromarray((np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)).save(tmp_path / "deep.png")
    with pytest.raises(EdgekdError, match=r"deep.png: mode I.* not supported"):
        apply(PreprocessSpec(), tmp_path / "deep.png")


def test_bad_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(EdgekdError, match=r"empty.png: empty file \(0 bytes\)"):
        open_image(tmp_path / "empty.png")
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(EdgekdError, match=r"cut.jpg: not a readable image .*truncated"):
        open_image(tmp_path / "cut.jpg")
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    with pytest.raises(EdgekdError, match=r"text.png: not a readable image"):
        open_image(tmp_path / "text.png")
    with pytest.raises(EdgekdError, match=r"missing.png: cannot open"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(EdgekdError, match="image bytes: empty"):
        open_image(b"")
    with pytest.raises(EdgekdError, match="expected uint8"):
        open_image(np.zeros((4, 4, 3), np.float32))


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    Image.fromarray(_rgb(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(EdgekdError, match=r"big.png: 100x100 is 10000 pixels, more than the limit of 9999"):
        open_image(tmp_path / "big.png", max_pixels=9999)
    # Pillow's own decompression-bomb check, lowered for the test, becomes the same kind of one-line error
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 5000
    try:
        with pytest.raises(EdgekdError, match=r"big.png: larger than Pillow's decompression-bomb limit"):
            open_image(tmp_path / "big.png")
    finally:
        Image.MAX_IMAGE_PIXELS = old


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(EdgekdError, match=r"x.png: not a regular file"):
        open_image(tmp_path / "x.png")


def test_crop_larger_than_the_image_is_refused(tmp_path):
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "small.png")
    with pytest.raises(EdgekdError, match=r"small.png: 8x8 after resizing is smaller than the crop"):
        apply(PreprocessSpec(crop=[16, 16]), tmp_path / "small.png")


def test_preprocess_imports_without_torch():
    code = ("import sys, edgekd.preprocess, numpy as np; "
            "edgekd.preprocess.apply(edgekd.preprocess.PreprocessSpec(), np.zeros((4, 4, 3), np.uint8)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_probe_reads_the_size_from_the_header_with_the_same_checks(tmp_path):
    from edgekd.preprocess import probe_image

    Image.fromarray(_rgb(30, 40)).save(tmp_path / "a.jpg")
    assert probe_image(tmp_path / "a.jpg") == (30, 40)
    with pytest.raises(EdgekdError, match=r"a.jpg: 40x30 is 1200 pixels, more than the limit of 1000"):
        probe_image(tmp_path / "a.jpg", max_pixels=1000)
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(EdgekdError, match=r"e.png: empty file"):
        probe_image(tmp_path / "e.png")
