"""Q/DQ ONNX graphs: the pad fold onnxruntime needs, and the check that a scheme's graph fuses as it should.

- `fold_pads_into_convs`: a constant zero Pad (ZeroPad2d, TF "SAME" padding) between DQ and Q in front of a
  Conv keeps the conv out of onnxruntime's QLinearConv fusion (it needs DQ -> Conv -> Q). onnxruntime's
  `quantize_static` avoids it by folding pads into convs on the float graph (`quant_pre_process`); edgekd
  quantizes in PyTorch, where a conv cannot pad asymmetrically, so the fold runs on the exported Q/DQ ONNX.
- `check_graph`: after onnxruntime's CPU graph optimization (the graph a bundle saves), how many Q/DQ
  pairs are left around float ops and whether every Conv/Gemm/MatMul runs as an integer kernel.

Needs `onnx`; the check also `onnxruntime` (imported through edgekd.engines.ort).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgekd.engines.registry import QUANT_SCHEMES
from edgekd.errors import EdgekdError

ORT_SCHEMES = tuple(s for s in QUANT_SCHEMES if s.startswith("ort-"))
# Weighted ops after onnxruntime's optimization: integer kernels, and the float ones a fused graph must not keep.
QUANTIZED_WEIGHTED = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger",
                      "MatMulInteger", "DynamicQuantizeMatMul")
FLOAT_WEIGHTED = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of an ONNX graph, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _same_qparams(a: onnx.NodeProto, b: onnx.NodeProto, consts: dict[str, np.ndarray]) -> bool:
    """Two Q/DQ nodes with equal constant scale and zero point (inputs 1 and 2)."""
    for k in (1, 2):
        if len(a.input) <= k or len(b.input) <= k:
            return False
        va, vb = consts.get(a.input[k]), consts.get(b.input[k])
        if va is None or vb is None or va.dtype != vb.dtype or not np.array_equal(va, vb):
            return False
    return True


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _zero_pad_amounts(pad: onnx.NodeProto, consts: dict[str, np.ndarray]) -> list[int] | None:
    """The Pad's `pads` (begin..., end...) when it is a constant zero pad of spatial dims only, else None."""
    if _attr(pad, "mode", b"constant") != b"constant" or len(pad.input) < 2:   # a STRING attribute reads as bytes
        return None
    if len(pad.input) > 3 and pad.input[3]:   # explicit axes: not produced by the exporter for ZeroPad2d
        return None
    pads = consts.get(pad.input[1])
    value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
    if pads is None or value is None or np.any(value != 0):
        return None
    pads = [int(p) for p in pads.reshape(-1)]
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads) or any(pads[i] or pads[rank + i] for i in (0, 1)):
        return None
    return pads


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Pad(0) -> Q -> DQ -> Conv  becomes  Q -> DQ -> Conv with the pad added to the conv's `pads`.

    Exact: quantizing a zero-padded tensor gives the zero point at the padded positions, which is what the conv
    pads with (`auto_pad` NOTSET). When the Pad's input is itself a DQ with the same qparams (edgekd's quantizers
    give a pad its input's), the then redundant Q -> DQ goes too, so the conv reads that DQ. Returns the number
    of pads folded; constants only they used are dropped.
    """
    consts = constants(model)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}

    def only_consumer(name: str, op: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op and name not in graph_outputs:
            return users[0]
        return None

    removed: list[onnx.NodeProto] = []
    stale: set[str] = set()
    for pad in nodes:
        if pad.op_type != "Pad":
            continue
        pads = _zero_pad_amounts(pad, consts)
        q = only_consumer(pad.output[0], "QuantizeLinear")
        dq = only_consumer(q.output[0], "DequantizeLinear") if q is not None else None
        conv = only_consumer(dq.output[0], "Conv") if dq is not None else None
        if (pads is None or conv is None or conv.input[0] != dq.output[0]
                or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        rank = len(pads) // 2
        spatial = rank - 2
        old = list(_attr(conv, "pads", [0] * (2 * spatial)))
        new = ([old[i] + pads[2 + i] for i in range(spatial)]
               + [old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)])
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        dq_in = producer.get(pad.input[0])
        if dq_in is not None and dq_in.op_type == "DequantizeLinear" and _same_qparams(dq_in, q, consts) \
                and _same_qparams(q, dq, consts):
            conv.input[0] = dq_in.output[0]
            removed += [pad, q, dq]
        else:
            q.input[0] = pad.input[0]
            removed.append(pad)
            stale.update((q.output[0], dq.output[0]))   # their recorded shapes were the padded ones
    for info in [v for v in model.graph.value_info if v.name in stale]:
        model.graph.value_info.remove(info)
    for node in removed:
        model.graph.node.remove(node)
    drop_unused_initializers(model)
    return sum(1 for n in removed if n.op_type == "Pad")


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the initializers no node or graph output reads."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for init in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(init)


def check_graph(onnx_path: str | Path, scheme: str) -> dict[str, Any]:
    """What onnxruntime's CPU optimizer (level "all") makes of `scheme`'s Q/DQ ONNX, read from the graph it saves.

    Returns {"qdq_pairs": activation DequantizeLinear nodes left (each one a float op between DQ and Q: Q/DQ
    pairs that did not fuse into a quantized operator), "float_weighted": Conv/Gemm/MatMul nodes still in float,
    "quantized_weighted": QLinearConv/QGemm/... nodes, "ops": op type -> count, "ok": every Conv/Gemm/MatMul runs
    as an integer kernel}.
    """
    from edgekd.engines.ort import _session

    if scheme not in ORT_SCHEMES:
        raise EdgekdError(f"graph check: scheme {scheme!r} has no onnxruntime graph to check (expected one of "
                          f"{list(ORT_SCHEMES)})")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EdgekdError(f"graph check: ONNX file {onnx_path} not found")
    with tempfile.TemporaryDirectory(prefix="edgekd-graph-") as tmp:
        optimized = Path(tmp) / "model.opt.onnx"
        _session(onnx_path, "all", 1, optimized_out=optimized)
        model = onnx.load(str(optimized))
    consts = set(constants(model))
    ops = Counter(n.op_type for n in model.graph.node)
    pairs = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in consts)
    float_weighted, quantized_weighted = sum(ops[k] for k in FLOAT_WEIGHTED), sum(ops[k] for k in QUANTIZED_WEIGHTED)
    return {"qdq_pairs": pairs, "float_weighted": float_weighted, "quantized_weighted": quantized_weighted,
            "ops": dict(sorted(ops.items())), "ok": float_weighted == 0 and quantized_weighted > 0}
