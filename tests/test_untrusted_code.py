"""Issue 16, class 1: no code named by data. A bundle's manifest or a checkpoint's metadata never picks code to run.

Each payload is shown to be live first (calling what it names really creates its marker file), then handed to
edgekd through the real runtime API (`edgekd.runtime.load`, `edgekd.teachers.load_teacher`, `engines.build`) and
the real CLI (`python -m edgekd.runtime profile`, `edgekd label`): refused with a one-line error, the marker never
appears, the module it names is never imported, nothing outside is opened and no folder changes.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekd import runtime
from edgekd.engines import EngineSource, build
from edgekd.fileio import sha256_file
from edgekd.models import build_model, save_weights
from edgekd.targets import load_target
from tests._hostile import check_api_refusal, check_cli_refusal, cli, edit_json, resign

MARKER_MODULE = '''
import os, pathlib
pathlib.Path(os.environ["EDGEKD_MARKER"]).write_text("imported")


def make(input_shape, num_classes):
    import torch
    return torch.nn.Flatten()
'''
INPUT = (1, 8, 8)
CLASSES = 10
TORCH_CPU = ('description = "torch on the CPU"\nruntime = "torch"\ndevice = "cpu"\nprecisions = ["fp32"]\n'
             'batch_sizes = [1, 4]\nthreads = 1\n')


class _Marker:
    """Unpickling this creates the file at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("torch-bundle")
    torch.manual_seed(0)
    save_weights(build_model("mlp:hidden=16", INPUT, CLASSES), root / "w.safetensors")
    (root / "cpu-torch.toml").write_text(TORCH_CPU)
    source = EngineSource(model_name="student", onnx_path=None, weights_path=root / "w.safetensors",
                          model_spec="mlp:hidden=16", input_shape=INPUT, num_classes=CLASSES, class_names=(),
                          normalization={})
    return build(source, load_target(str(root / "cpu-torch.toml")), "fp32", root / "bundle")


