"""report.json, report.md and an accuracy-vs-latency plot for a run folder.

The headline is the trade on one target: the deployed student (the fastest student engine within 0.5
points of the most accurate one) keeps N% of the teacher's accuracy
(student engine accuracy / teacher engine accuracy) at M% of its latency (student p50 / teacher p50,
both at batch 1, measured in the same profiling run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgekd import fileio
from edgekd.errors import EdgekdError

ACCURACY_SLACK = 0.005   # a student engine within 0.5 points of the best student engine counts as as accurate


def engine_entry(profile: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One report row from a profile_bundle() result; latency_ms is the smallest profiled batch."""
    rows = sorted(profile["rows"], key=lambda r: r["batch"])
    first = rows[0]
    bundle = Path(profile["bundle"])
    try:
        path = str(bundle.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        path = str(bundle)
    return {
        "name": f"{profile['model']}-{profile['target']}-{profile['precision']}"
                + (f"-{profile['quantization']}" if profile["quantization"] != "none" else ""),
        "model": profile["model"], "target": profile["target"], "runtime": profile["runtime"],
        "precision": profile["precision"], "quantization": profile["quantization"], "path": path,
        "size_bytes": profile["size_bytes"], "accuracy": profile["accuracy"], "agreement": profile["agreement"],
        "latency_ms": {k: first[k] for k in ("batch", "p50", "p90", "p99", "mean")},
        "throughput_per_s": first["throughput_per_s"],
        "per_batch": rows,
        "peak_rss_mb": profile.get("peak_rss_mb"),
        "budgets": profile.get("budgets", {}),
    }


def int8_vs_fp32(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each int8 engine against the fp32 engine of the same model on the same target, at every profiled batch:
    speedup = fp32 p50 / int8 p50 (same profiling run); `slower_at_batches` lists the batches where it is < 1."""
    out = []
    for e in engines:
        base = next((f for f in engines if f["precision"] == "fp32" and f["model"] == e["model"]
                     and f["target"] == e["target"]), None)
        if e["precision"] != "int8" or base is None:
            continue
        fp32 = {r["batch"]: r["p50"] for r in base["per_batch"]}
        speedup = {r["batch"]: fp32[r["batch"]] / r["p50"] for r in e["per_batch"]
                   if r["batch"] in fp32 and r["p50"] > 0}
        out.append({"engine": e["name"], "fp32_engine": base["name"], "target": e["target"],
                    "speedup_vs_fp32": speedup, "slower_at_batches": sorted(b for b, v in speedup.items() if v < 1)})
    return out


def headline(engines: list[dict[str, Any]], target: str, *, ship_slower_int8: bool = False) -> dict[str, Any] | None:
    """The trade on `target`. An int8 engine slower than its fp32 engine at a profiled batch size is never the
    one shipped unless `ship_slower_int8` (the recipe's [quantize] ship_slower_int8) asks for it."""
    slower = set() if ship_slower_int8 else {v["engine"] for v in int8_vs_fp32(engines) if v["slower_at_batches"]}
    on_target = [e for e in engines if e["target"] == target and e["name"] not in slower]
    teachers = [e for e in on_target if e["model"] == "teacher" and e["precision"] == "fp32"]
    students = [e for e in on_target if e["model"] == "student"]
    if not teachers or not students:
        return None
    teacher = teachers[0]
    # the engine a user would ship: the fastest student engine that is as accurate as the best one
    best = max(e["accuracy"] for e in students)
    student = min((e for e in students if e["accuracy"] >= best - ACCURACY_SLACK), key=lambda e: e["latency_ms"]["p50"])
    if teacher["accuracy"] in (None, 0):
        return None
    retention = student["accuracy"] / teacher["accuracy"]
    ratio = student["latency_ms"]["p50"] / teacher["latency_ms"]["p50"]
    return {"target": target, "student_engine": student["name"], "teacher_engine": teacher["name"],
            "accuracy_retention": retention, "latency_ratio": ratio,
            "text": f"the student keeps {retention * 100:.1f}% of the teacher's accuracy at {ratio * 100:.1f}% of its "
                    f"latency on target {target} ({student['precision']}, {student['quantization']}, batch "
                    f"{student['latency_ms']['batch']})"}


def build_report(models: dict[str, Any], engines: list[dict[str, Any]], skipped: list[dict[str, Any]],
                 targets: list[str], extra: dict[str, Any] | None = None, *,
                 ship_slower_int8: bool = False) -> dict[str, Any]:
    keep = ("accuracy", "params", "test_samples", "epochs", "train_seconds", "samples", "labelled", "temperature",
            "alpha", "function_matching", "teacher_outputs")
    report = {"models": {k: {f: v[f] for f in keep if f in v} for k, v in models.items()
                         if k in ("teacher", "scratch", "student")},
              "distillation": distillation_summary(models), "search": models.get("search"),
              "engines": engines, "skipped": skipped, "headline": None}
    if verdicts := int8_vs_fp32(engines):
        report["int8_vs_fp32"] = verdicts
    for target in targets:
        if (h := headline(engines, target, ship_slower_int8=ship_slower_int8)) is not None:
            report["headline"] = h
            break
    report.update(extra or {})
    return report


def distillation_summary(models: dict[str, Any]) -> dict[str, Any] | None:
    """What distillation gained over the scratch student, and the fraction of the teacher-student gap it closed:
    gap recovered = (distilled - scratch) / (teacher - scratch)."""
    if not all(k in models for k in ("teacher", "student", "scratch")):
        return None
    t, s, b = (models[k]["accuracy"] for k in ("teacher", "student", "scratch"))
    return {"gain": s - b, "gap_recovered": (s - b) / (t - b) if t != b else None,
            "accuracy_retention": s / t if t else None}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points no other point beats: lower latency and higher accuracy are
    better, and a point is dominated when another is at least as good on both and strictly better on one.
    Ordered by latency (accuracy rises along the front); NaN points are never on it; equal points all stay."""
    valid = [i for i, (lat, acc) in enumerate(points) if not (math.isnan(lat) or math.isnan(acc))]
    front = [i for i in valid
             if not any(points[j][0] <= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i]
                        for j in valid)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def markdown(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = ["# edgekd report", ""]
    if report.get("headline"):
        lines += [f"**Headline:** {report['headline']['text']}.", ""]
    lines += ["## Models (PyTorch, test split)", ""]
    rows = []
    for k, v in report["models"].items():
        errors = round((1 - v["accuracy"]) * v["test_samples"]) if "test_samples" in v else "-"
        t_a = f"T={v['temperature']:g}, alpha={v['alpha']:g}" if k == "student" and "temperature" in v else ""
        rows.append([k, f"{v['accuracy']:.4f}", errors, f"{v['params']:,}", v.get("labelled", v.get("samples", "")),
                     v.get("epochs", ""), v.get("train_seconds", ""), t_a])
    lines += [tabulate(rows, headers=["model", "accuracy", "test errors", "params", "labels", "epochs",
                                      "train s", "distillation"], tablefmt="github"), ""]
    if d := report.get("distillation"):
        gap = f"{d['gap_recovered'] * 100:.0f}%" if d.get("gap_recovered") is not None else "n/a"
        lines += [f"Distillation gain over scratch: {d['gain'] * 100:+.2f} points; teacher-student gap recovered: "
                  f"{gap}.", ""]
    if search := report.get("search"):
        lines += [f"## T/alpha search (validation split, {search['epochs']} epochs per pair)", ""]
        rows = [[f"{r['temperature']:g}", f"{r['alpha']:g}", f"{r['val_accuracy']:.4f}", r["seconds"],
                 "chosen" if (r["temperature"], r["alpha"]) == (search["chosen"]["temperature"],
                                                                search["chosen"]["alpha"]) else ""]
                for r in search["table"]]
        lines += [tabulate(rows, headers=["T", "alpha", "val accuracy", "seconds", ""], tablefmt="github"), ""]
    lines += ["## Engines (accuracy measured on the engine)", "", engines_table(report["engines"]), ""]
    if report["engines"]:
        lines += ["![accuracy against latency](report.png)", "", "![latency against batch size](report_batch.png)",
                  ""]
    if report.get("skipped"):
        lines += ["## Not built here", ""]
        lines += [f"- {s['target']} {s['model']} {s['precision']}: {s['reason']}" for s in report["skipped"]]
        lines.append("")
    for key, value in report.items():
        if key not in ("models", "engines", "skipped", "headline", "distillation", "search"):
            lines += [f"## {key}", "", "```json", json.dumps(value, indent=2), "```", ""]
    return "\n".join(lines)


def engines_table(engines: list[dict[str, Any]]) -> str:
    from tabulate import tabulate

    rows = []
    for e in engines:
        agreement = f"{e['agreement']:.4f}" if e.get("agreement") is not None else "-"
        for r in e["per_batch"]:
            rows.append([e["model"], e["target"], e["precision"], e["quantization"], f"{e['accuracy']:.4f}",
                         agreement, r["batch"], f"{r['p50']:.3f}", f"{r['p99']:.3f}", f"{r['throughput_per_s']:.0f}",
                         f"{e['size_bytes'] / 1024:.1f}"])
    return tabulate(rows, headers=["model", "target", "precision", "quant", "accuracy", "agreement", "batch",
                                   "p50 ms", "p99 ms", "samples/s", "size KiB"], tablefmt="github")


def _label(e: dict[str, Any]) -> str:
    return f"{e['model']} {e['precision']}{'/' + e['quantization'] if e['quantization'] != 'none' else ''}"


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against batch-1 p50 latency for every engine, one marker per model, with the Pareto front."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"teacher": "s", "student": "o", "scratch": "^"}
    engines = report["engines"]
    points = [(e["latency_ms"]["p50"], e["accuracy"] * 100) for e in engines]
    for e, (x, y) in zip(engines, points, strict=True):
        ax.scatter(x, y, marker=markers.get(e["model"], "x"), s=60, zorder=3)
        ax.annotate(f"{_label(e)}\n{e['target']}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = [points[i] for i in pareto_front(points)]
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black", linestyle="--", linewidth=1,
            label="Pareto front (faster and more accurate than the rest)", zorder=2)
    ax.legend(fontsize=8)
    ax.set_xlabel("p50 latency at batch 1 (ms)")
    ax.set_ylabel("accuracy on the engine (%)")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title("edgekd: accuracy against latency")
    save_png(plt, fig, path)


def plot_batches(report: dict[str, Any], path: Path) -> None:
    """p50 latency per sample against batch size, one line per engine (log-log)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in report["engines"]:
        rows = sorted(e["per_batch"], key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rows], [r["p50"] / r["batch"] for r in rows], marker="o",
                label=f"{_label(e)} ({e['target']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency per sample (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("edgekd: latency per sample against batch size")
    save_png(plt, fig, path)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: files only, no display needed (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(plt: Any, fig: Any, path: str | Path) -> Path:
    """Write `fig` to `path` as PNG atomically and close it."""
    fig.tight_layout()
    path = Path(path)
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "png": run_dir / "report.png",
             "batch_png": run_dir / "report_batch.png"}
    fileio.write_json(paths["json"], report)
    fileio.write_text(paths["md"], markdown(report))
    if report["engines"]:
        plot(report, paths["png"])
        plot_batches(report, paths["batch_png"])
    return paths


def read_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise EdgekdError(f"{path}: no report here; run `edgekd run` or `edgekd profile` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekdError(f"{path}: not valid JSON ({e})") from None
