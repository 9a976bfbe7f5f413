"""INT8 quantization through torchao's PT2E flow: one quantizer per deployment target.

Where the Q/DQ pairs go decides what a runtime can fuse, so each target gets its own `Quantizer`:

- `"ort-cpu"` (onnxruntime CPU): uint8 asymmetric per-tensor activations, int8 symmetric per-channel
  weights, int32 biases, and Q/DQ on the *output* of every fused pattern (conv[-bn][-relu], linear[-relu],
  add[-relu]); pools/flatten share their input's qparams. That is the QDQ shape onnxruntime's graph
  optimizer turns into QLinearConv / QGemm / QLinearAdd; any other placement leaves float kernels with
  Q/DQ overhead (slower than FP32).
- `"ort-cpu-avx2"`: the same with 7-bit weights, for x86 CPUs with AVX2 but no VNNI, where onnxruntime's
  u8 x s8 kernels saturate with full-range int8 weights.
- `"tensorrt"`: int8 symmetric activations (zero point 0, range [-128, 127]) and int8 symmetric per-channel
  weights (range [-127, 127]) with Q/DQ on the *inputs* of conv/linear/matmul; on a residual add only the skip
  input is quantized, so TensorRT fuses conv[-bn] + add [+ relu] into one INT8 kernel (NVIDIA's placement
  guidance; Model Optimizer's ONNX INT8 export drops the Q/DQ of the conv-branch input the same way). Other
  adds get Q/DQ on both inputs; biases stay float. TensorRT rejects non-zero zero points.

Flow: `prepare` (torch.export + prepare_pt2e / prepare_qat_pt2e) -> `calibrate` (PTQ) or training with a KD
loss (QAT) -> `freeze` (last QAT phase) -> `convert`. `ptq` does PTQ in one call; `sensitivity` ranks layers
by the accuracy lost when only that layer is quantized.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    FakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    disable_observer,
    move_exported_model_to_eval,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
    annotate_output_qspec,
    get_module_name_filter,
)
from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY as _ANNOTATION_KEY
from torchao.quantization.pt2e.utils import getattr_from_fqn

from edgekd.engines.registry import QUANT_SCHEMES
from edgekd.errors import EdgekdError
from edgekd.recipe import CHOICES

if TYPE_CHECKING:
    import onnx

OBSERVERS = CHOICES["observer"]   # the recipe's [quantize] observer choices

# onnxruntime session config that makes "ort-cpu" (8-bit weight) engines exact on AVX2 CPUs without VNNI.
# There onnxruntime's u8 x s8 kernels (VPMADDUBSW) saturate when two adjacent products are large;
# "x64quantprecision" shifts int8 weights to uint8 (Avx2WeightS8ToU8Transformer) so QLinearConv/QGemm stay
# exact (digits: 91-99% -> 100% top-1 agreement with the PyTorch Q/DQ model), but the u8u8 kernels it
# falls back to were about 40% slower on ResNet-18 here, so the fast fix is the "ort-cpu-avx2" scheme. The
# ONNX model needs `untie_shared_initializers` first. No effect on CPUs with VNNI or on ARM.
ORT_SESSION_CONFIG: dict[str, str] = {"session.x64quantprecision": "1"}

_aten = torch.ops.aten
_CONV_OPS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default}
_LINEAR_OPS = {_aten.linear.default}
_MATMUL_OPS = {_aten.matmul.default, _aten.bmm.default, _aten.mm.default}
_BN_OPS = {_aten.batch_norm.default, _aten._native_batch_norm_legit.default,
           _aten._native_batch_norm_legit_no_training.default, _aten.cudnn_batch_norm.default}
_RELU_OPS = {_aten.relu.default, _aten.relu_.default}
# Clipping activations (ReLU6 = hardtanh(0, 6) or relu6, clamp): onnxruntime drops a Clip followed by a Q whose
# range lies inside the clip (ClipQuantFusion), so the Q/DQ goes after them and observes the clipped range.
_CLIP_OPS = {_aten.hardtanh.default, _aten.hardtanh_.default, _aten.relu6.default, _aten.clamp.default,
             _aten.clamp_.default}
_ADD_OPS = {_aten.add.Tensor, _aten.add_.Tensor}
_MUL_OPS = {_aten.mul.Tensor, _aten.mul_.Tensor}
# Ops onnxruntime runs on uint8 with their own output qparams (QLinearSigmoid, QLinearSoftmax, ...); HardSigmoid
# runs in float between DQ and Q, as in quantize_static's graphs, and its Q feeds the QLinearMul after it.
_UNARY_QOPS = {_aten.sigmoid.default, _aten.sigmoid_.default, _aten.hardsigmoid.default,
               _aten.hardsigmoid_.default, _aten.softmax.int, _aten._softmax.default, _aten.leaky_relu.default}
_CAT_OPS = {_aten.cat.default, _aten.concat.default}
_PAD_OPS = {_aten.pad.default, _aten.constant_pad_nd.default}
# x * sigmoid(x) and x * hardsigmoid(x): decomposed before annotation so onnxruntime gets QLinearSigmoid and
# QLinearMul instead of a float activation between DQ and Q (what quantize_static's graphs have).
_GATED_ACTS = {_aten.silu.default: _aten.sigmoid.default, _aten.silu_.default: _aten.sigmoid.default,
               _aten.hardswish.default: _aten.hardsigmoid.default,
               _aten.hardswish_.default: _aten.hardsigmoid.default}
# Ops whose output range lies within the input's: they reuse the input's qparams, so onnxruntime drops the
# DQ/Q around them and runs them on the uint8 tensor (MaxPool, Reshape/Flatten). A global average pool
# exports as ReduceMean, which onnxruntime runs in float between DQ and Q.
_SHARED_OPS = {_aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default,
               _aten.avg_pool1d.default, _aten.avg_pool2d.default, _aten.avg_pool3d.default,
               _aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool2d.default,
               _aten.flatten.using_ints, _aten.view.default, _aten.reshape.default,
               _aten.dropout.default, _aten.pad.default, _aten.constant_pad_nd.default}
_DQ_PER_TENSOR = {torch.ops.quantized_decomposed.dequantize_per_tensor.default,
                  torch.ops.quantized_decomposed.dequantize_per_tensor.tensor}
_DQ_PER_CHANNEL = {torch.ops.quantized_decomposed.dequantize_per_channel.default}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: the target scheme, the PTQ activation observer, and layers kept in float.

    `skip` holds module paths ("features.0", "head"); a path also covers everything below it.
    QAT ignores `observer` and uses fake-quant with moving-average min/max.
    """

    scheme: str = "ort-cpu"
    observer: str = "minmax"
    percentile: float = 99.99
    skip: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- observers