@pytest.fixture
def env(tmp_path: Path, monkeypatch, evil_pt2: Path) -> dict:
    """A folder holding edgekd_marker_mod (importing it writes the marker), on sys.path and in the CLI's PYTHONPATH."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "edgekd_marker_mod.py").write_text(MARKER_MODULE)
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("EDGEKD_MARKER", str(marker))
    monkeypatch.syspath_prepend(str(mods))
    sys.modules.pop("edgekd_marker_mod", None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("sentinel")
    return {"marker": marker, "outside": outside, "pt2": evil_pt2,
            "cli_env": {"PYTHONPATH": str(mods), "EDGEKD_MARKER": str(marker)}}


@pytest.fixture(scope="module")
def evil_pt2(tmp_path_factory) -> Path:
    """A real torch.export .pt2 whose symbolic-shape expression is Python (torch.export.load sympifies, i.e. evals,
    it): writes the file named by $EDGEKD_MARKER."""
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, CLASSES)).eval()
    ep = torch.export.export(model, (torch.zeros(2, *INPUT),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    clean = path.with_suffix(".clean.pt2")
    torch.export.save(ep, clean)
    payload = "__import__('pathlib').Path(__import__('os').environ['EDGEKD_MARKER']).write_text('pt2')"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("models/model.json"):
                text = data.decode()
                exprs = set(re.findall(r'"expr_str": ("(?:[^"\\]|\\.)*")', text))
                assert exprs, "the exported program has no symbolic shape to carry the payload"
                for e in exprs:
                    text = text.replace(f'"expr_str": {e}', f'"expr_str": {json.dumps(payload)}')
                data = text.encode()
            dst.writestr(name, data)
    clean.unlink()
    return path


def _prove_live(marker: Path, run: Callable[[], object]) -> None:
    """The payload really runs code when handed to what it targets (then the marker is removed again)."""
    assert not marker.exists()
    try:
        run()
    except Exception:
        pass
    assert marker.exists(), "the payload is not live; the test would prove nothing"
    marker.unlink()


@dataclass(frozen=True)
class Hostile:
    id: str
    fragments: tuple[str, ...]
    tamper: Callable[[Path, dict], None]   # (bundle copy, env)


def _spec(spec: object, input_shape: Callable[[dict], object] | None = None, sign: bool = True
          ) -> Callable[[Path, dict], None]:
    def tamper(b: Path, e: dict) -> None:
        def change(m: dict) -> None:
            m["engine"]["model_spec"] = spec
            if input_shape is not None:
                m["engine"]["input_shape"] = input_shape(e)
        manifest = edit_json(b / "manifest.json", change)
        if sign:
            resign(b, manifest)
        else:
            (b / "manifest.json").write_text(json.dumps(manifest))
    return tamper


def _shell(e: dict) -> list[str]:
    return ["touch", str(e["marker"])]   # subprocess.call(("touch", MARKER), 10) if the spec were imported


def _pt2(b: Path, e: dict) -> None:
    shutil.copyfile(e["pt2"], b / "model.pt2")
    _prove_live(e["marker"], lambda: torch.export.load(b / "model.pt2"))

    def change(m: dict) -> None:
        m["engine"]["file"] = "model.pt2"
        m["files"]["model.pt2"] = sha256_file(b / "model.pt2")
    resign(b, edit_json(b / "manifest.json", change))


def _pickled_weights(b: Path, e: dict) -> None:
    (b / "model.safetensors").write_bytes(pickle.dumps({"w": _Marker(e["marker"])}, protocol=4))
    resign(b, edit_json(b / "manifest.json",
                        lambda m: m["files"].update({"model.safetensors": sha256_file(b / "model.safetensors")})))


CASES = [
    Hostile("manifest-subprocess-call-unsigned", ("was edited after edgekd wrote it",),
            _spec("subprocess:call", _shell, sign=False)),
    Hostile("manifest-subprocess-call-signed", ("model spec 'subprocess:call' is not a built-in family",
                                                "never names code to import"), _spec("subprocess:call", _shell)),
    Hostile("manifest-importing-module-signed", ("'edgekd_marker_mod:make' is not a built-in family",),
            _spec("edgekd_marker_mod:make")),
    Hostile("manifest-spec-not-a-string", ("is not a built-in family",), _spec({"module": "os", "fn": "system"})),
    Hostile("exported-program-pt2", ("engine.file 'model.pt2' is not a .safetensors file",
                                     "torch.export.load runs code from the file"), _pt2),
    Hostile("pickle-as-weights", ("model.safetensors is not a valid safetensors file",), _pickled_weights),
    Hostile("architecture-bomb", ("does not hold the weights of model 'mlp:hidden=1000000000,1000000000'",),
            _spec("mlp:hidden=1000000000,1000000000")),
]


@pytest.fixture
def copy(torch_bundle: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(torch_bundle, bundle)
    return bundle


def test_the_payloads_are_live(env: dict, tmp_path: Path) -> None:
    """Without the checks, the manifest's spec would run a shell command and the module would be imported."""
    _prove_live(env["marker"], lambda: build_model("subprocess:call", tuple(_shell(env)), CLASSES))
    _prove_live(env["marker"], lambda: build_model("edgekd_marker_mod:make", INPUT, CLASSES))
    sys.modules.pop("edgekd_marker_mod", None)
    _prove_live(env["marker"], lambda: pickle.loads(pickle.dumps(_Marker(env["marker"]))))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_torch_bundle_refused_by_runtime_load(case: Hostile, copy: Path, env: dict) -> None:
    case.tamper(copy, env)
    check_api_refusal(lambda: runtime.load(copy), (f"bundle {copy}", *case.fragments), forbidden=[env["outside"]],
                      watch=[copy, env["outside"]], marker=env["marker"])
    assert "edgekd_marker_mod" not in sys.modules


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_torch_bundle_refused_by_cli_profile(case: Hostile, copy: Path, env: dict, tmp_path: Path) -> None:
    case.tamper(copy, env)
    check_cli_refusal(["profile", str(copy), "--save-metrics", "--warmup", "0", "--min-runs", "1",
                       "--min-seconds", "0"], (f"bundle {copy}", *case.fragments), cwd=tmp_path,
                      module="edgekd.runtime", forbidden=[env["outside"]], watch=[copy, env["outside"]],
                      marker=env["marker"], env_extra=env["cli_env"])


def test_intact_torch_bundle_still_runs(copy: Path) -> None:
    """The control: the untouched bundle loads and gives the model's logits."""
    engine = runtime.load(copy)
    assert engine(np.zeros((2, *INPUT), np.float32)).shape == (2, CLASSES)


