"""The ONNX side of TensorRT builds: Q/DQ placement on residual blocks, the export gate (plus Polygraphy's
lint), fp16 conversion for strongly typed builds, and the DLA calibration cache from Q/DQ scales."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgekd import quantize as q
from edgekd.engines import trt_onnx
from edgekd.errors import EdgekdError
from edgekd.export import OPSET, export_onnx

SHAPE = (3, 8, 8)


class DownsampleNet(nn.Module):
    """A ResNet BasicBlock with a strided 1x1 shortcut conv: both add inputs end in a conv-bn."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(y + self.down(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TwoHeads(nn.Module):
    """An add of two linear outputs: not a residual add, so both inputs stay quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(192, 8), nn.Linear(192, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.a(x) + self.b(x)


def _export(model: nn.Module, scheme: str, path: Path) -> Path:
    torch.manual_seed(0)
    calib = [torch.randn(8, *SHAPE) for _ in range(2)]
    gm = q.ptq(model.eval(), calib[0], calib, q.QuantConfig(scheme=scheme))
    return export_onnx(gm, calib[0][:2], path, metadata={"quant_scheme": scheme})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("trt_onnx")
    net = DownsampleNet().eval()
    float_path = export_onnx(net, torch.randn(2, *SHAPE), tmp / "float.onnx", metadata={})
    return {"trt": _export(net, "tensorrt", tmp / "trt.onnx"), "ort": _export(net, "ort-cpu", tmp / "ort.onnx"),
            "heads": _export(TwoHeads(), "tensorrt", tmp / "heads.onnx"), "float": float_path}


def _graph(path: Path) -> tuple[list[onnx.NodeProto], dict[str, onnx.NodeProto]]:
    model = onnx.load(str(path))
    return list(model.graph.node), {o: n for n in model.graph.node for o in n.output}


def _op(producer: dict[str, onnx.NodeProto], name: str) -> str:
    node = producer.get(name)
    return node.op_type if node is not None else "input"


# ------------------------------------------------------------------------------------------ Q/DQ placement


def test_downsample_block_quantizes_the_shortcut_not_the_main_branch(exported) -> None:
    """Model Optimizer's rule: with a conv on both add inputs, the input on the longer path to their common
    ancestor (the main branch, conv1-bn-relu-conv2-bn) stays unquantized; the shortcut conv gets Q/DQ."""
    nodes, producer = _graph(exported["trt"])
    (add,) = [n for n in nodes if n.op_type == "Add"]
    sources = [_op(producer, i) for i in add.input]
    assert sorted(sources) == ["Conv", "DequantizeLinear"]
    dq = producer[add.input[sources.index("DequantizeLinear")]]
    q_node = producer[dq.input[0]]
    shortcut = producer[q_node.input[0]]
    assert shortcut.op_type == "Conv"
    weight = onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(exported["trt"])).graph.initializer
             if t.name == producer[shortcut.input[1]].input[0]))
    assert weight.shape[2:] == (1, 1), "the Q/DQ input is the 1x1 shortcut conv"
    main = producer[add.input[sources.index("Conv")]]
    assert main.op_type == "Conv" and main.output[0] == add.input[sources.index("Conv")]


def test_non_residual_add_keeps_both_inputs_quantized(exported) -> None:
    nodes, producer = _graph(exported["heads"])
    (add,) = [n for n in nodes if n.op_type == "Add"]
    assert [_op(producer, i) for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]


# -------------------------------------------------------------------------------------------------- gate


def test_export_pins_the_opset_the_parser_reads(exported) -> None:
    assert OPSET == trt_onnx.TRT_OPSET_RANGE[1]
    opsets = {o.domain: o.version for o in onnx.load(str(exported["trt"])).opset_import}
    assert opsets[""] == OPSET


def test_gate_passes_tensorrt_and_float_exports(exported) -> None:
    assert trt_onnx.check_tensorrt_onnx(exported["trt"]) == []
    assert trt_onnx.check_tensorrt_onnx(exported["heads"]) == []
    assert trt_onnx.check_tensorrt_onnx(exported["float"]) == []
    trt_onnx.require_tensorrt_onnx(exported["trt"])


def test_gate_rejects_the_onnxruntime_scheme(exported) -> None:
    problems = trt_onnx.check_tensorrt_onnx(exported["ort"])
    text = " ".join(problems)
    assert "UINT8" in text and "zero point must be INT8 0" in text
    with pytest.raises(EdgekdError, match=r"ort.onnx: not a valid TensorRT ONNX: .*more\)"):
        trt_onnx.require_tensorrt_onnx(exported["ort"])


def _tiny_qdq(w_scale: np.ndarray, axis: int = 0, zp: int = 0, x_scale: float = 0.1, opset: int = 20,
              extra: onnx.NodeProto | None = None) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ(int8 weight (4, 3, 1, 1))) -> y, built by hand to hit each gate rule."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w")
    inits = [w, numpy_helper.from_array(np.asarray(w_scale, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(np.shape(w_scale), np.int8), "wz"),
             numpy_helper.from_array(np.float32(x_scale), "xs"), numpy_helper.from_array(np.int8(zp), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dqw", axis=axis),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    if extra is not None:
        nodes.append(extra)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_gate_rules_one_by_one() -> None:
    assert trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.full(4, 0.1))) == []
    (p,) = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.float32(0.1)))
    assert "one scale per output channel (4 on axis 0)" in p
    (p,) = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.full(4, 0.1), axis=1))
    assert "got scale shape [4] on axis 1" in p
    (p,) = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.array([0.1, 0.1, 0.0, 0.1])))
    assert "positive and finite" in p
    problems = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.full(4, 0.1), zp=3))
    assert len(problems) == 2 and all("zero point must be INT8 0" in p for p in problems)
    (p,) = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.full(4, 0.1), opset=21))
    assert "opset 21 is outside 9..20" in p
    odd = helper.make_node("Col2Im", ["y", "x", "x"], ["z"], name="odd")
    (p,) = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.full(4, 0.1), extra=odd))
    assert "Col2Im is not in onnx-tensorrt's supported list" in p
    ms = helper.make_node("QuickGelu", ["y"], ["z"], name="ms", domain="com.microsoft")
    (p,) = trt_onnx.check_tensorrt_onnx(_tiny_qdq(np.full(4, 0.1), extra=ms))
    assert "com.microsoft::QuickGelu is not a standard ONNX op" in p


def test_gate_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EdgekdError, match="nope.onnx: not found"):
        trt_onnx.check_tensorrt_onnx(tmp_path / "nope.onnx")


def test_polygraphy_lint_passes_on_the_tensorrt_export(exported, tmp_path: Path) -> None:
    pytest.importorskip("polygraphy", reason="polygraphy is in the 'trt-check' extra that CI installs")
    pytest.importorskip("onnx_graphsurgeon", reason="polygraphy's lint needs onnx-graphsurgeon ('trt-check')")
    exe = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
    report = tmp_path / "lint.json"
    r = subprocess.run([exe, "check", "lint", str(exported["trt"]), "-o", str(report)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lint = json.loads(report.read_text())
    assert lint["summary"]["failing"] == [] and lint["lint_entries"] == []
    assert len(lint["summary"]["passing"]) >= 20  # every node was checked


# -------------------------------------------------------------------------------------------- fp16 (11.x)


def test_to_fp16_types_the_graph_in_fp16_keeps_float32_io(exported, tmp_path: Path) -> None:
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common is in the 'trt-check' extra")
    out = trt_onnx.to_fp16(exported["float"], tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    weights = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert trt_onnx.check_tensorrt_onnx(model) == []
    x = np.random.default_rng(0).normal(size=(4, *SHAPE)).astype(np.float32)
    ref = ort.InferenceSession(str(exported["float"])).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-2)
    with pytest.raises(EdgekdError, match="has Q/DQ nodes"):
        trt_onnx.to_fp16(exported["trt"], tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


# ------------------------------------------------------------------------------------------ DLA cache (10.x)


def test_strip_qdq_gives_the_float_model_and_the_q_scales(exported) -> None:
    model, scales = trt_onnx.strip_qdq(exported["trt"])
    assert not {n.op_type for n in model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    qdq = onnx.load(str(exported["trt"]))
    consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    for n in qdq.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    q_scales = {n.input[0]: float(consts[n.input[1]]) for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert q_scales and all(scales[name] == pytest.approx(s) for name, s in q_scales.items())
    assert "input" in scales, "the network input is quantized by the first conv's Q/DQ"
    # The stripped model computes what the Q/DQ model computes, minus rounding.
    x = np.random.default_rng(1).normal(size=(8, *SHAPE)).astype(np.float32)
    ref = ort.InferenceSession(str(exported["trt"])).run(None, {"input": x})[0]
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_calibration_cache_format_round_trips() -> None:
    blob = trt_onnx.calibration_cache({"input": 0.5, "relu": 1 / 127}, "10.3.0.26")
    lines = blob.decode().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert lines[1] == "input: 3f000000"  # 0.5 as float32 bits
    assert trt_onnx.read_calibration_cache(blob) == pytest.approx({"input": 0.5, "relu": 1 / 127})
    assert trt_onnx.trt_version_int("11.4.1") == 110401
    with pytest.raises(EdgekdError, match="tensor 'x' has scale 0.0"):
        trt_onnx.calibration_cache({"x": 0.0}, "10.3")


def test_every_tensorrt_scheme_export_passes_the_gate(tmp_path: Path) -> None:
    """compress._export (the quantize stage's ONNX writer) runs the gate for the tensorrt scheme: a model with
    onnxruntime's placement (UINT8, zero points) exported as 'tensorrt' is refused and leaves no file."""
    from types import SimpleNamespace

    from edgekd import tasks
    from edgekd.compress import _export

    torch.manual_seed(0)
    x = torch.randn(16, *SHAPE)
    ctx = SimpleNamespace(example=lambda: x[:2], task=tasks.CLASSIFICATION, export_options=lambda name: {},
                          onnx_path=lambda name, k, s: tmp_path / f"{s}.onnx",
                          metadata=lambda name, extra: {k: str(v) for k, v in extra.items()})
    for scheme, ok in (("tensorrt", True), ("ort-cpu", False)):
        gm = q.ptq(TwoHeads().eval(), x[:8], [x], q.QuantConfig(scheme=scheme))
        if ok:
            assert trt_onnx.check_tensorrt_onnx(_export(ctx, gm, "ptq", "tensorrt")) == []
        else:
            ctx.onnx_path = lambda name, k, s: tmp_path / "mislabelled.onnx"
            refused = "mislabelled.onnx: not a valid TensorRT ONNX: .*zero point must be INT8 0, got uint8"
            with pytest.raises(EdgekdError, match=refused):
                _export(ctx, gm, "ptq", "tensorrt")
            assert not (tmp_path / "mislabelled.onnx").exists()
