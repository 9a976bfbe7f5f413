"""Q/DQ graphs onnxruntime fuses: on MobileNetV2-, EfficientNet-Lite-, ResNet- and MobileNetV3-shaped models
(tiny, built here), edgekd's ort-cpu / ort-cpu-avx2 PTQ leaves as many unfused Q/DQ pairs after onnxruntime's
optimization as onnxruntime's own quantize_static (after quant_pre_process) on the same FP32 ONNX, and every
conv/gemm runs as an integer kernel. Also: the pad fold is exact, ReLU6 ranges are observed after the clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgekd import qdq
from edgekd import quantize as q
from edgekd.errors import EdgekdError
from edgekd.export import export_onnx, parity

SIZE = 32


def _same_pad(k: int, s: int, size: int) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding as EfficientNet-Lite's Conv2dStaticSamePadding computes it (asymmetric)."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2)


def _cbr(cin: int, cout: int, k: int, s: int, *, groups: int = 1, act: nn.Module | None = None,
         pad: tuple[int, int, int, int] | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.ZeroPad2d(pad)] if pad is not None else []
    layers += [nn.Conv2d(cin, cout, k, s, 0 if pad is not None else k // 2, groups=groups, bias=False),
               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1, depthwise 3x3, [squeeze-excite], project 1x1, residual add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, *, act: type[nn.Module] = nn.ReLU6,
                 size: int | None = None, se: bool = False) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _cbr(cin, mid, 1, 1, act=act()) if expand != 1 else nn.Identity()
        self.dw = _cbr(mid, mid, 3, stride, groups=mid, act=act(),
                       pad=_same_pad(3, stride, size) if size else None)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, 4, 1), nn.ReLU(), nn.Conv2d(4, mid, 1),
                                nn.Hardsigmoid()) if se else None
        self.project = _cbr(mid, cout, 1, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        if self.se is not None:
            y = y * self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class MobileNetV2ish(nn.Module):
    """MobileNetV2 layout (ReLU6, depthwise convs, inverted residuals); `efficient` adds EfficientNet-Lite's
    explicit ZeroPad2d "SAME" padding in front of every strided/3x3 conv."""

    def __init__(self, efficient: bool = False, w: int = 8) -> None:
        super().__init__()
        self.stem = _cbr(3, w, 3, 2, act=nn.ReLU6(), pad=_same_pad(3, 2, SIZE) if efficient else None)
        size, cin, blocks = SIZE // 2, w, []
        for cout, stride, expand in ((w, 1, 1), (2 * w, 2, 6), (2 * w, 1, 6), (3 * w, 2, 6), (3 * w, 1, 6)):
            blocks.append(InvertedResidual(cin, cout, stride, expand, size=size if efficient else None))
            size, cin = -(-size // stride), cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _cbr(cin, 8 * w, 1, 1, act=nn.ReLU6())
        self.fc = nn.Linear(8 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(F.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), 0.2, self.training))


class MobileNetV3ish(nn.Module):
    """Hardswish, SiLU, squeeze-excite with hardsigmoid, average pooling and concat."""

    def __init__(self, w: int = 8) -> None:
        super().__init__()
        self.stem = _cbr(3, w, 3, 2, act=nn.Hardswish())
        self.b1 = InvertedResidual(w, w, 1, 1, se=True)
        self.b2 = InvertedResidual(w, 2 * w, 2, 4, act=nn.Hardswish, se=True)
        self.b3 = InvertedResidual(2 * w, 2 * w, 1, 4, act=nn.SiLU, se=True)
        self.side = _cbr(2 * w, 2 * w, 1, 1, act=nn.ReLU())
        self.head = _cbr(4 * w, 8 * w, 1, 1, act=nn.Hardswish())
        self.fc = nn.Linear(8 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        x = torch.cat([x, F.avg_pool2d(self.side(x), 3, 1, 1)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(x), 1), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = _cbr(cin, cout, 3, stride, act=nn.ReLU())
        self.c2 = _cbr(cout, cout, 3, 1)
        self.down = _cbr(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(self.c1(x)) + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self, w: int = 8) -> None:
        super().__init__()
        self.stem = _cbr(3, w, 3, 1, act=nn.ReLU())
        self.layers = nn.Sequential(nn.MaxPool2d(3, 2, 1), BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2))
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


MODELS = {"mobilenetv2": lambda: MobileNetV2ish(), "efficientnet-lite": lambda: MobileNetV2ish(efficient=True),
          "resnet": ResNetish, "mobilenetv3": MobileNetV3ish}


class _Reader:
    """onnxruntime CalibrationDataReader over the batches edgekd calibrates on."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.items = iter([{name: b.numpy()} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:
        pass


