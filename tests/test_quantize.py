"""Quantization: Q/DQ placement per target (checked on the exported ONNX graph), onnxruntime fusion,
QAT with a KD loss then freeze/convert/engine parity, PTQ observers, mixed precision, sensitivity, errors.

Module-scoped fixtures share the expensive steps (torch.export, QAT convert, ONNX export).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from edgekd import quantize as q
from edgekd.errors import EdgekdError
from edgekd.models import build_model
from edgekd.objective import Batch, ObjectiveConfig, compute

SHAPE = (1, 8, 8)


class ResidualNet(nn.Module):
    """Stem conv-bn-relu, one BasicBlock (conv-bn-relu, conv-bn, add, relu), pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        x = self.relu(x + y)
        return self.head(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------------------------------------- helpers


def export_onnx(gm: torch.nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    batch = torch.export.Dim("batch")
    torch.onnx.export(gm, (x,), str(path), dynamo=True, external_data=False, dynamic_shapes=({0: batch},),
                      verbose=False)
    model = onnx.load(str(path))
    q.untie_shared_initializers(model)
    onnx.save(model, str(path))
    return model


def ort_session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    """Graph optimizations on, with the precision setting the ort-cpu scheme asks for (q.ORT_SESSION_CONFIG):
    without it, AVX2 CPUs without VNNI saturate u8 x s8 products in QLinearConv (a 9% top-1 disagreement on
    digits here)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    for key, value in q.ORT_SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fused_op_counts(path: Path) -> Counter:
    """Op types in the model onnxruntime actually runs (graph optimizations on)."""
    optimized = path.with_suffix(".opt.onnx")
    ort_session(path, optimized)
    return Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


class Graph:
    """Producer/consumer lookups and constant values of an ONNX graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.init_types = {t.name: t.data_type for t in model.graph.initializer}
        for n in self.nodes:  # Constant nodes count as initializers
            if n.op_type == "Constant":
                self.inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
                self.init_types[n.output[0]] = n.attribute[0].t.data_type

    def of_type(self, op: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op]

    def source(self, name: str) -> str:
        node = self.producer.get(name)
        return node.op_type if node is not None else ("initializer" if name in self.inits else "input")

    def is_activation_dq(self, dq: onnx.NodeProto) -> bool:
        """A DequantizeLinear fed by a QuantizeLinear (not by a constant weight/bias)."""
        return self.source(dq.input[0]) == "QuantizeLinear"


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, *SHAPE) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target)


def train_float(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"x_train": x[:1300], "y_train": y[:1300], "x_test": x[1300:1700], "y_test": y[1300:1700]}


@pytest.fixture(scope="module")
def cnn(data: dict[str, torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    return train_float(build_model("cnn:widths=8,16", SHAPE, 10), data["x_train"], data["y_train"], 60)


@pytest.fixture(scope="module")
def ort_cnn(cnn: nn.Module, data: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory):
    x = data["x_train"]
    gm = q.ptq(cnn, x[:8], [x[i:i + 64] for i in range(0, 256, 64)], q.QuantConfig(scheme="ort-cpu"))
    path = tmp_path_factory.mktemp("ort") / "cnn.onnx"
    return gm, path, export_onnx(gm, x[:2], path)


@pytest.fixture(scope="module")
def residual_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, onnx.ModelProto]]:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    calib = [torch.randn(16, *SHAPE) for _ in range(3)]
    out = {}
    for scheme in ("ort-cpu", "tensorrt"):
        gm = q.ptq(model, calib[0], calib, q.QuantConfig(scheme=scheme))
        path = tmp_path_factory.mktemp(scheme) / "residual.onnx"
        out[scheme] = (path, export_onnx(gm, calib[0][:2], path))
    return out