class PercentileObserver(HistogramObserver):
    """Clips the range at a percentile of the observed values (torchao has no percentile observer).

    Keeps HistogramObserver's running histogram and changes only the range choice: (100 - percentile)% of
    the values are clipped from each tail (affine), or from |x| (symmetric).
    """

    def __init__(self, percentile: float = 99.99, *, dtype: torch.dtype = torch.uint8, **kwargs: Any) -> None:
        super().__init__(dtype=dtype, **kwargs)   # bins, qscheme, quant_min/max, eps, ...: HistogramObserver's
        if not 0.0 < percentile <= 100.0:
            raise EdgekdError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self.min_val == float("inf"):  # never observed: the parent warns and returns defaults
            return super().calculate_qparams()
        if self.percentile >= 100.0 or float(self.max_val - self.min_val) == 0.0:
            return self._calculate_qparams(self.min_val, self.max_val)
        hist = self.histogram.double()
        total = float(hist.sum())
        lo, hi = float(self.min_val), float(self.max_val)
        width = (hi - lo) / self.bins
        keep = self.percentile / 100.0
        lower_edges = lo + width * torch.arange(self.bins, dtype=torch.float64)
        if self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
            # Smallest t = the far edge of a bin, by |x|, with at least `keep` of the values in [-t, t].
            reach = torch.maximum(lower_edges.abs(), (lower_edges + width).abs())
            order = torch.argsort(reach)
            cum = torch.cumsum(hist[order], 0) / total
            idx = min(int(torch.searchsorted(cum, torch.tensor([keep], dtype=torch.float64))[0]), self.bins - 1)
            t = float(reach[order][idx])
            new_min, new_max = -t, t
        else:
            cdf = torch.cumsum(hist, 0) / total
            bounds = torch.searchsorted(cdf, torch.tensor([1.0 - keep, keep], dtype=torch.float64))
            lo_bin, hi_bin = (int(b) for b in bounds.clamp(0, self.bins - 1))
            new_min = float(lower_edges[lo_bin]) if lo_bin > 0 else lo
            new_max = float(lower_edges[hi_bin]) + width
        return self._calculate_qparams(torch.tensor(new_min), torch.tensor(new_max))


class MSEObserver(HistogramObserver):
    """Picks the clipping range with the least quantization MSE on the observed histogram (global search).

    HistogramObserver also minimizes L2 error, but with a greedy walk that stops at the first local
    increase: on symmetric int8 ranges of Laplace or Student-t(4) data it returned exactly the min/max range
    while the best range was 13-16% narrower with 15-18% less error. This searches 120 ranges
    [lo * f, hi * f] (f geometric from 1 down to ~0.015), scoring each with the exact quantize/dequantize of
    the histogram (8 points per bin), so zero-point rounding, clipping and symmetric ranges are all counted.
    """

    def __init__(self, *, dtype: torch.dtype = torch.uint8, **kwargs: Any) -> None:
        super().__init__(dtype=dtype, **kwargs)   # bins, qscheme, quant_min/max, eps, ...: HistogramObserver's

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self.min_val == float("inf"):  # never observed: the parent warns and returns defaults
            return super().calculate_qparams()
        lo, hi = float(self.min_val), float(self.max_val)
        if hi == lo:
            return self._calculate_qparams(self.min_val, self.max_val)
        sub = 8
        width = (hi - lo) / self.bins
        points = lo + width * (torch.arange(self.bins * sub, dtype=torch.float64) + 0.5) / sub
        weights = self.histogram.double().repeat_interleave(sub) / sub
        keep = weights > 0
        points, weights = points[keep], weights[keep]
        lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
        factors = 0.965 ** torch.arange(120, dtype=torch.float64)
        qparams = [self._calculate_qparams(torch.tensor(lo0 * f), torch.tensor(hi0 * f)) for f in factors.tolist()]
        scales = torch.stack([sc.reshape(()) for sc, _ in qparams]).double()[:, None]
        zps = torch.stack([zp.reshape(()) for _, zp in qparams]).double()[:, None]
        levels = torch.clamp(torch.round(points[None, :] / scales) + zps, self.quant_min, self.quant_max)
        errors = (weights[None, :] * ((levels - zps) * scales - points[None, :]) ** 2).sum(dim=1)
        return qparams[int(torch.argmin(errors))]


