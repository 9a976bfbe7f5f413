"""A corpus of bad inputs, each run through the real CLI (`python -m edgekd ...` in a subprocess).

Every case must end with exit code 2 and exactly one stderr line `error: <message>` whose message names the
file/key/shape at fault and what was expected (a specific fragment is asserted), no traceback, and nothing
written that looks valid: no checkpoint / ONNX / bundle manifest / report in the output folder, and a run
folder or bundle that existed before the command is byte-for-byte unchanged after it.

Each CLI call costs a few seconds of torch import on a small CPU, so the whole corpus runs once, two
subprocesses at a time, in a module-scoped fixture (with the one tiny trained run folder and the one built
bundle the cases that need them copy before tampering); the parametrized test then checks each case by id.

Set EDGEKD_CORPUS_OUT=path to also append `case<TAB>message` lines to that file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tomllib

WORKERS = 2
TIMEOUT = 300

# Files whose presence in an output folder would look like a (partial) success.
VALID_LOOKING = ("teacher.safetensors", "student.safetensors", "scratch.safetensors", "metrics.json",
                 "recipe.toml", "manifest.json", "report.json", "report.md")

TINY = """
[data]
source = {source}
[teacher]
model = {teacher}
epochs = 1
batch_size = 256
{teacher_extra}
[student]
model = "mlp:hidden=8"
epochs = 1
batch_size = 256
"""

BADMODS = '''
import torch


def wrong_head(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))


def raising_factory(input_shape, num_classes):
    raise RuntimeError("factory exploded")


def raising_source():
    raise ValueError("source exploded")
'''


def tiny_recipe(source: str, teacher: str = "cnn:widths=4,8", teacher_extra: str = "") -> str:
    """A tiny recipe (if a case wrongly got past validation it would still finish fast)."""
    return TINY.format(source=f'"{source}"', teacher=f'"{teacher}"', teacher_extra=teacher_extra)


class _Marker:
    """Unpickling this creates the file at `path`: proof that a file was (or was not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class Ctx:
    """One case's scratch folder; setup functions fill in what the checks need."""

    dir: Path
    shared: Shared
    module: str = "edgekd"
    watch: list[Path] = field(default_factory=list)   # must be byte-for-byte unchanged by the command
    marker: Path | None = None                        # must never appear (nothing was unpickled)

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    def recipe(self, text: str, name: str = "recipe.toml") -> str:
        return str(self.write(name, text))

    def tiny(self, source: str | None = None, **kw: str) -> str:
        """tiny_recipe() on the shared small .npz (sklearn's digits would cost an import per case)."""
        return tiny_recipe(source or str(self.shared.data), **kw)

    def npz(self, name: str = "data.npz", **arrays) -> str:
        path = self.dir / name
        np.savez(path, **arrays)
        return str(path)

    def copy_run(self, which: str) -> Path:
        src = self.shared.trained() if which == "trained" else self.shared.built()
        dst = self.dir / which
        shutil.copytree(src, dst)
        return dst


def distill(recipe_path: str) -> list[str]:
    return ["distill", recipe_path, "--out", "out", "--device", "cpu", "--quiet"]


def small_arrays(n_train: int = 60, n_test: int = 16, shape: tuple[int, ...] = (1, 8, 8)) -> dict[str, np.ndarray]:
    """Random 8x8 single-channel "images" in 4 classes."""
    rng = np.random.default_rng(0)
    return {"x_train": rng.random((n_train, *shape), dtype=np.float32), "y_train": np.arange(n_train) % 4,
            "x_test": rng.random((n_test, *shape), dtype=np.float32), "y_test": np.arange(n_test) % 4}


def npz_case(**changes) -> Callable[[Ctx], list[str]]:
    """A distill run on an .npz built from small_arrays() with some arrays replaced (None removes one)."""
    def setup(c: Ctx) -> list[str]:
        arrays = {**small_arrays(), **changes}
        path = c.npz(**{k: v for k, v in arrays.items() if v is not None})
        return distill(c.recipe(c.tiny(source=path, teacher="mlp:hidden=8")))
    return setup


def recipe_case(text: str) -> Callable[[Ctx], list[str]]:
    return lambda c: distill(c.recipe(text))


def teacher_model_case(spec: str) -> Callable[[Ctx], list[str]]:
    return lambda c: distill(c.recipe(c.tiny(teacher=spec)))


# --- Cases that need a file of the trained run or the built bundle --------------------------------------


def ckpt_other_arch(c: Ctx) -> list[str]:
    ckpt = c.dir / "student.safetensors"       # an MLP's weights handed to a CNN teacher
    shutil.copy(c.shared.trained() / "student.safetensors", ckpt)
    return distill(c.recipe(c.tiny(teacher_extra=f'checkpoint = "{ckpt}"')))


def ckpt_wrong_shape(c: Ctx) -> list[str]:
    ckpt = c.dir / "teacher.safetensors"       # cnn:widths=4,8 weights handed to cnn:widths=4,16
    shutil.copy(c.shared.trained() / "teacher.safetensors", ckpt)
    return distill(c.recipe(c.tiny(teacher="cnn:widths=4,16", teacher_extra=f'checkpoint = "{ckpt}"')))


def ckpt_truncated(c: Ctx) -> list[str]:
    data = (c.shared.trained() / "teacher.safetensors").read_bytes()
    ckpt = c.write("teacher.safetensors", data[:len(data) // 2])
    return distill(c.recipe(c.tiny(teacher_extra=f'checkpoint = "{ckpt}"')))


def ckpt_tampered_header(c: Ctx) -> list[str]:
    data = bytearray((c.shared.trained() / "teacher.safetensors").read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    at = data.index(b'"shape"')
    assert 8 <= at < 8 + header_len
    for i in range(at, at + 4):                 # flip bytes inside the JSON header
        data[i] ^= 0xFF
    ckpt = c.write("teacher.safetensors", bytes(data))
    return distill(c.recipe(c.tiny(teacher_extra=f'checkpoint = "{ckpt}"')))


def ckpt_torch_save(c: Ctx) -> list[str]:
    import torch

    probe = c.dir / "probe"
    torch.save({"payload": _Marker(probe)}, c.dir / "probe.pt")
    torch.load(c.dir / "probe.pt", weights_only=False)     # the payload is live: torch.load does run it
    assert probe.is_file()
    c.marker = c.dir / "UNPICKLED"
    ckpt = c.dir / "teacher.pt"
    torch.save({"features.0.weight": torch.zeros(4, 1, 3, 3), "payload": _Marker(c.marker)}, ckpt)
    return distill(c.recipe(c.tiny(teacher_extra=f'checkpoint = "{ckpt}"')))


def ckpt_raw_pickle(c: Ctx) -> list[str]:
    c.marker = c.dir / "UNPICKLED"
    probe = c.dir / "probe"
    pickle.loads(pickle.dumps(_Marker(probe)))      # the payload is live: unpickling it does create the file
    assert probe.is_file()
    ckpt = c.write("teacher.safetensors", pickle.dumps({"w": _Marker(c.marker)}, protocol=4))
    return distill(c.recipe(c.tiny(teacher_extra=f'checkpoint = "{ckpt}"')))


def object_array_npz(c: Ctx) -> list[str]:
    c.marker = c.dir / "UNPICKLED"
    arrays = {**small_arrays(), "x_train": np.array([_Marker(c.marker)] * 60, dtype=object)}
    return distill(c.recipe(c.tiny(source=c.npz(**arrays), teacher="mlp:hidden=8")))


def build_corrupt_onnx(c: Ctx) -> list[str]:
    run = c.copy_run("built")
    (run / "onnx" / "student.onnx").write_bytes(b"this is not an ONNX protobuf\x00\xff" * 8)
    c.watch.append(run)
    return ["build", str(run), "--target", "x86-cpu-ort"]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def profile_tampered(c: Ctx) -> list[str]:
    run = c.copy_run("built")
    # The teacher's bundle sorts after the student's: a profile that checked bundles one at a time would
    # already have written the student's metrics into its manifest.
    _flip_byte(run / "engines" / "x86-cpu-ort" / "teacher-fp32" / "model.opt.onnx")
    c.watch.append(run)
    return ["profile", str(run), "--target", "x86-cpu-ort", "--quick"]


def runtime_tampered(c: Ctx) -> list[str]:
    run = c.copy_run("built")
    bundle = run / "engines" / "x86-cpu-ort" / "student-fp32"
    _flip_byte(bundle / "model.opt.onnx")
    c.watch.append(run)
    c.module = "edgekd.runtime"
    return ["profile", str(bundle), "--json", str(c.out / "profile.json"), "--save-metrics"]


def qat_mode_none(c: Ctx) -> list[str]:
    run = c.copy_run("trained")
    c.watch.append(run)
    return ["qat", str(run), "--device", "cpu", "--quiet"]


def calibration_case(kind: str) -> Callable[[Ctx], list[str]]:
    """`edgekd qat RUN` with [quantize] mode = "ptq" and a calibration manifest that is wrong in one way."""
    def setup(c: Ctx) -> list[str]:
        import tomli_w

        run = c.copy_run("trained")
        cal = run / "calibration"
        cal.mkdir()
        x = np.zeros((8, 64) if kind == "shape" else (8, 1, 8, 8), np.float32)
        npz = cal / "cal.npz"
        if kind == "object":
            np.savez(npz, x=np.array([None] * 8, dtype=object))
        else:
            np.savez(npz, x=x)
        manifest = {"source": "data.npz", "split": "train", "samples": 8, "seed": 0, "file": npz.name,
                    "sha256": hashlib.sha256(npz.read_bytes()).hexdigest(), "input_shape": list(x.shape[1:])}
        if kind == "sha":
            manifest["sha256"] = "0" * 64
        if kind == "npz-missing":
            manifest["file"] = "gone.npz"
        (cal / "cal.toml").write_text(tomli_w.dumps(manifest))
        raw = tomllib.loads((run / "recipe.toml").read_text())
        # absolute: relative paths in a run folder's recipe.toml resolve against the recipe's own folder (issue 17)
        raw["quantize"].update(mode="ptq", calibration=str(cal / "cal.toml"))
        (run / "recipe.toml").write_text(tomli_w.dumps(raw))
        c.watch.append(run)
        return ["qat", str(run), "--device", "cpu", "--quiet"]
    return setup


# --- The corpus ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    fragments: tuple[str, ...]      # each must appear in the error line
    setup: Callable[[Ctx], list[str]]
    needs: str = ""                 # "", "trained" or "built": which shared fixture it waits for


def _image_folder_corrupt(c: Ctx) -> list[str]:
    c.write("imgs/a/one.png", b"\x89PNG not really")
    c.write("imgs/b/two.png", b"\x89PNG not really")
    return distill(c.recipe(c.tiny(source=str(c.dir / "imgs"))))


def _target_file(text: str) -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        target = c.write("my-target.toml", text)
        return ["run", c.recipe(c.tiny()), "--out", "out", "--target", str(target), "--device", "cpu", "--quiet"]
    return setup


def _not_a_run(command: str, module: str = "edgekd") -> Callable[[Ctx], list[str]]:
    def setup(c: Ctx) -> list[str]:
        c.out.mkdir()
        c.module = module
        return [command, str(c.out)]
    return setup


F = small_arrays()
CASES: list[Case] = [
    # TOML syntax
    Case("toml-malformed", ("recipe.toml: not valid TOML", "line 1"), recipe_case("[student\nmodel = 1\n")),
    Case("toml-truncated", ("recipe.toml: not valid TOML",), recipe_case('[data]\nsource = "dig')),
    Case("toml-binary", ("recipe.toml: not a text file",),
         lambda c: distill(str(c.write("recipe.toml", b"\xff\xfe\x00[data]\x81")))),
    Case("recipe-missing", ("recipe no-such-recipe.toml: file not found", "built-in: digits"),
         lambda c: distill("no-such-recipe.toml")),
    # keys and types
    Case("unknown-section", ("unknown section [dataa]", "expected one of data, teacher"),
         recipe_case('[dataa]\nsource = "digits"\n')),
    Case("unknown-key", ("[teacher]: unknown key 'epoch'", "expected one of model, checkpoint, epochs"),
         recipe_case("[teacher]\nepoch = 3\n")),
    Case("str-for-int", ("[teacher].epochs: expected int, got str '3'",), recipe_case('[teacher]\nepochs = "3"\n')),
    Case("bool-for-int", ("[student].batch_size: expected int, got bool True",),
         recipe_case("[student]\nbatch_size = true\n")),
    Case("list-for-str", ("[data].source: expected str, got list ['digits']",),
         recipe_case('[data]\nsource = ["digits"]\n')),
    Case("table-for-section", ("recipe.toml [data]: expected a table like [data], got str",),
         recipe_case('data = "digits"\n')),
    # out-of-range values
    Case("alpha-range", ("[distill].alpha: must be in [0, 1], got 1.5",), recipe_case("[distill]\nalpha = 1.5\n")),
    Case("temperature-zero", ("[distill].temperature: must be > 0, got 0.0",),
         recipe_case("[distill]\ntemperature = 0\n")),
    Case("test-fraction", ("[data].test_fraction: must be in [0, 1), got 1.0",),
         recipe_case("[data]\ntest_fraction = 1.0\n")),
    Case("freeze-fraction", ("[quantize].freeze_fraction: must be in [0, 1], got 1.5",),
         recipe_case("[quantize]\nfreeze_fraction = 1.5\n")),
    # data files
    Case("data-file-missing", ("no-such-data.npz: file not found",),
         lambda c: distill(c.recipe(c.tiny(source="no-such-data.npz")))),
    Case("npz-not-zip", ("data.npz: not a readable .npz file",),
         lambda c: distill(c.recipe(c.tiny(source=str(c.write("data.npz", b"not a zip file")))))),
    Case("npz-missing-arrays", ("data.npz: missing arrays x_test, y_test", "found x_train, y_train"),
         npz_case(x_test=None, y_test=None)),
    Case("npz-string-inputs", ("x_train has dtype <U", "expected numbers"),
         npz_case(x_train=np.array([["a", "b"]] * 60))),
    Case("npz-object-array", ("data.npz: cannot read array 'x_train'", "object arrays/pickles are not loaded"),
         object_array_npz),
    Case("labels-out-of-range", ("y_train has labels in [0, 3]; expected 0..1 for 2 classes",),
         npz_case(class_names=np.array(["a", "b"]))),
    Case("nan-inputs", ("x_test contains NaN or Inf values",),
         npz_case(x_test=np.where(np.arange(16 * 64).reshape(16, 1, 8, 8) == 7, np.nan, F["x_test"]))),
    Case("train-test-shape", ("x_train samples have shape (1, 8, 8) but x_test samples have (1, 7, 7)",),
         npz_case(x_test=np.zeros((16, 1, 7, 7), np.float32))),
    Case("image-corrupt", ("one.png: not a readable image",), _image_folder_corrupt),
    # models
    Case("cnn-on-flat", ("model spec 'cnn:widths=4,8': cnn models need (channels, height, width) inputs, got "
                         "input shape (16,)",),
         lambda c: distill(c.recipe(c.tiny(source=c.npz(**small_arrays(shape=(16,))))))),
    Case("factory-wrong-head", ("teacher model outputs shape (3,) per sample",
                                "the data has 4 classes, so expected (4,)"),
         teacher_model_case("edgekd_badmods:wrong_head")),
    Case("factory-no-module", ("model factory 'edgekd_no_such_module:big': cannot import module",),
         teacher_model_case("edgekd_no_such_module:big")),
    Case("factory-raises", ("model factory 'edgekd_badmods:raising_factory' raised RuntimeError: factory exploded",),
         teacher_model_case("edgekd_badmods:raising_factory")),
    # module:function data sources
    Case("source-no-module", ("data source 'edgekd_no_such_module:load': cannot import module",),
         lambda c: distill(c.recipe(c.tiny(source="edgekd_no_such_module:load")))),
    Case("source-raises", ("data source 'edgekd_badmods:raising_source' raised ValueError: source exploded",),
         lambda c: distill(c.recipe(c.tiny(source="edgekd_badmods:raising_source")))),
    # checkpoints
    Case("ckpt-other-arch", ("student.safetensors: does not match the model", "another architecture",
                             "its metadata says model 'mlp:hidden=8'"),
         ckpt_other_arch, "trained"),
    Case("ckpt-wrong-shape", ("tensor 'features.4.weight' has shape (8, 4, 3, 3), the model expects (16, 4, 3, 3)",),
         ckpt_wrong_shape, "trained"),
    Case("ckpt-truncated", ("teacher.safetensors: not a valid safetensors file",), ckpt_truncated, "trained"),
    Case("ckpt-tampered-header", ("teacher.safetensors: not a valid safetensors file",), ckpt_tampered_header,
         "trained"),
    Case("ckpt-torch-save", ("teacher.pt: looks like a pickle/torch.save file", "only loads safetensors"),
         ckpt_torch_save),
    Case("ckpt-raw-pickle", ("teacher.safetensors: looks like a pickle/torch.save file",), ckpt_raw_pickle),
    # command line, targets, run folders
    Case("unknown-device", ("'--device'", "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
         lambda c: ["distill", "digits", "--out", "out", "--device", "tpu"]),
    Case("unknown-target", ("unknown target 'no-such-target'", "x86-cpu-ort"),
         lambda c: ["run", c.recipe(c.tiny()), "--out", "out", "--target", "no-such-target", "--quiet"]),
    Case("target-unknown-runtime", ("my-target.toml: key 'runtime' must be one of onnxruntime, tensorrt, torch, "
                                    "got 'tflite'",),
         _target_file('runtime = "tflite"\ndevice = "cpu"\nprecisions = ["fp32"]\n')),
    Case("export-not-run-folder", ("out: not a run folder (no recipe.toml)",), _not_a_run("export")),
    Case("report-not-run-folder", ("out: not a run folder (no metrics.json)",), _not_a_run("report")),
    Case("runtime-not-bundle", ("bundle", "no manifest.json; not an edgekd bundle",),
         _not_a_run("profile", "edgekd.runtime")),
    # engines and bundles
    Case("build-corrupt-onnx", ("onnx/student.onnx: cannot be read",), build_corrupt_onnx, "built"),
    Case("profile-tampered-bundle", ("teacher-fp32: file model.opt.onnx fails its sha256 check",), profile_tampered,
         "built"),
    Case("runtime-tampered-bundle", ("student-fp32: file model.opt.onnx fails its sha256 check",), runtime_tampered,
         "built"),
    # quantization
    Case("qat-mode-none", ('[quantize].mode is "none"; set it to "ptq" or "qat"',), qat_mode_none, "trained"),
    Case("calibration-npz-missing", ("gone.npz: file not found (named by",), calibration_case("npz-missing"),
         "trained"),
    Case("calibration-wrong-sha", ("cal.npz fails its sha256 check",), calibration_case("sha"), "trained"),
    Case("calibration-wrong-shape", ("samples have shape (64,), the model expects (1, 8, 8)",),
         calibration_case("shape"), "trained"),
    Case("calibration-object-array", ("cal.npz: cannot read array 'x'", "allow_pickle=False"),
         calibration_case("object"), "trained"),
]


# --- Running the corpus -------------------------------------------------------------------------------------

class Shared:
    """The small .npz, the tiny trained run folder and its built copy; the folders are made once, in the
    background, on first demand."""

    def __init__(self, root: Path, pool: ThreadPoolExecutor, env: dict[str, str]) -> None:
        self.root, self.env, self._pool = root, env, pool
        self.data = root / "data.npz"
        np.savez(self.data, **small_arrays(n_train=200, n_test=40))
        self._trained: Future | None = None
        self._built: Future | None = None

    def _cli(self, *args: str) -> None:
        r = subprocess.run([sys.executable, "-m", "edgekd", *args], capture_output=True, text=True, cwd=self.root,
                           env=self.env, timeout=TIMEOUT)
        assert r.returncode == 0, f"edgekd {' '.join(args)} failed:\n{r.stderr}"

    def _train(self) -> Path:
        (self.root / "tiny.toml").write_text(tiny_recipe(str(self.data)))
        self._cli("distill", "tiny.toml", "--out", "trained", "--device", "cpu", "--quiet")
        return self.root / "trained"

    def _build(self) -> Path:
        shutil.copytree(self.trained(), self.root / "built")
        self._cli("build", "built", "--target", "x86-cpu-ort")
        return self.root / "built"

    def start(self, which: str) -> None:
        if self._trained is None:
            self._trained = self._pool.submit(self._train)
        if which == "built" and self._built is None:
            self._built = self._pool.submit(self._build)

    def trained(self) -> Path:
        assert self._trained is not None
        return self._trained.result()

    def built(self) -> Path:
        assert self._built is not None
        return self._built.result()


def _snapshot(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in paths for p in sorted(root.rglob("*")) if p.is_file()}


def _valid_looking(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name in VALID_LOOKING or p.suffix in (".onnx", ".safetensors")
                  or (p.name.startswith("profile") and p.suffix == ".json"))


@dataclass
class Outcome:
    ctx: Ctx
    result: subprocess.CompletedProcess | None = None
    before: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)


def _execute(case: Case, ctx: Ctx) -> Outcome:
    argv = case.setup(ctx)
    outcome = Outcome(ctx, before=_snapshot(ctx.watch))
    outcome.result = subprocess.run([sys.executable, "-m", ctx.module, *argv], capture_output=True, text=True,
                                    cwd=ctx.dir, env=ctx.shared.env, timeout=TIMEOUT)
    outcome.after = _snapshot(ctx.watch)
    return outcome


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> dict[str, Future]:
    """Start every selected case (-k works) on a pool of WORKERS subprocesses; test ids wait for theirs."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    cases = [c for c in CASES if c.id in selected]
    root = tmp_path_factory.mktemp("bad_inputs")
    mods = root / "mods"
    mods.mkdir()
    (mods / "edgekd_badmods.py").write_text(BADMODS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(mods), os.environ.get("PYTHONPATH")]))}
    env.pop("EDGEKD_DEBUG", None)       # the traceback is what the cases prove absent
    env.pop("EDGEKD_TARGETS", None)     # the repository's catalog
    pool = ThreadPoolExecutor(WORKERS)
    shared = Shared(root, pool, env)
    plain = [c for c in cases if not c.needs]
    # The trained run first, the build (waiting on it) after two plain cases, then the rest, so the two
    # workers stay busy while the shared folders are made.
    if any(c.needs for c in cases):
        shared.start("trained")
    order = plain[:2] + ["build"] + plain[2:] + [c for c in cases if c.needs == "trained"] \
        + [c for c in cases if c.needs == "built"]
    futures: dict[str, Future] = {}
    for case in order:
        if case == "build":
            if any(c.needs == "built" for c in cases):
                shared.start("built")
            continue
        folder = root / case.id
        folder.mkdir()
        futures[case.id] = pool.submit(_execute, case, Ctx(folder, shared))
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _record(case_id: str, message: str) -> None:
    path = os.environ.get("EDGEKD_CORPUS_OUT")
    if path:
        with open(path, "a") as f:
            f.write(f"{case_id}\t{message}\n")


def test_corpus_is_large_and_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) >= 32 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, corpus: dict[str, Future]):
    outcome: Outcome = corpus[case.id].result()
    r = outcome.result
    assert r is not None
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    message = lines[0]
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    written = _valid_looking(outcome.ctx.out)
    assert not written, f"a failed run left {written} in {outcome.ctx.out}"
    assert outcome.before == outcome.after, "a failed run changed files in a folder that existed before it"
    if outcome.ctx.marker is not None:
        assert not outcome.ctx.marker.exists(), "a pickle was unpickled"
    _record(case.id, message.removeprefix("error: "))