@pytest.fixture(scope="module")
def qat_run(data: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """KD-QAT of a pre-trained CNN student from a CNN teacher on digits, freeze, convert, ONNX, onnxruntime."""
    x, y = data["x_train"], data["y_train"]
    torch.manual_seed(1)
    teacher = train_float(build_model("cnn:widths=16,32", SHAPE, 10), x, y, 80, seed=1)
    torch.manual_seed(2)
    student = train_float(build_model("cnn:widths=8,16", SHAPE, 10), x, y, 100, seed=2)
    prepared = q.prepare(student, x[:8], q.QuantConfig(scheme="ort-cpu"), qat=True)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    losses = []

    def step() -> float:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        with torch.no_grad():
            t_logits = teacher(x[idx])
        loss = compute(Batch(prepared(x[idx]), y[idx], teacher_logits=t_logits), ObjectiveConfig(4.0, 0.7))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(30):
        losses.append(step())

    def snapshot() -> dict[str, torch.Tensor]:
        state = {k: v.clone() for k, v in prepared.state_dict().items()
                 if k.endswith((".scale", ".zero_point", "running_mean", "running_var"))}
        return state

    before_freeze = snapshot()
    step()
    after_unfrozen_step = snapshot()
    q.freeze(prepared)
    for group in opt.param_groups:  # the frozen phase runs at a decayed rate (BN no longer normalizes batches)
        group["lr"] = 0.005
    frozen = snapshot()
    for _ in range(3):
        step()
    after_frozen_steps = snapshot()

    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(prepared)
    x_test = data["x_test"]
    with torch.no_grad():
        fake_quant_logits = prepared(x_test).numpy()
    converted = q.convert(prepared)
    with torch.no_grad():
        converted_logits = converted(x_test).numpy()
    path = tmp_path_factory.mktemp("qat") / "student.int8.onnx"
    model = export_onnx(converted, x_test[:2], path)
    sess = ort_session(path)
    engine_logits = sess.run(None, {sess.get_inputs()[0].name: x_test.numpy()})[0]
    return {"losses": losses, "before_freeze": before_freeze, "after_unfrozen_step": after_unfrozen_step,
            "frozen": frozen, "after_frozen_steps": after_frozen_steps, "fake_quant": fake_quant_logits,
            "converted": converted_logits, "engine": engine_logits, "path": path, "onnx": model,
            "y_test": data["y_test"].numpy()}


# ----------------------------------------------------------------------------------- ort-cpu placement


def test_ort_cpu_qdq_placement(ort_cnn) -> None:
    _, _, model = ort_cnn
    g = Graph(model)
    convs = g.of_type("Conv")
    assert len(convs) == 2
    for conv in convs:
        x_dq, w_dq, b_dq = (g.producer[i] for i in conv.input)
        assert (x_dq.op_type, w_dq.op_type, b_dq.op_type) == ("DequantizeLinear",) * 3
        assert g.init_types[w_dq.input[0]] == TensorProto.INT8
        assert not g.inits[w_dq.input[2]].any(), "weights are symmetric (zero point 0)"
        assert g.inits[w_dq.input[1]].shape == (g.inits[w_dq.input[0]].shape[0],), "per-channel weight scales"
        assert g.init_types[b_dq.input[0]] == TensorProto.INT32, "int32 bias, as QLinearConv wants"
        # The output Q/DQ comes after the fused ReLU.
        (relu,) = g.consumers[conv.output[0]]
        assert relu.op_type == "Relu"
        assert [n.op_type for n in g.consumers[relu.output[0]]] == ["QuantizeLinear"]
    for node in g.of_type("QuantizeLinear"):
        assert g.init_types[node.input[2]] == TensorProto.UINT8, "activations are uint8 asymmetric"
    # The model input itself is quantized, and max-pool sits between Q/DQ with the same qparams.
    assert [n.op_type for n in g.consumers[model.graph.input[0].name]] == ["QuantizeLinear"]
    for pool in g.of_type("MaxPool"):
        dq = g.producer[pool.input[0]]
        (q_after,) = g.consumers[pool.output[0]]
        assert dq.op_type == "DequantizeLinear" and q_after.op_type == "QuantizeLinear"
        assert g.inits[dq.input[1]] == g.inits[q_after.input[1]]


def test_ort_cpu_fuses_into_integer_kernels(ort_cnn, residual_models) -> None:
    _, path, _ = ort_cnn
    ops = fused_op_counts(path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1
    assert ops["Conv"] == ops["FusedConv"] == ops["Gemm"] == 0, ops
    ops = fused_op_counts(residual_models["ort-cpu"][0])
    assert ops["QLinearConv"] == 3 and ops["QLinearAdd"] == 1 and ops["QGemm"] == 1, ops
    assert ops["Add"] == ops["Conv"] == ops["FusedConv"] == 0, ops


def test_ort_cpu_engine_matches_pytorch(ort_cnn, data) -> None:
    gm, path, _ = ort_cnn
    x = data["x_test"][:200]
    with torch.no_grad():
        ref = gm(x).numpy()
    sess = ort_session(path)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert np.abs(out - ref).max() < 0.25


def test_ort_cpu_avx2_is_exact_without_session_options(cnn: nn.Module, data, tmp_path: Path) -> None:
    """7-bit weights cannot saturate onnxruntime's u8 x s8 AVX2 kernels: the default session matches PyTorch."""
    x = data["x_train"]
    gm = q.ptq(cnn, x[:8], [x[i:i + 64] for i in range(0, 256, 64)], q.QuantConfig(scheme="ort-cpu-avx2"))
    path = tmp_path / "avx2.onnx"
    g = Graph(export_onnx(gm, x[:2], path))
    for conv in g.of_type("Conv") + g.of_type("Gemm"):
        w = g.inits[g.producer[conv.input[1]].input[0]]
        assert np.abs(w.astype(np.int32)).max() <= 64
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x_test = data["x_test"]
    out = sess.run(None, {sess.get_inputs()[0].name: x_test.numpy()})[0]
    with torch.no_grad():
        ref = gm(x_test).numpy()
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99
    ops = fused_op_counts(path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1, ops


# ---------------------------------------------------------------------------------- tensorrt placement


def test_tensorrt_qdq_placement(residual_models) -> None:
    _, model = residual_models["tensorrt"]
    g = Graph(model)
    quantizable = {"Conv", "Gemm", "MatMul", "Add"}
    for node in g.of_type("QuantizeLinear"):
        assert g.init_types[node.input[2]] == TensorProto.INT8
        assert float(g.inits[node.input[2]]) == 0, "TensorRT needs zero point 0"
    for dq in g.of_type("DequantizeLinear"):
        if g.is_activation_dq(dq):
            # Q/DQ only on the inputs of quantizable ops: never on a pool/relu/reshape input.
            assert {n.op_type for n in g.consumers[dq.output[0]]} <= quantizable
        else:
            assert g.init_types[dq.input[0]] == TensorProto.INT8, "weights int8"
            assert not g.inits[dq.input[2]].any(), "weights symmetric"
    for op in g.of_type("Conv") + g.of_type("Gemm"):
        assert g.source(op.input[0]) == g.source(op.input[1]) == "DequantizeLinear"
        if len(op.input) > 2:
            assert g.source(op.input[2]) == "initializer", "TensorRT keeps the bias float"
    # Residual add: Q/DQ on the skip input only; the conv branch feeds the add directly so TensorRT fuses
    # conv + add (+ relu) into one INT8 kernel (NVIDIA's placement, as Model Optimizer's ONNX export).
    (add,) = g.of_type("Add")
    assert sorted(g.source(i) for i in add.input) == ["Conv", "DequantizeLinear"]
    skip = next(i for i in add.input if g.source(i) == "DequantizeLinear")
    assert g.source(g.producer[g.producer[skip].input[0]].input[0]) == "Relu", "the skip is the stem's output"
    # No Q/DQ after the add's ReLU (its consumer is the pool, not a quantizable op).
    (relu,) = g.consumers[add.output[0]]
    assert "QuantizeLinear" not in {n.op_type for n in g.consumers[relu.output[0]]}


def test_linear_only_student_same_flow(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = build_model("mlp:hidden=32,16", SHAPE, 10).eval()
    calib = [torch.randn(32, *SHAPE) for _ in range(2)]
    gm = q.ptq(mlp, calib[0][:1], calib, q.QuantConfig(scheme="ort-cpu"))  # batch-1 example: still dynamic
    path = tmp_path / "mlp.onnx"
    g = Graph(export_onnx(gm, calib[0][:2], path))
    for gemm in g.of_type("Gemm"):
        assert [g.source(i) for i in gemm.input] == ["DequantizeLinear"] * 3
    assert fused_op_counts(path)["QGemm"] == 3
    assert gm(torch.randn(1, *SHAPE)).shape == (1, 10)
    assert gm(torch.randn(7, *SHAPE)).shape == (7, 10)


# ------------------------------------------------------------------------------------------------ QAT


def test_qat_kd_loss_decreases(qat_run) -> None:
    losses = qat_run["losses"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_freeze_stops_observers_and_bn_stats(qat_run) -> None:
    before, unfrozen = qat_run["before_freeze"], qat_run["after_unfrozen_step"]
    frozen, after = qat_run["frozen"], qat_run["after_frozen_steps"]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith(".scale") for k in frozen)
    # Before freeze, a training step moves both the ranges and the BN statistics ...
    assert any(not torch.equal(before[k], unfrozen[k]) for k in before if k.endswith(".scale"))
    assert any(not torch.equal(before[k], unfrozen[k]) for k in before if k.endswith("running_mean"))
    # ... after it, three more steps move neither.
    for k in frozen:
        assert torch.equal(frozen[k], after[k]), k


def test_qat_engine_agrees_with_fake_quant_model(qat_run) -> None:
    fq, conv, engine, y = qat_run["fake_quant"], qat_run["converted"], qat_run["engine"], qat_run["y_test"]
    assert (conv.argmax(1) == fq.argmax(1)).mean() >= 0.97
    assert (engine.argmax(1) == fq.argmax(1)).mean() >= 0.97
    assert (engine.argmax(1) == y).mean() >= (fq.argmax(1) == y).mean() - 0.03
    assert (fq.argmax(1) == y).mean() > 0.8, "the QAT student learned the task"
    ops = fused_op_counts(qat_run["path"])
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1, ops


def test_tensorrt_qat_fake_quant_is_symmetric() -> None:
    """TensorRT QAT trains with zero point 0 even on ReLU outputs (the fused moving-average fake-quant op
    would pick -128 there, which convert then contradicts) and converts to int8 Q/DQ with zero point 0."""
    from torchao.quantization.pt2e import FakeQuantize

    torch.manual_seed(0)
    mlp = build_model("mlp:hidden=16", SHAPE, 10)
    prepared = q.prepare(mlp, torch.randn(8, *SHAPE), q.QuantConfig(scheme="tensorrt"), qat=True)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):
        loss = prepared(torch.randn(16, *SHAPE)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fqs = [m for m in prepared.modules() if isinstance(m, FakeQuantize)]
    assert fqs and all(int(m.zero_point.abs().max()) == 0 for m in fqs)
    assert all(m.dtype == torch.int8 for m in fqs)
    q.freeze(prepared)
    converted = q.convert(prepared)
    qnodes = [n for n in converted.graph.nodes if "quantize_per_tensor" in str(n.target)]
    assert qnodes and all(n.args[2] == 0 and n.args[5] == torch.int8 for n in qnodes)


# ------------------------------------------------------------------------------------------ observers


def _input_scale(gm: torch.fx.GraphModule) -> float:
    for node in gm.graph.nodes:
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target):
            return float(node.args[1])
    raise AssertionError("no quantize node")


@pytest.mark.parametrize("scheme", ["ort-cpu", "tensorrt"])
def test_observers_differ_on_outliers(scheme: str) -> None:
    torch.manual_seed(0)
    mlp = build_model("mlp:hidden=16", SHAPE, 10).eval()
    heavy_tailed = torch.distributions.StudentT(2.0)  # rare large values, like real activations
    calib = [heavy_tailed.sample((256, *SHAPE)) for _ in range(4)]
    scales = {obs: _input_scale(q.ptq(mlp, calib[0], calib, q.QuantConfig(scheme=scheme, observer=obs)))
              for obs in q.OBSERVERS}
    assert scales["percentile"] < 0.5 * scales["minmax"], scales
    assert scales["mse"] < 0.95 * scales["minmax"], scales


def _quant_mse(x: torch.Tensor, observer: torch.nn.Module) -> float:
    scale, zp = (float(v) for v in observer.calculate_qparams())
    levels = torch.clamp(torch.round(x / scale) + zp, observer.quant_min, observer.quant_max)
    return float(((levels - zp) * scale - x).pow(2).mean())


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_observer_beats_minmax_and_histogram(symmetric: bool) -> None:
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver

    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((65536,))
    kw = ({"dtype": torch.int8, "qscheme": torch.per_tensor_symmetric, "quant_min": -128, "quant_max": 127}
          if symmetric else {"dtype": torch.uint8, "qscheme": torch.per_tensor_affine, "quant_min": 0,
                             "quant_max": 255})
    errors = {}
    for name, cls in (("minmax", MinMaxObserver), ("histogram", HistogramObserver), ("mse", q.MSEObserver)):
        obs = cls(**kw)
        for chunk in x.chunk(4):
            obs(chunk)
        errors[name] = _quant_mse(x, obs)
    assert errors["mse"] < 0.92 * errors["minmax"], errors
    assert errors["mse"] <= errors["histogram"] * 1.001, errors


def test_percentile_observer_clips_the_tail() -> None:
    x = torch.linspace(0, 1, 100001)
    obs = q.PercentileObserver(percentile=99.0)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert int(zp) == 0
    assert float(scale) * 255 == pytest.approx(0.99, abs=0.002)


# ------------------------------------------------------------------------------------ mixed precision


def test_skip_keeps_layer_float(cnn: nn.Module, data, tmp_path: Path) -> None:
    x = data["x_train"]
    cfg = q.QuantConfig(scheme="ort-cpu", skip=("features.0",))
    gm = q.ptq(cnn, x[:8], [x[:64]], cfg)
    g = Graph(export_onnx(gm, x[:2], tmp_path / "skip.onnx"))
    first, second = g.of_type("Conv")
    assert g.source(first.input[1]) == "initializer", "skipped layer keeps float weights"
    assert g.source(first.input[0]) == "input"
    assert g.source(second.input[1]) == "DequantizeLinear"


def test_sensitivity_one_row_per_layer_sorted(cnn: nn.Module, data) -> None:
    x, y = data["x_test"], data["y_test"]

    def accuracy(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    rows = q.sensitivity(cnn, x[:8], [data["x_train"][:128]], accuracy, q.QuantConfig())
    assert sorted(r["layer"] for r in rows) == sorted(q.quantizable_layers(cnn)) == ["features.0", "features.4",
                                                                                      "head"]
    drops = [r["drop"] for r in rows]
    assert drops == sorted(drops, reverse=True)
    base = accuracy(cnn)
    for r in rows:
        assert set(r) == {"layer", "accuracy", "drop"}
        assert r["drop"] == pytest.approx(base - r["accuracy"])


# ------------------------------------------------------------------------------------------ bad input


def test_qat_refuses_a_captured_training_only_random_branch() -> None:
    """Drop-connect written as `if self.training:` is captured by the training-mode QAT export; convert refuses
    the graph instead of shipping a stochastic INT8 engine."""

    class DropConnect(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if self.training:
                y = y * (torch.rand_like(y) > 0.2) / 0.8
            return self.head(torch.flatten(y + x, 1))

    x = torch.randn(4, *SHAPE)
    prepared = q.prepare(DropConnect(), x, q.QuantConfig(), qat=True)
    q.calibrate(prepared, [x])
    with pytest.raises(EdgekdError, match="random numbers .* drop_connect_rate"):
        q.convert(prepared)


def test_unknown_scheme_and_observer_name_the_choices() -> None:
    with pytest.raises(EdgekdError, match="ort-cpu.*tensorrt"):
        q.make_quantizer(q.QuantConfig(scheme="tflite"), qat=False)
    with pytest.raises(EdgekdError, match="minmax.*percentile.*mse"):
        q.make_quantizer(q.QuantConfig(observer="entropyy"), qat=False)
    with pytest.raises(EdgekdError, match="tflite"):
        q.prepare(nn.Linear(4, 2), torch.randn(2, 4), q.QuantConfig(scheme="tflite"), qat=True)


def test_unknown_skip_layer_lists_the_layers() -> None:
    model = build_model("mlp:hidden=8", SHAPE, 10)
    with pytest.raises(EdgekdError, match=r"features\.9.*features\.1.*head"):
        q.prepare(model, torch.randn(2, *SHAPE), q.QuantConfig(skip=("features.9",)), qat=False)


def test_make_quantizer_returns_scheme_quantizers() -> None:
    assert isinstance(q.make_quantizer(q.QuantConfig(scheme="ort-cpu"), qat=True), q.OrtCpuQuantizer)
    assert isinstance(q.make_quantizer(q.QuantConfig(scheme="tensorrt"), qat=False), q.TensorRTQuantizer)
    avx2 = q.make_quantizer(q.QuantConfig(scheme="ort-cpu-avx2"), qat=False)
    assert isinstance(avx2, q.OrtCpuQuantizer) and avx2.weight.quant_max == 64


# ------------------------------------------------------------------------------------------ exact values

_QPT = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQPC = torch.ops.quantized_decomposed.dequantize_per_channel.default


def _hand_mlp() -> tuple[nn.Module, torch.Tensor]:
    """Linear(3, 2) - ReLU - Linear(2, 2) with hand-picked weights, and a calibration batch with x in [-2, 3]."""
    m = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.1, -0.3]]))
        m[0].bias.copy_(torch.tensor([0.1, -0.2]))
        m[2].weight.copy_(torch.tensor([[1.0, -0.5], [0.3, 0.6]]))
        m[2].bias.copy_(torch.tensor([0.05, 0.0]))
    return m, torch.tensor([[1.0, -2.0, 0.5], [-0.5, 1.5, 3.0]])


def _minmax_qparams(t: torch.Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """MinMax qparams over a range that includes 0: affine scale = (max - min) / (qmax - qmin),
    zp = qmin - round(min / scale); symmetric scale = amax / ((qmax - qmin) / 2), zp 0."""
    lo, hi = torch.clamp(t.min(), max=0.0), torch.clamp(t.max(), min=0.0)
    if symmetric:
        return float(torch.maximum(-lo, hi) / ((qmax - qmin) / 2)), 0
    scale = (hi - lo) / float(qmax - qmin)
    return float(scale), int(torch.clamp(qmin - torch.round(lo / scale), qmin, qmax))


@pytest.mark.parametrize("scheme", ["ort-cpu", "tensorrt"])
def test_ptq_places_and_computes_exact_qparams(scheme: str) -> None:
    """Q/DQ placement and every number of a PTQ graph, against the formulas computed here: activation qparams
    (MinMax), per-channel weight scales amax / bound and int8 weights, and (ort-cpu) int32 biases b / (sx * sw)."""
    m, x = _hand_mlp()
    gm = q.ptq(m, x, [x], q.QuantConfig(scheme=scheme))
    with torch.no_grad():
        h = m[1](m[0](x))
        y = m[2](h)
    trt = scheme == "tensorrt"
    qmin, qmax = (-128, 127) if trt else (0, 255)
    observed = [x, h] if trt else [x, h, y]   # tensorrt: Q/DQ on conv/linear inputs only; ort-cpu: outputs too
    quants = [n for n in gm.graph.nodes if n.target == _QPT]
    assert [tuple(n.args[1:5]) for n in quants] == \
        [(*_minmax_qparams(t, qmin, qmax, trt), qmin, qmax) for t in observed]
    assert [n.args[0].target for n in quants[1:2]] == [torch.ops.aten.relu.default]   # Q after the relu
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    for lin, layer, x_scale in zip(linears, (m[0], m[2]), (quants[0].args[1], quants[1].args[1]), strict=True):
        w_dq = lin.args[1]
        assert w_dq.target == _DQPC and w_dq.args[4:6] == (-127, 127)
        w_int, w_scale = (gm.get_buffer(a.target) for a in w_dq.args[:2])
        expected_scale = layer.weight.abs().amax(1) / 127
        assert torch.equal(w_scale, expected_scale)
        assert torch.equal(w_int, torch.round(layer.weight / expected_scale[:, None]).to(torch.int8))
        bias = lin.args[2]
        if trt:
            assert torch.equal(gm.get_parameter(bias.target), layer.bias)   # TensorRT keeps biases float
            continue
        assert bias.target == _DQPC and bias.args[6] == torch.int32
        b_scale = (x_scale * expected_scale.double()).float()
        assert torch.equal(gm.get_buffer(bias.args[1].target), b_scale)
        assert torch.equal(gm.get_buffer(bias.args[0].target),
                           torch.round(layer.bias.double() / b_scale.double()).to(torch.int32))
