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
import contextlib
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import runtime
from edgekd.bundle import read_eval, update_metrics
from edgekd.errors import EdgekdError
from edgekd.fileio import write_json
from edgekd.tasks import of_manifest

MAX_RUNS = 2000


def _rss_mb(key: str = "VmRSS") -> float | None:
    """This process's resident set size in MiB from /proc/self/status (Linux): VmRSS now, VmHWM the peak of this
    process image; None where unavailable."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024   # kB
    return None


def _peak_rss_mb() -> float:
    """This process image's peak RSS in MiB: VmHWM (Linux), else ru_maxrss."""
    if (peak := _rss_mb("VmHWM")) is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


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
    bundle_dir = Path(bundle_dir)
    rss_before = _rss_mb()
    engine = runtime.load(bundle_dir, threads=threads)
    manifest = engine.manifest
    batch_info = manifest.get("batch") or {}
    sizes = tuple(batch_sizes) if batch_sizes else tuple(batch_info.get("sizes") or (1,))
    if min(sizes) < 1:
        raise EdgekdError(f"profile {bundle_dir}: batch sizes must be positive, got {list(sizes)}")

    task = of_manifest(manifest, f"bundle {bundle_dir}")
    data = read_eval(bundle_dir, manifest)   # only the listed eval file, verified on the bytes that are used

    rows = []
    for batch in sizes:
        x = task.timing_batch(data, batch, engine.input_shape, engine.input_range)
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

    spot = task.evaluate(engine.logits, data, engine.max_batch or max(max(sizes), 64)) \
        if data is not None else {"accuracy": None, "agreement": None, "samples": 0}
    test = (manifest.get("metrics") or {}).get("test") or {}

    rss_after = _rss_mb()
    peak = _peak_rss_mb()
    size_bytes = (bundle_dir / manifest["engine"]["file"]).stat().st_size

    smallest = min(rows, key=lambda r: r["batch"])
    measured = {"latency_ms": (smallest["p99"], f"p99 at batch {smallest['batch']}"),
                "memory_mb": (peak, "peak RSS of the profiling process")}   # what each budget of the manifest bounds
    budgets: dict[str, Any] = {key: {"budget": budget, "measured": value, "metric": metric, "pass": value <= budget}
                               for key, (value, metric) in measured.items()
                               if (budget := (manifest.get("budgets") or {}).get(key)) is not None}
    budgets["pass"] = all(b["pass"] for b in budgets.values()) if budgets else None

    return {
        "bundle": str(bundle_dir),
        **{k: manifest.get(k) for k in ("model", "target", "runtime", "device", "precision", "quantization",
                                        "quant_scheme")},
        "size_bytes": int(size_bytes),
        "task": task.name,
        "accuracy": spot.get("accuracy"),
        "agreement": spot.get("agreement"),
        "metrics": {k: spot.get(k) for k in task.metric_keys},
        "eval_samples": spot["samples"],
        **{f"test_{k}": test.get(k) for k in ("accuracy", "agreement", "samples", "per_class")},
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


def format_table(result: dict) -> str:
    """A fixed-width text table of a profile_bundle result, for terminals on devices."""
    head = (f"{result['model']} on {result['target']} ({result['runtime']}, {result['precision']}, "
            f"quantization {result['quantization']}): {result['size_bytes'] / 1024:.1f} KiB")
    lines = [head, f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'samples/s':>11} "
                   f"{'runs':>5}"]
    for r in result["rows"]:
        lines.append(f"{r['batch']:>5} {r['p50']:>9.3f} {r['p90']:>9.3f} {r['p99']:>9.3f} {r['mean']:>9.3f} "
                     f"{r['throughput_per_s']:>11.1f} {r['runs']:>5}")
    acc, agr = ("n/a" if result[k] is None else f"{100 * result[k]:.2f}%" for k in ("accuracy", "agreement"))
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
            write_json(args.json, result)
        if args.save_metrics:
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
