"""Distillation quality on Fashion-MNIST, over seeds, against the same student trained from scratch.

    python benchmarks/bench_distill_quality.py [--suites hinton,scarce,patient,consistent,engine] [--seeds 0,1,2]
        [--quick]

Suites (each a variation of benchmarks/recipes/fmnist.toml; one teacher, trained once, is shared by all):
- hinton:  full labels, no augmentation for the students, T and alpha chosen by edgekd's built-in search on the
           validation split (seed 0's run; the other seeds reuse the choice). Hinton et al. 2015, Fashion-MNIST.
- scarce:  [data] labelled = 1000; the other 54,000 training images are an unlabelled transfer set. The
           scratch student has the 1,000 labels (and as many optimizer steps); T and alpha are the recipe's
           defaults (4, 0.9): a search would need more labelled validation data than the user has.
- patient: full labels, a schedule 1.5x as long, crop+flip+mixup views, function matching (alpha = 1, the
           teacher run on exactly the mixed view each step, T = 1 as in Beyer et al. 2022) against the same
           schedule from scratch with crop+flip.
- consistent: the patient schedule and crop+flip views without mixup, Hinton KD at the hinton suite's searched
           T and alpha, the teacher run on exactly the student's view each step (Beyer et al.'s "consistent
           teaching" without function matching), against the same scratch schedule as patient.
- engine:  the hinton CNN student of seed 0 through QAT-KD, PTQ, ONNX and the onnxruntime and PyTorch-eager
           CPU targets: accuracy on the engine, latency, size (edgekd.pipeline.engines, as `edgekd run` does).

Run folders live under --work (resumable: a finished run is not retrained, so suites can run in separate
processes, e.g. one thread each). Every invocation aggregates whatever runs exist into
benchmarks/results/distill_quality.{json,md} and PNG plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import _common as common
import tomllib
import torch

from edgekd.distillation import distill, read_metrics, train_teacher
from edgekd.pipeline import RunContext, engines
from edgekd.recipe import recipe_from_dict
from edgekd.targets import load_target

BASE = Path(__file__).parent / "recipes" / "fmnist.toml"
STUDENTS = {"cnn": "cnn:widths=8,16,32", "mlp": "mlp:hidden=128"}
SUITES = ("hinton", "scarce", "patient", "consistent", "engine")
ENGINE_TARGETS = ("x86-cpu-ort", "x86-cpu-torch")
SEEDS_SEARCHED = 0   # the hinton suite searches T and alpha in seed 0's run


def base_recipe(quick: bool) -> dict[str, Any]:
    raw = tomllib.loads(BASE.read_text())
    if quick:   # the same code paths on scikit-learn's digits, in about a minute
        raw["data"] = {"source": "digits", "test_fraction": 0.25, "val_fraction": 0.15, "seed": 0}
        raw["teacher"].update(model="cnn:widths=16,32", epochs=3, batch_size=64)
        raw["student"].update(epochs=1, batch_size=64)
        raw["augment"] = {"crop": 1, "flip": False}
        raw["quantize"] = {"mode": "ptq", "calibration_size": 64}
    return raw


def suite_recipe(raw: dict[str, Any], suite: str, student: str, seed: int, teacher: Path, quick: bool,
                 chosen: dict[str, float] | None) -> dict[str, Any]:
    """The recipe of one run: the base recipe with the suite's changes, the student and the seed."""
    r = copy.deepcopy(raw)
    r["teacher"]["checkpoint"] = str(teacher.resolve())
    r["student"]["model"] = "mlp:hidden=16" if quick and student == "mlp" else STUDENTS[student]
    if quick and student == "cnn":
        r["student"]["model"] = "cnn:widths=4,8"
    r["student"]["seed"] = seed
    r["distill"]["seed"] = seed
    if suite in ("hinton", "engine"):
        r["augment"] = {}
        if chosen is None:
            r["distill"].update(search_temperatures=[2.0, 4.0] if quick else [2.0, 4.0, 8.0],
                                search_alphas=[0.9] if quick else [0.5, 0.9], search_epochs=1 if quick else 2)
        else:
            r["distill"].update(temperature=chosen["temperature"], alpha=chosen["alpha"])
    elif suite == "scarce":
        r["augment"] = {}
        r["data"]["labelled"] = 100 if quick else 1000
    elif suite in ("patient", "consistent"):
        r["augment"] = {"crop": r["augment"].get("crop", 2), "flip": r["augment"].get("flip", True)}
        if suite == "patient":
            r["augment"]["mixup"] = 1.0
            r["distill"].update(function_matching=True, temperature=1.0)
        else:
            r["distill"].update(temperature=chosen["temperature"], alpha=chosen["alpha"])
        r["student"]["epochs"] = r["student"]["epochs"] * 3 // 2
    return r


def run_dir(work: Path, suite: str, student: str, seed: int) -> Path:
    return work / ("hinton" if suite == "engine" else suite) / student / f"seed{seed}"


