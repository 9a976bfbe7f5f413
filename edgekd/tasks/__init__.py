"""Task contracts: what a model of each task takes and gives, and how its outputs are scored and reported.

One object per task owns the facts every stage reads instead of assuming them: the input/output signature
(tensor names, dtypes, which axes are dynamic), example and timing inputs, the evaluation metrics computed on
numpy outputs (the same function on PyTorch outputs, on the ONNX graph and on the built engine), the parity
figures of an export, the run context the torch-side stages read a run folder through, and the report: what
report.json holds and how report.md shows it. The base class reports any task from its metrics as the engines
measured them (edgekd.profile); a task adds its own sections. numpy only: the device runtime reads it.

    task = tasks.get("embedding")
    task.signature((64,), 384)   # {"input": {"name": "input_ids", "shape": ["batch", "seq"], ...}, "output": ...}

Adding a task (detection, regression) is one more module in this folder defining `TASK = MyTask()` (a `Task`
subclass): the registry, bundle manifests, the runtime, the profiler and the report find it by its file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.plugins import declared

EVAL_BATCH = 64   # samples per engine call when a task scores an engine on an eval set


class Task:
    """The contract of one task. Subclasses set the class attributes and the methods below."""

    name: str = ""
    input_name: str = ""
    output_name: str = ""
    input_dtype: str = "float32"
    dynamic_axes: tuple[str, ...] = ("batch",)   # the input's symbolic dimensions, from axis 0
    metric_keys: tuple[str, ...] = ()            # the metrics `evaluate` returns, in report order
    eval_arrays: dict[str, str] = {}             # an eval set's arrays (eval.npz) and their dtypes
    runtimes: tuple[str, ...] | None = None      # the runtimes that build its engines (None: all)
    recipe_section: str = ""                     # the recipe section that makes a run this task's ("": the default)
    context: Any = None                          # its run context, what the torch-side stages read (a lazy class)
    # A task that trains its own way: lazy functions (recipe, out, *, progress) -> the text `edgekd teacher` and
    # `edgekd distill` print (`edgekd run` trains with distill_command). None: edgekd.distillation's stages.
    teacher_command: Any = None
    distill_command: Any = None
    title: str = ""                              # report.md's title
    sample: str = "sample"                       # what one input is called in the report ("sentence")
    details: tuple[str, ...] = ()                # report.json keys report.md shows as JSON at its end

    def signature(self, input_shape: tuple[Any, ...], output_dim: int, *, batch: int | str = "batch",
                  **extra: Any) -> dict[str, dict[str, Any]]:
        """The manifest's "input" and "output" entries: name, shape (dynamic axes by name), dtype (+ extra)."""
        return {"input": {"name": self.input_name, "shape": [batch, *input_shape], "dtype": self.input_dtype,
                          **extra},
                "output": {"name": self.output_name, "shape": [batch, output_dim], "dtype": "float32"}}

    def sample_shape(self, manifest_shape: list[Any]) -> tuple[int | None, ...]:
        """The per-sample input shape of a manifest's input.shape; None for a dynamic axis."""
        return tuple(d if isinstance(d, int) else None for d in manifest_shape[1:])

    def zeros(self, batch: int, input_shape: tuple[Any, ...]) -> np.ndarray:
        """A smoke-test input: a batch of zeros, dynamic axes at length 1."""
        return np.zeros((batch, *(d if isinstance(d, int) else 1 for d in input_shape)), self.input_dtype)

    def check_eval(self, data: dict[str, Any], input_shape: tuple[Any, ...], output_dim: int) -> dict[str, Any]:
        """An eval set's arrays with their shapes checked (without reading them: they may be memory-mapped)."""
        raise NotImplementedError

    def parity(self, reference: np.ndarray, ours: np.ndarray) -> dict[str, float]:
        """How far an exported graph's outputs `ours` are from PyTorch's `reference` on the same inputs."""
        raise NotImplementedError

    def evaluate(self, run: Callable[[np.ndarray], np.ndarray], data: dict[str, np.ndarray],
                 size: int = EVAL_BATCH) -> dict[str, Any]:
        """Metrics of the outputs of `run` (an engine, a session) on an eval set."""
        raise NotImplementedError

    def timing_batch(self, data: dict[str, np.ndarray] | None, batch: int, sample_shape: tuple[Any, ...],
                     input_range: tuple[float, float] | None) -> np.ndarray:
        """One input batch to time: eval samples where the bundle has them, else seeded data of the right kind."""
        raise NotImplementedError

    # --- the report (edgekd.report.write asks the run's task for report.json, report.md and the figures)

    def report(self, run_dir: Path, skipped: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        """report.json: this task's engines as profiled in run_dir (profile-*.json), each student engine's latency
        per sample against the teacher's engine (latency_ratios), the headline, and what was not built here."""
        engines = [{**p, "path": str(Path(p["bundle"]).relative_to(run_dir)) if Path(p["bundle"]).is_relative_to(
                   run_dir) else p["bundle"]} for f in sorted(run_dir.glob("profile-*.json"))
                   for p in json.loads(f.read_text()) if p.get("task") == self.name]
        ratios = latency_ratios(engines)
        return {"task": self.name, "engines": engines, "latency_ratios": ratios,
                "headline": self.headline(engines, ratios), "skipped": skipped}

    def headline(self, engines: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The engine a user would ship: the fastest at its smallest batch among the student engines within 0.005 of
        the best on the first metric (higher is better), with its metrics and speed-up over the teacher."""
        key = self.metric_keys[0]
        students = [e for e in engines if e["model"] == "student" and e["metrics"].get(key) is not None]
        if not students or not ratios:
            return None
        best = max(e["metrics"][key] for e in students)
        pick = min((e for e in students if e["metrics"][key] >= best - 0.005),
                   key=lambda e: ms_per_sample(min(e["rows"], key=lambda r: r["batch"])))
        name = f"student {pick['precision']} {pick['quantization']}"
        mine = [r for r in ratios if r["engine"] == name and r["target"] == pick["target"]]
        speed = ", ".join(f"{1 / r['ratio']:.1f}x faster per {self.sample} at batch {r['batch']}" for r in mine)
        return {"engine": name, "target": pick["target"], "metrics": pick["metrics"], "ratios": mine,
                "text": self.headline_text(name, pick["metrics"], f"runs {speed} on target {pick['target']}")}

    def headline_text(self, engine: str, metrics: dict[str, Any], speed: str) -> str:
        return f"the {engine} engine scores {', '.join(f'{k} {_figure(metrics.get(k))}' for k in self.metric_keys)} " \
               f"and {speed}"

    def markdown(self, report: dict[str, Any]) -> str:
        """report.md: the headline, the task's own sections, the engines, latency against the teacher, what was not
        built, then `details` as JSON."""
        lines = [f"# edgekd report: {self.title or self.name}", ""]
        if report.get("headline"):
            lines += [f"**Headline:** {report['headline']['text']}.", ""]
        lines += [*self.report_sections(report), "## Engines (metrics measured on the engine's own outputs of the "
                  f"bundle's eval {self.sample}s)", "", *self.engines_table(report["engines"]).splitlines()]
        if report.get("latency_ratios"):
            lines += ["", f"## Latency per {self.sample} against the teacher (fp32 engine, same batches)", "",
                      *table(["engine", "batch", f"student ms/{self.sample}", f"teacher ms/{self.sample}", "ratio",
                              "speed-up"],
                             [[r["engine"], r["batch"], f"{r['student_ms']:.3f}", f"{r['teacher_ms']:.3f}",
                               f"{r['ratio']:.3f}", f"{1 / r['ratio']:.1f}x"] for r in report["latency_ratios"]])]
        if report.get("skipped"):
            lines += ["", "## Not built here", ""] + [f"- {x['target']}: {x['reason']}" for x in report["skipped"]]
        for key in self.details:
            if report.get(key):
                lines += ["", f"## {key}", "", "```json", json.dumps(report[key], indent=2), "```"]
        return "\n".join(lines) + "\n"

    def report_sections(self, report: dict[str, Any]) -> list[str]:
        """report.md lines of the task's own, between the headline and the engines (none by default)."""
        return []

    def engines_table(self, engines: list[dict[str, Any]]) -> str:
        """One row per engine and batch size: the task's metrics on the engine, size and latency."""
        rows = [[e["target"], e["model"], e["precision"], e["quantization"],
                 *(_figure(e["metrics"].get(k)) for k in self.metric_keys), f"{e['size_bytes'] / 2**20:.1f}",
                 r["batch"], f"{r['p50']:.2f}", f"{ms_per_sample(r):.3f}", f"{1000 / ms_per_sample(r):.0f}"]
                for e in engines for r in e["rows"]]
        return "\n".join(table(["target", "model", "precision", "quant", *self.metric_keys, "size MiB", "batch",
                                 "p50 ms", f"ms/{self.sample}", f"{self.sample}s/s"], rows))

    def metrics_table(self, named: dict[str, dict[str, Any]]) -> list[str]:
        """A markdown table of the task's metrics, one row per name."""
        return table(["model", *self.metric_keys], [[k, *(_figure(m.get(f)) for f in self.metric_keys)]
                                                    for k, m in named.items()])

    def figures(self, report: dict[str, Any], run_dir: Path) -> None:
        """Write the figures report.md links into run_dir (none by default)."""


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """A GitHub markdown table, one line per row."""
    return [f"| {' | '.join(map(str, r))} |" for r in (headers, ["---"] * len(headers), *rows)]


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def ms_per_sample(row: dict[str, Any]) -> float:
    return row["p50"] / row["batch"]


def latency_ratios(engines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and batch: each student engine's ms per sample / the (first) teacher engine's on that target."""
    teacher: dict[str, dict[int, float]] = {}
    for e in engines:
        if e["model"] == "teacher":
            teacher.setdefault(e["target"], {r["batch"]: ms_per_sample(r) for r in e["rows"]})
    return [{"target": e["target"], "engine": f"student {e['precision']} {e['quantization']}", "batch": r["batch"],
             "student_ms": ms_per_sample(r), "teacher_ms": t[r["batch"]], "ratio": ms_per_sample(r) / t[r["batch"]]}
            for e in engines if e["model"] == "student" and (t := teacher.get(e["target"])) for r in e["rows"]
            if r["batch"] in t]


# Each task's own helpers, importable from here, and the registry: every module of this folder that defines TASK
# (imported once Task exists: they subclass it).
from edgekd.tasks.classification import per_class_accuracy  # noqa: E402
from edgekd.tasks.sentence_embedding import embed, embedding_metrics, pad_batch, unpad  # noqa: E402

__all__ = ["CLASSIFICATION", "EMBEDDING", "EVAL_BATCH", "TASKS", "Task", "embed", "embedding_metrics", "get",
           "of_manifest", "of_recipe", "pad_batch", "per_class_accuracy", "unpad"]

TASKS: dict[str, Task] = {t.name: t for t in declared(__name__, "TASK")}
CLASSIFICATION = TASKS["classification"]
EMBEDDING = TASKS["embedding"]


def get(name: Any, where: str = "task") -> Task:
    """The task named `name`; a bundle or ONNX file naming another is refused (it was made by another edgekd)."""
    if name not in TASKS:
        raise EdgekdError(f"{where}: unknown task {name!r} (this edgekd knows {', '.join(TASKS)}); use an edgekd "
                          "that made it, or rebuild it with this one")
    return TASKS[name]


def of_manifest(manifest: dict[str, Any], where: str) -> Task:
    """A bundle manifest's task; bundles written before tasks were recorded are classifiers."""
    return get(manifest.get("task", CLASSIFICATION.name), f"{where}: manifest.json task")


def of_recipe(recipe: Any) -> Task:
    """A recipe's task: the one whose recipe_section the recipe sets, else classification."""
    return next((t for t in TASKS.values() if t.recipe_section and getattr(recipe, t.recipe_section, None) is not None),
                CLASSIFICATION)
