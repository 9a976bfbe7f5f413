import json
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from edgekd.errors import EdgekdError
from edgekd.models import build_model, save_weights
from edgekd.teachers import (
    CommandTeacher,
    FunctionTeacher,
    OnnxTeacher,
    TeacherOutput,
    TorchTeacher,
    load_teacher,
    validate_output,
)

INPUT_SHAPE = (1, 6, 6)
CLASSES = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("mlp:hidden=16", INPUT_SHAPE, CLASSES).eval()


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((12, *INPUT_SHAPE)).astype(np.float32)


def _logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_torch_teacher_gives_eval_mode_logits_and_a_weight_identity(model, x, tmp_path):
    model.train()   # the teacher must switch to eval itself
    teacher = TorchTeacher(model, batch_size=5)
    out = teacher(x)
    assert out.kind == "logits" and out.values.dtype == np.float32 and out.indices is None
    assert np.allclose(out.values, _logits(model.eval(), x), atol=1e-6)
    assert not model.training
    assert teacher.identity() == TorchTeacher(model).identity()
    other = build_model("mlp:hidden=16", INPUT_SHAPE, CLASSES)
    assert TorchTeacher(other).identity() != teacher.identity()

    meta = {"model": "mlp:hidden=16", "input_shape": json.dumps(list(INPUT_SHAPE)), "num_classes": str(CLASSES)}
    save_weights(model, tmp_path / "t.safetensors", meta)
    with pytest.raises(EdgekdError, match="model_spec, input_shape, num_classes not given"):
        load_teacher(str(tmp_path / "t.safetensors"))   # the file's metadata never picks the architecture (issue 16)
    loaded = load_teacher(str(tmp_path / "t.safetensors"), model_spec="mlp:hidden=16", input_shape=INPUT_SHAPE,
                          num_classes=CLASSES)
    assert np.allclose(loaded(x).values, out.values, atol=1e-6)
    assert loaded.identity().startswith("torch:") and len(loaded.identity()) == 6 + 64
    with pytest.raises(EdgekdError, match="expected a .onnx file, a .safetensors checkpoint"):
        load_teacher(str(tmp_path / "teacher.pt"))


def test_onnx_teacher_on_an_exported_model(edge_model, edge_onnx, edge_eval):
    # edge_onnx: conftest's session fixture, edge_model exported with edgekd.export.export_onnx (shared cost)
    x = edge_eval[0]
    teacher = load_teacher(str(edge_onnx), input_shape=(1, 8, 8))
    assert isinstance(teacher, OnnxTeacher)
    out = teacher(x)
    assert out.kind == "logits"
    assert np.allclose(out.values, _logits(edge_model, x), atol=1e-4)
    assert teacher.identity().startswith("onnx:")
    assert OnnxTeacher(edge_onnx, output_kind="probs")(x[:3]).kind == "probs"
    with pytest.raises(EdgekdError, match=r"takes inputs of shape \(1, 8, 8\), the data has \(3, 8, 8\)"):
        load_teacher(str(edge_onnx), input_shape=(3, 8, 8))
    with pytest.raises(EdgekdError, match="cannot run it on inputs of shape"):
        teacher(np.zeros((2, 3, 8, 8), np.float32))


def test_onnx_teacher_infers_probs_from_a_softmax_output(tmp_path, x):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((36, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["z"]),
         helper.make_node("Softmax", ["z"], ["probs"], axis=1)],
        "softmax_teacher", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "p.onnx")
    out = OnnxTeacher(tmp_path / "p.onnx")(x)
    assert out.kind == "probs" and np.allclose(out.values.sum(1), 1, atol=1e-5)
    assert OnnxTeacher(tmp_path / "p.onnx", output_kind="logits")(x).kind == "logits"   # explicit override


