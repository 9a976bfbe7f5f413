"""The only place that knows the stage order: distill -> export -> (quantize) -> build -> profile -> report.

A run folder holds everything: the checkpoints, recipe.toml and recipe-source.json (the recipe's own folder,
which its relative paths resolve against from any working directory) from `distill`, onnx/<model>.onnx from
`export`, onnx/student.<ptq|qat>-<scheme>.onnx from `quantize`, engines/<target>/<model>-<precision>[-<quant>]/
bundles from `build`, profile-<target>.json from `profile`, and report.json / report.md / report.png.
The stage commands compose to `run`: each reads what the previous one wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import compress, fileio, runfolder, streaming, tasks
from edgekd.bundle import read_manifest
from edgekd.data import Dataset, load_data
from edgekd.distillation import distill, student_inputs, teacher_inputs
from edgekd.engines import EngineSource, check_target, onnx_info, registry
from edgekd.engines import build as build_engine
from edgekd.errors import EdgekdError
from edgekd.models import add_import_dir, build_model, load_weights
from edgekd.recipe import Recipe, load_recipe
from edgekd.report import engine_entry, engine_label, int8_vs_fp32, write
from edgekd.targets import Target, load_target
from edgekd.train import accuracy, predict_logits

MODELS = ("teacher", "student", "scratch")
DEFAULT_TARGETS = ("x86-cpu-ort",)
RECIPE_SOURCE = "recipe-source.json"   # {"recipe_dir": the absolute folder of the recipe the run was made from}


def record_recipe_dir(out: str | Path, recipe: Recipe) -> None:
    """Write out/recipe-source.json, so that the relative paths of out/recipe.toml resolve against the recipe's own
    folder from any working directory. A recipe read from the run folder itself keeps the existing record."""
    out = Path(out)
    base = Path(recipe.base_dir).resolve()
    if base == out.resolve() and (out / RECIPE_SOURCE).is_file():
        return
    fileio.write_json(out / RECIPE_SOURCE, {"recipe_dir": str(base)})


def load_run_recipe(run_dir: str | Path) -> Recipe:
    """A run folder's recipe.toml, with its relative paths (and module:function specs) resolved against the
    folder recorded in recipe-source.json (the run folder itself for runs made before it existed)."""
    run_dir = Path(run_dir)
    path = run_dir / "recipe.toml"
    if not path.is_file():
        raise EdgekdError(f"{run_dir}: not a run folder (no recipe.toml); run `edgekd distill` first")
    source = run_dir / RECIPE_SOURCE
    if not source.is_file():
        return load_recipe(path)
    try:
        folder = json.loads(source.read_text()).get("recipe_dir")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        folder = None
    if not isinstance(folder, str) or not Path(folder).is_dir():
        raise EdgekdError(f"{source}: expected {{\"recipe_dir\": an existing folder}}, got "
                          f"{source.read_text()[:200]!r}; rerun `edgekd distill` or delete the file to resolve paths "
                          "against the run folder")
    add_import_dir(folder)   # before loading: the recipe's model specs are checked as it loads
    return dataclasses.replace(load_recipe(path), base_dir=folder)


def run_task(run_dir: str | Path) -> tasks.Task:
    """A run folder's task, from its recipe (edgekd.tasks.of_recipe); classification before a recipe is saved there."""
    return tasks.of_recipe(load_run_recipe(run_dir)) if (Path(run_dir) / "recipe.toml").is_file() \
        else tasks.CLASSIFICATION


def context(run_dir: str | Path) -> RunContext:
    """The run folder as the shared stages read it: its task's run context (a classifier's RunContext, a
    sentence-embedding TextContext)."""
    return run_task(run_dir).context(run_dir)


def _newer(output: Path, *inputs: Path) -> bool:
    """`output` exists and is at least as new as every input (for files the provenance record does not cover)."""
    return output.exists() and all(output.stat().st_mtime >= p.stat().st_mtime for p in inputs if p.exists())


