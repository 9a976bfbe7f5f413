"""Issue 16, class 2: what a manifest names stays inside its folder, and the manifest itself is signed off.

Every case tampers with a copy of a real bundle, labels folder or teacher cache the way a hostile or careless
sender could, then loads it through the real runtime API (`edgekd.runtime.load`, `read_labels`, `load_cache`)
and/or the real CLI (`python -m edgekd.runtime profile --save-metrics`, `edgekd distill --labels/--cache`). Each
must be refused with a one-line error naming the bundle/folder and what to do, open nothing outside (a sentinel
folder beside it, /proc/self/mem, /dev), never block on a FIFO, and leave every folder unchanged by sha256.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgekd import runtime
from edgekd.fileio import sha256_file
from tests._hostile import check_api_refusal, check_cli_refusal, cli, edit_json, resign

SIGNED_EDIT = "was edited after edgekd wrote it"


@dataclass(frozen=True)
class Hostile:
    id: str
    fragments: tuple[str, ...]
    tamper: Callable[[Path, Path], None]   # (copy of the folder, outside sentinel folder)


def _outside(tmp_path: Path, bundle: Path) -> Path:
    """A sentinel folder beside the bundle: a byte-copy of the engine (so its sha256 is the listed one), an .npz."""
    out = tmp_path / "outside"
    out.mkdir()
    shutil.copyfile(bundle / "model.opt.onnx", out / "secret.onnx")
    np.savez(out / "secret.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64))
    signed = json.loads((bundle / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(signed))   # a valid, signed manifest outside
    return out


def _signed(change: Callable[[dict, Path, Path], None]) -> Callable[[Path, Path], None]:
    """Edit the manifest and re-sign it (what a deliberate editor can do): the content checks must still refuse."""
    def tamper(b: Path, o: Path) -> None:
        resign(b, edit_json(b / "manifest.json", lambda m: change(m, b, o)))
    return tamper


def _unsigned(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    """Edit the manifest in place without re-signing it (a hand edit): its checksum must refuse it."""
    def tamper(b: Path, o: Path) -> None:
        (b / "manifest.json").write_text(json.dumps(edit_json(b / "manifest.json", change), indent=2))
    return tamper


def _setitem(path: str, value: object) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value
    return change


def _engine_abs(m: dict, b: Path, o: Path) -> None:
    m["engine"]["file"] = str(o / "secret.onnx")


def _engine_abs_listed(m: dict, b: Path, o: Path) -> None:
    m["engine"]["file"] = str(o / "secret.onnx")
    m["files"][str(o / "secret.onnx")] = sha256_file(o / "secret.onnx")


def _engine_dotdot(m: dict, b: Path, o: Path) -> None:
    m["engine"]["file"] = "../outside/secret.onnx"
    m["files"]["../outside/secret.onnx"] = sha256_file(o / "secret.onnx")


def _fallback_dotdot(m: dict, b: Path, o: Path) -> None:
    m["engine"]["fallback_file"] = "../outside/secret.onnx"
    m["files"]["../outside/secret.onnx"] = sha256_file(o / "secret.onnx")


def _engine_unlisted(m: dict, b: Path, o: Path) -> None:
    shutil.copyfile(o / "secret.onnx", b / "extra.onnx")   # present in the folder, not in `files`
    m["engine"]["file"] = "extra.onnx"


def _files_proc_mem(m: dict, b: Path, o: Path) -> None:
    m["files"]["/proc/self/mem"] = "0" * 64


def _files_dotdot(m: dict, b: Path, o: Path) -> None:
    m["files"]["../outside/secret.npz"] = sha256_file(o / "secret.npz")


def _eval_elsewhere(m: dict, b: Path, o: Path) -> None:
    m["eval"]["file"] = "../outside/secret.npz"
    m["files"]["../outside/secret.npz"] = sha256_file(o / "secret.npz")


def _forged_eval(b: Path) -> None:
    """An eval.npz whose labels are the engine's own predictions: profile would report 100% accuracy."""
    with np.load(b / "eval.npz") as f:
        x = f["x"]
    logits = runtime.load(b)(x)
    (b / "eval.npz").unlink()
    np.savez(b / "eval.npz", x=x, y=logits.argmax(axis=1))