# ------------------------------------------------------------------------------------------------- specs

_EPS = 2.0**-12  # scale floor, as torchao's x86 config: avoids denormal scales for all-zero tensors


def _act_spec(observer: str, percentile: float, *, qat: bool, symmetric: bool) -> QuantizationSpec:
    if symmetric:
        dtype, qmin, qmax, qscheme = torch.int8, -128, 127, torch.per_tensor_symmetric
    else:
        dtype, qmin, qmax, qscheme = torch.uint8, 0, 255, torch.per_tensor_affine
    if qat:
        # Plain FakeQuantize (not the fused op) so training sees exactly the qparams convert will use:
        # the fused ATen kernel picks a non-zero zero point for symmetric ranges of non-negative tensors.
        ctr = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                     dtype=dtype, qscheme=qscheme, eps=_EPS)
    elif observer == "percentile":
        ctr = PercentileObserver.with_args(percentile=percentile, eps=_EPS)
    else:
        ctr = {"minmax": MinMaxObserver, "mse": MSEObserver}[observer].with_args(eps=_EPS)
    return QuantizationSpec(dtype=dtype, observer_or_fake_quant_ctr=ctr, quant_min=qmin, quant_max=qmax,
                            qscheme=qscheme)


def _weight_spec(*, qat: bool, bound: int) -> QuantizationSpec:
    # Narrow symmetric range [-bound, bound]: scale = amax / bound exactly. 127 is TensorRT's weight range and
    # onnxruntime's default; 64 is the 7-bit range that cannot saturate u8 x s8 products on AVX2 (see
    # OrtCpuAvx2Quantizer).
    if qat:
        ctr = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-bound,
                                     quant_max=bound, dtype=torch.int8, qscheme=torch.per_channel_symmetric,
                                     ch_axis=0, eps=_EPS)
    else:
        ctr = PerChannelMinMaxObserver.with_args(eps=_EPS)
    return QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=ctr, quant_min=-bound, quant_max=bound,
                            qscheme=torch.per_channel_symmetric, ch_axis=0)


# ------------------------------------------------------------------------------------------- quantizers


def _in_paths(node: Node, paths: Iterable[str]) -> bool:
    """True when the node comes from one of the module paths (or a module below one): torchao's module-name
    filter, which looks the path up in the node's module stack (every enclosing module)."""
    return any(get_module_name_filter(path)(node) for path in paths)


def _is_call(node: object, ops: set) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in ops


def _is_annotated(node: Node) -> bool:
    ann = node.meta.get(_ANNOTATION_KEY)
    return ann is not None and ann._annotated


def _is_float_tensor(node: object) -> bool:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _has_quantized_output(node: Node) -> bool:
    ann = node.meta.get(_ANNOTATION_KEY)
    return ann is not None and ann.output_qspec is not None


def _mark_pattern(chain: list[Node], output_qspec: QuantizationSpec) -> None:
    """Mark a fused pattern's nodes annotated (torchao leaves them alone); one Q/DQ after its last node."""
    annotate_output_qspec(chain[-1], output_qspec)
    for n in chain:
        n.meta.setdefault(_ANNOTATION_KEY, QuantizationAnnotation())._annotated = True


def _only_user(node: Node, ops: set) -> Node | None:
    users = list(node.users)
    if len(users) == 1 and _is_call(users[0], ops):
        return users[0]
    return None


def _arg(node: Node, index: int, name: str, default: object) -> object:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _clip_bounds(node: Node) -> tuple[float, float] | None:
    """(min, max) of a clipping activation with constant bounds (a missing bound is +-inf)."""
    if node.target == _aten.relu6.default:
        return 0.0, 6.0
    if node.target in (_aten.hardtanh.default, _aten.hardtanh_.default):
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    else:
        lo, hi = _arg(node, 1, "min", None), _arg(node, 2, "max", None)
    if not all(b is None or isinstance(b, (int, float)) for b in (lo, hi)):
        return None
    return (-float("inf") if lo is None else float(lo)), (float("inf") if hi is None else float(hi))


def _pattern_tail(anchor: Node, follow_bn: bool) -> list[Node]:
    """The anchor and what fuses after it: [bn] [relu | relu6 | clip], each the single user of the previous."""
    chain = [anchor]
    if follow_bn:
        bn = _only_user(anchor, _BN_OPS)
        if bn is not None:
            chain.append(bn)
    act = _only_user(chain[-1], _RELU_OPS | _CLIP_OPS)   # None when there is none: every _is_call is then False
    # ReLU, or a clip whose range holds 0: the uint8 Q range then lies inside the clip and the Clip folds away.
    bounds = _clip_bounds(act) if _is_call(act, _CLIP_OPS) else None
    if _is_call(act, _RELU_OPS) or (bounds is not None and bounds[0] <= 0.0 <= bounds[1]):
        chain.append(act)
    return chain