SCRIPT = """
import sys, time
import numpy as np

mode, in_path, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.load(in_path)["x"]
n = len(x)
z = x.reshape(n, -1)[:, :5].astype(np.float32) * 3
p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
order = np.argsort(-z, axis=1)[:, :2]
if mode == "logits":
    np.savez(out_path, logits=z)
elif mode == "probs":
    np.savez(out_path, probs=p)
elif mode == "topk":
    np.savez(out_path, topk_values=np.take_along_axis(p, order, 1), topk_indices=order)
elif mode == "topk_logits":
    np.savez(out_path, topk_values=np.take_along_axis(z, order, 1), topk_indices=order, topk_kind="logits")
elif mode == "labels":
    np.savez(out_path, labels=z.argmax(1))
elif mode == "fail":
    print("loading the model...", file=sys.stderr)
    print("RuntimeError: CUDA out of memory", file=sys.stderr)
    sys.exit(3)
elif mode == "shape":
    np.savez(out_path, logits=z[:, :, None])
elif mode == "count":
    np.savez(out_path, logits=z[:-1])
elif mode == "dtype":
    np.savez(out_path, labels=z[:, 0])
elif mode == "keys":
    np.savez(out_path, scores=z)
elif mode == "nothing":
    pass
elif mode == "sleep":
    time.sleep(30)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmd") / "teacher.py"
    path.write_text(textwrap.dedent(SCRIPT))
    return path


def _expected(x):
    z = x.reshape(len(x), -1)[:, :5] * 3
    p = np.exp(z - z.max(1, keepdims=True))
    return z, p / p.sum(1, keepdims=True)


def test_command_teacher_protocol_for_each_output_kind(script, x):
    z, p = _expected(x)
    out = CommandTeacher([sys.executable, str(script), "logits"], timeout_s=60)(x)
    assert out.kind == "logits" and np.allclose(out.values, z, atol=1e-5)
    out = CommandTeacher([sys.executable, str(script), "probs"], timeout_s=60)(x)
    assert out.kind == "probs" and np.allclose(out.values, p, atol=1e-6)
    out = CommandTeacher([sys.executable, str(script), "topk"], timeout_s=60)(x)
    assert out.kind == "topk" and out.values_are == "probs" and out.indices.dtype == np.int64
    assert np.array_equal(out.indices[:, 0], z.argmax(1)) and out.values.shape == (len(x), 2)
    out = load_teacher(f"cmd:{sys.executable} {script} topk_logits")
    assert isinstance(out, CommandTeacher)
    out = out(x)
    assert out.kind == "topk" and out.values_are == "logits" and np.allclose(out.values[:, 0], z.max(1), atol=1e-5)
    out = CommandTeacher([sys.executable, str(script), "labels"], timeout_s=60)(x)
    assert out.kind == "labels" and np.array_equal(out.values, z.argmax(1)) and out.values.dtype == np.int64


def test_command_teacher_identity_covers_the_command_line_and_the_script(script, tmp_path):
    a = CommandTeacher([sys.executable, str(script), "logits"])
    assert a.identity() == CommandTeacher([sys.executable, str(script), "logits"]).identity()
    assert a.identity() != CommandTeacher([sys.executable, str(script), "probs"]).identity()
    copy = tmp_path / "teacher.py"
    copy.write_text(script.read_text())
    before = CommandTeacher([sys.executable, str(copy), "logits"]).identity()
    copy.write_text(script.read_text() + "\n# edited\n")
    assert CommandTeacher([sys.executable, str(copy), "logits"]).identity() != before


@pytest.mark.parametrize("mode, message", [
    ("fail", r"exited with code 3 on a batch of 12 inputs; last stderr line: RuntimeError: CUDA out of memory"),
    ("shape", r"logits values have shape \(12, 5, 1\); expected \(12, classes\)"),
    ("count", r"logits values have shape \(11, 5\); expected \(12, classes\) for a batch of 12"),
    ("dtype", r"labels have dtype float32 and shape \(12,\); expected integers"),
    ("keys", r"output holds \['scores'\]; expected exactly one of"),
    ("nothing", r"exited 0 but wrote no output file out.npz"),
])
def test_misbehaving_command_is_named_with_what_was_wrong(script, x, mode, message):
    teacher = CommandTeacher([sys.executable, str(script), mode], timeout_s=60)
    with pytest.raises(EdgekdError, match=message) as err:
        teacher(x)
    assert f"teacher command `{sys.executable}" in str(err.value) and mode in str(err.value)


def test_command_teacher_timeout_kills_it(script, x):
    teacher = CommandTeacher([sys.executable, str(script), "sleep"], timeout_s=1)
    start = time.perf_counter()
    with pytest.raises(EdgekdError, match=r"did not finish within 1 s on a batch of 12 inputs \(killed"):
        teacher(x)
    assert time.perf_counter() - start < 10
    with pytest.raises(EdgekdError, match="cannot start it"):
        CommandTeacher(["/nonexistent/teacher-binary"])(x)


def test_validate_output_checks_kinds_and_function_teacher(x):
    with pytest.raises(EdgekdError, match="repeat a class"):
        validate_output(TeacherOutput("topk", np.ones((2, 2), np.float32), np.zeros((2, 2), np.int64)), 2, "t")
    with pytest.raises(EdgekdError, match="contain class 7; expected 0..4"):
        validate_output(TeacherOutput("labels", np.array([1, 7])), 2, "t", num_classes=5)
    with pytest.raises(EdgekdError, match="probs are not probabilities"):
        validate_output(TeacherOutput("probs", np.full((2, 3), 0.5, np.float32)), 2, "t")
    with pytest.raises(EdgekdError, match="NaN or Inf"):
        validate_output(TeacherOutput("logits", np.array([[np.nan, 0.0]], np.float32)), 1, "t")
    soft = FunctionTeacher(lambda a: np.full((len(a), 4), 0.25, np.float32), identity="uniform")
    assert soft(x).kind == "probs" and soft.identity() == "uniform"
