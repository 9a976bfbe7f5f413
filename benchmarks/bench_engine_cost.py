"""Suite 3, how cost grows: engine latency and throughput against batch size and student width, and the
fraction of the machine's measured peak each engine reaches.

    python benchmarks/bench_engine_cost.py --run runs/fmnist          # full: engine_cost.{json,md,*.png}
    python benchmarks/bench_engine_cost.py --quick                    # smoke test (~1 min): engine_cost_quick.*

What is measured, all in one process and interleaved (every round visits every engine x batch cell and a
float32 GEMM, in a shuffled order), so the load of a shared machine hits every number alike:

1. Batch sweep: each onnxruntime bundle of a finished `edgekd run` folder (RUN/engines/<target>/*: teacher
   FP32, student FP32, student INT8 PTQ and QAT) at batch 1, 2, 4, ..., 64. Without --run, a throwaway run
   folder is built with edgekd.pipeline.run from a small Fashion-MNIST subset (same architectures as the
   Fashion-MNIST benchmark; its accuracies mean nothing, its costs are those of the architectures).
2. Width sweep: students `cnn:widths=w,2w` for several w on 1x28x28 Fashion-MNIST, trained briefly with plain
   cross-entropy (so the accuracy axis is real), exported to ONNX, PTQ-quantized (calibrated on real training
   images) and built into FP32 and INT8 bundles, all through edgekd's own pipeline functions.
3. Peak: the best of a few torch.mm float32 GEMMs (2048 x 2048 by default) per round, with the engines' thread
   count. For each engine: achieved FLOP/s = model FLOPs per sample (torch.utils.flop_counter on the PyTorch
   model; INT8 engines do the same multiply-adds in integer arithmetic and are credited with the same count)
   x samples/s, divided by the same round's peak; the median over rounds is reported.

Latency: p50/p99 over every timed call of every round (ms per batch); throughput: samples per second from the
mean latency. Weights do not change the cost of these dense kernels, so the throwaway run's numbers hold for
trained models of the same architecture.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from edgekd import pipeline, profile, runtime, tasks  # noqa: E402
from edgekd.data import FASHION_MNIST_DIR, Dataset, load_data  # noqa: E402
from edgekd.models import build_model, count_params, save_weights  # noqa: E402
from edgekd.recipe import DataConfig, recipe_from_dict  # noqa: E402
from edgekd.report import engine_accuracy  # noqa: E402
from edgekd.targets import load_target  # noqa: E402
from edgekd.train import fit, seed_everything  # noqa: E402

TEACHER = "cnn:widths=32,64,128"   # the Fashion-MNIST benchmark's teacher and student (suites 1, 2 and 4)
STUDENT = "cnn:widths=8,16,32"


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


# ------------------------------------------------------------------------------------------------ bundles


def throwaway_run(work: Path, data_dir: Path, *, quick: bool, target: str) -> Path:
    """A small finished run folder made by edgekd.pipeline.run (teacher, distilled student, engines): PTQ only
    in quick mode, PTQ and QAT otherwise, so every bundle kind a real run has is there to time."""
    recipe = recipe_from_dict({
        "data": {"source": f"fashion-mnist:{data_dir}", "val_fraction": 0.1,
                 "train_samples": 2000 if quick else 5000, "test_samples": 500 if quick else 2000},
        "teacher": {"model": TEACHER, "epochs": 1, "batch_size": 128},
        "student": {"model": STUDENT, "epochs": 1, "batch_size": 128},
        "distill": {"baseline": False},
        "quantize": {"mode": "ptq" if quick else "qat", "epochs": 1, "calibration_size": 256}})
    out = work / "run"
    pipeline.run(recipe, out, targets=(target,), device="cpu", progress=False, quick_profile=True)
    return out


def width_sweep_bundles(work: Path, data: Dataset, widths: tuple[int, ...], *, epochs: int,
                        target: str) -> list[dict[str, Any]]:
    """For each w: train `cnn:widths=w,2w` (plain cross-entropy, seed 0), then export, PTQ and build its FP32 and
    INT8 bundles with edgekd.pipeline (a one-student run folder each). Returns one record per bundle."""
    tgt = load_target(target)
    out = []
    for w in widths:
        spec = f"cnn:widths={w},{2 * w}"
        run_dir = work / f"width-{w}"
        recipe = recipe_from_dict({"student": {"model": spec, "epochs": max(epochs, 1), "batch_size": 128},
                                   "quantize": {"mode": "ptq", "calibration_size": 256}})
        seed_everything(0)
        model = build_model(spec, data.input_shape, data.num_classes)
        started = time.perf_counter()
        if epochs > 0:
            fit(model, data.x_train, data.y_train, recipe.student, device=torch.device("cpu"), desc=spec,
                progress=False)
        train_s = time.perf_counter() - started
        save_weights(model, run_dir / "student.safetensors", {"model": spec})
        ctx = pipeline.RunContext(run_dir, recipe, data)
        q = pipeline.quantize(run_dir, tgt.quant_scheme, ctx=ctx, device="cpu", progress=False)
        built = pipeline.build(run_dir, tgt.name, models=("student",), ctx=ctx,
                               quantized={"ptq": Path(q["onnx"]["ptq"])})
        for bundle in built["built"]:
            out.append({"group": "width", "width": w, "spec": spec, "bundle": bundle, "train_s": train_s,
                        "params": count_params(model)})
        print(f"width {w}: {spec}, {count_params(model):,} params, trained {train_s:.1f} s, built "
              f"{len(built['built'])} bundles", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ measuring


def flops_per_sample(spec: str, input_shape: tuple[int, ...], num_classes: int) -> int:
    """Forward FLOPs of one sample (2 per multiply-add; conv, linear and matmul) counted on the PyTorch model."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(spec, input_shape, num_classes).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops())