def ensure_teacher(raw: dict[str, Any], work: Path, device: str = "cpu") -> Path:
    """The teacher of every suite (bench_patient's too), trained once into <work>/teacher."""
    folder = work / "teacher"
    if not (folder / "teacher.safetensors").is_file():
        train_teacher(recipe_from_dict(raw, base_dir=BASE.parent), folder, device=device, resume=True)
    return folder / "teacher.safetensors"


def run_distill(raw: dict[str, Any], suite: str, student: str, seed: int, work: Path, teacher: Path,
                quick: bool) -> dict[str, Any]:
    out = run_dir(work, suite, student, seed)
    done = read_metrics(out)
    if "student" in done and "scratch" in done:
        return done
    chosen = None
    if suite == "consistent" or (suite == "hinton" and seed != SEEDS_SEARCHED):
        first = read_metrics(run_dir(work, "hinton", student, SEEDS_SEARCHED))
        if "search" not in first:
            first = run_distill(raw, "hinton", student, SEEDS_SEARCHED, work, teacher, quick)
        chosen = first["search"]["chosen"]
    recipe = recipe_from_dict(suite_recipe(raw, suite, student, seed, teacher, quick, chosen), base_dir=BASE.parent)
    print(f"--- {suite} / {student} / seed {seed} -> {out}", flush=True)
    return distill(recipe, out, device="cpu", progress=False, resume=True)



def run_engine(work: Path, quick: bool) -> dict[str, Any]:
    out = run_dir(work, "engine", "cnn", SEEDS_SEARCHED)
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    print(f"--- engine: QAT-KD, PTQ, export, build and profile {out}", flush=True)
    targets = [load_target(t) for t in ENGINE_TARGETS]
    return engines(RunContext(out), targets, device="cpu", progress=False, quick_profile=quick)


# ----------------------------------------------------------------------------------------------- results


def summarize(work: Path, suite: str, student: str, seeds: list[int]) -> dict[str, Any] | None:
    runs = {s: read_metrics(run_dir(work, suite, student, s)) for s in seeds}
    runs = {s: m for s, m in runs.items() if "student" in m and "scratch" in m}
    if not runs:
        return None
    teacher = next(iter(runs.values()))["teacher"]["accuracy"] * 100
    kd = [m["student"]["accuracy"] * 100 for m in runs.values()]
    scratch = [m["scratch"]["accuracy"] * 100 for m in runs.values()]
    diffs = [a - b for a, b in zip(kd, scratch, strict=True)]
    kd_m, kd_sd = common.mean_sd(kd)
    sc_m, sc_sd = common.mean_sd(scratch)
    d_m, d_sd = common.mean_sd(diffs)
    se = d_sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    first = next(iter(runs.values()))
    n_test = first["student"]["test_samples"]
    search = next((m["search"] for m in runs.values() if "search" in m), None)
    return {
        "suite": suite, "student": student, "seeds": sorted(runs),
        "teacher_accuracy": teacher, "test_samples": n_test,
        "errors_teacher": (100 - teacher) * n_test / 100,
        "scratch": scratch, "distilled": kd, "scratch_mean": sc_m, "scratch_sd": sc_sd,
        "distilled_mean": kd_m, "distilled_sd": kd_sd, "gain_mean": d_m, "gain_se": se,
        "gain_over_2se": bool(len(diffs) > 1 and d_m > 2 * se),
        "gap_recovered": (kd_m - sc_m) / (teacher - sc_m) if teacher != sc_m else float("nan"),
        "errors_scratch": (100 - sc_m) * n_test / 100, "errors_distilled": (100 - kd_m) * n_test / 100,
        "temperature": first["student"]["temperature"], "alpha": first["student"]["alpha"],
        "student_epochs": first["student"]["epochs"], "scratch_epochs": first["scratch"]["epochs"],
        "labelled": first["student"].get("labelled"), "samples": first["student"].get("samples"),
        "student_seconds": common.mean_sd([m["student"]["train_seconds"] for m in runs.values()])[0],
        "scratch_seconds": common.mean_sd([m["scratch"]["train_seconds"] for m in runs.values()])[0],
        "params": first["student"]["params"], "search": search,
    }


