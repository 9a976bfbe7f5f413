"""Helpers shared by the benchmark suites: environment record, result files, Pareto fronts, plots, tables.

Every suite writes `benchmarks/results/<name>.json` and `<name>.md` (with `_quick` appended in `--quick` mode;
those names are git-ignored) through `write_results`, and records `environment()` and `command_line()` in
both, so a number is never separated from the machine, versions and command that produced it.

    import _common as common                     # the scripts put benchmarks/ and the repository on sys.path
    env = common.environment(threads=2)
    data = {"command": common.command_line(), "environment": env, "rows": rows}
    md = "\n".join([common.header_markdown("Title", data["command"], env), common.markdown_table(heads, rows)])
    common.write_results(out_dir, common.result_name("engine_cost", quick), data, md)

Nothing here imports torch or onnxruntime at module level; versions are read from package metadata.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere imports this checkout's edgekd
    sys.path.insert(0, str(REPO))

from edgekd import fileio  # noqa: E402
from edgekd.report import pareto_front, pyplot, save_png  # noqa: E402

PACKAGES = ("numpy", "torch", "torchao", "onnx", "onnxruntime", "onnxscript", "matplotlib")


# ------------------------------------------------------------------------------------------ environment


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor() or 'unknown'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The SIMD features that decide which kernels onnxruntime and torch pick (edgekd.targets.ISA_FLAGS)."""
    from edgekd.targets import cpu_flags

    return cpu_flags()["flags"] or []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from, with '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(threads: int | None = None) -> dict[str, Any]:
    """What the numbers depend on: CPU model and SIMD flags, cores (logical, and usable by this process), the
    thread count the suite used, the load average when called (other jobs on a shared machine), Python and
    package versions, the git commit, and the UTC date."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "threads": threads,
        "load_average_1_5_15m": load,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "edgekd_commit": _git_commit(),
    }


def command_line() -> str:
    """The exact command that started this process (interpreter, its options, script and arguments)."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


class _Threads(argparse.Action):
    """Stores --threads and records that it was given (so `threads_for` can tell it from the default)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values < 1:
            parser.error(f"--threads must be >= 1, got {values}")
        namespace.threads = values
        namespace.threads_given = True


def add_common_args(parser: argparse.ArgumentParser, *, default_threads: int | None = None) -> None:
    """--quick, --out and --threads, the same in every suite. args.threads defaults to `default_threads` (all
    cores when None); suites that want one thread in --quick mode resolve it with `threads_for`."""
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny sizes and few runs, about a minute; writes <name>_quick.*")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--threads", type=int, action=_Threads, default=default_threads or os.cpu_count() or 1,
                        help="intra-op threads for torch and onnxruntime (default: %(default)s)")


def threads_for(args: argparse.Namespace, default: int | None = None) -> int:
    """--threads when given on the command line; else 1 in --quick mode (smoke tests share machines, and a
    2-thread torch/onnxruntime op next to another busy process ran ten times slower here than on one thread);
    else `default`, or args.threads (add_common_args's default) when `default` is None."""
    if getattr(args, "threads_given", False):
        return args.threads
    if args.quick:
        return 1
    return default or args.threads


def result_name(name: str, quick: bool) -> str:
    """`name`, or `name_quick` for --quick runs (git-ignored, so smoke tests never overwrite real results)."""
    return f"{name}_quick" if quick else name


# ------------------------------------------------------------------------------------------ result files


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null (a missing measurement, not a number)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):   # numpy / torch scalars
        return _finite(obj.item())
    return obj