class Gemm:
    """The machine's float32 peak as a tuned GEMM measures it: n x n products through torch.mm (MKL in the x86 CPU
    wheel) and numpy (OpenBLAS, held to the same thread count with threadpoolctl), best of `reps` each. Both,
    because one BLAS can be far from the other on some CPUs (MKL on AMD); the peak is the faster one."""

    def __init__(self, n: int, reps: int, threads: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen)
        self.b = torch.randn(n, n, generator=gen)
        self.an, self.bn = self.a.numpy(), self.b.numpy()
        self.n, self.reps, self.threads = n, reps, threads
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:   # numpy's BLAS threads cannot be held to `threads`: leave it out
            self.limits = None
        else:
            self.limits = threadpool_limits

    def _best(self, fn: Any) -> float:
        fn()   # warm-up (thread pool, caches)
        best = 0.0
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            best = max(best, 2.0 * self.n**3 / (time.perf_counter() - t0))
        return best

    def __call__(self) -> dict[str, float]:
        """{"torch": FLOP/s, "numpy": FLOP/s or NaN, "peak": the larger}."""
        out = {"torch": self._best(lambda: torch.mm(self.a, self.b)), "numpy": float("nan")}
        if self.limits is not None:
            with self.limits(limits=self.threads, user_api="blas"):
                out["numpy"] = self._best(lambda: self.an @ self.bn)
        out["peak"] = max(v for v in out.values() if v == v)
        return out


def open_engine(record: dict[str, Any], threads: int, eval_samples: int) -> dict[str, Any]:
    """Load a bundle with edgekd.runtime, read what the tables need from its manifest (accuracy and size through
    edgekd.report.engine_accuracy: the whole test split's, from the build), take up to `eval_samples` of its eval
    inputs as timing inputs, and count its FLOPs."""
    bundle = Path(record["bundle"])
    engine = runtime.load(bundle, threads=threads)
    m = engine.manifest
    meta = (m.get("engine") or {}).get("onnx_metadata") or {}
    spec = record.get("spec") or meta.get("model_spec")
    if not spec:
        raise SystemExit(f"{bundle}: the manifest names no model_spec; cannot count its FLOPs")
    num_classes = int(m["output"]["shape"][1])
    eval_x = None
    if (bundle / "eval.npz").is_file():
        with np.load(bundle / "eval.npz") as f:
            eval_x = f["x"][:max(eval_samples, 64)]
    prof = profile.profile_bundle(bundle, batch_sizes=(1,), warmup=0, min_runs=1, min_seconds=0.0, threads=threads)
    accuracy = engine_accuracy(prof)   # the whole test split's, measured when the bundle was built
    name = bundle.name
    key = f"w{record['width']}/{name}" if "width" in record else f"{record['group']}/{name}"
    return {**record, "key": key, "name": name, "engine": engine, "eval_x": eval_x,
            "model": m.get("model"), "precision": m["precision"], "quantization": m["quantization"],
            "spec": spec, "flops_per_sample": flops_per_sample(spec, engine.input_shape, num_classes),
            "accuracy": accuracy["accuracy"], "eval_samples": accuracy.get("test_samples", prof["eval_samples"]),
            "size_bytes": prof["size_bytes"],
            "threads_at_load": engine.info.get("threads")}


