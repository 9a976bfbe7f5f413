"""Which int8 scheme for x86-cpu-ort on this CPU: "ort-cpu" (8-bit weights) against "ort-cpu-avx2" (7-bit).

One digits CNN (cnn:widths=32,64,128, trained a few epochs), PTQ'd with each scheme by edgekd (same calibration
draw), exported to Q/DQ ONNX and run by onnxruntime at graph optimization "all" as the x86-cpu-ort target does.
Agreement: top-1 of the onnxruntime engine against the PyTorch Q/DQ model it came from, on the test split
(onnxruntime's AVX2 u8 x s8 kernels without VNNI saturate on 8-bit weights, which shows up here). Speed: FP32
and both int8 engines timed in the same process, interleaved run by run, so load drifts hit them alike;
speedup = median of per-round FP32/engine ratios. The scheme `quant_scheme = "auto"` picks on this CPU is
recorded with its reason.

    flock /work/bench.lock python benchmarks/bench_int8_schemes.py     # results/int8_schemes.{json,md}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    add_common_args,
    command_line,
    environment,
    header_markdown,
    markdown_table,
    result_name,
    threads_for,
    write_results,
)
from edgekd import quantize as q  # noqa: E402
from edgekd.data import load_data  # noqa: E402
from edgekd.export import export_onnx  # noqa: E402
from edgekd.models import build_model  # noqa: E402
from edgekd.recipe import DataConfig, ModelConfig  # noqa: E402
from edgekd.targets import cpu_flags, cpu_quant_scheme  # noqa: E402
from edgekd.train import fit, predict_logits  # noqa: E402

SCHEMES = ("ort-cpu", "ort-cpu-avx2")


def session(path: Path, threads: int):
    """onnxruntime as the x86-cpu-ort target runs it: graph optimization "all", one session, `threads`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved(sessions: dict, x: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    feeds = {n: {s.get_inputs()[0].name: x} for n, s in sessions.items()}
    for n, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(rounds):
        for n, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[n])
            times[n].append((time.perf_counter() - t) * 1000)
    base = times["fp32"]
    return {n: {"median_ms": statistics.median(ts),
                "speedup_vs_fp32": statistics.median(b / t for b, t in zip(base, ts, strict=True))}
            for n, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, default_threads=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=300, help="interleaved timing rounds per batch size")
    args = parser.parse_args()
    threads = threads_for(args)
    torch.set_num_threads(threads)
    rounds, epochs = (30, 1) if args.quick else (args.rounds, args.epochs)
    env = environment(threads)
    start = time.time()

    data = load_data(DataConfig(source="digits", val_fraction=0.0))
    torch.manual_seed(0)
    model = build_model("cnn:widths=32,64,128", data.input_shape, data.num_classes)
    fit(model, data.x_train, data.y_train, ModelConfig(epochs=epochs, batch_size=64), device=torch.device("cpu"),
        desc="cnn", progress=False)
    model.eval()
    rng = np.random.default_rng(0)
    calibration = data.x_train[rng.choice(len(data.x_train), 256, replace=False)]
    batches = [torch.from_numpy(calibration[i:i + 64]) for i in range(0, 256, 64)]
    example = torch.from_numpy(data.x_train[:2])

    rows, sessions, agreement = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as tmp:
        fp32 = export_onnx(model, example, Path(tmp) / "fp32.onnx", metadata={})
        sessions["fp32"] = session(fp32, threads)
        for scheme in SCHEMES:
            gm = q.ptq(model, example, batches, q.QuantConfig(scheme=scheme))
            ref = predict_logits(gm, data.x_test, set_mode=lambda m, t: None)
            path = export_onnx(gm, example, Path(tmp) / f"{scheme}.onnx", metadata={"quant_scheme": scheme})
            sessions[scheme] = session(path, threads)
            got = sessions[scheme].run(None, {sessions[scheme].get_inputs()[0].name: data.x_test})[0]
            agreement[scheme] = {"top1_vs_pytorch_qdq": float(np.mean(got.argmax(1) == ref.argmax(1))),
                                 "max_abs_logit_diff": float(np.abs(got - ref).max()),
                                 "accuracy_engine": float(np.mean(got.argmax(1) == data.y_test)),
                                 "accuracy_pytorch_qdq": float(np.mean(ref.argmax(1) == data.y_test))}
        fp32_out = sessions["fp32"].run(None, {sessions["fp32"].get_inputs()[0].name: data.x_test})[0]
        latency = {f"batch{b}": interleaved(sessions, np.ascontiguousarray(data.x_test[:b]), rounds) for b in (1, 64)}

    cpu = cpu_flags()
    chosen, reason = cpu_quant_scheme(cpu)
    fp32_acc = float(np.mean(fp32_out.argmax(1) == data.y_test))
    for name in ("fp32", *SCHEMES):
        a = agreement.get(name, {})
        rows.append([name + (" (auto picks this)" if name == chosen else ""), a.get("top1_vs_pytorch_qdq"),
                     a.get("max_abs_logit_diff"), a.get("accuracy_engine", fp32_acc),
                     latency["batch1"][name]["median_ms"], latency["batch1"][name]["speedup_vs_fp32"],
                     latency["batch64"][name]["median_ms"], latency["batch64"][name]["speedup_vs_fp32"]])
    env["load_average_at_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    result = {"command": command_line(), "environment": env, "cpu": cpu, "auto": {"scheme": chosen, "reason": reason},
              "test_samples": int(len(data.y_test)), "epochs": epochs, "rounds": rounds, "fp32_accuracy": fp32_acc,
              "agreement": agreement, "latency": latency, "seconds": round(time.time() - start, 1)}
    md = "\n".join([
        header_markdown("int8 scheme for x86-cpu-ort on this CPU", result["command"], env,
                        f"Load average at end: {env['load_average_at_end']}. Digits CNN (cnn:widths=32,64,128, "
                        f"{epochs} epochs), PTQ on 256 training images, {len(data.y_test)} test images; "
                        f"{rounds} interleaved rounds per batch size."),
        "", f"`quant_scheme = \"auto\"` picks **{chosen}** here: {reason}.", "",
        markdown_table(["engine", "top-1 vs PyTorch Q/DQ", "max abs logit diff", "accuracy", "batch 1 ms", "vs FP32",
                        "batch 64 ms", "vs FP32"], rows, digits=4), "",
    ])
    write_results(args.out, result_name("int8_schemes", args.quick), result, md)
    print(md)


if __name__ == "__main__":
    main()
