"""Validation before work (issue 16, class 5): each hostile recipe, spec, data set or output folder is refused
through the real CLI with one `error:` line naming the key or file, before anything is written: the output
folder is not created (or, when it existed, is unchanged by sha256) and nothing else in the case's folder or
its TMPDIR changes."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgekd.errors import EdgekdError
from edgekd.recipe import RANGES, SECTIONS, recipe_from_dict
from tests.refusal import assert_refused, edgekd, snapshot

TINY = """
[data]
source = "data.npz"
{data}
[teacher]
model = "{teacher}"
epochs = 1
batch_size = 64
{teacher_extra}
[student]
model = "{student}"
epochs = 1
batch_size = 64
{student_extra}
[distill]
{distill}
[quantize]
{quantize}
"""


def recipe(teacher: str = "cnn:widths=4,8", student: str = "mlp:hidden=8", data: str = "", teacher_extra: str = "",
           student_extra: str = "", distill: str = "", quantize: str = "") -> str:
    return TINY.format(teacher=teacher, student=student, data=data, teacher_extra=teacher_extra,
                       student_extra=student_extra, distill=distill, quantize=quantize)


def write_npz(path: Path, n_train: int = 60, n_test: int = 16, unlabeled: int = 0) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((n_train, 1, 8, 8), dtype=np.float32), "y_train": np.arange(n_train) % 4,
              "x_test": rng.random((n_test, 1, 8, 8), dtype=np.float32), "y_test": np.arange(n_test) % 4}
    if unlabeled:
        arrays["x_unlabeled"] = rng.random((unlabeled, 1, 8, 8), dtype=np.float32)
    np.savez(path, **arrays)


@dataclass
class Case:
    id: str
    fragments: tuple[str, ...]
    setup: Callable[[Path], list[str]]       # writes the case's files into the folder; returns the CLI args
    prefix: tuple[str, ...] = ()             # a wrapper command (unshare for the full-disk case)
    out: str = "out"                         # the output folder the command names


def recipe_case(**kw: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        (d / "r.toml").write_text(recipe(**kw))
        return ["distill", "r.toml", "--out", "out", "--device", "cpu", "--quiet"]
    return setup


def deep_toml(d: Path) -> list[str]:
    (d / "r.toml").write_text("[data]\nsource = " + "[" * 20000 + "]" * 20000 + "\n")
    return ["distill", "r.toml", "--out", "out", "--quiet"]


def one_image(d: Path) -> list[str]:
    from PIL import Image

    (d / "imgs" / "cat").mkdir(parents=True)
    Image.new("L", (8, 8), 128).save(d / "imgs" / "cat" / "only.png")
    (d / "r.toml").write_text(recipe().replace('"data.npz"', '"imgs"'))
    return ["distill", "r.toml", "--out", "out", "--device", "cpu", "--quiet"]


def labels_shard_size_zero(d: Path) -> list[str]:
    from edgekd.fileio import write_signed_json
    from edgekd.labels import FORMAT, MANIFEST

    write_npz(d / "data.npz", unlabeled=8)
    (d / "labels").mkdir()
    # signed, so the refusal is the field check and not the checksum
    write_signed_json(d / "labels" / MANIFEST, {"format": FORMAT, "samples": 8, "shard_size": 0, "shards": [],
                                                "complete": True})
    (d / "r.toml").write_text(recipe())
    return ["distill", "r.toml", "--labels", "labels", "--out", "out", "--device", "cpu", "--quiet"]


def read_only_out(d: Path) -> list[str]:
    """An existing --out on a read-only mount (a bind mount remounted read-only: refused even to root)."""
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("the user's notes\n")
    (d / "r.toml").write_text(recipe())
    return ["distill", "r.toml", "--out", "out", "--device", "cpu", "--quiet"]


def disk_full(d: Path) -> list[str]:
    """The run folder on a 128 KiB tmpfs: the teacher's first checkpoint (weights + AdamW state, ~450 KB)
    cannot fit. Runs as `sh -c 'mount ...; python -m edgekd ...'` in a private mount namespace."""
    (d / "disk").mkdir()
    (d / "r.toml").write_text(recipe(teacher="mlp:hidden=512"))
    return ["distill", "r.toml", "--out", "disk/out", "--device", "cpu", "--quiet"]


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


def read_only(folder: str) -> tuple[str, ...]:
    """Run the command with `folder` bind-mounted read-only (in a private mount namespace)."""
    return ("unshare", "-rm", "sh", "-c",
            f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} || exit 99; "$@"', "sh")


def calibrate_read_only(d: Path) -> list[str]:
    """A write the OS refuses deep inside a stage (no stage checks it first): still one line naming the file."""
    (d / "cal").mkdir()
    (d / "r.toml").write_text(recipe())
    return ["calibrate", "r.toml", "--out", "cal/set.toml", "--samples", "8"]
# mount the tmpfs, run the command, then list the files left on the tmpfs on stdout (it vanishes with the namespace)
UNSHARE = ("unshare", "-rm", "sh", "-c",
           'mount -t tmpfs -o size=128k tmpfs disk || exit 99; "$@"; rc=$?; find disk -type f; exit $rc', "sh")

CASES = [
    Case("lr-nan", ("r.toml [teacher].lr: must be a finite number, got nan",), recipe_case(teacher_extra="lr = nan")),
    Case("weight-decay-negative", ("[student].weight_decay: must be >= 0, got -0.01",),
         recipe_case(student_extra="weight_decay = -0.01")),
    Case("quantize-lr-negative", ("[quantize].lr: must be > 0, got -1.0",), recipe_case(quantize="lr = -1")),
    Case("data-seed-negative", ("[data].seed: must be >= 0, got -1",), recipe_case(data="seed = -1")),
    Case("dropout-2", ("model spec 'cnn:widths=4,8,dropout=2': dropout must be in [0, 1), got 2",),
         recipe_case(teacher="cnn:widths=4,8,dropout=2")),
    Case("widths-zero", ("model spec 'cnn:widths=0': widths must be positive integers",),
         recipe_case(student="cnn:widths=0")),
    Case("image-size-zero", ("[data].image_size: each must be >= 1, got [0, 0]",),
         recipe_case(data="image_size = [0, 0]")),
    Case("model-too-big", ("model spec 'mlp:hidden=100000000000': cannot build it", "allocate"),
         recipe_case(student="mlp:hidden=100000000000")),
    Case("toml-deep-array", ("r.toml: arrays or tables nested too deeply",), deep_toml),
    Case("one-image", ("data imgs", "1 training and 0 test samples; each split needs at least one"), one_image),
    Case("labels-shard-size-zero", ("manifest.json: shard_size is 0; expected an integer >= 1",),
         labels_shard_size_zero),
    Case("read-only-out", ("out: cannot write into this run folder (Read-only file system)",), read_only_out,
         read_only("out")),
    Case("read-only-calibration-folder", ("cal/.set.npz.", "Read-only file system"), calibrate_read_only,
         read_only("cal"), "cal"),
    Case("disk-full-checkpoint", ("checkpoints/teacher.ckpt: cannot be written (No space left on device)",),
         disk_full, UNSHARE, "disk/out"),
    Case("temperature-nan", ("[distill].temperature: must be a finite number, got nan",),
         recipe_case(distill="temperature = nan")),
    Case("checkpoint-every-negative", ("[teacher].checkpoint_every: must be >= 0, got -1",),
         recipe_case(teacher_extra="checkpoint_every = -1")),
    Case("alpha-inf", ("[distill].alpha: must be a finite number, got inf",), recipe_case(distill="alpha = inf")),
    Case("search-temperature-nan", ("[distill].search_temperatures: must be a finite number, got [2.0, nan]",),
         recipe_case(distill="search_temperatures = [2, nan]\nsearch_alphas = [0.5]")),
    Case("percentile-zero", ("[quantize].percentile: must be in (0, 100], got 0.0",),
         recipe_case(quantize="percentile = 0")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_refused_before_any_write(case: Case, tmp_path: Path):
    if case.prefix and not _can_mount():
        pytest.skip("no unprivileged mount namespace here (unshare -rm) for a tmpfs or a read-only mount")
    d = tmp_path / "case"
    d.mkdir()
    write_npz(d / "data.npz")
    args = case.setup(d)
    out = d / case.out
    existed = out.exists()
    before = snapshot(d)
    r = edgekd(*args, cwd=d, prefix=case.prefix, tmpdir=tmp_path / "tmp")
    assert_refused(r, *case.fragments)
    after = snapshot(d)
    if not existed:   # nothing written: the folder the command would have created is not there
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert before == after, {k: after.get(k) for k in set(before) ^ set(after)}
    left = [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")]
    assert not left, f"temporary files left behind: {left}"   # (torch's own compile cache aside)
    if case.prefix == UNSHARE:
        assert r.stdout.strip() == "", f"files left on the full disk: {r.stdout}"


# --- Every range in the table is enforced (in-process: one recipe_from_dict per key) ------------------------

BAD = {">= 1": 0, ">= 0": -1, "> 0": 0, "[0, 1]": 1.5, "[0, 1)": 1.0, "(0, 100]": 0}


def _bad_value(section: str, key: str, rule: str) -> object:
    import dataclasses
    import typing

    hint = typing.get_type_hints(SECTIONS[section])[key]
    value = BAD[rule]
    if "list" in str(hint):
        return [value, value]
    if "float" in str(hint) and "int" not in str(hint):
        return float(value)
    assert key in {f.name for f in dataclasses.fields(SECTIONS[section])}
    return value


RULES = [(s, k, rule) for s, keys in RANGES.items() for k, rule in keys.items()]


@pytest.mark.parametrize("section,key,rule", RULES, ids=[f"{s}.{k}" for s, k, _ in RULES])
def test_every_ranged_key_refuses_a_value_outside(section: str, key: str, rule: str):
    raw = {section: {key: _bad_value(section, key, rule)}}
    with pytest.raises(EdgekdError, match=rf"\[{section}\]\.{key}: (each )?must be"):
        recipe_from_dict(raw)
    recipe_from_dict({section: {}})   # the defaults are inside every range


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_everywhere(value: str):
    import tomllib

    for section, keys in RANGES.items():
        floats = [k for k in keys if isinstance(getattr(SECTIONS[section](), k), float)]
        for key in floats:
            raw = tomllib.loads(f"[{section}]\n{key} = {value}\n")
            with pytest.raises(EdgekdError, match="must be a finite number"):
                recipe_from_dict(raw)