def measure(cells: list[tuple[dict[str, Any], int]], gemm: Gemm, *, rounds: int, warmup: int, min_runs: int,
            min_seconds: float) -> tuple[dict[tuple[str, int], dict[str, list]], list[dict[str, float]]]:
    """Interleaved timing: each round measures the GEMM peak, then every (engine, batch) cell in a freshly
    shuffled order (edgekd.profile's timing loop: `warmup` untimed calls, then timed ones until `min_runs`
    and `min_seconds`). Returns per-cell call latencies (ms) and per-round throughputs, and per-round peaks."""
    timings: dict[tuple[str, int], dict[str, list]] = {(e["key"], b): {"ms": [], "round_tput": [], "round": []}
                                                       for e, b in cells}
    peaks: list[dict[str, float]] = []
    inputs = {(e["key"], b): tasks.CLASSIFICATION.timing_batch(
        {"x": e["eval_x"]} if e["eval_x"] is not None else None, b, e["engine"].input_shape,
        e["engine"].input_range) for e, b in cells}
    order = list(cells)
    for r in range(rounds):
        peaks.append(gemm())
        random.Random(r).shuffle(order)
        for e, b in order:
            ms = profile._time(e["engine"], inputs[(e["key"], b)], warmup, min_runs, min_seconds)
            cell = timings[(e["key"], b)]
            cell["ms"] += ms
            cell["round_tput"].append(b * len(ms) / (sum(ms) / 1000.0))
            cell["round"].append(r)
        print(f"round {r + 1}/{rounds}: GEMM torch {peaks[-1]['torch'] / 1e9:.1f}, numpy "
              f"{peaks[-1]['numpy'] / 1e9:.1f} GFLOP/s", flush=True)
    return timings, peaks


def summarize(e: dict[str, Any], batch: int, cell: dict[str, list], peaks: list[dict[str, float]]) -> dict[str, Any]:
    """One table row: latency percentiles, throughput (mean and per-round sd), achieved FLOP/s and its fraction
    of the same rounds' peaks (median of per-round fractions)."""
    ms = np.asarray(cell["ms"])
    tput = float(batch / (ms.mean() / 1000.0))
    fractions = [t * e["flops_per_sample"] / peaks[r]["peak"]
                 for t, r in zip(cell["round_tput"], cell["round"], strict=True)]
    return {
        "engine": e["key"], "bundle": e["name"], "model": e["model"], "spec": e["spec"],
        "precision": e["precision"], "quantization": e["quantization"], "width": e.get("width"), "batch": batch,
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
        "p50_ms_per_sample": float(np.percentile(ms, 50)) / batch, "calls": int(len(ms)),
        "throughput_per_s": tput, "throughput_sd_rounds": common.mean_sd(cell["round_tput"])[1],
        "flops_per_sample": e["flops_per_sample"], "achieved_gflops": tput * e["flops_per_sample"] / 1e9,
        "fraction_of_peak": float(statistics.median(fractions)),
        "accuracy": e["accuracy"], "eval_samples": e["eval_samples"], "size_bytes": e["size_bytes"],
        "input_shape": list(e["engine"].input_shape),
    }


# ------------------------------------------------------------------------------------------------ report


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.2f}"


