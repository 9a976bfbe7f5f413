"""report.json, report.md and an accuracy-vs-latency plot for a run folder.

The headline is the trade on one target: the deployed student (the fastest student engine within 0.5
points of the most accurate one) keeps N% of the teacher's accuracy
(student engine accuracy / teacher engine accuracy) at M% of its latency (student p50 / teacher p50,
both at batch 1, measured in the same profiling run).
"""

from __future__ import annotations

import json
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


def headline(engines: list[dict[str, Any]], target: str) -> dict[str, Any] | None:
    on_target = [e for e in engines if e["target"] == target]
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
                 targets: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    report = {"models": {k: {"accuracy": v["accuracy"], "params": v["params"]} for k, v in models.items()
                         if k in ("teacher", "scratch", "student")},
              "engines": engines, "skipped": skipped, "headline": None}
    for target in targets:
        if (h := headline(engines, target)) is not None:
            report["headline"] = h
            break
    report.update(extra or {})
    return report


def markdown(report: dict[str, Any]) -> str:
    from tabulate import tabulate

    lines = ["# edgekd report", ""]
    if report.get("headline"):
        lines += [f"**Headline:** {report['headline']['text']}.", ""]
    lines += ["## Models (PyTorch, test split)", ""]
    rows = [[k, f"{v['accuracy']:.4f}", f"{v['params']:,}"] for k, v in report["models"].items()]
    lines += [tabulate(rows, headers=["model", "accuracy", "params"], tablefmt="github"), ""]
    lines += ["## Engines (accuracy measured on the engine)", "", engines_table(report["engines"]), ""]
    if report.get("skipped"):
        lines += ["## Not built here", ""]
        lines += [f"- {s['target']} {s['model']} {s['precision']}: {s['reason']}" for s in report["skipped"]]
        lines.append("")
    for key, value in report.items():
        if key not in ("models", "engines", "skipped", "headline"):
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


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against batch-1 p50 latency for every engine, one marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"teacher": "s", "student": "o", "scratch": "^"}
    for e in report["engines"]:
        ax.scatter(e["latency_ms"]["p50"], e["accuracy"] * 100, marker=markers.get(e["model"], "x"), s=60)
        ax.annotate(f"{e['model']} {e['precision']}{'/' + e['quantization'] if e['quantization'] != 'none' else ''}"
                    f"\n{e['target']}", (e["latency_ms"]["p50"], e["accuracy"] * 100), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("p50 latency at batch 1 (ms)")
    ax.set_ylabel("accuracy on the engine (%)")
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title("edgekd: accuracy against latency")
    fig.tight_layout()
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(run_dir: str | Path, report: dict[str, Any]) -> dict[str, Path]:
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "png": run_dir / "report.png"}
    fileio.write_json(paths["json"], report)
    fileio.write_text(paths["md"], markdown(report))
    if report["engines"]:
        plot(report, paths["png"])
    return paths


def read_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise EdgekdError(f"{path}: no report here; run `edgekd run` or `edgekd profile` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgekdError(f"{path}: not valid JSON ({e})") from None
