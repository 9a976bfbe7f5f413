"""The only place that knows the stage order: distill -> export -> (quantize) -> build -> profile -> report.

A run folder holds everything: the checkpoints and recipe.toml from `distill`, onnx/<model>.onnx from
`export`, engines/<target>/<model>-<precision>[-<quant>]/ bundles from `build`, profile-<target>.json
from `profile`, and report.json / report.md / report.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import fileio
from edgekd.data import Dataset, load_data
from edgekd.engines import check_target
from edgekd.errors import EdgekdError
from edgekd.models import build_model, load_weights
from edgekd.recipe import Recipe, load_recipe
from edgekd.targets import Target, load_target

MODELS = ("teacher", "student", "scratch")
DEFAULT_TARGETS = ("x86-cpu-ort",)


class RunContext:
    """A run folder with its recipe and data loaded once (the data split is deterministic from the recipe)."""

    def __init__(self, run_dir: str | Path, recipe: Recipe | None = None, data: Dataset | None = None) -> None:
        self.dir = Path(run_dir)
        if recipe is None:
            path = self.dir / "recipe.toml"
            if not path.is_file():
                raise EdgekdError(f"{self.dir}: not a run folder (no recipe.toml); run `edgekd distill` first")
            recipe = load_recipe(path)
        self.recipe = recipe
        self.data = data or load_data(recipe.data, recipe.base_dir)

    def spec(self, model: str) -> str:
        return self.recipe.teacher.model if model == "teacher" else self.recipe.student.model

    def weights(self, model: str) -> Path:
        if model not in MODELS:
            raise EdgekdError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
        path = self.dir / f"{model}.safetensors"
        if not path.is_file() and model == "teacher" and self.recipe.teacher.checkpoint:
            path = self.recipe.path(self.recipe.teacher.checkpoint)   # distilled from a given teacher
        if not path.is_file():
            raise EdgekdError(f"{path}: not found; run `edgekd distill` into {self.dir} first")
        return path

    def model(self, name: str) -> nn.Module:
        model = build_model(self.spec(name), self.data.input_shape, self.data.num_classes)
        load_weights(model, self.weights(name))
        return model.eval()

    def metadata(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"model": name, "model_spec": self.spec(name), "class_names": json.dumps(list(self.data.class_names)),
                "normalization": json.dumps(self.data.normalization), **(extra or {})}

    def eval_data(self, model: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from edgekd.train import predict_logits

        return self.data.x_test, self.data.y_test, predict_logits(model, self.data.x_test)

    def onnx_path(self, name: str, quantization: str = "none", scheme: str = "") -> Path:
        suffix = "" if quantization == "none" else f".{quantization}-{scheme}"
        return self.dir / "onnx" / f"{name}{suffix}.onnx"


def export(run_dir: str | Path, model: str = "student", *, ctx: RunContext | None = None) -> dict[str, Any]:
    """Export a trained model to ONNX and measure its parity with PyTorch on the test split."""
    from edgekd.export import export_onnx, parity

    ctx = ctx or RunContext(run_dir)
    net = ctx.model(model)
    path = ctx.onnx_path(model)
    example = torch.from_numpy(ctx.data.x_test[:2])
    export_onnx(net, example, path, metadata=ctx.metadata(model))
    check = parity(net, path, ctx.data.x_test)
    result = {"model": model, "path": str(path), "size_bytes": path.stat().st_size, "parity": check}
    fileio.write_json(path.with_suffix(".parity.json"), result)
    return result


def _bundle_dir(ctx: RunContext, target: Target, model: str, precision: str, quantization: str) -> Path:
    name = f"{model}-{precision}" + ("" if quantization == "none" else f"-{quantization}")
    return ctx.dir / "engines" / target.name / name


def build(run_dir: str | Path, target_name: str, *, models: tuple[str, ...] = ("teacher", "student"),
          ctx: RunContext | None = None, quantized: dict[str, Path] | None = None) -> dict[str, Any]:
    """Build every float engine the target asks for (and int8 engines from `quantized` Q/DQ ONNX files,
    keyed by quantization: {"ptq": path, "qat": path}) for `models`. Engines that cannot be built on this
    machine (no TensorRT, no GPU) are listed under "skipped" with the reason instead of failing the run."""
    from edgekd.engines import EngineSource, check_target
    from edgekd.engines import build as build_engine

    ctx = ctx or RunContext(run_dir)
    target = load_target(target_name)
    status = check_target(target)
    problem = "" if status == "ok" else status
    # Read every checkpoint and existing ONNX this build uses before writing any bundle, so that a bad
    # student.onnx fails the build with the teacher's bundle untouched instead of rebuilt.
    nets = {model: ctx.model(model) for model in models}
    if not problem and target.runtime != "torch":
        from edgekd.engines import onnx_info

        for path in [ctx.onnx_path(m) for m in models] + [Path(p) for p in (quantized or {}).values()]:
            if path.is_file():
                onnx_info(path)
    built, skipped = [], []
    for model in models:
        net = nets[model]
        evals = ctx.eval_data(net)
        jobs: list[tuple[str, str, Path | None]] = []
        for precision in target.precisions:
            if precision == "int8":
                if model == "student":
                    jobs += [("int8", q, p) for q, p in (quantized or {}).items()]
            else:
                jobs.append((precision, "none", None))
        for precision, quantization, qpath in jobs:
            out = _bundle_dir(ctx, target, model, precision, quantization)
            if problem:
                skipped.append({"target": target.name, "model": model, "precision": precision,
                                "quantization": quantization, "reason": problem})
                continue
            onnx_path = qpath
            if target.runtime != "torch" and onnx_path is None:
                onnx_path = ctx.onnx_path(model)
                if not onnx_path.is_file():
                    export(ctx.dir, model, ctx=ctx)
            source = EngineSource(model_name=model, onnx_path=onnx_path, weights_path=ctx.weights(model),
                                  model_spec=ctx.spec(model), input_shape=ctx.data.input_shape,
                                  num_classes=ctx.data.num_classes, class_names=ctx.data.class_names,
                                  normalization=ctx.data.normalization, quantization=quantization)
            try:
                built.append(str(build_engine(source, target, precision, out, eval_data=evals)))
            except EdgekdError as e:
                if target.runtime == "tensorrt" or target.device != "cpu":
                    skipped.append({"target": target.name, "model": model, "precision": precision,
                                    "quantization": quantization, "reason": str(e)})
                else:
                    raise
    return {"target": target.name, "built": built, "skipped": skipped}


def profile(run_dir: str | Path, target_name: str, *, quick: bool = False) -> list[dict[str, Any]]:
    """Profile every bundle built for the target; writes profile-<target>.json and returns the results.

    Each bundle is profiled in its own `python -m edgekd.runtime profile` process, as on the device: the
    training process (torch and its threads) would otherwise inflate memory and disturb the timings.
    """
    run_dir = Path(run_dir)
    target = load_target(target_name)
    folder = run_dir / "engines" / target.name
    bundles = sorted(p for p in folder.iterdir() if (p / "manifest.json").is_file()) if folder.is_dir() else []
    if not bundles:
        raise EdgekdError(f"{folder}: no engines built for target {target.name}; run `edgekd build {run_dir} "
                          f"--target {target.name}` first")
    from edgekd.bundle import verify

    for bundle in bundles:  # a tampered bundle fails before any other bundle's manifest gets metrics
        verify(bundle)
    timing = ["--warmup", "3", "--min-runs", "10", "--min-seconds", "0.2"] if quick else []
    results = [profile_in_subprocess(bundle, ["--save-metrics", *timing]) for bundle in bundles]
    fileio.write_json(run_dir / f"profile-{target.name}.json", results)
    return results


def profile_in_subprocess(bundle: Path, args: list[str]) -> dict[str, Any]:
    """`python -m edgekd.runtime profile BUNDLE --json ... *args` in a fresh process, as on the device; returns
    its result (see edgekd.profile.profile_bundle)."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgekd-profile-") as tmp:
        out = Path(tmp) / "profile.json"
        proc = subprocess.run([sys.executable, "-m", "edgekd.runtime", "profile", str(bundle), "--json", str(out),
                               *args], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            raise EdgekdError(f"profiling {bundle} failed: {lines[-1].removeprefix('error: ')}")
        return json.loads(out.read_text())


def report(run_dir: str | Path, targets: tuple[str, ...] | None = None,
           skipped: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble report.json/.md/.png from metrics.json and the profile-<target>.json files in the run folder."""
    from edgekd.distillation import read_metrics
    from edgekd.report import build_report, engine_entry, write_report

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise EdgekdError(f"{run_dir}: not a run folder (no metrics.json); run `edgekd distill` or `edgekd run` "
                          "into it first")
    files = sorted(run_dir.glob("profile-*.json"))
    if targets is not None:
        files = [run_dir / f"profile-{t}.json" for t in targets if (run_dir / f"profile-{t}.json").is_file()]
    engines = [engine_entry(p, run_dir) for f in files for p in json.loads(f.read_text())]
    names = list(targets) if targets else [f.stem.removeprefix("profile-") for f in files]
    rep = build_report(read_metrics(run_dir), engines, skipped or [], names, extra)
    write_report(run_dir, rep)
    return rep


def run(recipe: Recipe, out: str | Path, *, targets: tuple[str, ...] = DEFAULT_TARGETS, device: str = "auto",
        progress: bool = True, quick_profile: bool = False) -> dict[str, Any]:
    """The whole pipeline for one recipe: teacher, distill (+ scratch), export, build, profile, report.

    A recipe with an [embedding] section runs sentence-embedding distillation instead (edgekd.embedding)."""
    if recipe.embedding is not None:
        from edgekd.embedding import run_embedding

        _import_torchao_quietly()   # transformers imports torchao when it is installed
        return run_embedding(recipe, out, targets=targets, progress=progress, quick_profile=quick_profile)
    from edgekd.distillation import distill

    out = Path(out)
    loaded = [load_target(t) for t in targets]   # fail on a bad target before training anything
    ctx_data = load_data(recipe.data, recipe.base_dir)
    distill(recipe, out, device=device, progress=progress, data=ctx_data)
    return engines(RunContext(out, recipe, ctx_data), loaded, device=device, progress=progress,
                   quick_profile=quick_profile)


def engines(ctx: RunContext, loaded: list[Target], *, device: str = "auto", progress: bool = True,
            quick_profile: bool = False, profile_here: bool = True) -> dict[str, Any]:
    """Everything after training, for a run folder with a distilled student: export, quantize (PTQ, QAT-KD),
    build and profile the engines of each target, and write the report. Without `profile_here` (the targets are
    other machines) the bundles are built and listed under "built_not_profiled" for profiling on the device."""
    out = ctx.dir
    recipe = ctx.recipe
    exports = {m: export(out, m, ctx=ctx) for m in ("teacher", "student")}
    skipped: list[dict[str, Any]] = []
    profiled: list[str] = []
    unprofiled: list[str] = []
    quantized: dict[str, dict[str, Any]] = {}   # scheme -> quantize_student() result
    for target in loaded:
        q_paths = None
        if recipe.quantize.mode != "none" and "int8" in target.precisions and target.quant_scheme != "none":
            if check_target(target) == "ok":
                if target.quant_scheme not in quantized:
                    quantized[target.quant_scheme] = quantize(out, target.quant_scheme, ctx=ctx, device=device,
                                                              progress=progress)
                q_paths = {k: Path(v) for k, v in quantized[target.quant_scheme]["onnx"].items()}
        where = target.path or target.name   # a target given as a file outside the catalog is found again
        result = build(out, where, ctx=ctx, quantized=q_paths)
        skipped += result["skipped"]
        if result["built"] and profile_here:
            profile(out, where, quick=quick_profile)
            profiled.append(target.name)
        elif result["built"]:
            unprofiled += result["built"]
    extra: dict[str, Any] = {"export_parity": {m: e["parity"] for m, e in exports.items()}}
    if unprofiled:
        extra["built_not_profiled"] = unprofiled
    if quantized:
        extra["quantization"] = {scheme: {k: v for k, v in q.items() if k not in ("qat_history", "onnx")}
                                 for scheme, q in quantized.items()}
    return report(out, tuple(profiled), skipped, extra=extra)


def quantize(run_dir: str | Path, scheme: str, *, ctx: RunContext | None = None, device: str = "auto",
             progress: bool = True) -> dict[str, Any]:
    """PTQ and (when [quantize].mode = "qat") quantization-aware distillation of the run's student."""
    from edgekd.compress import quantize_student, require_torchao

    _import_torchao_quietly()
    require_torchao()
    ctx = ctx or RunContext(run_dir)
    return quantize_student(ctx, scheme, device=device, progress=progress)


def _import_torchao_quietly() -> None:
    """Import torchao with its import-time log noise muted: it logs a warning for each prebuilt kernel library
    it cannot load (CUDA-only .so files on a CPU host) and torch logs a deprecation torchao triggers; neither
    is the user's to fix, and they would bury a one-line error. An ImportError is left to require_torchao()."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError:
        pass
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)