def markdown(data: dict[str, Any]) -> str:
    peak = data["peak"]
    run = data["run"]
    intro = (f"All engines onnxruntime CPU, {data['environment']['threads']} intra-op thread(s), interleaved over "
             f"{data['settings']['rounds']} rounds in one process. Latency is per batch (ms); throughput in "
             f"samples/s from the mean latency (outliers included). Peak per round = the faster of torch.mm (median "
             f"{peak['median_torch_gflops']:.1f} GFLOP/s) and numpy (median {peak['median_numpy_gflops']:.1f}), best "
             f"of {peak['reps']} float32 {peak['n']}x{peak['n']} GEMMs each: median {peak['median_gflops']:.1f} "
             f"GFLOP/s (max {peak['max_gflops']:.1f}). % of peak = model FLOPs/sample x "
             "samples/s / that round's peak (INT8 engines are credited with the FP32 model's FLOPs). "
             f"Total {data['total_s']:.0f} s.")
    lines = [common.header_markdown("How cost grows: latency and throughput against batch size and width",
                                    data["command"], data["environment"], intro), ""]
    lines += [f"## Batch sweep: bundles of {run['path']}", "", run["note"], ""]
    heads = ["bundle", "MFLOP/sample", "accuracy %", "batch", "p50 ms", "p99 ms", "ms/sample", "samples/s",
             "GFLOP/s", "% of peak"]
    lines.append(common.markdown_table(heads, [
        [r["bundle"], f"{r['flops_per_sample'] / 1e6:.3f}", _pct(r["accuracy"]), r["batch"], f"{r['p50_ms']:.3f}",
         f"{r['p99_ms']:.3f}", f"{r['p50_ms_per_sample']:.4f}",
         f"{r['throughput_per_s']:,.0f} ± {r['throughput_sd_rounds']:,.0f}", f"{r['achieved_gflops']:.2f}",
         f"{100 * r['fraction_of_peak']:.1f}"] for r in data["batch_sweep"]], align="l" + "r" * 9))
    w = data["width_sweep_setup"]
    lines += ["", "## Width sweep: cnn:widths=w,2w on 1x28x28 Fashion-MNIST", "",
              f"Each student trained {w['epochs']} epoch(s) on {w['train_samples']:,} training images (plain "
              f"cross-entropy, seed 0); INT8 = edgekd PTQ, scheme {w['quant_scheme']}, calibrated on "
              f"{w['calibration_samples']} training images; accuracy measured on the engine over "
              f"{w['eval_samples']:,} test images. INT8 speed-up = FP32 p50 / INT8 p50 at the same batch.", ""]
    fp32 = {(r["width"], r["batch"]): r for r in data["width_sweep"] if r["precision"] == "fp32"}
    heads = ["width", "params", "MFLOP/sample", "precision", "accuracy %", "KiB", "batch", "p50 ms", "p99 ms",
             "samples/s", "% of peak", "INT8 speed-up"]
    rows = []
    for r in data["width_sweep"]:
        base = fp32.get((r["width"], r["batch"]))
        speedup = f"{base['p50_ms'] / r['p50_ms']:.2f}x" if r["precision"] == "int8" and base else ""
        rows.append([r["width"], r["params"], f"{r['flops_per_sample'] / 1e6:.3f}", r["precision"],
                     _pct(r["accuracy"]), f"{r['size_bytes'] / 1024:.1f}", r["batch"], f"{r['p50_ms']:.3f}",
                     f"{r['p99_ms']:.3f}", f"{r['throughput_per_s']:,.0f}", f"{100 * r['fraction_of_peak']:.1f}",
                     speedup])
    lines.append(common.markdown_table(heads, rows, align="rrrlrrrrrrrr"))
    lines += ["", "Plots: " + ", ".join(f"`{Path(p).name}`" for p in data["plots"])]
    return "\n".join(lines)