def test_build_refuses_a_factory_model_for_the_torch_runtime(env: dict, tmp_path: Path) -> None:
    """A model only a factory can build goes to an onnxruntime/tensorrt target; the factory is not imported here."""
    (tmp_path / "cpu-torch.toml").write_text(TORCH_CPU)
    save_weights(build_model("mlp:hidden=16", INPUT, CLASSES), tmp_path / "w.safetensors")
    source = EngineSource(model_name="student", onnx_path=None, weights_path=tmp_path / "w.safetensors",
                          model_spec="edgekd_marker_mod:make", input_shape=INPUT, num_classes=CLASSES,
                          class_names=(), normalization={})
    target = load_target(str(tmp_path / "cpu-torch.toml"))
    check_api_refusal(lambda: build(source, target, "fp32", tmp_path / "out"),
                      ("'edgekd_marker_mod:make' is not a built-in family", "use an onnxruntime or tensorrt target"),
                      forbidden=[env["outside"]], watch=[env["outside"]], marker=env["marker"])
    assert not (tmp_path / "out").exists() and "edgekd_marker_mod" not in sys.modules


# --- teacher checkpoints ----------------------------------------------------------------------------------


def _hostile_checkpoint(path: Path, marker: Path, spec: str = "mlp:hidden=16") -> Path:
    """Real weights of `spec` whose safetensors metadata names subprocess.call with a shell command as input shape."""
    meta = {"model": "subprocess:call", "input_shape": json.dumps(["touch", str(marker)]), "num_classes": "1"}
    save_weights(build_model(spec, INPUT, CLASSES), path, meta)
    return path


def test_load_teacher_never_takes_the_model_from_metadata(env: dict, tmp_path: Path) -> None:
    from edgekd.teachers import load_teacher

    ckpt = _hostile_checkpoint(tmp_path / "teacher.safetensors", env["marker"])
    check_api_refusal(lambda: load_teacher(str(ckpt)), ("model_spec, input_shape, num_classes not given",
                                                        "never used to pick code"),
                      forbidden=[env["outside"]], watch=[env["outside"], ckpt.parent], marker=env["marker"])
    check_api_refusal(lambda: load_teacher(str(ckpt), input_shape=INPUT, num_classes=CLASSES),
                      ("model_spec not given",), forbidden=[env["outside"]], watch=[env["outside"]],
                      marker=env["marker"])
    teacher = load_teacher(str(ckpt), model_spec="mlp:hidden=16", input_shape=INPUT, num_classes=CLASSES)
    assert teacher(np.zeros((3, *INPUT), np.float32)).values.shape == (3, CLASSES)
    assert not env["marker"].exists()


@pytest.fixture
def label_setup(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.random((40, *INPUT)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:30], y_train=np.arange(30) % CLASSES, x_test=x[30:],
             y_test=np.arange(10) % CLASSES)
    np.savez(tmp_path / "pool.npz", x=rng.random((12, *INPUT)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize("teacher_model,refused", [("cnn:widths=4,8", True), ("mlp:hidden=16", False)],
                         ids=["recipe-model-differs", "recipe-model-matches"])
def test_cli_label_takes_the_model_from_the_recipe(teacher_model: str, refused: bool, label_setup: Path,
                                                   env: dict) -> None:
    """`edgekd label --teacher hostile.safetensors`: the recipe's [teacher] model is built, the metadata ignored."""
    root = label_setup
    (root / "recipe.toml").write_text(f'[data]\nsource = "d.npz"\nnormalize = false\nval_fraction = 0.0\n'
                                      f'[teacher]\nmodel = "{teacher_model}"\n[student]\nmodel = "mlp:hidden=8"\n')
    ckpt = _hostile_checkpoint(root / "teacher.safetensors", env["marker"])
    args = ["label", str(root / "recipe.toml"), "--teacher", str(ckpt), "--pool", str(root / "pool.npz"),
            "--out", str(root / "labels"), "--quiet"]
    if refused:
        check_cli_refusal(args, ("teacher.safetensors: does not match the model",), cwd=root,
                          forbidden=[env["outside"]], watch=[env["outside"]], marker=env["marker"],
                          env_extra=env["cli_env"])
        assert not (root / "labels").exists()
    else:
        r, _ = cli(args, cwd=root, env_extra=env["cli_env"])
        assert r.returncode == 0, r.stderr
        assert (root / "labels" / "manifest.json").is_file() and not env["marker"].exists()


def test_exported_program_loader_is_not_reachable_from_a_bundle() -> None:
    """No module of edgekd calls torch.export.load: the only .pt2 loader runs code from the file."""
    root = Path(__file__).resolve().parents[1] / "edgekd"
    callers = [str(p) for p in root.rglob("*.py") if "export.load(" in p.read_text()]
    assert callers == []

