"""INT8 on the networks people deploy: edgekd's PTQ vs onnxruntime's quantize_static, as edgekd bundles.

Models (224x224x3, 1000 classes): EfficientNet-Lite0 with its ImageNet weights (the `pretrained` extra), and
MobileNetV2 and ResNet-18 layouts built here with random weights whose BatchNorm statistics are re-estimated on
the calibration images (so activations have trained-network ranges). Calibration: 64 natural images, half random
crops of scikit-learn's sample photos, half upsampled Fashion-MNIST items; evaluation: 256 other ones.

Engines, all built with `edgekd.engines.build` for the x86-cpu-ort target and opened with `edgekd.runtime.load`
(same session options, 2 intra-op threads): FP32; edgekd PTQ with the "ort-cpu" (8-bit weights) and
"ort-cpu-avx2" (7-bit weights) schemes; onnxruntime `quantize_static` (QDQ, U8 activations, S8 per-channel
weights, MinMax, after `quant_pre_process`) on the same FP32 ONNX with the same calibration images. Timing is
interleaved (one run of each engine per round, order rotated), speed = median of the per-round FP32/engine
ratios at batch 1 and 8. Fidelity: top-1 agreement with the FP32 engine and mean |logit - FP32 logit| on the
evaluation images. Extra edgekd "ort-cpu" variants with the MSE and percentile observers are scored for
fidelity only (same graph, same speed). The graph check (`edgekd.qdq.check_graph`) counts the Q/DQ pairs
onnxruntime's optimizer leaves unfused.

    flock /work/bench.lock python benchmarks/bench_int8_edge.py     # writes benchmarks/results/int8_edge.{json,md}
    python benchmarks/bench_int8_edge.py --quick                      # smoke test (small sets, few rounds)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402
from bench_int8_resnet18 import ResNet18  # noqa: E402

from edgekd import quantize as q  # noqa: E402
from edgekd import runtime  # noqa: E402
from edgekd.engines import EngineSource, build  # noqa: E402
from edgekd.export import export_onnx  # noqa: E402
from edgekd.qdq import check_graph  # noqa: E402
from edgekd.targets import load_target  # noqa: E402

SIZE = 224
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TIMED = ("fp32", "edgekd ort-cpu", "edgekd ort-cpu-avx2", "quantize_static")


# ------------------------------------------------------------------------------------------------ models


def _inverted_residual(cin: int, cout: int, stride: int, expand: int) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            mid = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
            layers += [nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                       nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.residual else self.conv(x)

    return Block()


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (width 1.0): 17 inverted residual blocks, ReLU6, 1280-wide head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)):
            for i in range(n):
                layers.append(_inverted_residual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _reestimate_bn(model: nn.Module, x: np.ndarray) -> nn.Module:
    """BatchNorm running statistics = the calibration images' (cumulative average), like a trained network's."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 16):
            model(torch.from_numpy(x[i:i + 16]))
    return model.eval()


def build_models(calib: np.ndarray, only: list[str] | None) -> dict[str, nn.Module]:
    from edgekd.pretrained import efficientnet_lite0_imagenet

    torch.manual_seed(0)
    makers = {"EfficientNet-Lite0 (ImageNet weights)": lambda: efficientnet_lite0_imagenet(SIZE).eval(),
              "MobileNetV2 layout": lambda: _reestimate_bn(MobileNetV2(), calib),
              "ResNet-18 layout": lambda: _reestimate_bn(ResNet18(), calib)}
    return {name: make() for name, make in makers.items() if not only or any(o in name for o in only)}


# -------------------------------------------------------------------------------------------------- data