def write_results(out_dir: str | Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write `out_dir/name.json` (data, NaN/Inf as null) and `out_dir/name.md`, each atomically; return both."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    fileio.write_text(json_path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    fileio.write_text(md_path, markdown.rstrip() + "\n")
    return json_path, md_path


# --------------------------------------------------------------------------------------------- statistics


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


# ------------------------------------------------------------------------------------------------ markdown


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats with `digits` decimals (and thousands separators), None/NaN as 'n/a'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 2,
                   align: str | None = None) -> str:
    """A GitHub table; cells go through `fmt`. `align` is one letter per column (l/r/c; default: text columns
    left, the rest right)."""
    rows = [list(r) for r in rows]
    if align is None:
        align = "".join("l" if rows and isinstance(rows[0][k], str) else "r" for k in range(len(headers)))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def header_markdown(title: str, command: str, env: dict[str, Any], extra: str = "") -> str:
    """The top of every suite's Markdown: title, exact command, machine and versions, then `extra`."""
    v = env.get("versions", {})
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "torchao", "onnx", "onnxruntime") if v.get(k))
    load = env.get("load_average_1_5_15m")
    lines = [f"# {title}", "", f"Command: `{command}`  ",
             f"Machine: {env['cpu']} ({env['machine']}, {', '.join(env.get('cpu_flags') or []) or 'no flags'}), "
             f"{env['usable_cores']} usable of {env['logical_cores']} logical cores, {env['threads']} thread(s) used"
             + (f"; load average {load[0]} at start" if load else "") + ".  ",
             f"Python {env['python']}, {versions}; edgekd {env.get('edgekd_commit') or 'unknown commit'}; "
             f"measured {env['date']}."]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _plain_log_ticks(axis: Any, values: Sequence[float] | None = None) -> None:
    """Log-axis tick labels as plain numbers (1, 8, 64; 0.05) instead of powers; ticks at `values` if given."""
    from matplotlib import ticker

    def minor(v: float, _: Any) -> str:   # label 2x and 5x between the decades, leave the rest blank
        return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""

    if values:
        axis.set_ticks(sorted(set(values)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter() if values else ticker.FuncFormatter(minor))


def plot_accuracy_latency(path: str | Path, points: Sequence[Mapping[str, Any]], *, title: str,
                          xlabel: str = "latency (ms)", ylabel: str = "accuracy (%)", logx: bool = True) -> Path:
    """Scatter of accuracy against latency, one labelled marker per point ({"label", "latency", "accuracy"},
    optional "group" for colour), with the Pareto front (`pareto_front`) drawn as a step line. Returns path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = list(dict.fromkeys(str(p.get("group", "")) for p in points))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g_i, group in enumerate(groups):
        pts = [p for p in points if str(p.get("group", "")) == group]
        ax.scatter([p["latency"] for p in pts], [p["accuracy"] for p in pts], color=colors[g_i % len(colors)],
                   label=group or None, zorder=3)
    for p in points:
        ax.annotate(str(p["label"]), (p["latency"], p["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    front = [points[i] for i in pareto_front([(float(p["latency"]), float(p["accuracy"])) for p in points])]
    if front:
        ax.step([p["latency"] for p in front], [p["accuracy"] for p in front], where="post", color="black",
                linewidth=1, linestyle="--", label="Pareto front", zorder=2)
    if logx:
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    ax.margins(x=0.12, y=0.1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(plt, fig, path)


def plot_series(path: str | Path, series: Mapping[str, Sequence[tuple[float, float]]], *, title: str,
                xlabel: str, ylabel: str, logx: bool = True, logy: bool = True) -> Path:
    """Lines with markers, one per label in `series` ({label: [(x, y), ...]}), log-log by default."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
        _plain_log_ticks(ax.xaxis, [x for pts in series.values() for x, _ in pts])
    if logy:
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(plt, fig, path)


def plot_latency_batch(path: str | Path, series: Mapping[str, Sequence[tuple[int, float]]], *, title: str,
                       ylabel: str = "p50 latency per batch (ms)") -> Path:
    """Latency against batch size, log-log, one line per engine ({label: [(batch, ms), ...]})."""
    return plot_series(path, series, title=title, xlabel="batch size", ylabel=ylabel)


def plot_bars(path: str | Path, labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
              errors: Sequence[float] | None = None, reference: float | None = None) -> Path:
    """A bar chart (optional error bars and a dashed horizontal reference line, e.g. 1.0x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bars = ax.bar(list(labels), list(values), yerr=list(errors) if errors is not None else None, capsize=4)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    return save_png(plt, fig, path)


def plot_grouped_bars(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float]], *, title: str,
                      ylabel: str, errors: dict[str, Sequence[float]] | None = None,
                      reference: tuple[str, float] | None = None) -> Path:
    """Side-by-side bars per group (e.g. scratch vs distilled per suite), the y axis zoomed to the values so
    differences of a point stay visible; `reference` = (label, value) draws a dashed line (e.g. the teacher)."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(groups)), 4.5))
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        err = list(errors[name]) if errors and name in errors else None
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, list(values), width, yerr=err, capsize=3, label=name)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=7)
    everything = [v for values in series.values() for v in values] + ([reference[1]] if reference else [])
    span = max(everything) - min(everything)
    ax.set_ylim(min(everything) - 0.15 * span - 0.5, max(everything) + 0.1 * span + 0.5)
    if reference is not None:
        ax.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
    ax.set_xticks(x, list(groups))
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_png(plt, fig, path)
