"""The ONNX side of TensorRT builds (onnx + numpy, no tensorrt): the export gate, the fp16-typed ONNX for
strongly typed builds, and the DLA calibration cache written from Q/DQ scales.

- `check_tensorrt_onnx` is the gate every `tensorrt`-scheme export passes (CI runs it, and the quantize
  stage and the TensorRT builder refuse a model that fails it): opset within what the oldest supported parser
  reads, every op in its supported-operator list, INT8 Q/DQ with zero point 0 and positive finite scales,
  one scale per output channel on weights, no UINT8 anywhere.
- `to_fp16` makes the fp16-typed ONNX TensorRT 11 needs for fp16 (no BuilderFlag.FP16 there), with
  onnxconverter-common's float16 conversion (inputs/outputs stay float32).
- `strip_qdq` + `calibration_cache` turn a Q/DQ ONNX into the float ONNX and the implicit-quantization
  calibration cache DLA takes on TensorRT 10.x (DLA there does not run explicit Q/DQ networks; NVIDIA's
  Model Optimizer PR #1661 and its Q/DQ Translator use the same route).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.engines import load_onnx
from edgekd.errors import EdgekdError

if TYPE_CHECKING:
    import onnx

# Opsets the ONNX parser of the oldest supported TensorRT reads: onnx-tensorrt docs/operators.md, 10.0/10.1
# ("TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"); edgekd.export pins 20.
TRT_OPSET_RANGE = (9, 20)
# Operators marked supported ("Y") in onnx-tensorrt's docs/operators.md on its 10.1-GA branch, the oldest
# 10.x list published there (TensorRT 10.3's parser supports at least these). A fact list, not code.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())
# The weight input of each weighted op, and the axis of its output channels in that weight.
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# Ops whose output keeps the input's scale (the Q/DQ Translator's default set), for the DLA cache.
_SCALE_PRESERVING = {"Relu", "MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity"}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _output_channel_axis(consumer: onnx.NodeProto, weight_ndim: int) -> int:
    if consumer.op_type == "ConvTranspose":
        return 1
    if consumer.op_type == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type == "MatMul":
        return weight_ndim - 1
    return 0  # Conv: (out, in/groups, *kernel)


def _uint8_names(model: onnx.ModelProto) -> list[str]:
    from onnx import TensorProto

    names = [t.name for t in model.graph.initializer if t.data_type == TensorProto.UINT8]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.UINT8:
            names.append(value.name)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type == TensorProto.UINT8:
            names.append(node.output[0])
    return names


def check_tensorrt_onnx(model: Any) -> list[str]:
    """Problems that keep `model` (a ModelProto or a path) from being a TensorRT explicit-INT8/float ONNX.

    An empty list means it passes: default-domain opset in TRT_OPSET_RANGE, every op in TRT_SUPPORTED_OPS,
    Q/DQ zero points INT8 and 0, scales positive and finite, weights INT8 with one scale per output channel
    (a 1-D scale of length = the output-channel dimension, on that axis), and no UINT8 tensor.
    """
    proto = load_onnx(model)
    problems: list[str] = []
    lo, hi = TRT_OPSET_RANGE
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    if not lo <= opsets.get("ai.onnx", 0) <= hi:
        problems.append(f"opset {opsets.get('ai.onnx')} is outside {lo}..{hi}, the range TensorRT 10's ONNX "
                        "parser reads")
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name!r}: op {node.domain}::{node.op_type} is not a standard ONNX op")
        elif node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"node {node.name!r}: op {node.op_type} is not in onnx-tensorrt's supported list")
    from edgekd.qdq import constants

    consts = constants(proto)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq(node, consts, consumers)
    problems += [f"tensor {name!r} is UINT8 (TensorRT quantizes to INT8 only)" for name in _uint8_names(proto)]
    return problems


def _check_qdq(node: onnx.NodeProto, consts: dict[str, np.ndarray],
               consumers: dict[str, list[onnx.NodeProto]]) -> list[str]:
    problems = []
    scale = consts.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        return [f"{node.op_type} {node.name!r}: scale {node.input[1] if len(node.input) > 1 else '?'} is not "
                "a constant"]
    if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        problems.append(f"{node.op_type} {node.name!r}: scales must be positive and finite, got min "
                        f"{float(np.min(scale))}")
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
        problems.append(f"{node.op_type} {node.name!r}: zero point must be INT8 0, got {zp.dtype} "
                        f"{np.unique(zp)[:4].tolist()}")
    weight = consts.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
    if weight is None:
        return problems
    if weight.dtype != np.int8:
        problems.append(f"DequantizeLinear {node.name!r}: weight {node.input[0]} is {weight.dtype}, not INT8")
    for consumer in consumers.get(node.output[0], []):
        index = _WEIGHT_INPUT.get(consumer.op_type)
        if index is None or list(consumer.input).index(node.output[0]) != index:
            continue  # a bias or another constant input: no per-channel rule
        axis = _output_channel_axis(consumer, weight.ndim)
        channels = weight.shape[axis]
        got_axis = _attr(node, "axis", 1) % max(weight.ndim, 1)
        if scale.ndim != 1 or scale.shape[0] != channels or got_axis != axis:
            problems.append(f"DequantizeLinear {node.name!r}: weight of {consumer.op_type} {consumer.name!r} "
                            f"needs one scale per output channel ({channels} on axis {axis}), got scale shape "
                            f"{list(scale.shape)} on axis {got_axis}")
    return problems


def require_tensorrt_onnx(path: str | Path) -> None:
    """Raise EdgekdError naming the file and its first problems if `path` fails check_tensorrt_onnx."""
    problems = check_tensorrt_onnx(path)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise EdgekdError(f"ONNX file {path}: not a valid TensorRT ONNX: {'; '.join(problems[:3])}{more}")


# ------------------------------------------------------------------------------------------------- fp16


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """Write an fp16-typed copy of the float ONNX `src` at `dst` (float32 inputs/outputs kept, via Casts).

    onnxconverter-common's `convert_float_to_float16` converts initializers and value types; TensorRT 11 then
    builds it strongly typed in fp16. Refuses a Q/DQ model (its int8 layers already fix their precision).
    """
    from edgekd.fileio import write_bytes

    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise EdgekdError("fp16 engines on TensorRT 11 need an fp16-typed ONNX, made with onnxconverter-common "
                          f"(pip install 'edgekd[tensorrt]' or onnxconverter-common): {e}") from e
    model = load_onnx(src)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise EdgekdError(f"ONNX file {src}: has Q/DQ nodes; fp16 conversion is for the float model")
    converted = float16.convert_float_to_float16(model, keep_io_types=True)
    dst = Path(dst)
    write_bytes(dst, converted.SerializeToString())
    return dst


# ------------------------------------------------------------------------------------------ DLA (10.x)


def strip_qdq(model: Any) -> tuple[onnx.ModelProto, dict[str, float]]:
    """The float model and the per-tensor activation scales of a Q/DQ ONNX.

    Activation Q->DQ pairs are removed (consumers read the Q's input, whose scale is recorded); weight DQs
    become float initializers (w - zp) * scale under the DQ's output name. Scales then spread across ops that
    keep the range (Relu, MaxPool, Reshape, ...), as NVIDIA's Q/DQ Translator does, so DLA finds a scale on
    more tensors. Per-channel activation scales (never produced by edgekd) are refused.
    """
    import copy

    import onnx
    from onnx import numpy_helper

    proto = copy.deepcopy(load_onnx(model))
    graph = proto.graph
    from edgekd.qdq import constants, drop_unused_initializers

    consts = constants(proto)
    producer = {o: n for n in graph.node for o in n.output}
    rename: dict[str, str] = {}
    scales: dict[str, float] = {}
    drop: set[int] = set()
    new_inits = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        scale = consts[node.input[1]]
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        q = producer.get(src)
        if src in consts and (q is None or q.op_type == "Constant"):  # weight
            w = consts[src].astype(np.float32)
            axis = _attr(node, "axis", 1) % max(w.ndim, 1)
            shape = [-1 if i == axis and scale.ndim == 1 else 1 for i in range(w.ndim)]   # per channel, or one
            s = scale.astype(np.float32).reshape(shape)
            z = (zp if zp is not None else np.zeros(())).astype(np.float32).reshape(shape)
            new_inits.append(numpy_helper.from_array(((w - z) * s).astype(np.float32), node.output[0]))
            drop.add(id(node))
        elif q is not None and q.op_type == "QuantizeLinear":
            if np.size(scale) != 1:
                raise EdgekdError(f"Q/DQ {q.name!r}: per-channel activation scales cannot go into a TensorRT "
                                  "calibration cache (one scale per tensor)")
            scales[q.input[0]] = float(np.asarray(scale).reshape(()))
            rename[node.output[0]] = q.input[0]
            drop.update({id(node), id(q)})
    kept = [n for n in graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    for out in graph.output:
        out.name = rename.get(out.name, out.name)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    # Constants and initializers nothing reads any more (one pass: a Constant reads nothing, so removing one never
    # leaves another unread).
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(n)
    drop_unused_initializers(proto)
    _spread_scales(proto, scales)
    onnx.checker.check_model(proto)
    return proto, scales


def _spread_scales(proto: onnx.ModelProto, scales: dict[str, float]) -> None:
    changed = True
    while changed:
        changed = False
        for node in proto.graph.node:
            if node.op_type not in _SCALE_PRESERVING or not node.input or not node.output:
                continue
            a, b = node.input[0], node.output[0]
            if a in scales and b not in scales:
                scales[b] = scales[a]
                changed = True
            elif b in scales and a not in scales:
                scales[a] = scales[b]
                changed = True


def trt_version_int(version: str) -> int:
    """NV_TENSORRT_VERSION for "major.minor.patch[.build]": major*10000 + minor*100 + patch (TensorRT 10+,
    include/NvInferRuntimeBase.h)."""
    parts = [int(p) for p in (str(version).split(".") + ["0", "0"])[:3]]
    return parts[0] * 10000 + parts[1] * 100 + parts[2]


def calibration_cache(scales: dict[str, float], trt_version: str) -> bytes:
    """A TensorRT INT8 calibration cache: a `TRT-<version>-EntropyCalibration2` header, then one
    `tensor: <hex of the float32 scale's bits>` line per tensor (the format NVIDIA's Q/DQ Translator writes
    for DLA builds; scale = amax / 127)."""
    lines = [f"TRT-{trt_version_int(trt_version)}-EntropyCalibration2"]
    for name, scale in sorted(scales.items()):
        if not (np.isfinite(scale) and scale > 0):
            raise EdgekdError(f"calibration cache: tensor {name!r} has scale {scale}, expected > 0")
        bits = struct.unpack("<I", struct.pack("<f", float(scale)))[0]
        lines.append(f"{name}: {bits:08x}")
    return ("\n".join(lines) + "\n").encode()


def read_calibration_cache(blob: bytes) -> dict[str, float]:
    """Scales back from a calibration cache (for tests and reports)."""
    lines = blob.decode().splitlines()
    if not lines or not lines[0].startswith("TRT-"):
        raise EdgekdError("calibration cache: missing the TRT-<version>-<algorithm> header line")
    out = {}
    for line in lines[1:]:
        name, _, value = line.rpartition(": ")
        out[name] = struct.unpack("<f", struct.pack("<I", int(value, 16)))[0]
    return out