def _photo_crops(n: int, seed: int) -> np.ndarray:
    """Random square crops (20-100% of the short side, random flip) of sklearn's two sample photos, 224 px."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.2, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[top:top + side, left:left + side]).resize((SIZE, SIZE), Image.BILINEAR)
        out[i] = np.asarray(crop)[:, ::-1] if rng.random() < 0.5 else np.asarray(crop)
    return out


def _fashion(n: int, offset: int) -> np.ndarray:
    """Fashion-MNIST test items upsampled to 224 px, grey repeated to 3 channels."""
    from PIL import Image

    from edgekd.data import read_idx

    items = read_idx(FASHION)[offset:offset + n]
    out = [np.asarray(Image.fromarray(x).resize((SIZE, SIZE), Image.BILINEAR)) for x in items]
    return np.repeat(np.stack(out)[..., None], 3, axis=-1)


def images(n: int, seed: int, offset: int) -> np.ndarray:
    """Half photo crops, half Fashion-MNIST, NCHW float32 scaled to [-1, 1] (EfficientNet-Lite's range)."""
    x = np.concatenate([_photo_crops(n - n // 2, seed), _fashion(n // 2, offset)])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- engines


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration batches edgekd uses."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)

    def rewind(self) -> None:
        pass


def quantize_static_onnx(fp32: Path, out: Path, batches: list[np.ndarray]) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), _Reader(onnx.load(str(pre)).graph.input[0].name, batches),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    return out


def qat_kd(model: nn.Module, calib: np.ndarray, steps: int, lr: float) -> nn.Module:
    """edgekd's QAT with the FP32 model as teacher on the calibration images (unlabelled, random flips): ranges
    and BatchNorm statistics from calibration, frozen (`quantize.freeze`), then `steps` KD steps of batch 8 on
    the fake-quantized weights, then convert. No labels, no other data than PTQ uses."""
    import copy

    from edgekd.objective import Batch, ObjectiveConfig, compute

    student = copy.deepcopy(model)
    if hasattr(student, "_global_params"):
        # EfficientNet's drop-connect branches on self.training in Python: QAT exports in training mode, so
        # its random ops would be baked into the INT8 graph (9 unfused Q/DQ pairs and a stochastic engine).
        student._global_params = student._global_params._replace(drop_connect_rate=0.0)
    batches = [torch.from_numpy(calib[i:i + 8]) for i in range(0, len(calib), 8)]
    prepared = q.prepare(student, batches[0], q.QuantConfig(scheme="ort-cpu"), qat=True)
    q.calibrate(prepared, batches)
    q.freeze(prepared)
    params = [p for p in prepared.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.from_numpy(calib)
    for step in range(steps):
        x = x_all[torch.randint(0, len(calib), (8,), generator=gen)]
        x = x.flip(-1) if step % 2 else x
        with torch.no_grad():
            target = model(x)
        loss = compute(Batch(prepared(x), teacher_logits=target), ObjectiveConfig(temperature=1.0, alpha=1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.convert(prepared)


def build_engines(model: nn.Module, calib: np.ndarray, work: Path, threads: int,
                  observers: tuple[str, ...], qat_steps: int = 0,
                  qat_lr: float = 1e-5) -> tuple[dict[str, Path], dict[str, Any]]:
    """Bundles for FP32, edgekd PTQ per scheme (and observer variants) and quantize_static; and what it took."""
    base = dataclasses.replace(load_target("x86-cpu-ort"), threads=threads)
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    example = torch.from_numpy(calib[:2])
    onnx_files: dict[str, tuple[Path, str]] = {"fp32": (export_onnx(model, example, work / "fp32.onnx",
                                                                    metadata={}), "none")}
    info: dict[str, Any] = {"ptq_seconds": {}, "graph": {}}
    variants = [("ort-cpu", "minmax"), ("ort-cpu-avx2", "minmax")] + [("ort-cpu", o) for o in observers]
    for scheme, observer in variants:
        name = f"edgekd {scheme}" + ("" if observer == "minmax" else f" {observer}")
        start = time.perf_counter()
        gm = q.ptq(model, example, [torch.from_numpy(b) for b in batches],
                   q.QuantConfig(scheme=scheme, observer=observer))
        info["ptq_seconds"][name] = round(time.perf_counter() - start, 1)
        onnx_files[name] = (export_onnx(gm, example, work / f"{name.replace(' ', '_')}.onnx",
                                        metadata={"quant_scheme": scheme}), scheme)
    if qat_steps:
        start = time.perf_counter()
        gm = qat_kd(model, calib, qat_steps, qat_lr)
        info["ptq_seconds"]["edgekd ort-cpu QAT-KD"] = round(time.perf_counter() - start, 1)
        onnx_files["edgekd ort-cpu QAT-KD"] = (export_onnx(gm, example, work / "qat.onnx",
                                                           metadata={"quant_scheme": "ort-cpu"}), "ort-cpu")
    start = time.perf_counter()
    onnx_files["quantize_static"] = (quantize_static_onnx(onnx_files["fp32"][0], work / "qs.onnx", batches),
                                     "ort-cpu")
    info["ptq_seconds"]["quantize_static"] = round(time.perf_counter() - start, 1)
    bundles = {}
    for name, (path, scheme) in onnx_files.items():
        precision = "fp32" if name == "fp32" else "int8"
        target = dataclasses.replace(base, quant_scheme=scheme if scheme != "none" else base.quant_scheme)
        source = EngineSource(model_name=name, onnx_path=path, weights_path=None, model_spec=None,
                              input_shape=(3, SIZE, SIZE), num_classes=1000, class_names=(), normalization={},
                              quantization="none" if precision == "fp32" else "ptq")
        bundles[name] = build(source, target, precision, work / "bundles" / name.replace(" ", "_"))
        if precision == "int8":
            g = check_graph(path, scheme)
            info["graph"][name] = {"unfused_qdq_pairs": g["qdq_pairs"], "float_conv_gemm": g["float_weighted"],
                                   "int8_conv_gemm": g["quantized_weighted"]}
    return bundles, info


# ----------------------------------------------------------------------------------------- measurements


def fidelity(engines: dict[str, Any], x: np.ndarray) -> dict[str, dict[str, float]]:
    logits = {name: np.concatenate([e(x[i:i + 8]) for i in range(0, len(x), 8)]) for name, e in engines.items()}
    ref = logits["fp32"]
    return {name: {"top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                   "mean_abs_logit_error": float(np.abs(out - ref).mean())}
            for name, out in logits.items() if name != "fp32"}


def speed(engines: dict[str, Any], x: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    """Interleaved rounds (one run per engine, order rotated); median per-round FP32/engine time ratio."""
    names = list(engines)
    for name in names:
        for _ in range(3):
            engines[name](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            engines[name](x)
            times[name].append(time.perf_counter() - t)
    base = times["fp32"]
    return {n: {"median_ms": 1000 * statistics.median(ts),
                "speedup_vs_fp32": statistics.median(b / t for b, t in zip(base, ts, strict=True))}
            for n, ts in times.items()}


def run_model(name: str, model: nn.Module, calib: np.ndarray, evals: np.ndarray, args: argparse.Namespace,
              threads: int) -> dict[str, Any]:
    efficientnet = "EfficientNet" in name
    observers = tuple(args.observers) if efficientnet else ()
    with tempfile.TemporaryDirectory(prefix="edgekd-int8-edge-") as tmp:
        bundles, info = build_engines(model, calib, Path(tmp), threads, observers,
                                      qat_steps=args.qat_steps if efficientnet else 0, qat_lr=args.qat_lr)
        engines = {n: runtime.load(path, threads=threads) for n, path in bundles.items()}
        info["fidelity"] = fidelity(engines, evals)
        timed = {n: e for n, e in engines.items() if n in TIMED}
        info["speed"] = {f"batch{b}": speed(timed, evals[:b], rounds)
                         for b, rounds in ((1, args.rounds1), (8, args.rounds8))}
    return info


# ---------------------------------------------------------------------------------------------- report


def markdown(results: dict[str, Any], env: dict[str, Any], command: str, load_end: list[float]) -> str:
    rows = []
    for model, r in results.items():
        qs = r["speed"]
        for b in ("batch1", "batch8"):
            s = qs[b]
            ratio_cpu, ratio_avx2 = (s[f"edgekd {k}"]["speedup_vs_fp32"] / s["quantize_static"]["speedup_vs_fp32"]
                                     for k in ("ort-cpu", "ort-cpu-avx2"))
            fid = r["fidelity"]
            rows.append([model if b == "batch1" else "", b[5:], f"{s['fp32']['median_ms']:.1f}",
                         f"{s['edgekd ort-cpu']['speedup_vs_fp32']:.2f}x",
                         f"{s['edgekd ort-cpu-avx2']['speedup_vs_fp32']:.2f}x",
                         f"{s['quantize_static']['speedup_vs_fp32']:.2f}x", f"{ratio_cpu:.2f} / {ratio_avx2:.2f}",
                         (f"{100 * fid['edgekd ort-cpu']['top1_agreement']:.1f} / "
                          f"{100 * fid['edgekd ort-cpu-avx2']['top1_agreement']:.1f} / "
                          f"{100 * fid['quantize_static']['top1_agreement']:.1f}") if b == "batch1" else ""])
    heads = ["model", "batch", "FP32 ms", "edgekd ort-cpu", "edgekd ort-cpu-avx2", "quantize_static",
             "edgekd / qs (cpu / avx2)", "top-1 agreement % (cpu / avx2 / qs)"]
    fid_rows = [[model, name, 100 * f["top1_agreement"], f["mean_abs_logit_error"],
                 r["graph"].get(name, {}).get("unfused_qdq_pairs"), r["graph"].get(name, {}).get("float_conv_gemm"),
                 r["ptq_seconds"].get(name)]
                for model, r in results.items() for name, f in r["fidelity"].items()]
    return "\n".join([
        common.header_markdown("INT8 on EfficientNet-Lite0, MobileNetV2, ResNet-18: edgekd vs quantize_static",
                               command, env, f"Load average at end: {load_end}. Speed is over the FP32 engine "
                               "(median of per-round ratios, interleaved); all engines are edgekd bundles."),
        "", common.markdown_table(heads, rows), "",
        "Fidelity on the evaluation images (vs the FP32 engine), and onnxruntime's optimized graph:", "",
        common.markdown_table(["model", "engine", "top-1 agreement %", "mean abs logit error",
                               "unfused Q/DQ pairs", "float conv/gemm", "PTQ s"], fid_rows, digits=3)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, default_threads=2)
    parser.add_argument("--rounds1", type=int, default=40, help="interleaved rounds at batch 1")
    parser.add_argument("--rounds8", type=int, default=15, help="interleaved rounds at batch 8")
    parser.add_argument("--calib", type=int, default=64, help="calibration images")
    parser.add_argument("--eval", type=int, default=256, help="evaluation images")
    parser.add_argument("--observers", nargs="*", default=["mse", "percentile"], choices=["mse", "percentile"],
                        help="EfficientNet-Lite0 also gets edgekd PTQ with these activation observers")
    parser.add_argument("--qat-steps", type=int, default=0,
                        help="EfficientNet-Lite0 also gets edgekd QAT-KD from the FP32 model for this many steps")
    parser.add_argument("--qat-lr", type=float, default=1e-5, help="Adam learning rate of those QAT-KD steps")
    parser.add_argument("--models", nargs="*", help="substrings of the model names to run (default: all)")
    args = parser.parse_args()
    if args.quick:
        args.rounds1, args.rounds8, args.calib, args.eval = 5, 3, 16, 16
    threads = common.threads_for(args, 2)
    torch.set_num_threads(threads)
    env = common.environment(threads)
    calib, evals = images(args.calib, seed=0, offset=0), images(args.eval, seed=1, offset=5000)
    results = {}
    for name, model in build_models(calib, args.models).items():
        start = time.perf_counter()
        results[name] = run_model(name, model, calib, evals, args, threads)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {results[name]['seconds']} s", flush=True)
    import os

    load_end = [round(v, 2) for v in os.getloadavg()]
    data = {"command": common.command_line(), "environment": env, "load_average_at_end": load_end,
            "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    md = markdown(results, env, data["command"], load_end)
    common.write_results(args.out, common.result_name("int8_edge", args.quick), data, md)
    print(md)


if __name__ == "__main__":
    main()