def _is_zero_pad(node: Node) -> bool:
    """A constant pad with value 0 (what ZeroPad2d and F.pad's default give): it can fold into a conv."""
    mode = _arg(node, 2, "mode", "constant") if node.target == _aten.pad.default else "constant"
    value = _arg(node, 3 if node.target == _aten.pad.default else 2, "value", None)
    return mode == "constant" and (value is None or float(value) == 0.0)


def _decompose_gated_activations(model: GraphModule) -> GraphModule:
    """silu(x) -> x * sigmoid(x), hardswish(x) -> x * hardsigmoid(x), in place (same values)."""
    changed = False
    for node in list(model.graph.nodes):
        if not _is_call(node, set(_GATED_ACTS)):
            continue
        x = node.args[0]
        with model.graph.inserting_before(node):
            gate = model.graph.call_function(_GATED_ACTS[node.target], (x,))
            product = model.graph.call_function(_aten.mul.Tensor, (x, gate))
        for new in (gate, product):
            new.meta.update({k: v for k, v in node.meta.items() if k != _ANNOTATION_KEY})
        node.replace_all_uses_with(product)
        model.graph.erase_node(node)
        changed = True
    if changed:
        model.graph.lint()
        model.recompile()
    return model


class _SchemeQuantizer(Quantizer):
    """Shared plumbing: which nodes to annotate (skip list / single layer) and the specs to use."""

    scheme = ""
    weight_bound = 127
    int32_bias = False  # quantize biases to int32 at convert (onnxruntime fuses only with int32 biases)

    def __init__(self, config: QuantConfig | None = None, *, qat: bool = False, only: str | None = None) -> None:
        super().__init__()
        self.config = config or QuantConfig(scheme=self.scheme)
        self.qat = qat
        self.only = only  # sensitivity analysis: quantize this one layer, nothing else
        symmetric = self.scheme == "tensorrt"
        self.act = _act_spec(self.config.observer, self.config.percentile, qat=qat, symmetric=symmetric)
        self.weight = _weight_spec(qat=qat, bound=self.weight_bound)

    def _wanted(self, node: Node) -> bool:
        if _is_annotated(node) or _in_paths(node, self.config.skip):
            return False
        return self.only is None or _in_paths(node, (self.only,))

    def _weighted_nodes(self, model: GraphModule) -> list[Node]:
        return [n for n in model.graph.nodes if _is_call(n, _CONV_OPS | _LINEAR_OPS) and self._wanted(n)]

    def _annotate_weighted_inputs(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        node.meta[_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={x: self.act, w: self.weight}, _annotated=True)

    def validate(self, model: GraphModule) -> None:
        if not any(_is_annotated(n) for n in model.graph.nodes):
            raise EdgekdError(f"{self.scheme} quantizer found no Conv/Linear layer to quantize "
                              f"(skip={list(self.config.skip)}); nothing would run in INT8")


class OrtCpuQuantizer(_SchemeQuantizer):
    """Q/DQ on pattern outputs, uint8 activations: what onnxruntime's CPU QDQ fusions need.

    Covers the edge op set the way onnxruntime's `quantize_static` does, so its optimizer fuses the same:
    conv/linear [-bn] [-relu/relu6/clip] (QLinearConv, QGemm; the clip folds into the Q), depthwise and grouped
    convs (the same conv op), add and mul of two tensors (QLinearAdd/QLinearMul: residuals, squeeze-excite),
    sigmoid/softmax (QLinearSigmoid/QLinearSoftmax), SiLU and hardswish as x * (hard)sigmoid(x), concat
    (QLinearConcat), and pools/pads/reshapes sharing their input's qparams. Constant pads fold into the
    following conv after export (`edgekd.qdq.fold_pads_into_convs`), as quantize_static's pre-processing does.
    """

    scheme = "ort-cpu"
    int32_bias = True

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        return _decompose_gated_activations(model)

    def _annotate_io(self, node: Node, inputs: Iterable[object]) -> None:
        """Every float-tensor input and the output get the activation spec (one shared observer per edge)."""
        node.meta[_ANNOTATION_KEY] = QuantizationAnnotation(
            input_qspec_map={a: self.act for a in inputs if _is_float_tensor(a)}, output_qspec=self.act,
            _annotated=True)

    def annotate(self, model: GraphModule) -> GraphModule:
        # 1. conv[-bn][-act] and linear[-act]: inputs and weight in, one Q/DQ after the last op.
        for node in self._weighted_nodes(model):
            chain = _pattern_tail(node, follow_bn=_is_call(node, _CONV_OPS))
            if any(_is_annotated(n) for n in chain[1:]):
                chain = chain[:1]
            self._annotate_weighted_inputs(node)
            _mark_pattern(chain, self.act)
        if self.only is not None:
            return model
        for node in model.graph.nodes:
            if not self._wanted(node):
                continue
            if _is_call(node, _MATMUL_OPS | _MUL_OPS):
                # 2. matmul of two activations (attention) -> QLinearMatMul; mul -> QLinearMul.
                if _is_float_tensor(node.args[0]) and _is_float_tensor(node.args[1]):
                    self._annotate_io(node, node.args[:2])
            elif _is_call(node, _ADD_OPS):
                # 3. tensor + tensor [-act] -> QLinearAdd.
                a, b = node.args[0], node.args[1]
                if not (_is_float_tensor(a) and _is_float_tensor(b)):
                    continue
                chain = _pattern_tail(node, follow_bn=False)
                node.meta[_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map={a: self.act, b: self.act})
                _mark_pattern(chain, self.act)
            elif _is_call(node, _CAT_OPS):
                # 4. concat -> QLinearConcat.
                self._annotate_io(node, node.args[0])
            elif _is_call(node, _UNARY_QOPS) and isinstance(node.args[0], Node) \
                    and _has_quantized_output(node.args[0]):
                # 5. sigmoid/hardsigmoid/softmax of a quantized tensor -> QLinear* (their own output range).
                self._annotate_io(node, node.args[:1])
        # 6. pools/pads/flatten/reshape after a quantized tensor keep its qparams (graph order propagates).
        for node in model.graph.nodes:
            if not (_is_call(node, _SHARED_OPS) and self._wanted(node)):   # _wanted: not annotated yet
                continue
            if _is_call(node, _PAD_OPS) and not _is_zero_pad(node):
                continue
            x = node.args[0]
            if isinstance(x, Node) and _has_quantized_output(x):
                node.meta[_ANNOTATION_KEY] = QuantizationAnnotation(
                    input_qspec_map={x: self.act}, output_qspec=SharedQuantizationSpec((x, node)),
                    _annotated=True)
        return model


class OrtCpuAvx2Quantizer(OrtCpuQuantizer):
    """The "ort-cpu" placement with 7-bit weights ([-64, 64]), for x86 CPUs with AVX2 but without VNNI.

    There onnxruntime multiplies u8 activations by s8 weights with VPMADDUBSW, which saturates a pair of
    products at 32767: 2 * 255 * 127 overflows, 2 * 255 * 64 does not (onnxruntime's own
    Avx2WeightS8ToU8Transformer treats |w| <= 64 as safe, and quantize_static's docs advise reduce_range
    on such CPUs). Same kernels, same speed; the saturation cost up to 9% top-1 agreement with the PyTorch
    Q/DQ model on digits, 7-bit weights 0%. The alternative, the session option in ORT_SESSION_CONFIG,
    keeps 8-bit weights but runs slower u8u8 kernels.
    """

    scheme = "ort-cpu-avx2"
    weight_bound = 64


def _conv_backbone(node: object) -> Node | None:
    """The conv that `node` is the [bn] [relu] tail of (the branch TensorRT fuses into an add), else None."""
    while isinstance(node, Node) and (_is_call(node, _BN_OPS) or _is_call(node, _RELU_OPS)):
        node = node.args[0]
    return node if _is_call(node, _CONV_OPS) else None


def _ancestor_depths(node: Node) -> dict[Node, int]:
    """Shortest number of edges from `node` back to each of its ancestors (itself at 0)."""
    depths = {node: 0}
    frontier = [node]
    while frontier:
        nxt = []
        for n in frontier:
            for arg in n.all_input_nodes:
                if arg not in depths:
                    depths[arg] = depths[n] + 1
                    nxt.append(arg)
        frontier = nxt
    return depths


def _residual_branch(add: Node) -> int | None:
    """Index (0/1) of the add input that is the conv branch of a residual block, or None if not residual.

    Model Optimizer's rule (modelopt.onnx.quantization.graph_utils.build_non_residual_input_map): an input
    whose producer is a conv [bn] [relu] tail is the fusible branch; with two such inputs (a downsampling
    shortcut conv) the one on the longer path to their lowest common ancestor is the main branch; when the
    lowest common ancestor is that conv itself the add is not a residual add.
    """
    a, b = add.args[0], add.args[1]
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    conv_a, conv_b = _conv_backbone(a), _conv_backbone(b)
    if conv_a is None and conv_b is None:
        return None
    da, db = _ancestor_depths(a), _ancestor_depths(b)
    common = [n for n in da if n in db]
    lca = min(common, key=lambda n: da[n] + db[n]) if common else None
    if conv_a is not None and conv_b is not None:
        if conv_a is conv_b or lca is None:
            return None
        return 0 if da[lca] > db[lca] else 1
    conv, index = (conv_a, 0) if conv_a is not None else (conv_b, 1)
    return None if lca is conv else index


class TensorRTQuantizer(_SchemeQuantizer):
    """Symmetric int8 Q/DQ on the inputs of conv/linear/matmul and on the skip input of residual adds."""

    scheme = "tensorrt"

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in self._weighted_nodes(model):
            self._annotate_weighted_inputs(node)
        if self.only is not None:
            return model
        for node in model.graph.nodes:
            if not self._wanted(node):
                continue
            if _is_call(node, _MATMUL_OPS) or _is_call(node, _ADD_OPS):
                a, b = node.args[0], node.args[1]
                if not (_is_float_tensor(a) and _is_float_tensor(b)):
                    continue
                inputs = [a, b]
                branch = _residual_branch(node) if _is_call(node, _ADD_OPS) else None
                if branch is not None:  # leave the conv branch unquantized: conv + add fuse in TensorRT
                    del inputs[branch]
                node.meta[_ANNOTATION_KEY] = QuantizationAnnotation(
                    input_qspec_map={x: self.act for x in inputs}, _annotated=True)
        return model


# Each scheme of edgekd.engines.registry.QUANT_SCHEMES (the one list, in its order) -> the quantizer placing its Q/DQ.
SCHEMES = {q.scheme: q for q in (OrtCpuQuantizer, OrtCpuAvx2Quantizer, TensorRTQuantizer)}
if tuple(SCHEMES) != QUANT_SCHEMES:
    raise ImportError(f"edgekd.quantize implements schemes {sorted(SCHEMES)}, but edgekd.engines.registry lists "
                      f"{list(QUANT_SCHEMES)}; give each listed scheme one quantizer class")


def _check_config(config: QuantConfig) -> None:
    if config.scheme not in SCHEMES:
        raise EdgekdError(f"unknown quantization scheme {config.scheme!r} (expected one of {sorted(SCHEMES)})")
    if config.observer not in OBSERVERS:
        raise EdgekdError(f"unknown calibration observer {config.observer!r} (expected one of {list(OBSERVERS)})")
    if not 0.0 < config.percentile <= 100.0:
        raise EdgekdError(f"quantization percentile must be in (0, 100], got {config.percentile}")


def make_quantizer(config: QuantConfig, *, qat: bool) -> Quantizer:
    """The torchao Quantizer for `config.scheme`, with fake-quant (qat) or PTQ observers."""
    _check_config(config)
    return SCHEMES[config.scheme](config, qat=qat)


# ------------------------------------------------------------------------------------------------- flow


def quantizable_layers(model: nn.Module) -> list[str]:
    """Module paths of the Conv/Linear layers: the names `QuantConfig.skip` and `sensitivity` use."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [name for name, m in model.named_modules() if isinstance(m, kinds) and name]


def _check_skip(model: nn.Module, skip: Iterable[str]) -> None:
    names = {name for name, _ in model.named_modules() if name}
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise EdgekdError(f"quantization skip list names {unknown}, which the model does not have "
                          f"(quantizable layers: {quantizable_layers(model)})")


def _export(model: nn.Module, example: torch.Tensor, *, train: bool,
            dynamic_shapes: tuple[dict, ...] | None = None) -> GraphModule:
    """torch.export with a dynamic batch dim (which needs an example batch > 1), as a GraphModule.

    `dynamic_shapes` replaces the default ({0: batch},), e.g. to keep a sequence dimension dynamic too.
    """
    if example.dim() == 0:
        raise EdgekdError("quantization example input must have a batch dimension, got a scalar")
    if example.shape[0] == 1:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    was_training = model.training
    model.train(train)
    try:
        if dynamic_shapes is None:
            dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
        exported = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as e:
        raise EdgekdError(f"torch.export could not capture the model for quantization "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        model.train(was_training)
    return exported.module()


# conv_fn -> the aten ops it appears as in an exported graph (torchao's QAT conv-bn passes are per conv_fn).
_CONV_FN_OPS = {
    F.conv1d: {_aten.conv1d.default, _aten.conv1d.padding},
    F.conv2d: {_aten.conv2d.default, _aten.conv2d.padding},
    F.conv_transpose1d: {_aten.conv_transpose1d.default},
    F.conv_transpose2d: {_aten.conv_transpose2d.input},
}


@contextlib.contextmanager
def _skip_absent_conv_kinds(model: GraphModule):
    """Run torchao's QAT conv-bn fuse/fold passes only for the conv kinds the graph has.

    Each pass torch.exports about a dozen pattern graphs per conv kind (conv1d/2d/transpose1d/2d), about
    0.3 s each: convert_pt2e after QAT took ~30 s here, three quarters of it for kinds a CNN never uses.
    A pass over an absent kind can match nothing, so skipping it changes no result.
    """
    from torchao.quantization.pt2e import qat_utils

    present = {n.target for n in model.graph.nodes if n.op == "call_function"}
    originals = {name: getattr(qat_utils, name) for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")}

    def wrap(original: Callable) -> Callable:
        def helper(m: GraphModule, conv_fn: Callable, example_inputs: tuple, is_cuda: bool) -> GraphModule:
            ops = _CONV_FN_OPS.get(conv_fn)
            if ops is not None and not ops & present:
                return m
            return original(m, conv_fn, example_inputs, is_cuda=is_cuda)
        return helper

    for name, original in originals.items():
        setattr(qat_utils, name, wrap(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(qat_utils, name, original)


def _mark_mode(gm: GraphModule, training: bool) -> None:
    """Record the train/eval mode the graph is already in (it was exported in that mode).

    move_exported_model_to_train/eval rewrite dropout and batch-norm patterns, torch.exporting four pattern
    graphs (about 1 s) even when nothing changes; with the mode recorded they return at once.
    """
    from torchao.quantization.pt2e import export_utils

    setattr(gm, export_utils._EXPORTED_TRAINING_ATTR, training)


def _prepare_with(gm: GraphModule, quantizer: _SchemeQuantizer) -> GraphModule:
    if quantizer.qat:
        with _skip_absent_conv_kinds(gm):
            prepared = prepare_qat_pt2e(gm, quantizer)
    else:
        prepared = prepare_pt2e(gm, quantizer)
    _mark_mode(prepared, training=quantizer.qat)
    prepared.meta["edgekd_scheme"] = quantizer.scheme
    prepared.meta["edgekd_int32_bias"] = quantizer.int32_bias
    return prepared


def prepare(model: nn.Module, example: torch.Tensor, config: QuantConfig, *, qat: bool,
            dynamic_shapes: tuple[dict, ...] | None = None) -> GraphModule:
    """Export `model` and insert observers (PTQ) or fake-quant (QAT, returned in train mode).

    The batch dimension is dynamic; `dynamic_shapes` (torch.export's, for the one input) overrides that."""
    _check_config(config)
    _check_skip(model, config.skip)
    gm = _export(model, example, train=qat, dynamic_shapes=dynamic_shapes)
    return _prepare_with(gm, SCHEMES[config.scheme](config, qat=qat))


def calibrate(prepared: GraphModule, batches: Iterable[torch.Tensor]) -> None:
    """Run calibration batches through the observers (eval mode, no autograd)."""
    move_exported_model_to_eval(prepared)
    seen = 0
    with torch.no_grad():
        for x in batches:
            prepared(x)
            seen += 1
    if seen == 0:
        raise EdgekdError("calibration got no batches; observers need data to set the INT8 ranges")


_BN_TRAINING_ARG = 5  # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)


def freeze(prepared: GraphModule) -> None:
    """Last QAT phase: fix the quantization ranges and BatchNorm statistics, keep fake-quant on.

    Observers stop updating (`disable_observer` on every fake-quant module) and each batch-norm node's
    `training` flag is set to False, so BN normalizes with its running statistics (as the folded INT8 conv
    will) and stops updating them. The torchao tutorial's loop only rewrites `_native_batch_norm_legit`;
    torch.export now emits `aten.batch_norm`, so both are handled. Calling
    `move_exported_model_to_train` afterwards would switch BN back to batch statistics.
    """
    prepared.apply(disable_observer)
    for node in prepared.graph.nodes:
        if _is_call(node, _BN_OPS) and node.target != _aten._native_batch_norm_legit_no_training.default:
            node.update_arg(_BN_TRAINING_ARG, False)
    prepared.recompile()


_RANDOM_OPS = {_aten.rand_like.default, _aten.randn_like.default, _aten.rand.default, _aten.randn.default,
               _aten.bernoulli.default, _aten.bernoulli.p, _aten.bernoulli_.float, _aten.native_dropout.default,
               _aten.randint_like.default}


def _check_no_random_ops(gm: GraphModule) -> None:
    """A QAT model is exported in training mode: a training-only Python branch in its forward (stochastic depth,
    drop-connect) is captured with its random ops, which torchao's train/eval switch cannot remove."""
    found = [n for n in gm.graph.nodes if _is_call(n, _RANDOM_OPS)]
    if found:
        where = sorted({p for n in found for p, _ in list((n.meta.get("nn_module_stack") or {}).values())[-1:]}
                       or {"the model's forward"})
        raise EdgekdError(f"the quantized model still draws random numbers ({found[0].target}) in {where}: a "
                          "training-only branch (stochastic depth, drop-connect) was captured when the model was "
                          "exported in training mode for QAT; turn it off (e.g. drop_connect_rate = 0) before QAT")


def convert(prepared: GraphModule) -> GraphModule:
    """Observers/fake-quant -> Q/DQ ops (BN folded); the result runs in PyTorch and exports to ONNX.

    Refuses a graph that would still draw random numbers at inference (see `_check_no_random_ops`)."""
    move_exported_model_to_eval(prepared)
    scheme = prepared.meta.get("edgekd_scheme")
    int32_bias = prepared.meta.get("edgekd_int32_bias", False)
    with _skip_absent_conv_kinds(prepared):
        converted = convert_pt2e(prepared)
    _check_no_random_ops(converted)
    if int32_bias:
        _quantize_biases(converted)
    converted.meta["edgekd_scheme"] = scheme
    _mark_mode(converted, training=False)
    for module in converted.modules():  # exported modules refuse .eval(); the flag only silences export warnings
        module.training = False
    return converted


def ptq(model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor],
        config: QuantConfig, *, dynamic_shapes: tuple[dict, ...] | None = None) -> GraphModule:
    """Post-training quantization: prepare, calibrate on `batches`, convert."""
    prepared = prepare(model, example, config, qat=False, dynamic_shapes=dynamic_shapes)
    calibrate(prepared, batches)
    return convert(prepared)


def sensitivity(model: nn.Module, example: torch.Tensor, batches: Iterable[torch.Tensor],
                evaluate: Callable[[nn.Module], float], config: QuantConfig) -> list[dict]:
    """Accuracy lost when one layer alone is INT8 (all else float), worst layer first.

    Rows: {"layer", "accuracy", "drop"} with drop = float accuracy - accuracy. Layers in `config.skip` are
    left out. Shows which layers to keep in float (`skip`) when the whole model loses too much.
    """
    _check_config(config)
    _check_skip(model, config.skip)
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            base = float(evaluate(model))
        gm = _export(model, example, train=False)
    finally:
        model.train(was_training)
    rows = []
    for layer in quantizable_layers(model):
        if any(layer == s or layer.startswith(s + ".") for s in config.skip):
            continue
        quantizer = SCHEMES[config.scheme](config, qat=False, only=layer)
        prepared = _prepare_with(copy.deepcopy(gm), quantizer)
        calibrate(prepared, batches)
        with torch.no_grad():
            acc = float(evaluate(convert(prepared)))
        rows.append({"layer": layer, "accuracy": acc, "drop": base - acc})
    rows.sort(key=lambda r: r["drop"], reverse=True)
    return rows


# ------------------------------------------------------------------------------------------------ ONNX


def untie_shared_initializers(model: onnx.ModelProto) -> int:
    """Give every DequantizeLinear its own copy of initializers it shares with other nodes; returns how many.

    The ONNX exporter deduplicates equal constants, so all weight zero points of one shape (all zeros) become
    one initializer. onnxruntime's `session.x64quantprecision` pass (see ORT_SESSION_CONFIG) converts each
    QLinearConv's weight zero point under a name derived from the initializer, and fails on the second conv
    with "AddInitializedOrtValue Attempt to replace the existing tensor". Run this on a quantized ONNX model
    before building an onnxruntime engine from it.
    """
    from collections import Counter

    inits = {t.name: t for t in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input if name in inits)
    taken = set(inits) | {o for node in model.graph.node for o in node.output}
    untied = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        for k, name in enumerate(node.input):
            if name not in inits or uses[name] <= 1:
                continue
            new_name = f"{name}__{node.output[0]}_{k}"
            while new_name in taken:
                new_name += "_"
            copy_ = model.graph.initializer.add()
            copy_.CopyFrom(inits[name])
            copy_.name = new_name
            taken.add(new_name)
            node.input[k] = new_name
            uses[name] -= 1
            untied += 1
    return untied


# ------------------------------------------------------------------------------------------ int32 bias


def _const(gm: GraphModule, arg: object) -> torch.Tensor | float | None:
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, Node) and arg.op == "get_attr":
        value = getattr_from_fqn(gm, str(arg.target))
        return value if isinstance(value, torch.Tensor) else None
    return None


