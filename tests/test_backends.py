"""One conformance suite over every registered backend (edgekd.engines.registry): build a bundle from a tiny model,
load it through edgekd.runtime, run it through the one runner protocol, compare with PyTorch, refuse a bad batch.

onnxruntime and torch run for real. TensorRT cannot be installed without an NVIDIA GPU: it runs through
tests/fake_tensorrt.py (transcribed from the 10.3/11.1 bindings; its engine executes the ONNX with onnxruntime),
with host memory standing in for CUDA buffers, as tests/test_engines_trt.py does; on a machine with TensorRT and
a GPU the real module is used. A backend registered later is picked up here by name; without a case below it is
skipped with that reason.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgekd import runtime
from edgekd.bundle import read_manifest
from edgekd.engines import build, check_target, registry
from edgekd.errors import EdgekdError
from edgekd.targets import load_target

ROOT = Path(__file__).resolve().parent.parent


def _tensorrt_case(monkeypatch, tmp_path: Path):
    """The catalog's Jetson Orin Nano target at fp16, on the fake module unless real TensorRT with a GPU is here."""
    import edgekd.engines
    from edgekd.engines import trt as trt_backend

    if trt_backend.availability() != "ok":
        from tests import fake_tensorrt

        mod = fake_tensorrt.make("10.3.0.26")
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        monkeypatch.setattr(edgekd.engines, "cuda_device_count", lambda: (1, ""))
        monkeypatch.setattr(trt_backend, "cuda_binding", lambda: fake_tensorrt.HostCuda(mod.fake))
    target = replace(load_target("jetson-orin-nano-trt"), timing_cache=str(tmp_path / "nano.timing"), workspace_mb=256,
                     max_batch=64)
    return target, "fp16", 1e-4


CASES = {
    "onnxruntime": lambda monkeypatch, tmp_path: (load_target("x86-cpu-ort"), "fp32", 1e-5),
    "torch": lambda monkeypatch, tmp_path: (load_target("x86-cpu-torch"), "fp32", 1e-6),
    "tensorrt": _tensorrt_case,
}


@pytest.fixture(params=registry.runtimes())
def backend_case(request, monkeypatch, tmp_path, edge_source, edge_model):
    """(backend, target, precision, tolerance, source) for one registered runtime."""
    name = request.param
    if name not in CASES:
        pytest.skip(f"no conformance case for runtime {name!r} yet: add one to CASES with a catalog target")
    target, precision, atol = CASES[name](monkeypatch, tmp_path)
    status = check_target(target)
    if status != "ok":
        pytest.skip(status)
    b = registry.backend(name)
    source = edge_source
    if b.source == "weights":
        from edgekd.models import save_weights

        weights = tmp_path / "student.safetensors"
        save_weights(edge_model, weights)
        source = replace(edge_source, onnx_path=None, weights_path=weights, model_spec="cnn:widths=4,8")
    return b, target, precision, atol, source


def test_declaration_is_complete(backend_case) -> None:
    b, target, precision, _, _ = backend_case
    assert set(b.precisions) <= set(registry.PRECISIONS) and set(b.devices) <= set(registry.DEVICES)
    assert b.default_scheme in (*registry.QUANT_SCHEMES, registry.NO_SCHEME) and b.source in ("onnx", "weights")
    module = b.functions()
    assert module.BACKEND is b and all(callable(getattr(module, f)) for f in
                                       ("availability", "check_target", "target_rules", "build_engine", "open_runner"))
    assert target.runtime == b.name and precision in target.precisions and target.device in b.devices


def test_build_load_run_matches_pytorch(backend_case, edge_eval, tmp_path: Path) -> None:
    b, target, precision, atol, source = backend_case
    x, _, ref = edge_eval
    out = build(source, target, precision, tmp_path / "bundle", eval_data=edge_eval)
    manifest = read_manifest(out, verify=True)
    assert manifest["runtime"] == b.name and manifest["metrics"]["test"]["agreement"] == 1.0
    engine = runtime.load(out)
    runner = engine.runner
    assert isinstance(runner, registry.Runner)
    assert runner.input_names == (manifest["input"]["name"],) and runner.output_names == (manifest["output"]["name"],)
    outputs = engine.run({runner.input_names[0]: x})
    assert set(outputs) == set(runner.output_names)
    np.testing.assert_allclose(outputs[runner.output_names[0]], ref, atol=atol)
    np.testing.assert_array_equal(engine(x), outputs[runner.output_names[0]])   # the single-input convenience
    with pytest.raises(EdgekdError, match=r"run\(\) got inputs \['pixels'\], this engine takes"):
        engine.run({"pixels": x})


