"""A real pretrained teacher (EfficientNet-Lite0, ImageNet) against a from-scratch CNN teacher, same student.

    OMP_NUM_THREADS=1 python benchmarks/bench_pretrained_vision.py [--run runs/fmnist-efficientnet]

1. The recipe benchmarks/recipes/fmnist-efficientnet.toml through `edgekd run` (edgekd.pipeline.run, what the
   command calls): fine-tune EfficientNet-Lite0 on a Fashion-MNIST subset, distill the tiny CNN, train the same
   CNN from scratch, QAT INT8, onnxruntime CPU engines, profile, report. An existing run folder with a
   report.json is read instead of re-run (delete it, or pass --rerun).
2. The same recipe with the from-scratch CNN teacher of benchmarks/recipes/fmnist.toml (cnn:widths=32,64,128,
   its schedule) in place of EfficientNet: teacher, distilled student and scratch student on the same subset.
3. For both teachers, T in {1, 2, 4} x alpha in {0.5, 0.9} from the teacher cache (`edgekd cache-teacher`,
   all 10 logits, so offline KD sees the same targets as online KD), the pair chosen on the validation split
   (never the test split); the recipe uses the pair chosen on the EfficientNet teacher.
Writes benchmarks/results/pretrained_vision.{json,md}. Needs the optional extra `pretrained` and Debian's
dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch

from edgekd.data import load_data
from edgekd.distillation import cache_teacher, distill
from edgekd.pipeline import run
from edgekd.recipe import ModelConfig, load_recipe

HERE = Path(__file__).resolve().parent
SWEEP = [(t, a) for t in (1.0, 2.0, 4.0) for a in (0.5, 0.9)]
CNN_TEACHER = ModelConfig(model="cnn:widths=32,64,128", epochs=10, lr=0.003, batch_size=128, schedule="onecycle")


def gap(student: float, scratch: float, teacher: float) -> float | None:
    """Fraction of the teacher-scratch gap the distilled student recovers: (KD - scratch) / (teacher - scratch)."""
    return (student - scratch) / (teacher - scratch) if teacher != scratch else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=HERE / "recipes" / "fmnist-efficientnet.toml")
    parser.add_argument("--run", type=Path, default=Path("runs/fmnist-efficientnet"))
    parser.add_argument("--rerun", action="store_true", help="run the recipe even if the run folder has a report")
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    started = time.perf_counter()
    result: dict = {"command": common.command_line(), "machine": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "torch": torch.__version__, "recipe": str(args.recipe), "run": str(args.run)}

    # 1. the recipe through the pipeline `edgekd run` calls
    if args.rerun or not (args.run / "report.json").is_file():
        t0 = time.perf_counter()
        run(recipe, args.run, progress=False)
        result["pipeline_seconds"] = round(time.perf_counter() - t0, 1)
    report = json.loads((args.run / "report.json").read_text())
    metrics = json.loads((args.run / "metrics.json").read_text())

    # 2. the same student distilled from the from-scratch CNN teacher, same data subset and student schedule
    cnn_recipe = dataclasses.replace(recipe, teacher=CNN_TEACHER,
                                     quantize=dataclasses.replace(recipe.quantize, mode="none"))
    dataset = load_data(recipe.data, recipe.base_dir)   # one load for every run below (same [data] section)
    with tempfile.TemporaryDirectory(prefix="bench-pretrained-") as tmp:
        t0 = time.perf_counter()
        cnn = distill(cnn_recipe, Path(tmp) / "cnn", device="cpu", progress=False, data=dataset)
        result["cnn_teacher_run_seconds"] = round(time.perf_counter() - t0, 1)

        # 3. T and alpha chosen on validation, offline from each teacher's cache
        t0 = time.perf_counter()
        sweep = {}
        for name, rec, folder in (("efficientnet", recipe, args.run), ("cnn", cnn_recipe, Path(tmp) / "cnn")):
            cache_teacher(rec, folder, top_k=10, device="cpu", progress=False)
            rows = []
            for temperature, alpha in SWEEP:
                variant = dataclasses.replace(rec, distill=dataclasses.replace(
                    rec.distill, temperature=temperature, alpha=alpha, baseline=False))
                m = distill(variant, Path(tmp) / f"{name}-{temperature}-{alpha}", device="cpu", progress=False,
                            data=dataset, cache=folder / "teacher-cache")["student"]
                rows.append({"temperature": temperature, "alpha": alpha, "val_accuracy": m["val_accuracy"],
                             "test_accuracy": m["accuracy"]})
            best = max(rows, key=lambda r: (r["val_accuracy"], -r["alpha"]))
            sweep[name] = {"rows": rows, "chosen_on_val": best}
        result["sweep_seconds"] = round(time.perf_counter() - t0, 1)

    int8 = [e for e in report["engines"] if e["model"] == "student" and e["quantization"] != "none"]
    engines = {f"{e['model']} {e['precision']} {e['quantization']}": {
        "accuracy": e["accuracy"], "p50_ms_batch1": e["latency_ms"]["p50"], "size_bytes": e["size_bytes"]}
        for e in report["engines"]}
    eff, cnnt = metrics["teacher"], cnn["teacher"]
    rows = [
        {"model": "teacher: EfficientNet-Lite0, ImageNet weights, fine-tuned", "spec": recipe.teacher.model,
         **_cols(eff)},
        {"model": "teacher: CNN from scratch", "spec": CNN_TEACHER.model, **_cols(cnnt)},
        {"model": "student from scratch", "spec": recipe.student.model, **_cols(metrics["scratch"])},
        {"model": "student distilled from EfficientNet-Lite0", "spec": recipe.student.model,
         **_cols(metrics["student"]),
         "gap_recovered": gap(metrics["student"]["accuracy"], metrics["scratch"]["accuracy"], eff["accuracy"])},
        {"model": "student distilled from the CNN teacher", "spec": recipe.student.model, **_cols(cnn["student"]),
         "gap_recovered": gap(cnn["student"]["accuracy"], cnn["scratch"]["accuracy"], cnnt["accuracy"])},
    ]
    data = recipe.data
    result.update({
        "data": {"source": data.source, "train_samples": data.train_samples, "val_fraction": data.val_fraction,
                 "test_samples": data.test_samples, "seed": data.seed},
        "rows": rows, "scratch_in_cnn_run": cnn["scratch"]["accuracy"], "engines": engines,
        "quantization": report.get("quantization"), "headline": report.get("headline"),
        "int8_student_engines": [{"quantization": e["quantization"], "accuracy": e["accuracy"]} for e in int8],
        "sweep": sweep, "scratch_val_accuracy": metrics["scratch"]["val_accuracy"],
        "total_seconds": round(time.perf_counter() - started, 1),
    })
    md = markdown(result)
    common.write_results(args.out, "pretrained_vision", result, md)
    print(md)
    return 0


def _cols(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "params", "epochs", "train_seconds")}


def markdown(r: dict) -> str:
    d = r["data"]
    lines = ["# Pretrained vision teacher: EfficientNet-Lite0 (ImageNet) vs a from-scratch CNN, Fashion-MNIST subset",
             "", f"Command: `{r['command']}` (run folder `{r['run']}`, recipe `{r['recipe']}`)  ",
             f"{r['machine']}, torch {r['torch']}, {r['torch_threads']} torch thread(s) "
             f"(OMP_NUM_THREADS={r['omp_num_threads']}); data {d['source']}: {d['train_samples']} training images "
             f"(stratified subset; {d['val_fraction']:.0%} of it held out for validation), {d['test_samples']} test "
             f"images, seed {d['seed']}. Other jobs shared this 2-core machine: wall times are indicative.", "",
             "| model | spec | test accuracy | params | epochs | train s | gap recovered |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        g = row.get("gap_recovered")
        lines.append(f"| {row['model']} | `{row['spec']}` | {100 * row['accuracy']:.2f} | {row['params']:,} | "
                     f"{row['epochs']} | {row['train_seconds']:.0f} | {'' if g is None else f'{g:+.2f}'} |")
    lines += ["", "gap recovered = (distilled - scratch) / (teacher - scratch), each with its own teacher.",
              f"The scratch student of the CNN-teacher run (same data, seed, schedule): "
              f"{100 * r['scratch_in_cnn_run']:.2f}.", "", "Engines of the EfficientNet run (onnxruntime CPU, "
              "accuracy measured on the engine, p50 latency at batch 1):", "",
              "| engine | accuracy | p50 ms | size KiB |", "|---|---|---|---|"]
    for name, e in r["engines"].items():
        lines.append(f"| {name} | {100 * e['accuracy']:.2f} | {e['p50_ms_batch1']:.3f} | "
                     f"{e['size_bytes'] / 1024:.1f} |")
    if r.get("headline"):
        lines += ["", f"Headline of the run: {r['headline']['text']}."]
    lines += ["", "Offline KD from each teacher's cache (all 10 logits), T and alpha chosen on the validation split "
              f"(scratch student: validation {100 * r['scratch_val_accuracy']:.2f}, test "
              f"{100 * r['rows'][2]['accuracy']:.2f}):", "",
              "| teacher | T | alpha | val accuracy | test accuracy | chosen on val |", "|---|---|---|---|---|---|"]
    for name, sw in r["sweep"].items():
        for row in sw["rows"]:
            chosen = "yes" if row == sw["chosen_on_val"] else ""
            lines.append(f"| {name} | {row['temperature']:g} | {row['alpha']:g} | {100 * row['val_accuracy']:.2f} | "
                         f"{100 * row['test_accuracy']:.2f} | {chosen} |")
    lines += ["", f"Total benchmark time {r['total_seconds']:.0f} s"
              + (f" (pipeline {r['pipeline_seconds']:.0f} s)" if "pipeline_seconds" in r else "")
              + f"; CNN-teacher run {r['cnn_teacher_run_seconds']:.0f} s; T/alpha sweep {r['sweep_seconds']:.0f} s.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
