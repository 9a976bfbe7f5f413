"""The device-side runtime: no torch at import, same logits as onnxruntime, clear input errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from edgekd import runtime
from edgekd.bundle import read_manifest, write_manifest
from edgekd.engines import EngineSource, build
from edgekd.errors import EdgekdError
from edgekd.models import build_model, save_weights
from edgekd.preprocess import PreprocessSpec
from edgekd.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)


def test_import_pulls_in_neither_torch_nor_click() -> None:
    done = _python("import edgekd.runtime, sys; assert 'torch' not in sys.modules, 'torch'; "
                   "assert 'click' not in sys.modules, 'click'; assert 'onnxruntime' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_running_an_ort_bundle_needs_no_torch(edge_ort_bundle: Path) -> None:
    code = (f"import sys, numpy as np, edgekd.runtime as rt; e = rt.load({str(edge_ort_bundle)!r}); "
            "print(e(np.zeros((2, 1, 8, 8), np.float32)).shape); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(sys.modules)")
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"


def test_same_logits_as_onnxruntime(edge_ort_bundle: Path, edge_onnx: Path, edge_eval) -> None:
    engine = runtime.load(edge_ort_bundle)
    session = ort.InferenceSession(str(edge_onnx), providers=["CPUExecutionProvider"])
    for n in (1, 5, 48):
        x = edge_eval[0][:n]
        np.testing.assert_allclose(engine(x), session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)
    assert engine.manifest["target"] == "x86-cpu-ort"
    assert engine.input_shape == (1, 8, 8)


def test_input_errors(edge_ort_bundle: Path) -> None:
    engine = runtime.load(edge_ort_bundle)
    with pytest.raises(EdgekdError, match=r"input shape \(2, 3, 8, 8\) does not match the engine's "
                                          r"\(N, 1, 8, 8\)"):
        engine(np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(EdgekdError, match=r"input shape \(1, 8, 8\) does not match"):
        engine(np.zeros((1, 8, 8), np.float32))
    with pytest.raises(EdgekdError, match="dtype int64, expected float32"):
        engine(np.zeros((2, 1, 8, 8), np.int64))
    with pytest.raises(EdgekdError, match="numpy array"):
        engine([[0.0]])
    assert engine(np.zeros((2, 1, 8, 8), np.float64)).dtype == np.float32  # float64 is converted


def test_preprocess_and_predict(edge_ort_bundle: Path) -> None:
    engine = runtime.load(edge_ort_bundle)
    raw = np.full((1, 8, 8), 1.0, np.float32)
    x = engine.preprocess(raw)  # a single sample gets a batch axis
    assert x.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(x, (1.0 - 0.5) / 0.25)
    labels = engine.predict(engine.preprocess(np.zeros((3, 1, 8, 8))))
    assert len(labels) == 3 and all(label.startswith("class") for label in labels)
    with pytest.raises(EdgekdError, match="raw input shape"):
        engine.preprocess(np.zeros((2, 8, 8)))


def test_missing_and_tampered_bundles(edge_ort_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(EdgekdError, match="folder not found"):
        runtime.load(tmp_path / "nope")
    copy = tmp_path / "b"
    shutil.copytree(edge_ort_bundle, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(EdgekdError, match="file model.onnx is missing"):
        runtime.load(copy)


def test_cli_profile_writes_json(edge_ort_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "edgekd.runtime", "profile", str(edge_ort_bundle), "--json",
                           str(out), "--batch", "1,4", "--warmup", "2", "--min-runs", "5", "--min-seconds", "0.05"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 4]
    assert result["accuracy"] is not None and result["agreement"] == 1.0
    assert "p50 ms" in done.stdout and "accuracy" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "edgekd.runtime", "profile", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "folder not found" in bad.stderr


def _torch_setup(tmp_path: Path) -> tuple[torch.nn.Module, EngineSource]:
    torch.manual_seed(1)
    model = build_model("mlp:hidden=16", (1, 8, 8), 10).eval()
    weights = tmp_path / "student.safetensors"
    save_weights(model, weights)
    source = EngineSource(model_name="student", onnx_path=None, weights_path=weights, model_spec="mlp:hidden=16",
                          input_shape=(1, 8, 8), num_classes=10, class_names=(), normalization={})
    return model, source


def test_torch_runtime_on_cpu(tmp_path: Path) -> None:
    model, source = _torch_setup(tmp_path)
    target_file = tmp_path / "cpu-torch.toml"
    target_file.write_text('description = "torch on the CPU"\nruntime = "torch"\ndevice = "cpu"\n'
                           'precisions = ["fp32"]\nbatch_sizes = [1, 4]\nthreads = 1\n')
    out = build(source, load_target(str(target_file)), "fp32", tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    engine = runtime.load(out)
    assert engine.info["device"] == "cpu" and not engine.info["compiled"]
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(engine(x), want, atol=1e-6)
    assert engine.preprocess(x[0]).shape == (1, 1, 8, 8)  # no normalization: identity
    with pytest.raises(EdgekdError, match="precision fp32 does not match quantization 'ptq'"):
        build(replace(source, quantization="ptq"), load_target(str(target_file)), "fp32", tmp_path / "x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_torch_cuda_target_without_cuda(tmp_path: Path) -> None:
    _, source = _torch_setup(tmp_path)
    out = build(source, load_target("cuda-torch"), "fp16", tmp_path / "bundle")  # building needs no GPU...
    assert read_manifest(out)["engine"]["compile"] and read_manifest(out)["engine"]["dtype"] == "float16"
    with pytest.raises(EdgekdError, match="runs on CUDA, but torch .* sees no CUDA device"):
        runtime.load(out)


# --- Images in, class names out: the bundle's own preprocessing spec ------------------------------------------

IMAGE_SPEC = PreprocessSpec(mode="RGB", resize=12, crop=(8, 8), mean=(0.5, 0.45, 0.4), std=(0.25, 0.2, 0.3))
IMAGE_CLASSES = ("cat", "dog", "owl")


def _jpegs(folder: Path, n: int = 9) -> list[Path]:
    """RGB JPEGs of two aspect ratios (so resize keeps the ratio and the crop is off-centre), smooth enough that
    JPEG keeps them apart."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        h, w = (16, 22) if i % 2 else (20, 14)
        px = np.kron(rng.integers(0, 256, (h // 2, w // 2, 3)), np.ones((2, 2, 1))).astype(np.uint8)
        paths.append(folder / f"img{i}.jpg")
        Image.fromarray(px).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> tuple[Path, list[Path], np.ndarray]:
    """An onnxruntime bundle of a tiny RGB CNN whose manifest carries IMAGE_SPEC; returns (bundle, JPEG files,
    the PyTorch logits on those files preprocessed by edgekd.preprocess.apply)."""
    from edgekd.export import export_onnx
    from edgekd.preprocess import apply

    folder = tmp_path_factory.mktemp("image_bundle")
    torch.manual_seed(0)
    model = build_model("cnn:widths=4,8", (3, 8, 8), len(IMAGE_CLASSES)).eval()
    onnx_path = export_onnx(model, torch.zeros(1, 3, 8, 8), folder / "student.onnx", metadata={})
    files = _jpegs(folder / "jpegs")
    x = np.stack([apply(IMAGE_SPEC, f) for f in files])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    source = EngineSource(model_name="student", onnx_path=onnx_path, weights_path=None, model_spec=None,
                          input_shape=(3, 8, 8), num_classes=len(IMAGE_CLASSES), class_names=IMAGE_CLASSES,
                          normalization={}, preprocessing=IMAGE_SPEC.to_dict())
    bundle = build(source, load_target("x86-cpu-ort"), "fp32", folder / "bundle", eval_data=(x, ref.argmax(1), ref))
    return bundle, files, ref


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_classify_images_from_paths_bytes_pil_and_arrays(image_bundle) -> None:
    bundle, files, ref = image_bundle
    engine = runtime.load(bundle)
    pre = engine.manifest["preprocessing"]
    assert pre["spec"] == IMAGE_SPEC.to_dict()
    mean, std = np.asarray(IMAGE_SPEC.mean), np.asarray(IMAGE_SPEC.std)
    assert pre["input_range"] == pytest.approx([float((-mean / std).min()), float(((1 - mean) / std).max())])
    names, probs = engine.classify([str(f) for f in files])
    assert names == [IMAGE_CLASSES[i] for i in ref.argmax(1)]
    np.testing.assert_allclose(probs, _softmax(ref), atol=1e-5)
    pixels = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    for images in ([f.read_bytes() for f in files], [Image.open(f) for f in files], pixels, files):
        got_names, got = engine.classify(images)
        assert got_names == names
        np.testing.assert_allclose(got, probs, atol=1e-6)
    chunked_names, chunked = engine.classify(files, batch_size=2)   # decoded and run two at a time
    assert chunked_names == names
    np.testing.assert_allclose(chunked, probs, atol=1e-6)
    one_name, one = engine.classify(files[3])   # a single image is a batch of one
    assert one_name == names[3:4] and one.shape == (1, 3)
    assert engine.preprocess(pixels[0][None])[0] == pytest.approx(engine.preprocess(files[0])[0], abs=1e-6)


def test_wrong_scale_is_refused(image_bundle, edge_ort_bundle: Path) -> None:
    bundle, files, _ = image_bundle
    engine = runtime.load(bundle)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((8, 8))) for f in files[:2]])
    chw = pixels.transpose(0, 3, 1, 2)
    with pytest.raises(EdgekdError, match=r"input values span \[.*\], but this engine's normalized input lies in"):
        engine(chw.astype(np.float32))                     # 0-255 floats where normalized input belongs
    with pytest.raises(EdgekdError, match="raw pixels"):
        engine.preprocess(chw.astype(np.float32))          # 0-255 floats where [0, 1] floats belong
    scaled = engine.preprocess(chw.astype(np.float32) / 255)
    np.testing.assert_allclose(engine.preprocess(chw), scaled, atol=1e-6)   # uint8 (N, C, H, W): scaled first
    engine(scaled)
    # array bundles (no image spec) refuse against the range observed on the test split at build time
    edge = runtime.load(edge_ort_bundle)
    with pytest.raises(EdgekdError, match="input values span"):
        edge(np.full((2, 1, 8, 8), 255.0, np.float32))
    with pytest.raises(EdgekdError, match="records no image preprocessing"):
        edge.classify([str(files[0])])


