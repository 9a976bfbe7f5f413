"""Suite 4, training cost: epoch time of one student under plain training, online KD, QAT-KD and cached-teacher KD.

    python benchmarks/bench_training_cost.py            # full: training_cost.{json,md,png}, all 60,000 images
    python benchmarks/bench_training_cost.py --quick    # smoke test (seconds): training_cost_quick.*

The same student (default the Fashion-MNIST student cnn:widths=8,16,32; teacher cnn:widths=32,64,128) trains
one epoch per mode with edgekd.train.fit, in one process, in rounds; each round runs every mode once (the
order rotates from round to round) on a freshly built, identically seeded student, so machine load drifts hit
the modes alike and each round gives a ratio to that round's plain epoch. Reported: the epoch time (fit's own
per-epoch clock: the training loop, not model/optimizer setup) in seconds and as a ratio to plain training,
mean and standard deviation across rounds.

Modes:
- plain: cross-entropy on the true labels.
- online KD: a teacher forward pass on every batch plus the KD loss (edgekd.objective.Objective).
- QAT-KD: the student prepared for QAT by edgekd.quantize (torchao PT2E fake-quant, the target's scheme) and
  calibrated as edgekd.compress does, trained with the online KD loss (observers still updating, as in the
  first QAT epochs).
- cached-teacher KD: top-k teacher logits built once by `edgekd cache-teacher`'s function
  (edgekd.distillation.cache_teacher) and read as `edgekd distill --cache` reads them (no teacher at training).
One-time costs are reported apart: the cache build (one teacher pass), QAT prepare + calibration, and (full mode
only) the QAT convert to Q/DQ. Weights are random initializations: the cost of these dense kernels does not
depend on their values, and timing needs no trained teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

from edgekd import pipeline  # noqa: E402

pipeline._import_torchao_quietly()   # torchao logs a line per CUDA kernel library it cannot load on a CPU host

from edgekd import compress, distillation, quantize  # noqa: E402
from edgekd.data import FASHION_MNIST_DIR, load_data  # noqa: E402
from edgekd.models import build_model, count_params, save_weights  # noqa: E402
from edgekd.objective import Objective, config_from_recipe  # noqa: E402
from edgekd.recipe import Recipe, recipe_from_dict  # noqa: E402
from edgekd.targets import load_target  # noqa: E402
from edgekd.train import fit, seed_everything  # noqa: E402

MODES = ("plain", "online KD", "QAT-KD", "cached-teacher KD")
FULL_TRAIN = 60000


def _student(recipe: Recipe, data: Any) -> torch.nn.Module:
    seed_everything(0)   # every mode starts from the same weights
    return build_model(recipe.student.model, data.input_shape, data.num_classes)


def one_epoch(mode: str, recipe: Recipe, data: Any, teacher: torch.nn.Module, cached: tuple, scheme: str
              ) -> dict[str, Any]:
    """Train a fresh student for one epoch in `mode`; returns fit's epoch seconds (and QAT's setup seconds)."""
    cfg = recipe.student
    dev = torch.device("cpu")
    kd = config_from_recipe(recipe, features=False)
    student = _student(recipe, data)
    out: dict[str, Any] = {}
    if mode == "plain":
        history = fit(student, data.x_train, data.y_train, cfg, device=dev, desc=mode, epochs=1, progress=False)
    elif mode == "online KD":
        history = fit(student, data.x_train, data.y_train, cfg, device=dev, desc=mode, epochs=1, progress=False,
                      objective=Objective(kd, teacher=teacher))
    elif mode == "QAT-KD":
        t0 = time.perf_counter()
        example = torch.from_numpy(data.x_train[:2])
        prepared = quantize.prepare(student, example, quantize.QuantConfig(scheme=scheme), qat=True)
        x_cal, step = data.x_train[:recipe.quantize.calibration_size], compress.CALIBRATION_BATCH   # as the stage does
        quantize.calibrate(prepared, [torch.from_numpy(x_cal[i:i + step]) for i in range(0, len(x_cal), step)])
        out["setup_s"] = time.perf_counter() - t0
        history = fit(prepared, data.x_train, data.y_train, cfg, device=dev, desc=mode, epochs=1, progress=False,
                      objective=Objective(kd, teacher=teacher), set_mode=compress._qat_mode([False]))
        out["model"] = prepared
    else:
        x, y, objective = cached
        history = fit(student, x, y, cfg, device=dev, desc=mode, epochs=1, progress=False, objective=objective)
    out["epoch_s"] = float(history[0]["seconds"])
    return out


def markdown(data: dict[str, Any]) -> str:
    s = data["setup"]
    intro = (f"Student `{s['student']}` ({s['student_params']:,} params), teacher `{s['teacher']}` "
             f"({s['teacher_params']:,} params); {s['train_samples']:,} Fashion-MNIST training images per epoch, "
             f"batch {s['batch_size']}, {s['threads']} torch thread(s); KD T={s['temperature']}, alpha={s['alpha']}; "
             f"QAT scheme {s['scheme']}; cache top-{s['top_k']}. {s['rounds']} round(s), one epoch per mode per round, "
             f"order rotated each round. Epoch time is fit's per-epoch clock; ratios are per round to that round's "
             f"plain epoch, then mean ± sd across rounds. Random-init weights (cost does not depend on their values). "
             f"Total {data['total_s']:.0f} s.")
    lines = [common.header_markdown("Training cost: plain, online KD, QAT-KD and cached-teacher KD epochs",
                                    data["command"], data["environment"], intro), ""]
    heads = ["training", "epoch s (mean ± sd)", "samples/s", "vs plain (mean ± sd)", "per-round epoch s"]
    rows = [[r["mode"], f"{r['epoch_s_mean']:.2f} ± {r['epoch_s_sd']:.2f}", r["samples_per_s"],
             f"{r['ratio_mean']:.2f}x ± {r['ratio_sd']:.2f}", ", ".join(f"{v:.2f}" for v in r["epoch_s"])]
            for r in data["rows"]]
    lines += [common.markdown_table(heads, rows, digits=0), "", "One-time costs (not in the epoch times):", ""]
    o = data["one_time"]
    conv = (f"{o['qat_convert_s']:.1f} s" if o["qat_convert_s"] is not None
            else f"not measured ({o['qat_convert_note']})")
    lines += [f"- teacher cache build (one teacher pass over {s['train_samples']:,} images, "
              f"`edgekd cache-teacher`): {o['cache_build_s']:.1f} s",
              f"- QAT prepare (torch.export + fake-quant insertion) and calibration: {o['qat_setup_s_mean']:.1f} s "
              "(mean over rounds)",
              f"- QAT convert to Q/DQ after training: {conv}", "", f"Plot: `{data['plot']}`"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="cnn:widths=8,16,32")
    parser.add_argument("--teacher", default="cnn:widths=32,64,128")
    parser.add_argument("--train", type=int, default=FULL_TRAIN, help="training images per epoch (of 60,000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=5, help="teacher cache top-k (edgekd cache-teacher's default)")
    parser.add_argument("--target", default="x86-cpu-ort", help="target whose quant_scheme QAT uses")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST idx files")
    common.add_common_args(parser)
    args = parser.parse_args()
    if args.quick:
        args.train, args.rounds = 512, 2
    started = time.perf_counter()
    args.threads = common.threads_for(args)
    torch.set_num_threads(args.threads)
    env = common.environment(threads=args.threads)
    scheme = load_target(args.target).quant_scheme
    name = common.result_name("training_cost", args.quick)

    with tempfile.TemporaryDirectory(prefix="edgekd-training-cost-") as tmp:
        work = Path(tmp)
        subset = {"train_samples": args.train, "test_samples": 1000} if args.train < FULL_TRAIN else {}
        recipe = recipe_from_dict({
            "data": {"source": f"fashion-mnist:{args.data_dir}", "val_fraction": 0.0, **subset},
            "teacher": {"model": args.teacher, "batch_size": args.batch_size},
            "student": {"model": args.student, "batch_size": args.batch_size},
            "distill": {"temperature": args.temperature, "alpha": args.alpha},
            "quantize": {"mode": "qat", "calibration_size": 256}})
        data = load_data(recipe.data)
        seed_everything(1)
        teacher = build_model(args.teacher, data.input_shape, data.num_classes).eval()
        run_dir = work / "run"
        save_weights(teacher, run_dir / "teacher.safetensors", {"model": args.teacher})

        # the cache, built once with `edgekd cache-teacher`'s function and read as `edgekd distill --cache` does
        t0 = time.perf_counter()
        distillation.cache_teacher(recipe, run_dir, top_k=args.top_k, device="cpu", progress=False)
        cache_build_s = time.perf_counter() - t0
        x_c, y_c, objective, _ = distillation._offline_source(recipe, data, None, run_dir / "teacher-cache")
        cached = (x_c, y_c, objective)

        # warm-up (thread pools, allocator, torch.export caches): one short untimed run of the costliest modes
        small = dataclasses.replace(data, x_train=data.x_train[:256], y_train=data.y_train[:256])
        for mode in ("plain", "online KD"):
            one_epoch(mode, recipe, small, teacher, cached, scheme)

        times: dict[str, list[float]] = {m: [] for m in MODES}
        qat_setup: list[float] = []
        last_qat = None
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for mode in order:
                res = one_epoch(mode, recipe, data, teacher, cached, scheme)
                times[mode].append(res["epoch_s"])
                if mode == "QAT-KD":
                    qat_setup.append(res["setup_s"])
                    last_qat = res["model"]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in MODES), flush=True)

        convert_s, convert_note = None, ""
        if args.quick:
            convert_note = "skipped in --quick"
        else:
            t0 = time.perf_counter()
            quantize.freeze(last_qat)
            quantize.convert(last_qat)
            convert_s = time.perf_counter() - t0

    rows = []
    for mode in MODES:
        ratios = [t / p for t, p in zip(times[mode], times["plain"], strict=True)]
        mean, sd = common.mean_sd(times[mode])
        r_mean, r_sd = common.mean_sd(ratios)
        rows.append({"mode": mode, "epoch_s": times[mode], "epoch_s_mean": mean, "epoch_s_sd": sd,
                     "samples_per_s": len(data.x_train) / mean, "ratio_to_plain": ratios, "ratio_mean": r_mean,
                     "ratio_sd": r_sd})
    result: dict[str, Any] = {
        "suite": "training_cost", "command": common.command_line(), "environment": env,
        "setup": {"student": args.student, "teacher": args.teacher,
                  "student_params": count_params(_student(recipe, data)), "teacher_params": count_params(teacher),
                  "train_samples": int(len(data.x_train)),
                  "batch_size": args.batch_size, "threads": args.threads, "temperature": args.temperature,
                  "alpha": args.alpha, "scheme": scheme, "top_k": args.top_k, "rounds": args.rounds,
                  "data": "Fashion-MNIST" + ("" if args.train >= FULL_TRAIN
                                             else f" (stratified subset of {args.train})")},
        "rows": rows,
        "one_time": {"cache_build_s": cache_build_s, "qat_setup_s": qat_setup,
                     "qat_setup_s_mean": statistics.fmean(qat_setup), "qat_convert_s": convert_s,
                     "qat_convert_note": convert_note},
    }
    result["total_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    plot = common.plot_bars(args.out / f"{name}.png", [r["mode"] for r in rows], [r["ratio_mean"] for r in rows],
                            errors=[r["ratio_sd"] for r in rows], reference=1.0, ylabel="epoch time / plain epoch",
                            title=f"Training cost of {args.student} ({len(data.x_train):,} images/epoch)")
    result["plot"] = plot.name
    md = markdown(result)
    common.write_results(args.out, name, result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