def markdown(rows: list[dict[str, Any]], engine: dict[str, Any] | None, data: dict[str, Any],
             title: str = "Distillation quality on Fashion-MNIST") -> str:
    parts = [common.header_markdown(title, data["command"], data["environment"], data["notes"])]
    heads = ["suite", "student", "seeds", "params", "labels", "epochs (KD / scratch)", "T", "alpha", "teacher",
             "scratch", "distilled", "gain (± SE)", "> 2 SE", "gap recovered", "test errors (teacher, scratch, KD)",
             "train s (KD / scratch)"]
    table = []
    for r in rows:
        table.append([r["suite"], r["student"], len(r["seeds"]), f"{r['params']:,}", f"{r['labelled']:,}",
                      f"{r['student_epochs']} / {r['scratch_epochs']}", f"{r['temperature']:g}", f"{r['alpha']:g}",
                      f"{r['teacher_accuracy']:.2f}", f"{r['scratch_mean']:.2f} ± {r['scratch_sd']:.2f}",
                      f"{r['distilled_mean']:.2f} ± {r['distilled_sd']:.2f}",
                      f"{r['gain_mean']:+.2f} ± {r['gain_se']:.2f}", "yes" if r["gain_over_2se"] else "no",
                      f"{r['gap_recovered'] * 100:.0f}%",
                      f"{r['errors_teacher']:.0f}, {r['errors_scratch']:.0f}, "
                      f"{r['errors_distilled']:.0f}",
                      f"{r['student_seconds']:.0f} / {r['scratch_seconds']:.0f}"])
    parts += ["## Test accuracy (%), mean ± sd over the seeds finished (of " + ", ".join(str(s) for s in data["seeds"])
              + ")", "",
              common.markdown_table(heads, table), "",
              "gain = distilled - scratch per seed (paired), ± its standard error; gap recovered = "
              "(distilled - scratch) / (teacher - scratch) on the means.", ""]
    for r in rows:
        if r["search"]:
            parts += [f"### T/alpha search, {r['suite']} / {r['student']} (validation split, "
                      f"{r['search']['epochs']} epochs per pair; chosen T={r['search']['chosen']['temperature']:g}, "
                      f"alpha={r['search']['chosen']['alpha']:g})", "",
                      common.markdown_table(["T", "alpha", "val accuracy", "seconds"],
                                            [[f"{s['temperature']:g}", f"{s['alpha']:g}",
                                              f"{s['val_accuracy'] * 100:.2f}", s["seconds"]]
                                             for s in r["search"]["table"]]), ""]
    if engine:
        from edgekd.report import engines_table

        parts += ["## Compression on the engine (hinton CNN student, seed 0)", "",
                  f"**{engine['headline']['text']}**" if engine.get("headline") else "", "",
                  engines_table(engine["engines"]), ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, default_threads=2)
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    parser.add_argument("--students", default="cnn,mlp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", type=Path, default=None, help="run folders (default runs/bench-fmnist; a "
                        "temporary folder in --quick mode)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    suites = [s for s in args.suites.split(",") if s]
    for s in suites:
        if s not in SUITES:
            parser.error(f"--suites: unknown {s!r}; expected {', '.join(SUITES)}")
    work = args.work or (Path(tempfile.mkdtemp(prefix="edgekd-quality-quick-")) if args.quick
                         else Path("runs/bench-fmnist"))
    raw = base_recipe(args.quick)
    teacher = ensure_teacher(raw, work)
    students = args.students.split(",")
    for suite in suites:
        if suite == "engine":
            run_distill(raw, "hinton", "cnn", SEEDS_SEARCHED, work, teacher, args.quick)
            run_engine(work, args.quick)
            continue
        for student in students:
            for seed in seeds:
                run_distill(raw, suite, student, seed, work, teacher, args.quick)

    rows = [r for suite in SUITES if suite != "engine" for student in STUDENTS
            if (r := summarize(work, suite, student, seeds)) is not None]
    engine_dir = run_dir(work, "engine", "cnn", SEEDS_SEARCHED)
    engine = json.loads((engine_dir / "report.json").read_text()) if (engine_dir / "report.json").is_file() else None
    notes = ("One teacher (seed 0) shared by every run; seeds change the students' initialisation and batch order "
             "(the data split is fixed). Scarce: the teacher was trained on all labels, as a model a user already "
             "has; only the student is limited to the 1,000 labels. Test split: the official 10,000 images.")
    data = {"command": common.command_line(), "environment": common.environment(threads=args.threads),
            "notes": notes, "seeds": seeds, "work": str(work), "rows": rows, "engine": engine}
    name = common.result_name("distill_quality", args.quick)
    md = markdown(rows, engine, data)
    args.out.mkdir(parents=True, exist_ok=True)
    if rows:
        kinds = ("scratch", "distilled")
        common.plot_grouped_bars(args.out / f"{name}.png", [f"{r['suite']}\n{r['student']}" for r in rows],
                                 {k: [r[f"{k}_mean"] for r in rows] for k in kinds},
                                 errors={k: [r[f"{k}_sd"] for r in rows] for k in kinds},
                                 ylabel="test accuracy (%)", title="Scratch vs distilled student, Fashion-MNIST",
                                 reference=("teacher", rows[0]["teacher_accuracy"]))
        md += f"\n![scratch vs distilled]({name}.png)\n"
    if engine:
        points = [{"label": f"{e['model']} {e['precision']} {e['quantization']}", "group": e["target"],
                   "latency": e["latency_ms"]["p50"], "accuracy": e["accuracy"] * 100}
                  for e in engine["engines"] if e["latency_ms"]["batch"] == 1]
        common.plot_accuracy_latency(args.out / f"{name}_engines.png", points,
                                     title="Engines at batch 1: accuracy vs p50 latency")
        md += f"\n![accuracy vs latency]({name}_engines.png)\n"
    json_path, md_path = common.write_results(args.out, name, data, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    if args.quick and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