def _stage(progress: bool, name: str, fn: Callable[[], Any], note: Callable[[Any], str] | None = None) -> Any:
    """Run one stage and, with `progress`, print one line for it with its wall time (stderr)."""
    start = time.perf_counter()
    result = fn()
    if progress:
        detail = f" ({note(result)})" if note else ""
        print(f"{name}: {time.perf_counter() - start:.1f} s{detail}", file=sys.stderr, flush=True)
    return result


class RunContext:
    """A run folder with its recipe and data loaded once (the data split is deterministic from the recipe).
    What the shared stages ask of a run (models, example input, parity inputs, eval set, engine source) is
    answered here for classifiers and by edgekd.embedding.TextContext for sentence embeddings."""

    task = tasks.CLASSIFICATION

    def __init__(self, run_dir: str | Path, recipe: Recipe | None = None, data: Dataset | None = None) -> None:
        self.dir = Path(run_dir)
        self.recipe = recipe if recipe is not None else load_run_recipe(self.dir)
        self.data = data or load_data(self.recipe.data, self.recipe.base_dir)

    def spec(self, model: str) -> str:
        return self.recipe.teacher.model if model == "teacher" else self.recipe.student.model

    def weights(self, model: str) -> Path:
        """The model's checkpoint; refused when the folder records it as made from another recipe than the
        run's (or from a teacher that has changed since): a folder whose files come from different runs."""
        if model not in MODELS:
            raise EdgekdError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
        path = self.dir / f"{model}.safetensors"
        if not path.is_file() and model == "teacher" and self.recipe.teacher.checkpoint:
            path = self.recipe.path(self.recipe.teacher.checkpoint)   # distilled from a given teacher
        if not path.is_file():
            raise EdgekdError(f"{path}: not found; run `edgekd distill` into {self.dir} first")
        if path.parent == self.dir:
            expected = teacher_inputs(self.recipe) if model == "teacher" else student_inputs(self.recipe)
            differ = runfolder.stale(self.dir, path.name, expected)
            if differ:
                raise EdgekdError(f"{path}: not made from this run's recipe and files ({'; '.join(differ)}); run "
                                  f"`edgekd distill` into {self.dir} again, or use another folder")
        return path

    def weights_input(self, model: str) -> dict[str, str]:
        """The made_from entry of an artifact built from the model's checkpoint (edgekd.runfolder)."""
        return dict([runfolder.file_key(self.dir, self.weights(model))])

    def fresh_onnx(self, model: str) -> bool:
        """onnx/<model>.onnx exists and the folder records it as exported from the current checkpoint."""
        path = self.onnx_path(model)
        return path.is_file() and runfolder.stale(self.dir, self.rel(path), self.weights_input(model)) == []

    def rel(self, path: Path) -> str:
        return path.relative_to(self.dir).as_posix()

    def model(self, name: str) -> nn.Module:
        model = build_model(self.spec(name), self.data.input_shape, self.data.num_classes)
        load_weights(model, self.weights(name))
        return model.eval()

    def metadata(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"model": name, "model_spec": self.spec(name), "class_names": json.dumps(list(self.data.class_names)),
                "normalization": json.dumps(self.data.normalization), **(extra or {})}

    def eval_data(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.data.x_test, self.data.y_test, predict_logits(model, self.data.x_test)

    def example(self) -> torch.Tensor:
        return torch.from_numpy(self.data.x_test[:2])

    def parity_inputs(self) -> np.ndarray:
        x = self.data.x_test   # a streamed test split: the first 512 (parity is a check of the export, not accuracy)
        return x[:512] if streaming.is_lazy(x) else x

    def export_options(self, name: str) -> dict[str, Any]:
        return {}

    def target(self, target: Target) -> Target:
        return target

    # what edgekd.compress.quantize_student asks of a run (the classifier's; TextContext has the embedding's)
    calibration_batches = compress.calibration_batches
    qat_fit = compress.qat_fit

    def quant_example(self) -> tuple[torch.Tensor, tuple[dict, ...] | None]:
        """(example batch torch.export traces, its dynamic shapes: None = the batch axis only)."""
        return torch.from_numpy(self.data.x_train[:2]), None

    def quant_accuracy(self, model: nn.Module, set_mode: Any, split: str) -> float:
        """Top-1 accuracy on the "val" or "test" split."""
        return accuracy(model, getattr(self.data, f"x_{split}"), getattr(self.data, f"y_{split}"), set_mode=set_mode)

    def quant_scores(self, model: nn.Module, set_mode: Any, onnx_path: Path) -> dict[str, Any]:
        return {"pytorch_accuracy": self.quant_accuracy(model, set_mode, "test")}

    def engine_source(self, model: str, onnx_path: Path | None, quantization: str) -> Any:
        return EngineSource(model_name=model, onnx_path=onnx_path, weights_path=self.weights(model),
                            model_spec=self.spec(model), input_shape=self.data.input_shape,
                            num_classes=self.data.num_classes, class_names=self.data.class_names,
                            normalization=self.data.normalization, quantization=quantization,
                            preprocessing=None if self.data.preprocess is None else self.data.preprocess.to_dict())

    def onnx_path(self, name: str, quantization: str = "none", scheme: str = "") -> Path:
        suffix = "" if quantization == "none" else f".{quantization}-{scheme}"
        return self.dir / "onnx" / f"{name}{suffix}.onnx"


def export(run_dir: str | Path, model: str = "student", *, ctx: RunContext | None = None,
           resume: bool = False) -> dict[str, Any]:
    """Export a trained model to ONNX and measure its parity with PyTorch on the test split. With `resume`, an
    ONNX the run folder records as exported from the current checkpoint (and its parity record) is kept."""
    from edgekd.export import export_onnx, parity

    with runfolder.locked(ctx.dir if ctx else run_dir):
        ctx = ctx or context(run_dir)
        path = ctx.onnx_path(model)
        record = path.with_suffix(".parity.json")
        if resume and ctx.fresh_onnx(model) and _newer(record, path):
            return json.loads(record.read_text())
        net = ctx.model(model)
        export_onnx(net, ctx.example(), path, metadata=ctx.metadata(model), task=ctx.task,
                    **ctx.export_options(model))
        runfolder.record(ctx.dir, ctx.rel(path), ctx.weights_input(model))
        check = parity(net, path, ctx.parity_inputs(), task=ctx.task)
        result = {"model": model, "path": str(path), "size_bytes": path.stat().st_size, "parity": check}
        fileio.write_json(record, result)
        return result


def quantized_onnx(ctx: RunContext, target: Target) -> tuple[dict[str, Path], list[str]]:
    """The student's Q/DQ ONNX files for the target's scheme that `edgekd quantize` wrote ({"ptq": path, ...}),
    and why int8 engines cannot be built when there are none (or they were made from another student)."""
    scheme = target.quant_scheme
    found: dict[str, Path] = {}
    stale = []
    student = ctx.weights_input("student")
    for q in registry.QUANTIZATIONS:
        path = ctx.onnx_path("student", q, scheme)
        if path.is_file():
            differ = runfolder.stale(ctx.dir, ctx.rel(path), student)   # None: an older folder, no record
            if not differ:
                found[q] = path
            else:
                stale.append(f"{path} is stale ({'; '.join(differ)})")
    if found:
        return found, []
    how = f"run `edgekd quantize {ctx.dir} --target {target.path or target.name}`"
    if stale:
        return {}, [f"{'; '.join(stale)}; {how} again"]
    return {}, [f"no quantized student for scheme {scheme} in {ctx.dir / 'onnx'} ({target.quant_scheme_reason}); "
                f"{how} first"]


def build(run_dir: str | Path, target: str | Target, *, models: tuple[str, ...] = ("teacher", "student"),
          ctx: RunContext | None = None, quantized: dict[str, Path] | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Build every float engine the target asks for, and int8 engines from the student's Q/DQ ONNX files of the
    target's scheme (`quantized`, keyed by "ptq"/"qat"; default: what `edgekd quantize` wrote into the run folder),
    for `models`. Engines that cannot be built here (no TensorRT, no GPU, no quantized student) are listed under
    "skipped" with the reason instead of failing the run. With `resume`, a bundle the run folder records as built
    from the same source and target is kept.

    Returns {"target", "built": [bundle paths], "engines": [{model, precision, quantization, path, reused}],
    "skipped": [{target, model, precision, quantization, reason}]}."""
    with runfolder.locked(ctx.dir if ctx else run_dir):
        ctx = ctx or context(run_dir)
        return _build(ctx, ctx.target(load_target(target)), models, quantized, resume)


def _build(ctx: RunContext, target: Target, models: tuple[str, ...], quantized: dict[str, Path] | None,
           resume: bool) -> dict[str, Any]:
    status = check_target(target)
    if status == "ok" and ctx.task.runtimes is not None and target.runtime not in ctx.task.runtimes:
        status = f"target {target.name}: {ctx.task.name} engines are built for {', '.join(ctx.task.runtimes)} only"
    problem = "" if status == "ok" else status
    from_onnx = registry.backend(target.runtime).source == "onnx"   # else built from the weights (torch)
    int8_missing: list[str] = []
    if quantized is None and "int8" in target.precisions and "student" in models and not problem:
        quantized, int8_missing = quantized_onnx(ctx, target)
    # Read every checkpoint and existing ONNX this build uses before writing any bundle, so that a bad
    # student.onnx fails the build with the teacher's bundle untouched instead of rebuilt.
    nets = {model: ctx.model(model) for model in models}
    if not problem and from_onnx:
        for path in [ctx.onnx_path(m) for m in models] + [Path(p) for p in (quantized or {}).values()]:
            if path.is_file():
                onnx_info(path)
    built: list[str] = []
    engines: list[dict[str, Any]] = []
    skipped = [_skipped(target, "student", "int8", "-", r) for r in int8_missing]
    for model in models:
        net = nets[model]
        evals = None
        # (precision, quantization, Q/DQ ONNX) in the target's order: int8 only for the student, one per ONNX
        int8 = [("int8", q, Path(p)) for q, p in (quantized or {}).items()] if model == "student" else []
        jobs = [job for p in target.precisions for job in (int8 if p == "int8" else [(p, "none", None)])]
        for precision, quantization, qpath in jobs:
            name = f"{model}-{precision}" + ("" if quantization == "none" else f"-{quantization}")
            out = ctx.dir / "engines" / target.name / name
            if problem:
                skipped.append(_skipped(target, model, precision, quantization, problem))
                continue
            onnx_path = qpath
            if from_onnx and onnx_path is None:
                onnx_path = ctx.onnx_path(model)
                if not ctx.fresh_onnx(model):   # missing, or left by an earlier checkpoint: export again
                    export(ctx.dir, model, ctx=ctx)
            made_from = (dict([runfolder.file_key(ctx.dir, onnx_path)]) if onnx_path is not None
                         else ctx.weights_input(model))
            made_from["target"] = runfolder.digest(dataclasses.asdict(target))
            reused = resume and (out / "manifest.json").is_file() and runfolder.stale(ctx.dir, ctx.rel(out),
                                                                                      made_from) == []
            if not reused:
                evals = evals if evals is not None else ctx.eval_data(net)
                try:
                    build_engine(ctx.engine_source(model, onnx_path, quantization), target, precision, out,
                                 eval_data=evals)
                    runfolder.record(ctx.dir, ctx.rel(out), made_from)
                except EdgekdError as e:
                    if not registry.needs_accelerator(target.device):   # a GPU engine this host may not build
                        raise
                    skipped.append(_skipped(target, model, precision, quantization, str(e)))
                    continue
            built.append(str(out))
            engines.append({"model": model, "precision": precision, "quantization": quantization,
                            "path": str(out), "reused": reused})
    return {"target": target.name, "quant_scheme": {"scheme": target.quant_scheme,
                                                    "reason": target.quant_scheme_reason},
            "built": built, "engines": engines, "skipped": skipped}


def _skipped(target: Target, model: str, precision: str, quantization: str, reason: str) -> dict[str, str]:
    """An engine the build could not make here, and why (the report lists it)."""
    return {"target": target.name, "model": model, "precision": precision, "quantization": quantization,
            "reason": reason}


def profile(run_dir: str | Path, target: str | Target, *, quick: bool = False,
            resume: bool = False) -> list[dict[str, Any]]:
    """Profile every bundle built for the target; writes profile-<target>.json and returns the results.

    Each bundle is profiled in its own `python -m edgekd.runtime profile` process, as on the device: the
    training process (torch and its threads) would otherwise disturb the timings, and the memory figure is that
    process's own peak (edgekd.profile). With `resume`, a profile newer than every bundle is kept.
    """
    with runfolder.locked(run_dir):
        run_dir, target = Path(run_dir), load_target(target)
        folder = run_dir / "engines" / target.name
        bundles = sorted(p for p in folder.iterdir() if (p / "manifest.json").is_file() and not fileio.is_temp(p)
                         ) if folder.is_dir() else []
        if not bundles:
            raise EdgekdError(f"{folder}: no engines built for target {target.name}; run `edgekd build {run_dir} "
                              f"--target {target.path or target.name}` first")
        for bundle in bundles:  # a tampered or stale bundle fails before any other bundle's manifest gets metrics
            read_manifest(bundle)
            differ = runfolder.stale(run_dir, bundle.relative_to(run_dir).as_posix())
            if differ:
                raise EdgekdError(f"{bundle}: stale, built from other files than the run's ({'; '.join(differ)}); "
                                  f"rebuild it with `edgekd build {run_dir} --target {target.name}`")
        record = run_dir / f"profile-{target.name}.json"
        if resume and _newer(record, *(b / "manifest.json" for b in bundles)):
            return json.loads(record.read_text())
        timing = ["--warmup", "3", "--min-runs", "10", "--min-seconds", "0.2"] if quick else []
        results = [profile_in_subprocess(bundle, ["--save-metrics", *timing]) for bundle in bundles]
        fileio.write_json(record, results)
        return results


def profile_in_subprocess(bundle: Path, args: list[str]) -> dict[str, Any]:
    """`python -m edgekd.runtime profile BUNDLE --json ... *args` in a fresh process, as on the device; returns
    its result (see edgekd.profile.profile_bundle)."""
    with tempfile.TemporaryDirectory(prefix="edgekd-profile-") as tmp:
        out = Path(tmp) / "profile.json"
        proc = subprocess.run([sys.executable, "-m", "edgekd.runtime", "profile", str(bundle), "--json", str(out),
                               *args], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            raise EdgekdError(f"profiling {bundle} failed: {lines[-1].removeprefix('error: ')}")
        return json.loads(out.read_text())


def report(run_dir: str | Path, targets: tuple[str, ...] | None = None,
           skipped: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None, *,
           ship_slower_int8: bool = False) -> dict[str, Any]:
    """Assemble report.json/.md (+ figures) from what the stages wrote into the run folder, as its task reports
    (edgekd.report.write). A classifier's headline never picks an INT8 engine slower than its FP32 engine unless
    `ship_slower_int8`."""
    with runfolder.locked(run_dir):
        return write(run_dir, run_task(run_dir), skipped, targets=targets, extra=extra,
                     ship_slower_int8=ship_slower_int8)


def run(recipe: Recipe, out: str | Path, *, targets: tuple[str | Target, ...] = DEFAULT_TARGETS,
        device: str = "auto", progress: bool = True, quick_profile: bool = False,
        resume: bool = False, reuse_teacher: bool = False) -> dict[str, Any]:
    """The whole pipeline for one recipe: teacher, distill (+ scratch), export, quantize, build, profile, report.

    Targets and model specs are checked before any data loads; with `resume`, stages whose outputs are complete
    and newer than their inputs are skipped (trained models, ONNX files, quantized students, bundles, profiles).
    A task that trains its own way (sentence embeddings: edgekd.embedding) trains with its distill_command, then
    the same stages."""
    out = Path(out)
    loaded = [load_target(t) for t in targets]   # resolved once: a bad target fails before training anything
    task = tasks.of_recipe(recipe)
    with runfolder.locked(out):
        if task.distill_command is not None:
            _import_torchao_quietly()   # transformers imports torchao when it is installed
            task.distill_command(recipe, out, progress=progress)
            ctx = task.context(out, recipe)
        else:
            ctx = RunContext(out, recipe, load_data(recipe.data, recipe.base_dir))
            distill(recipe, out, device=device, progress=progress, data=ctx.data, resume=resume,
                    reuse_teacher=reuse_teacher)
        return engines(ctx, loaded, device=device, progress=progress, quick_profile=quick_profile, resume=resume)


def engines(ctx: RunContext, loaded: list[Target], *, device: str = "auto", progress: bool = True,
            quick_profile: bool = False, resume: bool = False, profile_here: bool = True) -> dict[str, Any]:
    """Everything after training, for a run folder with a distilled student, as the stage commands do it: export,
    quantize (PTQ, QAT-KD) for each target's scheme, build (which picks the quantized student up), profile, report.
    One line per stage with its time when `progress`. Without `profile_here` (the targets are other machines) the
    bundles are built and listed under "built_not_profiled" for profiling on the device."""
    out = ctx.dir
    recipe = ctx.recipe
    exports = {m: _stage(progress, f"export {m}", lambda m=m: export(out, m, ctx=ctx, resume=resume))
               for m in ("teacher", "student")}
    skipped: list[dict[str, Any]] = []
    profiled: list[str] = []
    unprofiled: list[str] = []
    quantized: dict[str, dict[str, Any]] = {}   # scheme -> quantize_student() result
    fallbacks: dict[str, dict[str, Any]] = {}
    for target in loaded:
        scheme = target.quant_scheme
        if (recipe.quantize.mode != "none" and "int8" in target.precisions and scheme != "none"
                and check_target(target) == "ok" and scheme not in quantized):
            quantized[scheme] = _stage(progress, f"quantize {recipe.quantize.mode} {scheme}",
                                       lambda s=scheme: quantize(out, s, ctx=ctx, device=device, progress=progress,
                                                        resume=resume), _quantize_note)
        result = _stage(progress, f"build {target.name}", lambda t=target: build(out, t, ctx=ctx, resume=resume),
                        _build_note)
        skipped += result["skipped"]
        if result["built"] and profile_here:
            profiles = _stage(progress, f"profile {target.name}",
                              lambda t=target: profile(out, t, quick=quick_profile, resume=resume))
            profiled.append(target.name)
            q = quantized.get(scheme) or {}
            if "ptq" in q.get("onnx", {}) and not recipe.quantize.ship_slower_int8 and ctx.task is tasks.CLASSIFICATION:
                decision = _stage(progress, f"int8 vs fp32 {target.name}",
                                  lambda t=target, p=profiles, q=q: int8_fallback(ctx, t, p, q, quick=quick_profile))
                if decision is not None:
                    fallbacks[target.name] = decision
        elif result["built"]:
            unprofiled += result["built"]
    extra: dict[str, Any] = {"export_parity": {m: e["parity"] for m, e in exports.items()},
                             "quant_scheme": {t.name: {"scheme": t.quant_scheme, "reason": t.quant_scheme_reason}
                                              for t in loaded if "int8" in t.precisions}}
    if unprofiled:
        extra["built_not_profiled"] = unprofiled
    if quantized:
        extra["quantization"] = {scheme: {k: v for k, v in q.items() if k not in ("qat_history", "onnx")}
                                 for scheme, q in quantized.items()}
    if fallbacks:
        extra["int8_fallback"] = fallbacks
    return _stage(progress, "report", lambda: report(out, tuple(profiled), skipped, extra=extra,
                                                     ship_slower_int8=recipe.quantize.ship_slower_int8))


def _ptq_verdict(ctx: RunContext, target: Target, profiles: list[dict[str, Any]]) -> dict[str, Any] | None:
    name = f"student-{target.name}-int8-ptq"
    return next((v for v in int8_vs_fp32([engine_entry(p, ctx.dir) for p in profiles]) if v["engine"] == name), None)


def int8_fallback(ctx: RunContext, target: Target, profiles: list[dict[str, Any]], quantized: dict[str, Any], *,
                  quick: bool = False) -> dict[str, Any] | None:
    """INT8 never ships slower than FP32 unless the recipe asks: when the student's PTQ engine profiled slower
    than its FP32 engine at one of the target's batch sizes, measure each layer's kernels in both (onnxruntime's
    profiler, at the slowest such batch), keep in float the layers INT8 slows down, rebuild and re-profile.

    Returns None when INT8 is not slower, else what was measured and chosen: "int8 with float layers" when the
    rebuilt engine beats FP32 at every batch size, else "fp32" (the report's headline then skips the INT8 engine).
    """
    from edgekd.quantize import quantizable_layers

    before = _ptq_verdict(ctx, target, profiles)
    if before is None or not before["slower_at_batches"]:
        return None
    decision: dict[str, Any] = {k: before[k] for k in ("engine", "speedup_vs_fp32", "slower_at_batches")}
    if not registry.backend(target.runtime).layer_times:
        measured = ", ".join(b.name for b in registry.backends().values() if b.layer_times)
        return {**decision, "chose": "fp32", "why": f"per-layer costs are measured on {measured} targets only"}
    batch = max(before["slower_at_batches"])
    rows = compress.layer_latency(ctx, ctx.onnx_path("student"), Path(quantized["onnx"]["ptq"]), batch, target.threads)
    keep = [r["layer"] for r in rows if r["int8_ms"] > r["fp32_ms"]]   # INT8 kernels slower than FP32's: float
    decision.update(layer_ms={"batch": batch, "rows": rows}, kept_float_for_speed=keep)
    skip = tuple(dict.fromkeys([*quantized.get("kept_float", []), *keep]))
    if not keep or set(skip) >= set(quantizable_layers(ctx.model("student"))):
        why = ("no layer's INT8 kernels are slower than its FP32 ones" if not keep else
               "every layer is slower in INT8")
        return {**decision, "chose": "fp32", "why": f"{why}; the INT8 engine is not shipped"}
    mixed = compress.ptq_keep_float(ctx, target.quant_scheme, skip,
                                    ctx.dir / "onnx" / f"student.ptq-{target.quant_scheme}-keep-float.onnx")
    runfolder.record(ctx.dir, ctx.rel(mixed), _quantized_from(ctx))
    build(ctx.dir, target, models=("student",), ctx=ctx, quantized={"ptq": mixed},
          resume=True)   # the float bundles stand; only the int8 one is made from a new ONNX
    after = _ptq_verdict(ctx, target, profile(ctx.dir, target, quick=quick))
    decision["after"] = after
    if after is not None and not after["slower_at_batches"]:
        return {**decision, "chose": "int8 with float layers",
                "why": f"kept {keep} in float (their INT8 kernels took longer than FP32's at batch {batch}); the "
                       f"rebuilt INT8 engine beats FP32 at every batch size"}
    return {**decision, "chose": "fp32", "why": f"kept {keep} in float, but the INT8 engine is still slower than "
                                                "FP32; it is not shipped"}


def _quantized_from(ctx: RunContext) -> dict[str, str]:
    """What a quantized ONNX of the student is made from (its provenance record): the weights and [quantize]."""
    return {**ctx.weights_input("student"), **runfolder.sections(ctx.recipe, "quantize")}


def _quantize_note(result: dict[str, Any]) -> str:
    parts = [f"{k.upper()} {result[f'{k}_seconds']:.1f} s" for k in registry.QUANTIZATIONS if f"{k}_seconds" in result]
    return ", ".join(parts) or "reused"


def _build_note(result: dict[str, Any]) -> str:
    made = [engine_label(e) + (" (kept)" if e["reused"] else "") for e in result["engines"]]
    return ", ".join(made) + (f"; {len(result['skipped'])} skipped" if result["skipped"] else "") or "nothing built"


def quantize(run_dir: str | Path, scheme: str | None = None, *, target: str | Target | None = None,
             mode: str | None = None, ctx: RunContext | None = None, device: str = "auto", progress: bool = True,
             resume: bool = False) -> dict[str, Any]:
    """PTQ and (with mode "qat") quantization-aware distillation of the run's student, for `scheme` or the
    scheme of `target` (default x86-cpu-ort). `mode` overrides [quantize].mode (which must then not be "none").
    Writes onnx/student.<ptq|qat>-<scheme>.onnx, which `build` picks up.
    With `resume`, a result the run folder records as made from the current student and [quantize] is kept."""
    with runfolder.locked(ctx.dir if ctx else run_dir):
        ctx = ctx or context(run_dir)
        if not scheme:   # the scheme of `target` (default x86-cpu-ort), which must offer int8
            t = load_target(target or DEFAULT_TARGETS[0])
            if "int8" not in t.precisions:
                raise EdgekdError(f"target {t.name} ({t.path}): has no int8 precision, so nothing to quantize for")
            scheme = t.quant_scheme
        wanted = mode or ctx.recipe.quantize.mode
        if wanted == "none":
            raise EdgekdError(f"{ctx.dir}/recipe.toml: [quantize].mode is \"none\"; set it to \"ptq\" or \"qat\" "
                              "(or pass --mode)")
        if wanted != ctx.recipe.quantize.mode:
            ctx.recipe = dataclasses.replace(ctx.recipe, quantize=dataclasses.replace(ctx.recipe.quantize, mode=wanted))
        made_from = _quantized_from(ctx)
        record = ctx.dir / "onnx" / f"quantize-{scheme}.json"
        if resume and record.is_file():
            done = json.loads(record.read_text())
            kinds = ("ptq", "qat") if wanted == "qat" and ctx.recipe.quantize.epochs > 0 else ("ptq",)
            paths = [Path(done.get("onnx", {}).get(k, "")) for k in kinds]
            if all(p.is_file() and p.is_relative_to(ctx.dir) and runfolder.stale(ctx.dir, ctx.rel(p), made_from) == []
                   for p in paths):
                return done
        _import_torchao_quietly()
        compress.require_torchao()
        result = compress.quantize_student(ctx, scheme, device=device, progress=progress)
        for path in result["onnx"].values():
            if Path(path).is_relative_to(ctx.dir):
                runfolder.record(ctx.dir, ctx.rel(Path(path)), made_from)
        return result


def _import_torchao_quietly() -> None:
    """Import torchao with its import-time log noise muted: it logs a warning for each prebuilt kernel library
    it cannot load (CUDA-only .so files on a CPU host) and torch logs a deprecation torchao triggers; neither
    is the user's to fix, and they would bury a one-line error. An ImportError is left to require_torchao()."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.suppress(ImportError):
            import torchao  # noqa: F401
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
