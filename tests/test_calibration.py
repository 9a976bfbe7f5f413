import numpy as np
import pytest

from edgekd import calibration
from edgekd.data import load_data
from edgekd.errors import EdgekdError
from edgekd.recipe import DataConfig


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig())


def test_manifest_round_trip_and_checksum(tmp_path, digits):
    m = calibration.write(tmp_path / "cal.toml", digits, source="digits", samples=32, seed=1)
    x, manifest = calibration.load(tmp_path / "cal.toml", digits.input_shape)
    assert x.shape == (32, 1, 8, 8) and manifest["sha256"] == m["sha256"] and manifest["seed"] == 1
    # drawn from training data, never the test split
    train_rows = {r.tobytes() for r in digits.x_train}
    assert all(r.tobytes() in train_rows for r in x)
    assert np.array_equal(x, calibration.draw(digits, 32, 1))
    with open(tmp_path / "cal.npz", "r+b") as f:   # tamper with the saved set
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(EdgekdError, match="cal.npz fails its sha256 check"):
        calibration.load(tmp_path / "cal.toml", digits.input_shape)


def test_calibration_set_of_the_wrong_shape_is_refused(tmp_path, digits):
    calibration.write(tmp_path / "cal.toml", digits, source="digits", samples=8, seed=0)
    with pytest.raises(EdgekdError, match=r"samples have shape \(1, 8, 8\), the model expects \(3, 8, 8\)"):
        calibration.load(tmp_path / "cal.toml", (3, 8, 8))
    with pytest.raises(EdgekdError, match="file not found"):
        calibration.load(tmp_path / "missing.toml", (1, 8, 8))


def test_shipped_digits_manifest_verifies():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "calibration" / "digits-256.toml"
    x, manifest = calibration.load(path, (1, 8, 8))
    assert len(x) == manifest["samples"] == 256