def test_bad_batch_is_refused(backend_case, edge_eval, tmp_path: Path) -> None:
    b, target, precision, _, source = backend_case
    out = build(source, target, precision, tmp_path / "bundle")
    engine = runtime.load(out)
    name = engine.runner.input_names[0]
    with pytest.raises(EdgekdError, match=r"batch of 0 is outside the engine's batch range 1\.\."):
        engine(np.zeros((0, *source.input_shape), np.float32))
    if b.batch_profile:   # only the profile's batches: one past its maximum is refused before the engine runs
        big = np.zeros((target.max_batch + 1, *source.input_shape), np.float32)
        with pytest.raises(EdgekdError, match=f"batch of {target.max_batch + 1} is outside the engine's batch range "
                                              f"{target.min_batch}..{target.max_batch}"):
            engine.run({name: big})
        x = np.concatenate([edge_eval[0]] * 2)   # 96 > 64: logits() splits at the maximum instead
        np.testing.assert_allclose(engine.logits(x), np.concatenate([engine(edge_eval[0])] * 2), atol=1e-6)
    else:
        assert engine.max_batch is None and engine(np.concatenate([edge_eval[0]] * 3)).shape[0] == 3 * 48


def test_every_catalog_runtime_is_registered_and_unknown_ones_are_named() -> None:
    from edgekd.targets import list_targets

    assert {t.runtime for t in list_targets()} <= set(registry.runtimes())
    with pytest.raises(EdgekdError, match=r"bundle b: unknown runtime 'openvino' \(expected one of onnxruntime, "):
        registry.backend("openvino", "bundle b")


def test_a_runtime_key_of_another_runtime_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('runtime = "torch"\ndevice = "cpu"\nprecisions = ["fp32"]\ntiming_cache = "x.timing"\n')
    with pytest.raises(EdgekdError, match=r"t.toml: key 'timing_cache' only applies to runtime 'tensorrt' \(this "
                                          r"target's runtime is 'torch'\)"):
        load_target(str(path))
    path.write_text('runtime = "tensorrt"\ndevice = "cuda"\nprecisions = ["fp16"]\n'
                    'providers = ["CPUExecutionProvider"]\n')
    with pytest.raises(EdgekdError, match="key 'providers' only applies to runtime 'onnxruntime'"):
        load_target(str(path))


def test_quantization_schemes_are_listed_once() -> None:
    """The registry's list is what the targets, the qat --scheme choice and the quantizers read."""
    pytest.importorskip("torchao")
    from edgekd import cli, quantize, targets

    assert tuple(quantize.SCHEMES) == registry.QUANT_SCHEMES
    assert all(cls.scheme == name for name, cls in quantize.SCHEMES.items())
    assert targets.QUANT_SCHEMES == (*registry.QUANT_SCHEMES, "none")
    choice = next(p for p in cli.cli.commands["qat"].params if p.name == "scheme")
    assert tuple(choice.type.choices) == registry.QUANT_SCHEMES