def test_older_and_inconsistent_manifests(image_bundle, edge_ort_bundle: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(edge_ort_bundle, old)
    manifest = read_manifest(old)
    del manifest["preprocessing"]["input_range"]   # as edgekd wrote bundles before the spec and range
    write_manifest(old, manifest)
    engine = runtime.load(old)
    assert engine.spec is None and engine.input_range is None
    assert engine(np.full((1, 1, 8, 8), 255.0, np.float32)).shape == (1, 10)   # read as before: no range check
    bad = tmp_path / "bad"
    shutil.copytree(image_bundle[0], bad)
    manifest = read_manifest(bad)
    good = IMAGE_SPEC.to_dict()
    for spec, message in (({**good, "version": 2}, "spec version 2 is not supported"),
                          ({**good, "crop": [6, 6]}, r"does not produce the engine's input \(3, 8, 8\)"),
                          ({**good, "mode": "L", "mean": [0.5], "std": [0.2]}, "does not produce the engine's"),
                          ({**good, "scale": 0}, "preprocessing.scale")):
        write_manifest(bad, {**manifest, "preprocessing": {**manifest["preprocessing"], "spec": spec}})
        with pytest.raises(EdgekdError, match=f"bundle {bad}.*{message}"):
            runtime.load(bad)
    for value in ("wide", [1.0], [2.0, -2.0], [0.0, float("nan")]):
        write_manifest(bad, {**manifest, "preprocessing": {**manifest["preprocessing"], "input_range": value}})
        with pytest.raises(EdgekdError, match=r"preprocessing.input_range is .*; expected \[lo, hi\]"):
            runtime.load(bad)


def test_runtime_only_install_classifies_jpegs_without_torch(image_bundle, tmp_path: Path) -> None:
    """What a device does: a fresh venv, `pip install edgekd-runtime[ort]` (runtime/pyproject.toml, built here from
    a copy of the sources so the checkout stays clean), then classify JPEG files from disk and profile the bundle.
    torch must not be importable there, and every module the distribution ships except the torch runner imports."""
    import tomllib

    bundle, files, _ = image_bundle
    src = tmp_path / "src"
    shutil.copytree(ROOT / "edgekd", src / "edgekd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "runtime", src / "runtime")
    shipped = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = [*shipped["py-modules"], *shipped["packages"]]
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{src / 'runtime'}[ort]"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    code = ("import importlib, importlib.util, json, sys; assert importlib.util.find_spec('torch') is None, 'torch'; "
            f"[importlib.import_module(m) for m in {modules!r} if m != 'edgekd.engines.pytorch']; "
            "import edgekd, edgekd.runtime as rt, edgekd.tasks; assert list(edgekd.tasks.TASKS) == ['classification', "
            "'embedding'], 'tasks'; e = rt.load(sys.argv[1]); names, probs = e.classify(sys.argv[2:]); "
            "print(json.dumps({'file': edgekd.__file__, 'names': names, 'probs': probs.tolist()}))")
    done = subprocess.run([str(python), "-c", code, str(bundle), *map(str, files)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["file"]).is_relative_to(venv)   # the installed copy, not the checkout
    names, probs = runtime.load(bundle).classify(files)
    assert out["names"] == names
    np.testing.assert_allclose(out["probs"], probs, atol=1e-6)
    prof = subprocess.run([str(python), "-m", "edgekd.runtime", "profile", str(bundle), "--batch", "1", "--warmup",
                           "1", "--min-runs", "3", "--min-seconds", "0"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert prof.returncode == 0 and "accuracy 100.00% on 9 samples" in prof.stdout, prof.stderr


def test_runtime_preprocessing_matches_the_training_eval_transform(tmp_path: Path) -> None:
    """An image-folder recipe (shorter-side resize, centre crop, mean/std estimated from training images) built
    into an onnxruntime bundle by the pipeline: the runtime's preprocessing of the test files equals the
    training data's eval transform of the same files, and the engine's top-1 is the same on both."""
    from edgekd import pipeline
    from edgekd.recipe import load_recipe

    rng = np.random.default_rng(0)
    for c, name in enumerate(IMAGE_CLASSES):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(8):
            h, w = (20, 28) if i % 2 else (26, 18)
            px = np.clip(rng.normal(60 + 60 * c, 40, (h // 2, w // 2, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(np.kron(px, np.ones((2, 2, 1), np.uint8))).save(tmp_path / "images" / name / f"{i}.jpg")
    (tmp_path / "recipe.toml").write_text(
        '[data]\nsource = "images"\nresize = 14\ncrop = [12, 12]\ntest_fraction = 0.25\nnum_workers = 0\n'
        '[teacher]\nmodel = "cnn:widths=4"\n[student]\nmodel = "cnn:widths=4,8"\n')
    recipe = load_recipe(tmp_path / "recipe.toml")
    run = tmp_path / "run"
    ctx = pipeline.RunContext(run, recipe)
    torch.manual_seed(0)
    save_weights(build_model("cnn:widths=4,8", ctx.data.input_shape, ctx.data.num_classes), run / "student.safetensors")
    built = pipeline.build(run, "x86-cpu-ort", models=("student",), ctx=ctx)["built"]
    engine = runtime.load(built[0])
    assert engine.spec == ctx.data.preprocess and engine.spec.crop == (12, 12) and engine.spec.resize == 14
    assert engine.manifest["metrics"]["test"]["samples"] == 6   # the streamed test split, scored on the build host

    files = ctx.data.x_test.files()
    training = np.asarray(ctx.data.x_test[:])          # the training pipeline's eval transform of the test split
    assert len(files) == 6 and training.shape == (6, 3, 12, 12)
    assert np.abs(engine.preprocess(files) - training).max() < 1e-5
    names, _ = engine.classify(files)
    assert names == [IMAGE_CLASSES[i] for i in engine(training).argmax(1)]
