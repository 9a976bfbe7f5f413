"""[data] train_samples / test_samples: exact, stratified, seeded subsets taken before the validation split."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.data import load_data
from edgekd.errors import EdgekdError
from edgekd.recipe import DataConfig, recipe_from_dict


def test_subsets_are_exact_stratified_and_seeded() -> None:
    full = load_data(DataConfig(source="digits", test_fraction=0.25, val_fraction=0.0))
    cfg = DataConfig(source="digits", test_fraction=0.25, val_fraction=0.1, train_samples=500, test_samples=200)
    data = load_data(cfg)
    assert len(data.y_train) + len(data.y_val) == 500 and len(data.y_test) == 200
    share = np.bincount(data.y_test, minlength=10) / 200
    assert np.abs(share - np.bincount(full.y_test, minlength=10) / len(full.y_test)).max() < 0.01
    again = load_data(cfg)
    assert np.array_equal(again.x_train, data.x_train) and np.array_equal(again.y_test, data.y_test)
    # the subset is drawn from the split's own samples
    raw = DataConfig(source="digits", test_fraction=0.25, val_fraction=0.0, normalize=False)
    rows = {r.tobytes() for r in load_data(raw).x_test}
    sub = load_data(DataConfig(**{**raw.__dict__, "test_samples": 50})).x_test
    assert len(sub) == 50 and all(r.tobytes() in rows for r in sub)
    # asking for more than there is keeps everything
    big = load_data(DataConfig(source="digits", test_fraction=0.25, val_fraction=0.0, test_samples=10**6))
    assert len(big.y_test) == len(full.y_test)


def test_subset_sizes_must_be_positive() -> None:
    with pytest.raises(EdgekdError, match=r"\[data\].train_samples: must be >= 1"):
        recipe_from_dict({"data": {"train_samples": 0}})