def test_registry_and_runtime_import_without_torch_or_tensorrt_and_without_a_cycle() -> None:
    """A device has numpy and its runtime only: the registry lists every backend without importing torch or
    tensorrt, and edgekd.runtime does not import edgekd.profile (profile imports runtime, one direction)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None\n"
            "from edgekd.engines import registry; import edgekd.runtime, edgekd.targets\n"
            "assert 'edgekd.profile' not in sys.modules, 'runtime imported profile'\n"
            "import edgekd.profile\n"
            "print(sorted(registry.backends()), registry.backend('torch').availability().startswith('not installed'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["['onnxruntime',", "'tensorrt',", "'torch']", "True"]


# A runtime added the way the registry promises: one module (written here into a temporary folder: onnx's own
# ReferenceEvaluator, a real ONNX runtime that ships with the onnx package), found in the engines folder like the
# built-in ones (the temporary folder joins edgekd.engines' path), and one target file. Nothing else in edgekd
# changes, and the bundle builds, loads, runs and agrees with PyTorch.
REFERENCE_BACKEND = '''
from pathlib import Path
import shutil

from edgekd.engines.registry import Backend, Runner, check_feeds

BACKEND = Backend(name="onnx-reference", module=__name__, precisions=("fp32",), devices=("cpu",),
                  default_scheme="none", source="onnx")


def availability():
    return "ok"


def check_target(target):
    return "ok"


def target_rules(file, values):
    return {}


def build_engine(source, target, precision, out):
    from edgekd.engines import check_onnx_source

    info = check_onnx_source(source, target, precision)
    shutil.copyfile(source.onnx_path, Path(out) / "model.onnx")
    return {"engine": {"file": "model.onnx"}, "input_name": info["input_name"], "output_name": info["output_name"]}


class ReferenceRunner(Runner):
    def __init__(self, path):
        from onnx.reference import ReferenceEvaluator

        self.session = ReferenceEvaluator(str(path))
        self.input_names, self.output_names = tuple(self.session.input_names), tuple(self.session.output_names)
        self.info = {"file": Path(path).name}

    def run(self, feeds):
        check_feeds(self, feeds)
        return dict(zip(self.output_names, self.session.run(None, feeds)))


def open_runner(bundle_dir, manifest, threads):
    return ReferenceRunner(Path(bundle_dir) / manifest["engine"]["file"])
'''


def test_a_new_runtime_is_one_module_and_a_target_file(monkeypatch, tmp_path: Path, edge_source, edge_eval) -> None:
    import edgekd.engines

    (tmp_path / "reference.py").write_text(REFERENCE_BACKEND)
    monkeypatch.setattr(edgekd.engines, "__path__", [*edgekd.engines.__path__, str(tmp_path)])
    registry.backends.cache_clear()
    assert registry.backends()["onnx-reference"].module == "edgekd.engines.reference"
    try:
        target_file = tmp_path / "x86-cpu-reference.toml"
        target_file.write_text('runtime = "onnx-reference"\ndevice = "cpu"\nprecisions = ["fp32"]\n')
        target = load_target(str(target_file))
        assert target.quant_scheme == "none" and check_target(target) == "ok"
        out = build(edge_source, target, "fp32", tmp_path / "bundle", eval_data=edge_eval)
        engine = runtime.load(out)
        assert read_manifest(out)["metrics"]["test"]["agreement"] == 1.0
        np.testing.assert_allclose(engine(edge_eval[0]), edge_eval[2], atol=1e-5)
        with pytest.raises(EdgekdError, match="batch of 0 is outside"):
            engine(np.zeros((0, 1, 8, 8), np.float32))
    finally:
        registry.backends.cache_clear()


def test_the_runner_protocol_takes_every_named_input_and_gives_every_named_output(tmp_path: Path) -> None:
    """Names come from the model, not from edgekd: a two-input, two-output ONNX (token ids and a mask, as a text
    encoder has) runs through the onnxruntime runner by its own names, with its own dtypes."""
    import onnx
    from onnx import TensorProto, helper

    from edgekd.engines.ort import OrtRunner

    graph = helper.make_graph(
        [helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
         helper.make_node("Cast", ["kept"], ["kept_f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceSum", ["kept_f"], ["token_sum"], keepdims=0)],
        "two_in_two_out",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("token_sum", TensorProto.FLOAT, [])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    manifest = {"engine": {"file": "model.onnx", "graph_optimization_level": "disable",
                           "saved_optimization_level": "disable", "providers": ["CPUExecutionProvider"]}}
    runner = OrtRunner(tmp_path, manifest)
    assert runner.input_names == ("input_ids", "attention_mask") and runner.output_names == ("kept", "token_sum")
    ids = np.array([[5, 7, 9], [2, 4, 0]], np.int64)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    out = runner.run({"attention_mask": mask, "input_ids": ids})
    np.testing.assert_array_equal(out["kept"], [[5, 7, 0], [2, 0, 0]])
    assert out["token_sum"] == 14.0
    with pytest.raises(EdgekdError, match=r"call run\(\) with a dict of them"):
        runner(ids)   # the single-input convenience refuses a two-input engine
    with pytest.raises(EdgekdError, match=r"run\(\) got inputs \['input_ids'\], this engine takes \['input_ids', "
                                          r"'attention_mask'\]"):
        runner.run({"input_ids": ids})