def _weighted_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Per model: the FP32 model, its calibration batches, and quantize_static's graph check on its FP32 ONNX."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = {}
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().eval()
        with torch.no_grad():   # non-trivial BatchNorm statistics, as a trained network has
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        calib = [torch.randn(4, 3, SIZE, SIZE) for _ in range(3)]
        tmp = tmp_path_factory.mktemp(name)
        fp32 = export_onnx(model, calib[0], tmp / "fp32.onnx", metadata={})
        pre, qs = tmp / "pre.onnx", tmp / "qs.onnx"
        quant_pre_process(str(fp32), str(pre))
        quantize_static(str(pre), str(qs), _Reader(onnx.load(str(pre)).graph.input[0].name, calib),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        out[name] = {"model": model, "calib": calib, "dir": tmp, "qs": qdq.check_graph(qs, "ort-cpu")}
    return out


@pytest.mark.parametrize("scheme", ["ort-cpu", "ort-cpu-avx2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fuses_like_quantize_static(built: dict, name: str, scheme: str) -> None:
    b = built[name]
    gm = q.ptq(b["model"], b["calib"][0], b["calib"], q.QuantConfig(scheme=scheme))
    path = export_onnx(gm, b["calib"][0], b["dir"] / f"{scheme}.onnx", metadata={})
    ours, theirs = qdq.check_graph(path, scheme), b["qs"]
    assert theirs["ok"] and theirs["quantized_weighted"] == _weighted_layers(b["model"]), theirs
    assert ours["ok"] and ours["float_weighted"] == 0, ours["ops"]
    assert ours["quantized_weighted"] == _weighted_layers(b["model"]), ours["ops"]
    assert ours["qdq_pairs"] == theirs["qdq_pairs"], (ours["ops"], theirs["ops"])
    assert ours["ops"].get("Pad", 0) == ours["ops"].get("Clip", 0) == 0, ours["ops"]
    # Onnxruntime (optimizations off) computes what the converted PyTorch model does: the pad fold and the
    # clip placement change no value (float sums in another order flip a rare rounding to the next uint8 step).
    x = torch.randn(6, 3, SIZE, SIZE).numpy()
    check = parity(gm, path, x)
    assert check["max_abs_diff"] < 1e-2 and check["top1_agreement"] == 1.0, check


def test_relu6_range_is_observed_after_the_clip(built: dict, tmp_path: Path) -> None:
    b = built["mobilenetv2"]
    gm = q.ptq(b["model"], b["calib"][0], b["calib"], q.QuantConfig(scheme="ort-cpu"))
    model = onnx.load(str(export_onnx(gm, b["calib"][0], tmp_path / "m.onnx", metadata={})))
    consts = qdq.constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == 11      # stem, first depthwise, 4 x (expand, depthwise), head
    for clip in clips:
        assert producer[clip.input[0]].op_type == "Conv", "no Q/DQ between the conv and its ReLU6"
        (quant,) = consumers[clip.output[0]]
        assert quant.op_type == "QuantizeLinear"
        scale, zero = float(consts[quant.input[1]]), int(consts[quant.input[2]])
        assert zero == 0 and scale * 255 <= 6.0 + 1e-6, "the uint8 range lies inside ReLU6's [0, 6]"


def test_fold_pads_into_convs_is_exact(tmp_path: Path) -> None:
    """An asymmetric ZeroPad2d (TF "SAME", stride 2) and an F.pad on the input fold into the convs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 4, 3, 2), nn.ReLU(),
                          nn.ZeroPad2d(1), nn.Conv2d(4, 4, 3, 1, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(5))
    calib = [torch.randn(4, 3, 9, 9) for _ in range(2)]
    model(calib[0])
    gm = q.ptq(model.eval(), calib[0], calib, q.QuantConfig(scheme="ort-cpu"))
    path = export_onnx(gm, calib[0], tmp_path / "pad.onnx", metadata={})
    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    pads = [list(qdq._attr(n, "pads", [])) for n in graph.node if n.op_type == "Conv"]
    assert pads == [[0, 0, 1, 1], [2, 2, 2, 2]]
    check = parity(gm, path, torch.randn(8, 3, 9, 9).numpy())
    assert check["max_abs_diff"] < 1e-5, check


def test_fold_leaves_other_pads(tmp_path: Path) -> None:
    """Reflect padding and a non-zero constant are not a conv's zero padding: they stay."""
    model = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConstantPad2d(1, 0.5),
                          nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    calib = [torch.randn(4, 3, 8, 8)]
    model(calib[0])
    gm = q.ptq(model.eval(), calib[0], calib, q.QuantConfig(scheme="ort-cpu"))
    proto = onnx.load(str(export_onnx(gm, calib[0], tmp_path / "p.onnx", metadata={})))
    assert sum(n.op_type == "Pad" for n in proto.graph.node) == 2
    assert qdq.fold_pads_into_convs(proto) == 0


def test_transformer_block_runs_every_matmul_in_int8(tmp_path: Path) -> None:
    """Linear, GELU, LayerNorm, softmax attention, residual adds: every MatMul/Gemm is an integer kernel."""

    class Block(nn.Module):
        def __init__(self, d: int = 16) -> None:
            super().__init__()
            self.inp, self.ln1, self.qkv = nn.Linear(8, d), nn.LayerNorm(d), nn.Linear(d, 3 * d)
            self.proj, self.ln2 = nn.Linear(d, d), nn.LayerNorm(d)
            self.fc1, self.fc2, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.inp(x)
            qh, kh, vh = self.qkv(self.ln1(x)).chunk(3, dim=-1)
            att = torch.softmax(torch.matmul(qh, kh.transpose(1, 2)) * 0.25, dim=-1)
            x = x + self.proj(torch.matmul(att, vh))
            x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
            return self.head(x.mean(1))

    torch.manual_seed(0)
    model = Block().eval()
    calib = [torch.randn(4, 6, 8) for _ in range(2)]
    gm = q.ptq(model, calib[0], calib, q.QuantConfig(scheme="ort-cpu"))
    path = export_onnx(gm, calib[0], tmp_path / "t.onnx", metadata={})
    result = qdq.check_graph(path, "ort-cpu")
    assert result["ok"] and result["quantized_weighted"] == 6 + 2, result["ops"]   # 6 linears, 2 matmuls


def test_check_graph_errors(tmp_path: Path) -> None:
    with pytest.raises(EdgekdError, match="tensorrt"):
        qdq.check_graph(tmp_path / "x.onnx", "tensorrt")
    with pytest.raises(EdgekdError, match="not found"):
        qdq.check_graph(tmp_path / "missing.onnx", "ort-cpu")