def _quantize_biases(gm: GraphModule) -> None:
    """Float bias of a Q/DQ conv/linear -> int32 with scale input_scale * weight_scale, behind a DQ.

    onnxruntime fuses DQ->Conv/Gemm->Q into QLinearConv/QGemm only when the bias input is an int32
    DequantizeLinear too; a float bias leaves the conv unfused. Folded BatchNorm biases appear only at
    convert time, so this runs after convert_pt2e rather than through a DerivedQuantizationSpec.
    """
    counter = 0
    for node in list(gm.graph.nodes):
        if not _is_call(node, _CONV_OPS | _LINEAR_OPS) or len(node.args) < 3:
            continue
        x_dq, w_dq, bias = node.args[0], node.args[1], node.args[2]
        if not (_is_call(x_dq, _DQ_PER_TENSOR) and _is_call(w_dq, _DQ_PER_CHANNEL)):
            continue
        if not (isinstance(bias, Node) and bias.op == "get_attr"):
            continue
        x_scale = _const(gm, x_dq.args[1])
        w_scales = _const(gm, w_dq.args[1])
        b = _const(gm, bias)
        if x_scale is None or not isinstance(w_scales, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        scale = (float(x_scale) * w_scales.double()).float()
        q = torch.clamp(torch.round(b.double() / scale.double()), -(2**31), 2**31 - 1).to(torch.int32)
        names = [f"_edgekd_bias_{counter}_{suffix}" for suffix in ("int32", "scale", "zero_point")]
        for name, value in zip(names, (q, scale, torch.zeros_like(q, dtype=torch.int64)), strict=True):
            gm.register_buffer(name, value)
        counter += 1
        with gm.graph.inserting_before(node):
            q_node, s_node, z_node = (gm.graph.get_attr(n) for n in names)
            dq = gm.graph.call_function(
                torch.ops.quantized_decomposed.dequantize_per_channel.default,
                (q_node, s_node, z_node, 0, -(2**31), 2**31 - 1, torch.int32))
        node.update_arg(2, dq)
    gm.graph.eliminate_dead_code()
    gm.recompile()


__all__ = [
    "MSEObserver",
    "OBSERVERS",
    "ORT_SESSION_CONFIG",
    "SCHEMES",
    "OrtCpuAvx2Quantizer",
    "OrtCpuQuantizer",
    "PercentileObserver",
    "QuantConfig",
    "TensorRTQuantizer",
    "calibrate",
    "convert",
    "freeze",
    "make_quantizer",
    "prepare",
    "ptq",
    "quantizable_layers",
    "sensitivity",
    "untie_shared_initializers",
]
