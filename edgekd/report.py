"""report.json, report.md and an accuracy-vs-latency plot for a run folder.

The headline is the trade on one target: the deployed student (the fastest student engine within 0.5
points of the most accurate one) keeps N% of the teacher's accuracy
(student engine accuracy / teacher engine accuracy) at M% of its latency (student p50 / teacher p50,
both at batch 1, measured in the same profiling run), and the distilled student's gain over the same student
trained without the teacher. Every accuracy carries a 95% Wilson binomial interval over its test samples
(one seed: the interval is the test set's sampling error, not seed-to-seed variation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from edgekd import fileio
from edgekd.errors import EdgekdError

ACCURACY_SLACK = 0.005   # a student engine within 0.5 points of the best student engine counts as as accurate
CONFIDENCE = 0.95
LOSES_MOST = 3           # report.md names this many classes with the lowest retention
PLOTTED_CLASSES = 20     # the per-class bar plot shows at most this many classes (the lowest retention first)


def accuracy_ci(accuracy: float | None, samples: int | None) -> list[float] | None:
    """The 95% Wilson score interval of an accuracy measured on `samples` test samples (scipy's binomtest)."""
    if accuracy is None or not samples:
        return None
    from scipy.stats import binomtest

    ci = binomtest(round(accuracy * samples), samples).proportion_ci(CONFIDENCE, method="wilson")
    return [float(ci.low), float(ci.high)]


def _pct(accuracy: float, ci: list[float] | None) -> str:
    """82.50% [78.47, 85.91]: the accuracy and its 95% interval, in percent."""
    return f"{accuracy * 100:.2f}%" + (f" [{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]" if ci else "")


def engine_entry(profile: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One report row from a profile_bundle() result; latency_ms is the smallest profiled batch."""
    rows = sorted(profile["rows"], key=lambda r: r["batch"])
    first = rows[0]
    bundle = Path(profile["bundle"])
    inside = bundle.resolve().is_relative_to(run_dir.resolve())
    path = str(bundle.resolve().relative_to(run_dir.resolve()) if inside else bundle)
    return {
        "name": f"{profile['model']}-{profile['target']}-{profile['precision']}"
                + (f"-{profile['quantization']}" if profile["quantization"] != "none" else ""),
        "model": profile["model"], "target": profile["target"], "runtime": profile["runtime"],
        "precision": profile["precision"], "quantization": profile["quantization"], "path": path,
        "size_bytes": profile["size_bytes"], **(acc := engine_accuracy(profile)),
        "accuracy_ci": accuracy_ci(acc["accuracy"], acc.get("test_samples", profile.get("eval_samples"))),
        "latency_ms": {k: first[k] for k in ("batch", "p50", "p90", "p99", "mean")},
        "throughput_per_s": first["throughput_per_s"],
        "per_batch": rows,
        "quant_scheme": profile.get("quant_scheme") if profile["precision"] == "int8" else None,
        "peak_rss_mb": profile.get("peak_rss_mb"),
        "budgets": profile.get("budgets", {}),
    }


def engine_accuracy(profile: dict[str, Any]) -> dict[str, Any]:
    """The engine's accuracy on the whole test split (measured on the build host) where the bundle records it,
    else on its eval.npz sample (measured where it was profiled); the sample's figure is kept beside it."""
    if profile.get("test_accuracy") is None:
        return {"accuracy": profile["accuracy"], "agreement": profile["agreement"]}
    return {"accuracy": profile["test_accuracy"], "agreement": profile["test_agreement"],
            "test_samples": profile["test_samples"], "spot_accuracy": profile["accuracy"],
            "spot_samples": profile.get("eval_samples"), "per_class": profile.get("test_per_class")}


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


def headline(engines: list[dict[str, Any]], target: str, models: dict[str, Any] | None = None, *,
             ship_slower_int8: bool = False) -> dict[str, Any] | None:
    """The trade on `target`. An int8 engine slower than its fp32 engine at a profiled batch size is never the
    one shipped unless `ship_slower_int8` (the recipe's [quantize] ship_slower_int8) asks for it."""
    slower = set() if ship_slower_int8 else {v["engine"] for v in int8_vs_fp32(engines) if v["slower_at_batches"]}
    on_target = [e for e in engines if e["target"] == target and e["name"] not in slower]
    teacher = next((e for e in on_target if e["model"] == "teacher" and e["precision"] == "fp32"), None)
    students = [e for e in on_target if e["model"] == "student"]
    if teacher is None or not students:
        return None
    # the engine a user would ship: the fastest student engine that is as accurate as the best one
    best = max(e["accuracy"] for e in students)
    student = min((e for e in students if e["accuracy"] >= best - ACCURACY_SLACK), key=lambda e: e["latency_ms"]["p50"])
    if teacher["accuracy"] in (None, 0):
        return None
    retention = student["accuracy"] / teacher["accuracy"]
    ratio = student["latency_ms"]["p50"] / teacher["latency_ms"]["p50"]
    text = (f"the student keeps {retention * 100:.1f}% of the teacher's accuracy at {ratio * 100:.1f}% of its "
            f"latency on target {target} ({student['precision']}, {student['quantization']}, batch "
            f"{student['latency_ms']['batch']})")
    scratch = (models or {}).get("scratch")
    gain = None
    if scratch and "student" in (models or {}):
        gain = models["student"]["accuracy"] - scratch["accuracy"]
        text += (f", and is {abs(gain) * 100:.2f} points {'over' if gain >= 0 else 'under'} the same student trained "
                 "without the teacher (PyTorch, test split)")
    return {"target": target, "student_engine": student["name"], "teacher_engine": teacher["name"],
            "accuracy_retention": retention, "latency_ratio": ratio, "gain_over_scratch": gain, "text": text}


def build_report(models: dict[str, Any], engines: list[dict[str, Any]], skipped: list[dict[str, Any]],
                 targets: list[str], extra: dict[str, Any] | None = None, *,
                 ship_slower_int8: bool = False) -> dict[str, Any]:
    keep = ("accuracy", "params", "test_samples", "epochs", "train_seconds", "samples", "labelled", "temperature",
            "alpha", "function_matching", "teacher_outputs")
    kept = {k: {f: v[f] for f in keep if f in v} for k, v in models.items() if k in ("teacher", "scratch", "student")}
    for v in kept.values():
        v["accuracy_ci"] = accuracy_ci(v.get("accuracy"), v.get("test_samples"))
    first = next(filter(None, (headline(engines, t, models, ship_slower_int8=ship_slower_int8) for t in targets)), None)
    report = {"models": kept, "distillation": distillation_summary(models), "search": models.get("search"),
              "engines": engines, "skipped": skipped, "headline": first,   # the first target that has one
              "dominated": dominated(engines), "notes": int8_notes(engines)}
    if verdicts := int8_vs_fp32(engines):
        report["int8_vs_fp32"] = verdicts
    if (classes := per_class(models, engines, (first or {}).get("student_engine"))) is not None:
        report["per_class"] = classes
    report.update(extra or {})
    return report


def _lost_first(row: dict[str, Any]) -> tuple[bool, float, float]:
    """Sort key: lowest retention first (none last); equal retention: more accuracy points lost first."""
    lost = (row.get("student") or 0.0) - (row.get("teacher") or 0.0)
    return row["retention"] is None, row["retention"] or 0.0, lost


def per_class(models: dict[str, Any], engines: list[dict[str, Any]],
              student_engine: str | None = None) -> dict[str, Any] | None:
    """Which classes the student keeps: per class, the teacher's, the distilled student's and the scratch
    student's accuracy on the test split (PyTorch, metrics.json), the shipped student engine's where the build
    host scored it on the whole split, and retention = student / teacher (None where the class has no test
    sample or the teacher got none of it right). `loses_most`: the classes with the lowest retention below 1."""
    recorded = {k: models[k]["per_class"] for k in ("teacher", "student", "scratch")
                if isinstance(models.get(k), dict) and isinstance(models[k].get("per_class"), dict)}
    if not recorded:
        return None   # not a classification run, or made before edgekd recorded per-class counts
    base = recorded.get("teacher") or next(iter(recorded.values()))
    names, samples = base["classes"], base["samples"]
    columns = {k: v["accuracy"] for k, v in recorded.items() if v["classes"] == names and v["samples"] == samples}
    engine = next((e for e in engines if e["name"] == student_engine), None)
    if engine and isinstance(pc := engine.get("per_class"), dict) and pc.get("samples") == samples:
        columns["student_engine"] = pc["accuracy"]
    rows = []
    for c, name in enumerate(names):
        row: dict[str, Any] = {"class": name, "samples": samples[c], **{k: v[c] for k, v in columns.items()}}
        t, s = row.get("teacher"), row.get("student")
        row["retention"] = s / t if t and s is not None else None
        rows.append(row)
    losing = sorted((r for r in rows if r["retention"] is not None and r["retention"] < 1), key=_lost_first)
    return {"columns": list(columns), "student_engine": student_engine if "student_engine" in columns else None,
            "rows": rows, "loses_most": [r["class"] for r in losing[:LOSES_MOST]],
            "no_test_samples": [r["class"] for r in rows if not r["samples"]],
            "not_recorded": [k for k in ("teacher", "student", "scratch") if k in models and k not in columns]}


def distillation_summary(models: dict[str, Any]) -> dict[str, Any] | None:
    """What distillation gained over the scratch student, and the fraction of the teacher-student gap it closed:
    gap recovered = (distilled - scratch) / (teacher - scratch), defined only when the teacher beats scratch (else
    the ratio's sign flips and means nothing: `scratch_beat_teacher` is set instead)."""
    if not all(k in models for k in ("teacher", "student", "scratch")):
        return None
    t, s, b = (models[k]["accuracy"] for k in ("teacher", "student", "scratch"))
    return {"gain": s - b, "gap_recovered": (s - b) / (t - b) if t > b else None, "scratch_beat_teacher": b >= t,
            "accuracy_retention": s / t if t else None}


def dominated(engines: list[dict[str, Any]]) -> dict[str, str]:
    """{engine name: the engine that dominates it} per target: another engine at least as fast (batch-1 p50) and
    at least as accurate, strictly better on one; shipping a dominated engine buys nothing."""
    out: dict[str, str] = {}
    for target in dict.fromkeys(e["target"] for e in engines):
        group = [e for e in engines if e["target"] == target and e.get("accuracy") is not None]
        points = [(e["latency_ms"]["p50"], e["accuracy"]) for e in group]
        front = set(pareto_front(points))
        for i, e in enumerate(group):
            if i not in front:
                by = [group[j] for j in front if points[j][0] <= points[i][0] and points[j][1] >= points[i][1]]
                if by:
                    out[e["name"]] = max(by, key=lambda b: b["accuracy"])["name"]
    return out


def int8_notes(engines: list[dict[str, Any]]) -> list[str]:
    """Say in words when an int8 engine is slower than its model's fp32 engine on the same target (int8_vs_fp32's
    verdicts): at this size the quantize/dequantize work costs more than the integer kernels save."""
    by_name = {e["name"]: e for e in engines}
    notes = []
    for v in int8_vs_fp32(engines):
        if not v["slower_at_batches"]:
            continue
        e, fp32 = by_name[v["engine"]], by_name[v["fp32_engine"]]
        batch = min(v["slower_at_batches"], key=lambda b: v["speedup_vs_fp32"][b])
        notes.append(f"INT8 is slower than FP32 here: {e['model']} int8/{e['quantization']} on {e['target']} takes "
                     f"{1 / v['speedup_vs_fp32'][batch]:.2f}x the fp32 engine's time at batch {batch} (slower at "
                     f"batch {', '.join(map(str, v['slower_at_batches']))}); it only saves size "
                     f"({e['size_bytes'] / 1024:.1f} vs {fp32['size_bytes'] / 1024:.1f} KiB).")
    return notes


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
    lines = ["# edgekd report", ""]
    if report.get("headline"):
        lines += [f"**Headline:** {report['headline']['text']}.", ""]
    lines += ["## Models (PyTorch, test split)", ""]
    rows = []
    for k, v in report["models"].items():
        errors = round((1 - v["accuracy"]) * v["test_samples"]) if "test_samples" in v else "-"
        t_a = f"T={v['temperature']:g}, alpha={v['alpha']:g}" if k == "student" and "temperature" in v else ""
        rows.append([k, _pct(v["accuracy"], v.get("accuracy_ci")), errors, f"{v['params']:,}",
                     v.get("labelled", v.get("samples", "")), v.get("epochs", ""), v.get("train_seconds", ""), t_a])
    lines += [tabulate(rows, headers=["model", "accuracy [95% CI]", "test errors", "params", "labels", "epochs",
                                      "train s", "distillation"], tablefmt="github"), ""]
    if d := report.get("distillation"):
        if d.get("scratch_beat_teacher"):
            gap = "none to recover: scratch beat the teacher (the student trained without the teacher scored at " \
                  "least as well as the teacher)"
        else:
            gap = f"teacher-student gap recovered: {d['gap_recovered'] * 100:.0f}%"
        lines += [f"Distillation gain over scratch: {d['gain'] * 100:+.2f} points; {gap}.", ""]
    if search := report.get("search"):
        lines += [f"## T/alpha search (validation split, {search['epochs']} epochs per pair)", ""]
        rows = [[f"{r['temperature']:g}", f"{r['alpha']:g}", f"{r['val_accuracy']:.4f}", r["seconds"],
                 "chosen" if (r["temperature"], r["alpha"]) == (search["chosen"]["temperature"],
                                                                search["chosen"]["alpha"]) else ""]
                for r in search["table"]]
        lines += [tabulate(rows, headers=["T", "alpha", "val accuracy", "seconds", ""], tablefmt="github"), ""]
    if report.get("per_class"):
        lines += per_class_lines(report["per_class"])
    lines += ["## Engines (accuracy measured on the engine, 95% CI; memory: peak RSS of a fresh profiling process)",
              "", engines_table(report["engines"], report.get("dominated")), ""]
    schemes = {(e["target"], e["quant_scheme"]["scheme"]): e["quant_scheme"]["reason"] for e in report["engines"]
               if e.get("quant_scheme")}
    notes = [f"int8 scheme on {t}: {scheme} ({reason})" for (t, scheme), reason in schemes.items()]
    notes += report.get("notes") or []
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    if report["engines"]:
        lines += ["![accuracy against latency](report.png)", "", "![latency against batch size](report_batch.png)",
                  ""]
    if report.get("skipped"):
        lines += ["## Not built here", ""]
        lines += [f"- {s['target']} {s['model']} {s['precision']}: {s['reason']}" for s in report["skipped"]]
        lines.append("")
    if report.get("int8_fallback"):
        lines += int8_fallback_lines(report["int8_fallback"])
    for key, value in report.items():
        if key not in ("models", "engines", "skipped", "headline", "distillation", "search", "dominated", "notes",
                       "quant_scheme", "int8_fallback", "int8_vs_fp32", "per_class"):
            lines += [f"## {key}", "", "```json", json.dumps(value, indent=2), "```", ""]
    return "\n".join(lines)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _shown_classes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All classes when they fit a table or plot, else the PLOTTED_CLASSES with the lowest retention."""
    if len(rows) <= PLOTTED_CLASSES:
        return rows
    return sorted(rows, key=_lost_first)[:PLOTTED_CLASSES]


def per_class_lines(pc: dict[str, Any]) -> list[str]:
    """The per-class table (accuracies and retention = student / teacher) with the classes the student loses most
    named, and what could not be said (a class with no test sample, a model without per-class counts)."""
    heads = {"student_engine": f"student engine ({pc['student_engine']})"}   # the other columns: their names
    lines = ["## Per class (test split; retention = student accuracy / teacher accuracy)", ""]
    by_name = {r["class"]: r for r in pc["rows"]}
    if pc["loses_most"]:
        lost = [f"**{name}** keeps {_acc(by_name[name]['retention'])} (teacher "
                f"{_acc(by_name[name]['teacher'])}, student {_acc(by_name[name]['student'])})"
                for name in pc["loses_most"]]
        lines += [f"The student loses most on: {'; '.join(lost)}.", ""]
    elif "teacher" in pc["columns"] and "student" in pc["columns"]:
        lines += ["The student keeps at least the teacher's accuracy on every class.", ""]
    shown = _shown_classes(pc["rows"])
    if len(shown) < len(pc["rows"]):
        lines += [f"The {len(shown)} classes with the lowest retention of {len(pc['rows'])} (all in report.json):", ""]
    rows = [[r["class"], r["samples"], *(_acc(r.get(k)) for k in pc["columns"]), _acc(r["retention"])] for r in shown]
    lines += [tabulate(rows, headers=["class", "test samples", *(heads.get(k, k) for k in pc["columns"]), "retention"],
                       tablefmt="github"), ""]
    notes = [f"class {name} has no test samples: no accuracy or retention" for name in pc["no_test_samples"]]
    notes += [f"{role}: no per-class counts recorded for this test split (run `edgekd distill` again)"
              for role in pc["not_recorded"]]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return lines + ["![per-class accuracy](report_classes.png)", ""]


def int8_fallback_lines(fallbacks: dict[str, dict[str, Any]]) -> list[str]:
    """The INT8-vs-FP32 decision per target in words, with the per-layer kernel times it was based on."""
    lines = ["## INT8 against FP32 (what ships)", ""]
    for target, d in fallbacks.items():
        speed = ", ".join(f"{float(v):.2f}x at batch {b}" for b, v in d["speedup_vs_fp32"].items())
        lines += [f"- {target}: {d['engine']} ran at {speed} of the FP32 engine's speed; chose **{d['chose']}**: "
                  f"{d['why']}.", ""]
        rows = (d.get("layer_ms") or {}).get("rows") or []
        if rows:
            lines += [tabulate([[r["layer"], r["fp32_ms"], r["int8_ms"], "yes" if r["int8_ms"] > r["fp32_ms"] else ""]
                                for r in rows], headers=[f"layer (batch {d['layer_ms']['batch']})", "fp32 ms",
                                                         "int8 ms", "slower in int8"], tablefmt="github"), ""]
    return lines


def engines_table(engines: list[dict[str, Any]], dominated_by: dict[str, str] | None = None) -> str:
    """One row per engine and batch size; budgets as measured/budget with PASS/FAIL, dominated engines named."""
    dominated_by = dominated(engines) if dominated_by is None else dominated_by
    rows = []
    for e in engines:
        agreement = f"{e['agreement']:.4f}" if e.get("agreement") is not None else "-"
        accuracy = _pct(e["accuracy"], e.get("accuracy_ci")) if e.get("accuracy") is not None else "-"
        mem = f"{e['peak_rss_mb']:.0f}" if e.get("peak_rss_mb") is not None else "-"
        for r in e["per_batch"]:
            rows.append([e["model"], e["target"], e["precision"], e["quantization"], accuracy, agreement, r["batch"],
                         f"{r['p50']:.3f}", f"{r['p99']:.3f}", f"{r['throughput_per_s']:.0f}",
                         f"{e['size_bytes'] / 1024:.1f}", mem, _budgets(e.get("budgets") or {}),
                         f"dominated by {dominated_by[e['name']]}" if e["name"] in dominated_by else ""])
    return tabulate(rows, headers=["model", "target", "precision", "quant", "accuracy [95% CI]", "agreement",
                                   "batch", "p50 ms", "p99 ms", "samples/s", "size KiB", "peak MiB", "budgets", ""],
                    tablefmt="github")


def _budgets(budgets: dict[str, Any]) -> str:
    """'p99 3.1/5 ms PASS, 137/400 MiB PASS' from a profile's budgets."""
    parts = [f"{label}{b['measured']:.3g}/{b['budget']:g} {unit} {'PASS' if b['pass'] else 'FAIL'}"
             for key, label, unit in (("latency_ms", "p99 ", "ms"), ("memory_mb", "", "MiB"))
             if isinstance(b := budgets.get(key), dict)]
    return ", ".join(parts) or "-"


def engine_label(e: dict[str, Any]) -> str:
    """'student int8/ptq': an engine's model, precision and quantization (none: left out)."""
    return f"{e['model']} {e['precision']}{'/' + e['quantization'] if e['quantization'] != 'none' else ''}"


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against batch-1 p50 latency for every engine, one marker per model, with the Pareto front."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"teacher": "s", "student": "o", "scratch": "^"}
    engines = report["engines"]
    points = [(e["latency_ms"]["p50"], e["accuracy"] * 100) for e in engines]
    for e, (x, y) in zip(engines, points, strict=True):
        ci = e.get("accuracy_ci")
        if ci:
            ax.errorbar(x, y, yerr=[[y - ci[0] * 100], [ci[1] * 100 - y]], fmt="none", ecolor="gray", capsize=3,
                        zorder=2)
        ax.scatter(x, y, marker=markers.get(e["model"], "x"), s=60, zorder=3)
        ax.annotate(f"{engine_label(e)}\n{e['target']}", (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = [points[i] for i in pareto_front(points)]
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black", linestyle="--", linewidth=1,
            label="Pareto front (faster and more accurate than the rest)", zorder=2)
    scratch = report.get("models", {}).get("scratch")
    if scratch:   # no scratch engine is built: its PyTorch accuracy is the bar distillation has to clear
        ax.axhline(scratch["accuracy"] * 100, color="tab:red", linestyle=":", linewidth=1,
                   label="student trained without the teacher (scratch, PyTorch)")
        if scratch.get("accuracy_ci"):
            low, high = scratch["accuracy_ci"]
            ax.axhspan(low * 100, high * 100, color="tab:red", alpha=0.08)
    ax.legend(fontsize=8)
    ax.set(xlabel="p50 latency at batch 1 (ms)", ylabel="accuracy on the engine (%)", xscale="log",
           title="edgekd: accuracy against latency")
    ax.grid(True, alpha=0.3)
    save_png(plt, fig, path)


def plot_batches(report: dict[str, Any], path: Path) -> None:
    """p50 latency per sample against batch size, one line per engine (log-log)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in report["engines"]:
        rows = sorted(e["per_batch"], key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rows], [r["p50"] / r["batch"] for r in rows], marker="o",
                label=f"{engine_label(e)} ({e['target']})")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="batch size", ylabel="p50 latency per sample (ms)",
           title="edgekd: latency per sample against batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_png(plt, fig, path)


def plot_classes(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of per-class accuracy (teacher, student, scratch, student engine), retention under each class."""
    pc = report["per_class"]
    rows = _shown_classes(pc["rows"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    width = 0.8 / len(pc["columns"])
    for i, key in enumerate(pc["columns"]):
        values = [np.nan if r.get(key) is None else r[key] * 100 for r in rows]
        ax.bar(x + (i - (len(pc["columns"]) - 1) / 2) * width, values, width, label=key.replace("_", " "))
    ax.set_xticks(x, [f"{r['class']}\n" + ("-" if r["retention"] is None else f"{r['retention'] * 100:.0f}%")
                      for r in rows], fontsize=7)
    ax.set(ylabel="accuracy on the test split (%)", xlabel="class (retention = student / teacher)",
           ylim=(0, 118), yticks=range(0, 101, 20), title="edgekd: accuracy per class")   # room above 100%: legend
    ax.legend(fontsize=7, ncols=len(pc["columns"]), loc="upper center")
    ax.grid(True, axis="y", alpha=0.3)
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


def write(run_dir: str | Path, task: Any, skipped: list[dict[str, Any]] | None = None,
          **options: Any) -> dict[str, Any]:
    """The one write path of a run's report, whatever its task (an edgekd.tasks Task): report.json as the task
    assembles it from what the stages wrote into run_dir, report.md as the task renders it, the figures it links."""
    run_dir = Path(run_dir)
    report = task.report(run_dir, list(skipped or []), **options)
    fileio.write_json(run_dir / "report.json", report)
    fileio.write_text(run_dir / "report.md", task.markdown(report))
    task.figures(report, run_dir)
    return report


def classification_report(run_dir: Path, skipped: list[dict[str, Any]], targets: tuple[str, ...] | None = None,
                          extra: dict[str, Any] | None = None, ship_slower_int8: bool = False) -> dict[str, Any]:
    """A classifier's report: metrics.json's models and the profile-<target>.json files' engines (all, or those of
    `targets`); the headline never picks an INT8 engine slower than its FP32 engine unless `ship_slower_int8`."""
    from edgekd.distillation import read_metrics

    if not (run_dir / "metrics.json").is_file():
        raise EdgekdError(f"{run_dir}: not a run folder (no metrics.json); run `edgekd distill` or `edgekd run` "
                          "into it first")
    files = sorted(run_dir.glob("profile-*.json"))
    if targets is not None:
        files = [run_dir / f"profile-{t}.json" for t in targets if (run_dir / f"profile-{t}.json").is_file()]
    engines = [engine_entry(p, run_dir) for f in files for p in json.loads(f.read_text())]
    names = list(targets) if targets else [f.stem.removeprefix("profile-") for f in files]
    return build_report(read_metrics(run_dir), engines, skipped, names, extra, ship_slower_int8=ship_slower_int8)


def figures(report: dict[str, Any], run_dir: Path) -> None:
    """A classifier's report.png (accuracy against latency), report_batch.png and report_classes.png."""
    if report["engines"]:
        plot(report, run_dir / "report.png")
        plot_batches(report, run_dir / "report_batch.png")
    if report.get("per_class"):
        plot_classes(report, run_dir / "report_classes.png")
