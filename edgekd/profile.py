"""Profile a bundle where it runs: latency percentiles, throughput, memory, size, accuracy, budgets.

numpy + the bundle's runtime only (no torch at import), so `python -m edgekd.runtime profile BUNDLE` works on
a Jetson or a Pi that has nothing else installed.

Memory: `peak_rss_mb` is the whole profiling process's peak resident set (interpreter, numpy, the runtime, the
engine, its buffers), read from the kernel's VmHWM, which starts afresh when a program is exec'd; that is why
`edgekd profile` runs each bundle in its own `python -m edgekd.runtime profile` process. (getrusage's ru_maxrss
is not used on Linux: it carries the parent's peak across fork+exec, so a child of a 1.5 GB training process
would report 1.5 GB.) `rss_growth_mb` is what loading and running the engine added to the current RSS.

The device command line lives here (`main`); `python -m edgekd.runtime profile ...` hands over to it, so edgekd.runtime
never imports this module and this module imports edgekd.runtime (one direction, no cycle).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import runtime
from edgekd.errors import EdgekdError

MAX_RUNS = 2000


def _rss_mb() -> float | None:
    """Current resident set size from /proc/self/statm (Linux), in MiB; None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_mb() -> float:
    """This process image's peak RSS in MiB: VmHWM from /proc/self/status (Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024   # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _inputs(eval_x: np.ndarray | None, engine: Any, batch: int) -> np.ndarray:
    """Timing input: eval.npz samples (repeated to fill the batch), else seeded noise in the engine's input range
    (standard normal where the bundle records none)."""
    if eval_x is not None and len(eval_x):
        reps = -(-batch // len(eval_x))
        return np.ascontiguousarray(np.concatenate([eval_x] * reps)[:batch] if reps > 1 else eval_x[:batch])
    rng, shape = np.random.default_rng(0), (batch, *engine.input_shape)
    x = rng.uniform(*engine.input_range, size=shape) if engine.input_range else rng.standard_normal(shape)
    return x.astype(np.float32)


def _time(engine: Any, x: np.ndarray, warmup: int, min_runs: int, min_seconds: float) -> list[float]:
    for _ in range(warmup):
        engine(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MAX_RUNS and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        engine(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def profile_bundle(bundle_dir: str | Path, *, batch_sizes: tuple[int, ...] | None = None, warmup: int = 10,
                   min_runs: int = 30, min_seconds: float = 1.0, threads: int | None = None) -> dict:
    """Measure a bundle on this machine; returns the result dict (see the keys in the return statement).

    Per batch size: `warmup` untimed runs, then timed runs until both `min_runs` and `min_seconds` are reached
    (at most 2000). Accuracy/agreement run the bundle's eval.npz (a bounded sample of the test split) through
    the engine on this machine; test_accuracy/test_agreement are the build host's figures on the whole test
    split, from the manifest's metrics.
    """
    from edgekd.bundle import read_eval

    bundle_dir = Path(bundle_dir)
    rss_before = _rss_mb()
    engine = runtime.load(bundle_dir, threads=threads)
    manifest = engine.manifest
    batch_info = manifest.get("batch") or {}
    sizes = tuple(batch_sizes) if batch_sizes else tuple(batch_info.get("sizes") or (1,))
    if min(sizes) < 1:
        raise EdgekdError(f"profile {bundle_dir}: batch sizes must be positive, got {list(sizes)}")

    eval_x = eval_y = ref = None
    data = read_eval(bundle_dir, manifest)   # only the listed eval file, verified on the bytes that are used
    if data is not None:
        eval_x, eval_y = data["x"], data["y"]
        ref = data.get("reference_logits")

    rows = []
    for batch in sizes:
        x = _inputs(eval_x, engine, batch)
        times = np.asarray(_time(engine, x, warmup, min_runs, min_seconds))
        mean = float(times.mean())
        rows.append({
            "batch": int(batch),
            "p50": float(np.percentile(times, 50)),
            "p90": float(np.percentile(times, 90)),
            "p99": float(np.percentile(times, 99)),
            "mean": mean,
            "throughput_per_s": batch / (mean / 1000.0),
            "runs": int(len(times)),
        })

    spot = score(engine, batches_of(eval_x, eval_y, ref, size=engine.max_batch or max(max(sizes), 64))) \
        if eval_x is not None else {"accuracy": None, "agreement": None, "samples": 0}
    test = (manifest.get("metrics") or {}).get("test") or {}

    rss_after = _rss_mb()
    peak = _peak_rss_mb()
    engine_files = [manifest["engine"]["file"]]
    size_bytes = sum((bundle_dir / f).stat().st_size for f in engine_files)

    budgets: dict[str, Any] = {}
    latency_budget = (manifest.get("budgets") or {}).get("latency_ms")
    memory_budget = (manifest.get("budgets") or {}).get("memory_mb")
    smallest = min(rows, key=lambda r: r["batch"])
    if latency_budget is not None:
        budgets["latency_ms"] = {"budget": latency_budget, "measured": smallest["p99"],
                                 "metric": f"p99 at batch {smallest['batch']}",
                                 "pass": smallest["p99"] <= latency_budget}
    if memory_budget is not None:
        budgets["memory_mb"] = {"budget": memory_budget, "measured": peak,
                                "metric": "peak RSS of the profiling process", "pass": peak <= memory_budget}
    budgets["pass"] = all(b["pass"] for b in budgets.values()) if budgets else None

    return {
        "bundle": str(bundle_dir),
        "model": manifest.get("model"),
        "target": manifest.get("target"),
        "runtime": manifest.get("runtime"),
        "device": manifest.get("device"),
        "precision": manifest.get("precision"),
        "quantization": manifest.get("quantization"),
        "quant_scheme": manifest.get("quant_scheme"),
        "size_bytes": int(size_bytes),
        "accuracy": spot["accuracy"],
        "agreement": spot["agreement"],
        "eval_samples": spot["samples"],
        "test_accuracy": test.get("accuracy"),
        "test_agreement": test.get("agreement"),
        "test_samples": test.get("samples"),
        "test_per_class": test.get("per_class"),
        "peak_rss_mb": float(peak),
        "rss_growth_mb": (float(rss_after - rss_before) if rss_before is not None and rss_after is not None
                          else None),
        "rows": rows,
        "budgets": budgets,
        "threads": engine.info.get("threads"),
        "engine_info": engine.info,
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


Batch = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def batches_of(x: np.ndarray, y: np.ndarray, ref: np.ndarray | None, *, size: int) -> Iterator[Batch]:
    """(x, y, reference logits or None) in slices of `size`; a memory-mapped x is read one slice at a time."""
    for i in range(0, len(x), size):
        yield (np.ascontiguousarray(x[i:i + size], dtype=np.float32), np.asarray(y[i:i + size]),
               None if ref is None else np.asarray(ref[i:i + size]))


def per_class_accuracy(labels: Any, predictions: Any, num_classes: int) -> dict[str, list]:
    """Per class c: samples[c] = #(label == c), correct[c] = #(label == c and prediction == c) and
    accuracy[c] = correct[c] / samples[c] (None for a class with no test sample: nothing to divide by)."""
    y, p = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
    if y.shape != p.shape:
        raise EdgekdError(f"per-class accuracy: {len(y)} labels but {len(p)} predictions; expected one each")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise EdgekdError(f"per-class accuracy: labels range {y.min()}..{y.max()}; expected class ids "
                          f"0..{num_classes - 1}")
    samples = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[p == y], minlength=num_classes)
    return {"samples": samples.tolist(), "correct": correct.tolist(),
            "accuracy": [c / n if n else None for c, n in zip(correct.tolist(), samples.tolist(), strict=True)]}


def score(engine: Any, batches: Iterable[Batch]) -> dict[str, Any]:
    """Top-1 accuracy mean(argmax(engine(x)) == y) and agreement mean(argmax(engine(x)) == argmax(reference))
    over batches (x normalized, y, reference logits or None), so a test split of any size streams through the
    engine (Engine.logits splits and pads to its batch range). input_range: the smallest and largest input.
    per_class: per_class_accuracy of the predictions (None when a label is not a class id)."""
    correct = agree = n = classes = 0
    with_ref = True
    lo, hi = np.inf, -np.inf
    labels, predicted = [], []
    for x, y, ref in batches:
        logits = engine.logits(x)
        top1 = logits.argmax(axis=1)
        classes = logits.shape[1]
        labels.append(np.asarray(y).ravel())
        predicted.append(top1)
        correct += int(np.sum(top1 == np.asarray(y)))
        if ref is None:
            with_ref = False
        else:
            agree += int(np.sum(top1 == np.asarray(ref).argmax(axis=1)))
        n += len(x)
        if len(x):
            lo, hi = min(lo, float(np.min(x))), max(hi, float(np.max(x)))
    try:
        per_class = per_class_accuracy(np.concatenate(labels), np.concatenate(predicted), classes) if n else None
    except (EdgekdError, TypeError, ValueError):   # labels that are not class ids: no per-class figures
        per_class = None
    return {"accuracy": correct / n if n else None, "agreement": agree / n if n and with_ref else None,
            "samples": n, "input_range": [lo, hi] if n else None, "per_class": per_class}


def format_table(result: dict) -> str:
    """A fixed-width text table of a profile_bundle result, for terminals on devices."""
    head = (f"{result['model']} on {result['target']} ({result['runtime']}, {result['precision']}, "
            f"quantization {result['quantization']}): {result['size_bytes'] / 1024:.1f} KiB")
    lines = [head, f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'samples/s':>11} "
                   f"{'runs':>5}"]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>5} {r['p50']:>9.3f} {r['p90']:>9.3f} {r['p99']:>9.3f} {r['mean']:>9.3f} "
                     f"{r['throughput_per_s']:>11.1f} {r['runs']:>5}")
    acc = "n/a" if result["accuracy"] is None else f"{100 * result['accuracy']:.2f}%"
    agr = "n/a" if result["agreement"] is None else f"{100 * result['agreement']:.2f}%"
    growth = "n/a" if result["rss_growth_mb"] is None else f"{result['rss_growth_mb']:.1f} MiB"
    lines.append(f"accuracy {acc} on {result['eval_samples']} samples, agreement with PyTorch {agr}; peak "
                 f"RSS {result['peak_rss_mb']:.1f} MiB, growth {growth}")
    if result.get("test_accuracy") is not None:
        lines.append(f"build host, whole test split: accuracy {100 * result['test_accuracy']:.2f}% on "
                     f"{result['test_samples']} samples")
    for key, b in result["budgets"].items():
        if isinstance(b, dict):
            lines.append(f"budget {key}: {b['measured']:.2f} ({b['metric']}) vs {b['budget']} -> "
                         f"{'PASS' if b['pass'] else 'FAIL'}")
    return "\n".join(lines)


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be comma-separated integers like 1,8, got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch must be positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """`python -m edgekd.runtime profile BUNDLE ...`: profile a bundle on the device, print a table."""
    parser = argparse.ArgumentParser(prog="python -m edgekd.runtime", description=runtime.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="latency/throughput/memory/accuracy of a bundle on this machine")
    prof.add_argument("bundle", type=Path)
    prof.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    prof.add_argument("--batch", type=_batches, default=None, help="batch sizes, e.g. 1,8 (default: the "
                                                                   "bundle's)")
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--warmup", type=int, default=10)
    prof.add_argument("--min-runs", type=int, default=30)
    prof.add_argument("--min-seconds", type=float, default=1.0)
    prof.add_argument("--save-metrics", action="store_true", help="write the results into the bundle's "
                                                                  "manifest")
    args = parser.parse_args(argv)
    try:
        result = profile_bundle(args.bundle, batch_sizes=args.batch, warmup=args.warmup,
                                        min_runs=args.min_runs, min_seconds=args.min_seconds,
                                        threads=args.threads)
        if args.json is not None:
            from edgekd.fileio import write_json

            write_json(args.json, result)
        if args.save_metrics:
            from edgekd.bundle import update_metrics

            update_metrics(args.bundle, result)
    except EdgekdError as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