def _eval_unlisted(b: Path, o: Path) -> None:
    _forged_eval(b)
    resign(b, edit_json(b / "manifest.json", lambda m: m["files"].pop("eval.npz")))


def _eval_replaced(b: Path, o: Path) -> None:
    _forged_eval(b)


def _symlink_leaving(b: Path, o: Path) -> None:
    (b / "model.opt.onnx").unlink()
    (b / "model.opt.onnx").symlink_to(o / "secret.onnx")   # same bytes, so its sha256 matches the listed one


def _symlink_dev_zero(b: Path, o: Path) -> None:
    (b / "eval.npz").unlink()
    (b / "eval.npz").symlink_to("/dev/zero")


def _fifo_eval(b: Path, o: Path) -> None:
    (b / "eval.npz").unlink()
    os.mkfifo(b / "eval.npz")


def _manifest_symlink(b: Path, o: Path) -> None:
    (b / "manifest.json").unlink()
    (b / "manifest.json").symlink_to(o / "manifest.json")


def _manifest_fifo(b: Path, o: Path) -> None:
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")


def _manifest_deep(b: Path, o: Path) -> None:
    (b / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _manifest_huge(b: Path, o: Path) -> None:
    signed = json.loads((b / "manifest.json").read_text())
    signed["padding"] = "x" * (17 * 2**20)
    (b / "manifest.json").write_text(json.dumps(signed))


BUNDLE_CASES = [
    Hostile("engine-file-absolute", ("engine.file names", "not a listed, checksummed file"), _signed(_engine_abs)),
    Hostile("engine-file-absolute-listed", ("not a plain relative name",), _signed(_engine_abs_listed)),
    Hostile("engine-file-dotdot-listed", ("'../outside/secret.onnx'", "not a plain relative name"),
            _signed(_engine_dotdot)),
    Hostile("fallback-file-dotdot-listed", ("not a plain relative name",), _signed(_fallback_dotdot)),
    Hostile("engine-file-unlisted", ("engine.file names 'extra.onnx'", "not a listed"), _signed(_engine_unlisted)),
    Hostile("files-proc-self-mem", ("'/proc/self/mem'", "not a plain relative name"), _signed(_files_proc_mem)),
    Hostile("files-dotdot", ("not a plain relative name",), _signed(_files_dotdot)),
    Hostile("eval-file-outside", ("not a plain relative name",), _signed(_eval_elsewhere)),
    Hostile("eval-unlisted-forged", ("eval.file names 'eval.npz'", "not a listed"), _eval_unlisted),
    Hostile("eval-replaced-forged", ("file eval.npz fails its sha256 check",), _eval_replaced),
    Hostile("symlink-leaving", ("resolves to", "outside the folder"), _symlink_leaving),
    Hostile("symlink-dev-zero", ("resolves to /dev/zero, outside the folder",), _symlink_dev_zero),
    Hostile("fifo-eval", ("eval.npz is not a regular file",), _fifo_eval),
    Hostile("manifest-symlink-outside", ("manifest.json", "outside the folder"), _manifest_symlink),
    Hostile("manifest-fifo", ("manifest.json is not a regular file",), _manifest_fifo),
    Hostile("manifest-100k-deep", ("nested too deeply",), _manifest_deep),
    Hostile("manifest-17mb", ("larger than",), _manifest_huge),
    Hostile("manifest-not-json", ("not valid JSON",), lambda b, o: (b / "manifest.json").write_bytes(b"\xff{")),
    Hostile("manifest-no-engine", ("has no 'engine' entry",), _signed(lambda m, b, o: m.pop("engine"))),
    Hostile("manifest-unsigned", ("has no manifest_sha256",), _unsigned(lambda m: m.pop("manifest_sha256"))),
    Hostile("edit-normalization", (SIGNED_EDIT,), _unsigned(_setitem("preprocessing.normalization.mean", [0.9]))),
    Hostile("edit-class-names", (SIGNED_EDIT,), _unsigned(_setitem("class_names", ["cat"] * 10))),
    Hostile("edit-input-contract", (SIGNED_EDIT,), _unsigned(_setitem("input.shape", ["batch", 1, 4, 4]))),
    Hostile("edit-engine-entry", (SIGNED_EDIT,), _unsigned(_setitem("engine.providers", ["CUDAExecutionProvider"]))),
    Hostile("signed-garbage-input-shape", ("input.shape is", "expected [batch, positive ints...]"),
            _signed(lambda m, b, o: m["input"].update(shape="abc"))),
    Hostile("signed-zero-std", ("preprocessing.normalization",),
            _signed(lambda m, b, o: m["preprocessing"]["normalization"].update(std=[0.0]))),
    Hostile("signed-batch-sizes-text", ("manifest.json batch is", "'sizes': [positive ints]"),
            _signed(lambda m, b, o: m["batch"].update(sizes="1,8"))),
    Hostile("signed-bad-digest", ("not 64 hex digits",), _signed(lambda m, b, o: m["files"].update({"eval.npz": 7}))),
]


@pytest.fixture
def copy(edge_ort_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    bundle = tmp_path / "bundle"
    shutil.copytree(edge_ort_bundle, bundle)
    return bundle, _outside(tmp_path, bundle)


@pytest.mark.parametrize("case", BUNDLE_CASES, ids=[c.id for c in BUNDLE_CASES])
def test_bundle_refused_by_runtime_load(case: Hostile, copy: tuple[Path, Path]) -> None:
    bundle, outside = copy
    case.tamper(bundle, outside)
    check_api_refusal(lambda: runtime.load(bundle), (f"bundle {bundle}", *case.fragments),
                      forbidden=[outside, Path("/proc/self/mem")], watch=[bundle, outside])


@pytest.mark.parametrize("case", BUNDLE_CASES, ids=[c.id for c in BUNDLE_CASES])
def test_bundle_refused_by_cli_profile_save_metrics(case: Hostile, copy: tuple[Path, Path], tmp_path: Path) -> None:
    """`python -m edgekd.runtime profile --save-metrics` writes nothing (no forged accuracy) and says what to do."""
    bundle, outside = copy
    case.tamper(bundle, outside)
    message = check_cli_refusal(["profile", str(bundle), "--save-metrics", "--json", str(tmp_path / "p.json"),
                                 "--warmup", "0", "--min-runs", "1", "--min-seconds", "0"],
                                (f"bundle {bundle}", *case.fragments), cwd=tmp_path, module="edgekd.runtime",
                                forbidden=[outside, Path("/proc/self/mem")], watch=[bundle, outside])
    assert "rebuild" in message
    assert not (tmp_path / "p.json").exists()


def test_save_metrics_of_an_intact_bundle_is_re_signed(copy: tuple[Path, Path], tmp_path: Path) -> None:
    """The control: an untouched copy profiles, its manifest takes the true accuracy and still verifies."""
    bundle, _ = copy
    r, _ = cli(["profile", str(bundle), "--save-metrics", "--warmup", "0", "--min-runs", "1", "--min-seconds", "0"],
               cwd=tmp_path, module="edgekd.runtime")
    assert r.returncode == 0, r.stderr
    engine = runtime.load(bundle)
    with np.load(bundle / "eval.npz") as f:
        truth = float(np.mean(engine(f["x"]).argmax(axis=1) == f["y"]))
    assert engine.manifest["metrics"]["accuracy"] == pytest.approx(truth)


# --- labels and teacher caches -----------------------------------------------------------------------------

RECIPE = ('[data]\nsource = "d.npz"\nunlabeled = "pool.npz"\nval_fraction = 0.0\nnormalize = false\n'
          '[teacher]\nmodel = "mlp:hidden=8"\nepochs = 1\n[student]\nmodel = "mlp:hidden=8"\nepochs = 1\n'
          '[distill]\nbaseline = false\n')


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Path:
    """A recipe, its data, a labels folder for its pool and a teacher cache for its transfer set (API-made)."""
    from edgekd import cache, labels
    from edgekd.data import load_data
    from edgekd.distillation import transfer_set
    from edgekd.recipe import load_recipe
    from edgekd.teachers import FunctionTeacher

    root = tmp_path_factory.mktemp("offline")
    rng = np.random.default_rng(0)
    x = rng.random((120, 1, 4, 4)).astype(np.float32)
    y = np.arange(120) % 3
    np.savez(root / "d.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    np.savez(root / "pool.npz", x=rng.random((60, 1, 4, 4)).astype(np.float32))
    (root / "recipe.toml").write_text(RECIPE)
    recipe = load_recipe(str(root / "recipe.toml"))
    data = load_data(recipe.data, recipe.base_dir)
    teacher = FunctionTeacher(lambda a: a.reshape(len(a), -1)[:, :3] * 5, identity="fixed")
    labels.label_pool(teacher, data.x_unlabeled, root / "labels", shard_size=25, top_k=2)
    x = transfer_set(data)[0]
    cache.build_cache(teacher, x, root / "cache", top_k=2, epochs=1, augment=None, seed=0)
    np.save(root / "transfer.npy", x)
    return root


def _labels_shard_dotdot(f: Path, o: Path) -> None:
    shutil.copyfile(f / "shard-00001.npz", o / "shard.npz")
    resign(f, edit_json(f / "manifest.json", lambda m: m["shards"][1].update(file="../outside/shard.npz")))


def _labels_shard_absolute(f: Path, o: Path) -> None:
    shutil.copyfile(f / "shard-00001.npz", o / "shard.npz")
    resign(f, edit_json(f / "manifest.json", lambda m: m["shards"][1].update(file=str(o / "shard.npz"))))


def _labels_shard_symlink(f: Path, o: Path) -> None:
    shutil.move(f / "shard-00001.npz", o / "shard.npz")
    (f / "shard-00001.npz").symlink_to(o / "shard.npz")   # same bytes, right sha256, outside the folder


def _labels_shard_fifo(f: Path, o: Path) -> None:
    (f / "shard-00001.npz").unlink()
    os.mkfifo(f / "shard-00001.npz")


LABEL_CASES = [
    Hostile("labels-shard-dotdot", ("'../outside/shard.npz'", "not a plain relative name"), _labels_shard_dotdot),
    Hostile("labels-shard-absolute", ("not a plain relative name",), _labels_shard_absolute),
    Hostile("labels-shard-symlink-leaving", ("outside the folder",), _labels_shard_symlink),
    Hostile("labels-shard-fifo", ("shard-00001.npz is not a regular file",), _labels_shard_fifo),
    Hostile("labels-manifest-100k-deep", ("nested too deeply",),
            lambda f, o: (f / "manifest.json").write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)),
    Hostile("labels-shard-size-zero", ("shard_size is 0; expected an integer >= 1",),
            lambda f, o: resign(f, edit_json(f / "manifest.json", _setitem("shard_size", 0)))),
    Hostile("labels-edited-temperature", (SIGNED_EDIT,), _unsigned(_setitem("temperature", 0.05))),
    Hostile("labels-unsigned", ("has no manifest_sha256",), _unsigned(lambda m: m.pop("manifest_sha256"))),
]


def _cache_file_dotdot(f: Path, o: Path) -> None:
    shutil.copyfile(f / "epoch-00000.npz", o / "epoch.npz")
    resign(f, edit_json(f / "manifest.json", lambda m: m["files"][0].update(file="../outside/epoch.npz")))


def _cache_file_symlink(f: Path, o: Path) -> None:
    shutil.move(f / "epoch-00000.npz", o / "epoch.npz")
    (f / "epoch-00000.npz").symlink_to(o / "epoch.npz")


CACHE_CASES = [
    Hostile("cache-file-dotdot", ("'../outside/epoch.npz'", "not a plain relative name"), _cache_file_dotdot),
    Hostile("cache-file-symlink-leaving", ("outside the folder",), _cache_file_symlink),
    Hostile("cache-manifest-100k-deep", ("nested too deeply",),
            lambda f, o: (f / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)),
    Hostile("cache-edited-top-k", (SIGNED_EDIT,), _unsigned(_setitem("top_k_stored", 1))),
    Hostile("cache-manifest-fifo", ("manifest.json is not a regular file",),
            lambda f, o: ((f / "manifest.json").unlink(), os.mkfifo(f / "manifest.json"))),
]


def _offline_copy(offline: Path, tmp_path: Path, what: str, case: Hostile) -> tuple[Path, Path]:
    folder, outside = tmp_path / what, tmp_path / "outside"
    shutil.copytree(offline / what, folder)
    outside.mkdir()
    case.tamper(folder, outside)
    return folder, outside


@pytest.mark.parametrize("case", LABEL_CASES, ids=[c.id for c in LABEL_CASES])
def test_labels_refused_by_read_labels(case: Hostile, offline: Path, tmp_path: Path) -> None:
    from edgekd.labels import read_labels

    folder, outside = _offline_copy(offline, tmp_path, "labels", case)
    check_api_refusal(lambda: read_labels(folder), case.fragments, forbidden=[outside], watch=[folder, outside])


@pytest.mark.parametrize("case", CACHE_CASES, ids=[c.id for c in CACHE_CASES])
def test_cache_refused_by_load_cache(case: Hostile, offline: Path, tmp_path: Path) -> None:
    from edgekd.cache import load_cache

    folder, outside = _offline_copy(offline, tmp_path, "cache", case)
    x = np.load(offline / "transfer.npy")   # the cache's own data: only the tampering is wrong
    check_api_refusal(lambda: load_cache(folder, x=x, augment_key="none", seed=0, top_k=2), case.fragments,
                      forbidden=[outside], watch=[folder, outside])


def test_label_resume_refuses_a_hostile_manifest(offline: Path, tmp_path: Path) -> None:
    """`label_pool` into a folder whose manifest is 100k deep: refused before any teacher call or write."""
    from edgekd.labels import label_pool
    from edgekd.teachers import FunctionTeacher

    case = LABEL_CASES[4]
    folder, outside = _offline_copy(offline, tmp_path, "labels", case)
    calls = []
    teacher = FunctionTeacher(lambda a: calls.append(1) or np.zeros((len(a), 3), np.float32), identity="fixed")
    check_api_refusal(lambda: label_pool(teacher, np.zeros((60, 1, 4, 4), np.float32), folder),
                      case.fragments, forbidden=[outside], watch=[folder, outside])
    assert not calls


CLI_OFFLINE = [(LABEL_CASES[0], "labels"), (LABEL_CASES[5], "labels"), (CACHE_CASES[0], "cache"),
               (CACHE_CASES[3], "cache")]


@pytest.mark.parametrize("case,what", CLI_OFFLINE, ids=[c.id for c, _ in CLI_OFFLINE])
def test_offline_distill_refuses_through_the_cli(case: Hostile, what: str, offline: Path, tmp_path: Path) -> None:
    """`edgekd distill --labels/--cache`: refused before training, nothing written into --out."""
    folder, outside = _offline_copy(offline, tmp_path, what, case)
    out = tmp_path / "run"
    check_cli_refusal(["distill", str(offline / "recipe.toml"), f"--{what}", str(folder), "--out", str(out),
                       "--device", "cpu", "--quiet"], case.fragments, cwd=tmp_path, forbidden=[outside],
                      watch=[folder, outside, offline])
    assert not out.exists() or not any(out.iterdir())