def plots(data: dict[str, Any], out: Path, name: str) -> list[str]:
    paths = []
    series: dict[str, list[tuple[int, float]]] = {}
    for r in data["batch_sweep"]:
        series.setdefault(r["bundle"], []).append((r["batch"], r["p50_ms"]))
    paths.append(common.plot_latency_batch(out / f"{name}_batch.png", series,
                                           title="onnxruntime CPU: p50 latency against batch size"))
    by_width: dict[str, list[tuple[int, float]]] = {}
    for r in data["width_sweep"]:
        by_width.setdefault(f"{r['precision']} batch {r['batch']}", []).append((r["width"], r["throughput_per_s"]))
    paths.append(common.plot_series(out / f"{name}_width.png", by_width, xlabel="width w of cnn:widths=w,2w",
                                    ylabel="throughput (samples/s)", title="Throughput against student width"))
    smallest = min(r["batch"] for r in data["width_sweep"])
    points = [{"label": f"w={r['width']}", "group": r["precision"], "latency": r["p50_ms"],
               "accuracy": 100 * r["accuracy"]} for r in data["width_sweep"] if r["batch"] == smallest]
    if data["run"]["source"] == "given":   # on the same axis only when measured on the same test images
        same = [r for r in data["batch_sweep"] if r["batch"] == smallest and r["accuracy"] is not None
                and r["input_shape"] == data["width_sweep"][0]["input_shape"]
                and r["eval_samples"] == data["width_sweep"][0]["eval_samples"]]
        points += [{"label": r["bundle"], "group": "run bundles", "latency": r["p50_ms"],
                    "accuracy": 100 * r["accuracy"]} for r in same]
    paths.append(common.plot_accuracy_latency(out / f"{name}_pareto.png", points,
                                              title=f"Accuracy against p50 latency at batch {smallest}",
                                              xlabel=f"p50 latency at batch {smallest} (ms)"))
    return [p.name for p in paths]


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None,
                        help="a finished `edgekd run` folder; its RUN/engines/<target>/* bundles are timed")
    parser.add_argument("--target", default="x86-cpu-ort", help="target whose bundles are timed (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST idx files")
    parser.add_argument("--batches", type=_ints, default=(1, 2, 4, 8, 16, 32, 64), help="batch sweep sizes")
    parser.add_argument("--widths", type=_ints, default=(4, 8, 16, 32, 64), help="w of cnn:widths=w,2w")
    parser.add_argument("--width-batches", type=_ints, default=(1, 64), help="batch sizes of the width sweep")
    parser.add_argument("--width-epochs", type=int, default=2, help="training epochs per width (0: untrained)")
    parser.add_argument("--width-train", type=int, default=10000, help="training images for the width sweep")
    parser.add_argument("--eval-samples", type=int, default=10000, help="test images for engine accuracy")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-runs", type=int, default=30, help="timed calls per cell and round (at least)")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="seconds per cell and round (at least)")
    parser.add_argument("--gemm", type=int, default=2048, help="n of the n x n float32 peak GEMM")
    parser.add_argument("--throwaway", action="store_true",
                        help="without --run: build a throwaway run with edgekd.pipeline.run also in quick mode")
    parser.add_argument("--keep", type=Path, default=None, help="keep the built run folders here (default: temp)")
    common.add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.widths, args.width_batches = (1, 8, 64), (4, 16), (1, 32)
        args.width_epochs, args.width_train, args.eval_samples = 1, 1000, 1000
        args.rounds, args.min_runs, args.min_seconds = 2, 5, 0.02
    started = time.perf_counter()
    args.threads = common.threads_for(args, load_target(args.target).threads)
    torch.set_num_threads(args.threads)
    env = common.environment(threads=args.threads)
    name = common.result_name("engine_cost", args.quick)

    with tempfile.TemporaryDirectory(prefix="edgekd-engine-cost-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # 1. the width sweep's students, trained on real Fashion-MNIST and built through edgekd's pipeline
        data = load_data(DataConfig(source=f"fashion-mnist:{args.data_dir}", val_fraction=0.0,
                                    train_samples=args.width_train, test_samples=args.eval_samples))
        width_records = width_sweep_bundles(work, data, args.widths, epochs=args.width_epochs, target=args.target)

        # 2. the run folder whose bundles the batch sweep times
        if args.run is not None:
            run_dir, source = args.run, "given"
            note = f"Bundles of the finished run folder `{args.run}` (target {args.target})."
        elif args.quick and not args.throwaway:
            run_dir, source = work / f"width-{max(args.widths)}", "width-sweep"
            note = ("No --run in quick mode: the batch sweep times the width sweep's widest student (a one-student "
                    "run folder built by edgekd.pipeline, same layout as `edgekd run`); pass --run for a real run.")
        else:
            note = ("No --run: a throwaway run folder built with edgekd.pipeline.run (teacher "
                    f"{TEACHER}, student {STUDENT}, 1 epoch each on a Fashion-MNIST subset); its costs are those "
                    "of the architectures, its accuracies mean nothing. Pass --run for a real run.")
            run_dir, source = throwaway_run(work, args.data_dir, quick=args.quick, target=args.target), "throwaway"
        print(note, flush=True)
        folder = run_dir / "engines" / args.target
        run_bundles = sorted(p for p in folder.glob("*") if (p / "manifest.json").is_file())
        if not run_bundles:
            raise SystemExit(f"{folder}: no bundles; expected a finished `edgekd run` folder with engines built for "
                             f"target {args.target} (RUN/engines/{args.target}/<model>-<precision>[-<quant>]/)")

        # 3. open every engine, then time them all interleaved with the GEMM peak
        engines = [open_engine({"group": "run", "bundle": str(p)}, args.threads, args.eval_samples)
                   for p in run_bundles]
        engines += [open_engine(r, args.threads, args.eval_samples) for r in width_records]
        cells = [(e, b) for e in engines if e["group"] == "run" for b in args.batches]
        cells += [(e, b) for e in engines if e["group"] == "width" for b in args.width_batches]
        gemm = Gemm(args.gemm, reps=2 if args.quick else 3, threads=args.threads)
        print(f"timing {len(cells)} engine x batch cells over {args.rounds} rounds", flush=True)
        timings, peaks = measure(cells, gemm, rounds=args.rounds, warmup=1 if args.quick else 3,
                                 min_runs=args.min_runs, min_seconds=args.min_seconds)

    rows = {(e["key"], b): summarize(e, b, timings[(e["key"], b)], peaks) for e, b in cells}
    peak_values = [p["peak"] for p in peaks]
    batch_rows = [rows[(e["key"], b)] for e in engines if e["group"] == "run" for b in args.batches]
    width_rows = [{**rows[(e["key"], b)], "params": e["params"], "train_s": e["train_s"]}
                  for e in sorted((e for e in engines if e["group"] == "width"),
                                  key=lambda e: (e["width"], e["precision"]))
                  for b in args.width_batches]
    data_out: dict[str, Any] = {
        "suite": "engine_cost", "command": common.command_line(), "environment": env,
        "settings": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
        "run": {"path": str(run_dir) if source == "given" else f"{source} run folder (deleted)", "source": source,
                "note": note, "bundles": [p.name for p in run_bundles]},
        "peak": {"method": "float32 n x n GEMM, best of reps per round through torch.mm and numpy (threadpoolctl), "
                           "the faster of the two", "n": args.gemm, "reps": gemm.reps,
                 "gflops_per_round": [{k: v / 1e9 for k, v in p.items()} for p in peaks],
                 "median_gflops": statistics.median(peak_values) / 1e9, "max_gflops": max(peak_values) / 1e9,
                 "median_torch_gflops": statistics.median(p["torch"] for p in peaks) / 1e9,
                 "median_numpy_gflops": statistics.median(p["numpy"] for p in peaks) / 1e9},
        "batch_sweep": batch_rows,
        "width_sweep_setup": {"epochs": args.width_epochs, "train_samples": int(len(data.x_train)),
                              "eval_samples": int(len(data.x_test)), "calibration_samples": 256,
                              "quant_scheme": load_target(args.target).quant_scheme},
        "width_sweep": width_rows,
    }
    data_out["total_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    data_out["plots"] = plots(data_out, args.out, name)
    md = markdown(data_out)
    common.write_results(args.out, name, data_out, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
