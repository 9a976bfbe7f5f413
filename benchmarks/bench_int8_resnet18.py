"""INT8 speed on onnxruntime CPU: FP32 vs edgekd's ort-cpu PTQ vs onnxruntime's own quantize_static.

A ResNet-18-shaped student (BasicBlock [2, 2, 2, 2], 224x224, 1000 classes, random weights: this measures
speed, not accuracy), onnxruntime CPU with 2 intra-op threads, batch 1 and 8. All engines are timed in the
same process, interleaved run by run, so machine load drifts hit them alike; ratios are per-round medians
against the FP32 engine.

Engines: FP32; edgekd "ort-cpu" (8-bit weights) and quantize_static (QDQ, QUInt8 activations, QInt8
per-channel weights); edgekd "ort-cpu-avx2" and quantize_static reduce_range=True (7-bit weights, which
cannot saturate AVX2 u8 x s8 kernels); edgekd "ort-cpu" with edgekd.quantize.ORT_SESSION_CONFIG (exact 8-bit
weights on AVX2 through slower u8u8 kernels).

    python benchmarks/bench_int8_resnet18.py            # writes benchmarks/results/int8_resnet18.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekd import quantize as q  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, dynamic_shapes=({0: batch},),
                      verbose=False)


def session(path: Path, threads: int, precision: bool, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Idle intra-op threads spin by default; with several sessions interleaved on 2 cores, one session's
    # spinning threads would steal the CPU from the next one's run.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if precision:
        for key, value in q.ORT_SESSION_CONFIG.items():
            so.add_session_config_entry(key, value)
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fused_ops(path: Path, threads: int) -> dict[str, int]:
    optimized = path.with_suffix(".opt.onnx")
    session(path, threads, precision=False, optimized=optimized)
    counts = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    keep = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear", "Conv",
            "FusedConv", "Gemm", "Add")
    return {k: counts[k] for k in keep if counts[k]}


class Reader:
    """onnxruntime CalibrationDataReader over the same random batches edgekd calibrates on."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:  # not needed: one pass
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs1", type=int, default=60, help="timed runs per engine at batch 1")
    parser.add_argument("--runs8", type=int, default=20, help="timed runs per engine at batch 8")
    parser.add_argument("--calib", type=int, default=8, help="calibration batches of 4 random images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:  # the ONNX files stay out of the repo
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    t_start = time.time()
    load_at_start = os.getloadavg()

    model = ResNet18().eval()
    example = torch.randn(2, 3, 224, 224)
    fp32 = work / "resnet18.fp32.onnx"
    export(model, example, fp32)

    calib = [rng.standard_normal((4, 3, 224, 224)).astype(np.float32) for _ in range(args.calib)]
    ptq_s = {}
    paths = {}
    for scheme in ("ort-cpu", "ort-cpu-avx2"):
        t0 = time.time()
        gm = q.ptq(model, example, [torch.from_numpy(b) for b in calib], q.QuantConfig(scheme=scheme))
        ptq_s[f"edgekd {scheme}"] = time.time() - t0
        paths[scheme] = work / f"resnet18.edgekd-{scheme}.onnx"
        export(gm, example, paths[scheme])
        m = onnx.load(str(paths[scheme]))
        q.untie_shared_initializers(m)  # needed by the x64quantprecision session option
        onnx.save(m, str(paths[scheme]))

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "resnet18.fp32.pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    input_name = onnx.load(str(pre)).graph.input[0].name
    for reduce_range in (False, True):
        t0 = time.time()
        paths[f"qs{reduce_range}"] = work / f"resnet18.quantize_static.rr{int(reduce_range)}.onnx"
        quantize_static(str(pre), str(paths[f"qs{reduce_range}"]), Reader(input_name, calib),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                        calibrate_method=CalibrationMethod.MinMax)
        ptq_s[f"quantize_static reduce_range={reduce_range}"] = time.time() - t0

    engines = {
        "fp32": (fp32, False),
        "edgekd ort-cpu int8": (paths["ort-cpu"], False),
        "quantize_static int8": (paths["qsFalse"], False),
        "edgekd ort-cpu-avx2 int8 (7-bit weights)": (paths["ort-cpu-avx2"], False),
        "quantize_static int8 reduce_range (7-bit weights)": (paths["qsTrue"], False),
        "edgekd ort-cpu int8 +x64quantprecision": (paths["ort-cpu"], True),
    }
    sessions = {name: session(path, args.threads, precision) for name, (path, precision) in engines.items()}
    ops = {name: fused_ops(path, args.threads) for name, (path, precision) in engines.items()
           if name != "fp32" and not precision}

    # Output agreement with FP32 on one random batch (random weights: a sanity check, not accuracy).
    x8 = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    outs = {name: s.run(None, {s.get_inputs()[0].name: x8})[0] for name, s in sessions.items()}

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    agreement = {name: {"cosine_vs_fp32": cosine(o, outs["fp32"]),
                        "top1_agreement_vs_fp32": float((o.argmax(1) == outs["fp32"].argmax(1)).mean())}
                 for name, o in outs.items() if name != "fp32"}

    results: dict[str, dict] = {}
    for batch, runs in ((1, args.runs1), (8, args.runs8)):
        x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
        feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
        for name, s in sessions.items():  # warm-up
            for _ in range(3):
                s.run(None, feeds[name])
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(runs):
            for name, s in sessions.items():  # interleaved: one run of each engine per round
                t = time.perf_counter()
                s.run(None, feeds[name])
                times[name].append((time.perf_counter() - t) * 1000)
        base = times["fp32"]
        results[f"batch{batch}"] = {
            name: {"median_ms": statistics.median(ts),
                   "speedup_vs_fp32": statistics.median(b / t for b, t in zip(base, ts, strict=True)),
                   "p10_ms": float(np.percentile(ts, 10)), "p90_ms": float(np.percentile(ts, 90))}
            for name, ts in times.items()}

    command = "python benchmarks/bench_int8_resnet18.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    report = {
        "command": command,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "threads": args.threads, "runs": {"batch1": args.runs1, "batch8": args.runs8},
        "ptq_seconds": ptq_s,
        "fused_ops": ops, "agreement": agreement, "latency": results,
        "total_seconds": time.time() - t_start,
    }
    (args.out / "int8_resnet18.json").write_text(json.dumps(report, indent=2))

    lines = ["# INT8 ResNet-18 on onnxruntime CPU", "",
             f"Command: `{command}`", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} intra-op threads, "
             f"onnxruntime {ort.__version__}, torch {torch.__version__}. Load average (1/5/15 min) at start "
             f"{', '.join(f'{v:.1f}' for v in load_at_start)}, at end {', '.join(f'{v:.1f}' for v in os.getloadavg())}"
             " (the machine is shared: absolute times move with load, ratios are taken per interleaved round).",
             "ResNet-18 shape (BasicBlock [2,2,2,2]), 224x224, random weights; random calibration data "
             f"({args.calib} x 4 images). Interleaved runs; speedup = median of per-round FP32/engine ratios.", "",
             "| engine | batch 1 median ms | vs FP32 | batch 8 median ms | vs FP32 |", "|---|---|---|---|---|"]
    for name in sessions:
        r1, r8 = results["batch1"][name], results["batch8"][name]
        lines.append(f"| {name} | {r1['median_ms']:.1f} | {r1['speedup_vs_fp32']:.2f}x | {r8['median_ms']:.1f} | "
                     f"{r8['speedup_vs_fp32']:.2f}x |")
    lines += ["", "Op types onnxruntime runs after graph optimization:", ""]
    for name, counts in ops.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines += ["", "Logits vs FP32 on one random batch of 8 (random weights, so a sanity check only):", ""]
    for name, a in agreement.items():
        lines.append(f"- {name}: cosine {a['cosine_vs_fp32']:.4f}, "
                     f"top-1 agreement {a['top1_agreement_vs_fp32']:.2f}")
    lines += ["", "PTQ time: " + ", ".join(f"{k} {v:.1f} s" for k, v in ptq_s.items())
              + f". Total run {time.time() - t_start:.0f} s."]
    (args.out / "int8_resnet18.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
