"""Calibration sets for post-training quantization: small manifests in calibration/ that pin the data.

A manifest (TOML) records the data source, split, sample count, seed, the .npz beside it and its sha256,
so a PTQ result can be reproduced and a changed file is caught. The .npz holds `x`, already normalized
as the model sees it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tomllib

from edgekd import fileio
from edgekd.data import Dataset
from edgekd.errors import EdgekdError

MAX_BYTES = 4 << 30   # a calibration set is a few hundred inputs; 4 GiB holds 5,000 at 3x224x224 float32


def draw(data: Dataset, samples: int, seed: int, split: str = "train") -> np.ndarray:
    """`samples` inputs drawn without replacement from a split (never the test split)."""
    pool = {"train": data.x_train, "val": data.x_val, "unlabeled": data.x_unlabeled}.get(split)
    if pool is None or len(pool) == 0:
        raise EdgekdError(f"calibration split {split!r}: empty or unknown (expected train, val or unlabeled)")
    idx = np.random.default_rng(seed).permutation(len(pool))[:samples]
    return pool[np.sort(idx)]


def write(path: str | Path, data: Dataset, *, source: str, samples: int, seed: int, split: str = "train") -> dict:
    """Write `<path>.npz` and the manifest `<path>` (.toml); returns the manifest."""
    import tomli_w

    path = Path(path)
    if path.suffix != ".toml":
        raise EdgekdError(f"calibration manifest {path}: expected a .toml path")
    x = draw(data, samples, seed, split)
    npz = path.with_suffix(".npz")
    with fileio.atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x)
    manifest = {"source": source, "split": split, "samples": int(len(x)), "seed": seed, "file": npz.name,
                "sha256": fileio.sha256_file(npz), "input_shape": list(x.shape[1:]),
                "normalization": data.normalization}
    fileio.write_text(path, tomli_w.dumps(manifest))
    return manifest


def load(path: str | Path, input_shape: tuple[int, ...]) -> tuple[np.ndarray, dict]:
    """Read a manifest, verify its .npz checksum and that the inputs fit the model."""
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"calibration manifest {path}: file not found (build one with `edgekd calibrate`)")
    try:
        manifest = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise EdgekdError(f"calibration manifest {path}: not valid TOML ({e})") from None
    for key in ("file", "sha256", "samples"):
        if key not in manifest:
            raise EdgekdError(f"calibration manifest {path}: missing key {key!r}")
    remedy = "rebuild it with `edgekd calibrate`"
    npz = fileio.confined(path.parent, manifest["file"], what=f"calibration manifest {path}", remedy=remedy)
    if not npz.is_file():
        raise EdgekdError(f"calibration set {npz}: file not found (named by {path})")
    # read once: the sha256 is checked on exactly the bytes parsed below, so a swap in between cannot matter
    raw = fileio.read_confined(path.parent, manifest["file"], what=f"calibration set {npz} (named by {path})",
                               remedy=remedy, sha256=manifest["sha256"], max_bytes=MAX_BYTES)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            if "x" not in f.files:
                raise EdgekdError(f"calibration set {npz}: no array 'x'")
            x = f["x"]
    except EdgekdError:
        raise
    except Exception as e:  # not an .npz, or an object array (never unpickled)
        raise EdgekdError(f"calibration set {npz}: cannot read array 'x' ({type(e).__name__}: {e}); expected an "
                          ".npz of float inputs (build one with `edgekd calibrate`)") from None
    if x.dtype.kind not in "fiu":
        raise EdgekdError(f"calibration set {npz}: array 'x' has dtype {x.dtype}, expected float inputs")
    x = x.astype(np.float32)
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise EdgekdError(f"calibration set {npz}: samples have shape {tuple(x.shape[1:])}, the model expects "
                          f"{tuple(input_shape)}")
    return x, manifest
