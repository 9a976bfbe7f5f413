"""Patient distillation on a 5,000-image Fashion-MNIST subset: learning curves, distilled vs scratch (issue 21).

    python benchmarks/bench_patient.py [--epochs 300] [--arms fm,ct] [--students cnn,mlp] [--seeds 0,1,2]
        [--device cpu|cuda] [--jobs N] [--work runs/patient] [--out benchmarks/results] [--quick]

Arms (benchmarks/recipes/fmnist-patient.toml; Beyer et al. 2022, T = 1, alpha = 1, the teacher run every step on
exactly the student's view):
- fm: function matching, crop+flip+mixup views, against scratch on the same mixed views (mixed labels).
- ct: consistent teaching, crop+flip views (no mixup), against scratch on the same crop+flip views.
Students: cnn:widths=8,16,32 and mlp:hidden=128. Every run goes through edgekd.distillation.distill (student,
then the scratch baseline with the same seed and schedule).

Data: the script writes benchmarks/data/fmnist-train<N>-seed<S>.npz once: N training images drawn stratified
(edgekd.data.labelled_subset, seed S) from the official 60,000, the official 10,000 test images as x_test and
again as x_val, so edgekd's per-epoch validation accuracy (train.fit: at most ~20 passes a run) is test accuracy
along the schedule. No choice is made on it (fixed T and alpha, no search, last-epoch weights): it is a curve,
not a selection. The teacher is benchmarks/recipes/fmnist.toml's, trained once on all labels into
<work>/teacher (bench_distill_quality.ensure_teacher) and reused by every run.

--jobs N runs N independent runs in parallel processes (on one GPU many small runs share it). Run folders
(<work>/e<epochs>/<arm>/<student>/seed<n>) are resumable: finished runs are read, interrupted ones continue
from their checkpoint. Writes <out>/patient.{json,md} and <out>/patient_<student>.png (test accuracy against
epoch, mean over seeds, distilled and scratch per arm).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common
import bench_distill_quality as quality
import numpy as np
import tomllib
import torch

RECIPE = Path(__file__).parent / "recipes" / "fmnist-patient.toml"
DATA_DIR = Path(__file__).parent / "data"
ARMS = {"fm": "function matching (mixup)", "ct": "consistent teaching (crop+flip)"}
ROLES = {"student (KD)": "distilled", "scratch": "scratch"}   # train.fit's desc -> this benchmark's name


# ---------------------------------------------------------------------------------------------------- data


def subset_npz(folder: Path, train_samples: int, seed: int, test_samples: int | None = None) -> Path:
    """folder/fmnist-train<N>-seed<S>.npz (written once, atomically): a stratified, seeded subset of the
    official training images; the official test images (or a stratified subset of them) as test and val.

    x_val is stored as float32 (N, 1, H, W) in [0, 1], exactly what edgekd.data makes of the uint8 x_test: an
    in-memory .npz's own x_val is used as stored (not scaled, no channel axis added), and a memory-mapped .npz
    cannot be trained on yet (streaming.fingerprint cannot serialize the memmap's Path filename); both are
    edgekd.data/streaming issues this benchmark works around without touching them. 43 MB in all."""
    from edgekd.data import FASHION_MNIST_DIR, _fashion_mnist, labelled_subset
    from edgekd.errors import EdgekdError
    from edgekd.fileio import atomic_path

    name = f"fmnist-train{train_samples}-seed{seed}" + (f"-test{test_samples}" if test_samples else "") + ".npz"
    path = folder / name
    if path.is_file():
        return path
    try:   # the `fashion-mnist` source's reader: the four idx files as uint8 images and labels, and the class names
        raw = _fashion_mnist(FASHION_MNIST_DIR)
    except EdgekdError as e:
        raise SystemExit(f"{e}; {path} does not exist yet and is made from them") from None
    x_train, y_train = raw["x_train"], raw["y_train"].astype(np.int64)
    x_test, y_test = raw["x_test"], raw["y_test"].astype(np.int64)
    keep = labelled_subset(y_train, train_samples, seed, "patient subset")
    x_train, y_train = x_train[keep], y_train[keep]
    if test_samples:
        keep = labelled_subset(y_test, test_samples, seed, "patient test subset")
        x_test, y_test = x_test[keep], y_test[keep]
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, y_val=y_test,
                 x_val=x_test.astype(np.float32)[:, None] / 255.0, class_names=np.array(raw["class_names"]))
    return path


def teacher_metadata(teacher: Path) -> dict[str, str]:
    """What edgekd wrote into the teacher's safetensors: its model spec and the normalization it was trained with."""
    from safetensors import safe_open

    with safe_open(str(teacher), framework="numpy") as f:
        return f.metadata()


def ensure_teacher(work: Path, quick: bool, data: Path, device: str) -> Path:
    """fmnist.toml's teacher on all labels, trained once into <work>/teacher; in --quick mode a small one, five
    epochs on the subset."""
    raw = quality.base_recipe(False)
    if quick:
        raw["data"] = {"source": str(data.resolve()), "memory_map": False}
        raw["teacher"].update(model="cnn:widths=8,16", epochs=5, batch_size=64)
    return quality.ensure_teacher(raw, work, device)


# ---------------------------------------------------------------------------------------------------- runs


def arm_recipe(arm: str, student: str, seed: int, epochs: int, data: Path, teacher: Path) -> dict[str, Any]:
    """fmnist-patient.toml for one run: the arm's views and loss, the student, the seed, the schedule length."""
    raw = tomllib.loads(RECIPE.read_text())
    meta = teacher_metadata(teacher)
    norm = json.loads(meta["normalization"])   # the teacher sees inputs normalized exactly as in its training
    raw["data"].update(source=str(data.resolve()), mean=norm["mean"], std=norm["std"])
    raw["teacher"].update(model=meta["model"], checkpoint=str(teacher.resolve()))
    raw["student"].update(model=quality.STUDENTS[student], epochs=epochs, seed=seed)
    raw["distill"]["seed"] = seed
    if arm == "ct":   # the same loss (T = 1, alpha = 1) on crop+flip views, no mixing for either model
        raw["augment"] = {"crop": raw["augment"]["crop"], "flip": raw["augment"]["flip"]}
        raw["distill"] = {"temperature": 1.0, "alpha": 1.0, "seed": seed}
    return raw


def run_dir(work: Path, epochs: int, arm: str, student: str, seed: int) -> Path:
    return work / f"e{epochs}" / arm / student / f"seed{seed}"


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One run (student and scratch) through edgekd.distillation.distill, in its own process.

    The learning curve is the history train.fit returns (distill keeps only its length): fit is wrapped, not
    replaced (the run is edgekd's own), to keep each role's rows, written to <run>/curves.json beside
    metrics.json.
    """
    import torch

    from edgekd import distillation, fileio
    from edgekd.recipe import recipe_from_dict

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    curves_path = out / "curves.json"
    done = distillation.read_metrics(out)
    if "student" in done and "scratch" in done and curves_path.is_file():
        return {"out": str(out), "seconds": 0.0}
    curves: dict[str, list[dict[str, Any]]] = json.loads(curves_path.read_text()) if curves_path.is_file() else {}
    real_fit = distillation.fit

    def recording_fit(*args: Any, **kwargs: Any) -> list[dict]:
        history = real_fit(*args, **kwargs)
        if kwargs.get("desc") in ROLES:
            curves[ROLES[kwargs["desc"]]] = history
            fileio.write_json(curves_path, curves)   # a run stopped during scratch keeps the student's curve
        return history

    recipe = recipe_from_dict(job["recipe"], base_dir=RECIPE.parent)
    print(f"--- {job['name']} -> {out}", flush=True)
    start = time.perf_counter()
    distillation.fit = recording_fit
    try:
        metrics = distillation.distill(recipe, out, device=job["device"], progress=False, resume=True)
    finally:
        distillation.fit = real_fit
    for role, name in (("student", "distilled"), ("scratch", "scratch")):
        if name not in curves and metrics[role].get("history"):   # an edgekd that records the history itself
            curves[name] = metrics[role]["history"]
    fileio.write_json(curves_path, curves)
    missing = [name for name in ROLES.values() if name not in curves]
    if missing:
        raise RuntimeError(f"{out}: no learning curve for {', '.join(missing)} (edgekd.distillation no longer trains "
                         "through distillation.fit, or the run was finished without this script); delete the run "
                         "folder to train it again")
    return {"out": str(out), "seconds": round(time.perf_counter() - start, 1)}


def run_all(jobs: list[dict[str, Any]], workers: int, deadline: float | None = None) -> list[dict[str, Any]]:
    """The runs, `workers` at a time in fresh (spawned: CUDA cannot be forked) processes; one job and no deadline:
    in this process. Past `deadline` seconds the unfinished runs are stopped (their checkpoints stay, so the next
    invocation continues them) and returned."""
    if workers <= 1 and deadline is None:
        for job in jobs:
            run_one(job)
        return []
    end = time.monotonic() + deadline if deadline is not None else float("inf")
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        pending = [(job, pool.apply_async(run_one, (job,))) for job in jobs]
        while pending and time.monotonic() < end:
            time.sleep(0.5)
            for job, result in [p for p in pending if p[1].ready()]:
                r = result.get()   # a run's error stops the suite here
                print(f"finished {r['out']} in {r['seconds']} s", flush=True)
                pending.remove((job, result))
        pool.terminate()
    return [job for job, _ in pending]


def progress_of(out: Path) -> dict[str, Any]:
    """How far a stopped run got: per role, epochs done, training seconds per epoch and the last test accuracy,
    from its finished curves and its checkpoint (train.fit keeps the history there)."""
    import torch

    done = seed_curves(out)
    info: dict[str, Any] = {}
    for role, name in (("student", "distilled"), ("scratch", "scratch")):
        ckpt = out / "checkpoints" / f"{role}.ckpt"
        history = (done.get(name) or
                   (torch.load(ckpt, map_location="cpu", weights_only=True)["history"] if ckpt.is_file() else []))
        if history:
            val = [h["val_accuracy"] for h in history if h.get("val_accuracy") is not None]
            info[name] = {"epochs_done": len(history), "finished": name in done,
                          "seconds_per_epoch": common.mean_sd([h["seconds"] for h in history])[0],
                          "last_test_accuracy": val[-1] * 100 if val else None}
    return info


# ------------------------------------------------------------------------------------------------- results


def seed_curves(folder: Path) -> dict[str, list[dict[str, Any]]]:
    path = folder / "curves.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def mean_curve(histories: list[list[dict[str, Any]]]) -> list[tuple[int, float]]:
    """(epoch, mean test accuracy %) at the epochs every seed evaluated."""
    per_seed = [{r["epoch"]: r["val_accuracy"] * 100 for r in h if r.get("val_accuracy") is not None}
                for h in histories]
    if not per_seed:
        return []
    epochs = sorted(set.intersection(*(set(s) for s in per_seed)))
    return [(e, common.mean_sd([s[e] for s in per_seed])[0]) for e in epochs]


def crossing(distilled: list[tuple[int, float]], scratch: list[tuple[int, float]]) -> int | None:
    """The first evaluated epoch from which the distilled mean stays at or above scratch (None: never)."""
    sc = dict(scratch)
    ahead = [(e, a >= sc[e]) for e, a in distilled if e in sc]
    for k, (epoch, _) in enumerate(ahead):
        if all(ok for _, ok in ahead[k:]):
            return epoch
    return None


def summarize_arm(work: Path, epochs: int, arm: str, student: str, seeds: list[int]) -> dict[str, Any] | None:
    """bench_distill_quality's row (mean ± SD, paired gain ± SE, gap recovered) plus curves and s/epoch."""
    row = quality.summarize(work / f"e{epochs}", arm, student, seeds)
    if row is None:
        return None
    curves = {s: seed_curves(run_dir(work, epochs, arm, student, s)) for s in row["seeds"]}
    curves = {s: c for s, c in curves.items() if "distilled" in c and "scratch" in c}
    mean = {role: mean_curve([c[role] for c in curves.values()]) for role in ("distilled", "scratch")}
    seconds = {role: common.mean_sd([r["seconds"] for c in curves.values() for r in c[role]])[0]
               for role in ("distilled", "scratch")} if curves else {}
    row.update(suite=ARMS[arm], arm=arm, curves={str(s): c for s, c in curves.items()}, mean_curve=mean,
               crossing_epoch=crossing(mean["distilled"], mean["scratch"]) if curves else None,
               seconds_per_epoch=seconds)
    return row


def curve_markdown(rows: list[dict[str, Any]]) -> str:
    heads = ["arm", "student", "seeds with curves", "s/epoch (KD / scratch)", "distilled >= scratch from epoch",
             "test accuracy along the schedule, distilled / scratch (mean over seeds)"]
    table = []
    for r in rows:
        sc = dict(r["mean_curve"]["scratch"])
        points = ", ".join(f"{e}: {a:.1f}/{sc[e]:.1f}" for e, a in r["mean_curve"]["distilled"] if e in sc)
        s = r["seconds_per_epoch"]
        table.append([r["arm"], r["student"], len(r["curves"]),
                      f"{s['distilled']:.2f} / {s['scratch']:.2f}" if s else "n/a",
                      str(r["crossing_epoch"]) if r["crossing_epoch"] is not None else "never", points or "n/a"])
    return common.markdown_table(heads, table)


def plot_curves(out: Path, name: str, rows: list[dict[str, Any]], train_samples: int) -> list[Path]:
    """One PNG per student: mean test accuracy against epoch, distilled and scratch for each arm."""
    paths = []
    for student in dict.fromkeys(r["student"] for r in rows):
        series = {f"{r['arm']} {role}": r["mean_curve"][role] for r in rows if r["student"] == student
                  for role in ("distilled", "scratch") if r["mean_curve"][role]}
        if series:
            teacher = next(r["teacher_accuracy"] for r in rows if r["student"] == student)
            paths.append(common.plot_series(out / f"{name}_{student}.png", series, xlabel="epoch",
                                            ylabel="test accuracy (%)", logx=False, logy=False,
                                            title=f"{student} student, {train_samples:,} Fashion-MNIST images "
                                                  f"(teacher {teacher:.2f}%)"))
    return paths


# ---------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, default_threads=1)
    parser.add_argument("--epochs", type=int, default=None, help="default 300 (2 with --quick)")
    parser.add_argument("--arms", default="fm,ct", help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--students", default="cnn,mlp", help="comma-separated: " + ", ".join(quality.STUDENTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--test-samples", type=int, default=None, help="stratified test subset (default: all 10,000)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--deadline", type=float, default=None,
                        help="stop unfinished runs after this many seconds (they resume on the next invocation) "
                             "and report how far they got")
    parser.add_argument("--work", type=Path, default=None,
                        help="run folders and the teacher (default runs/patient; a temporary folder with --quick)")
    args = parser.parse_args()
    if args.quick:   # 2 epochs, one seed, the MLP student, 500 training and 1,000 test images: seconds
        args.epochs, args.seeds, args.students = args.epochs or 2, "0", "mlp"
        args.train_samples, args.test_samples = 500, args.test_samples or 1000
    args.epochs = args.epochs or 300
    for key, known in (("arms", ARMS), ("students", quality.STUDENTS)):
        bad = [v for v in getattr(args, key).split(",") if v not in known]
        if bad:
            parser.error(f"--{key}: unknown {', '.join(bad)}; expected {', '.join(known)}")
    if args.epochs < 1 or args.jobs < 1:
        parser.error("--epochs and --jobs must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # spawned runs inherit it
    arms, students = args.arms.split(","), args.students.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or (Path(tempfile.mkdtemp(prefix="edgekd-patient-quick-")) if args.quick
                         else Path("runs/patient"))
    torch.set_num_threads(args.threads)
    data = subset_npz(work / "data" if args.quick else DATA_DIR, args.train_samples, args.subset_seed,
                      args.test_samples)
    teacher = ensure_teacher(work, args.quick, data, args.device)
    jobs = [{"name": f"{arm} / {student} / seed {seed} / {args.epochs} epochs", "device": args.device,
             "threads": args.threads, "out": str(run_dir(work, args.epochs, arm, student, seed)),
             "recipe": arm_recipe(arm, student, seed, args.epochs, data, teacher)}
            for student in students for arm in arms for seed in seeds]   # CNN first: the longest runs
    start = time.perf_counter()
    stopped = run_all(jobs, args.jobs, args.deadline)
    wall = time.perf_counter() - start
    unfinished = {job["name"]: progress_of(Path(job["out"])) for job in stopped}

    rows = [r for arm in arms for student in students
            if (r := summarize_arm(work, args.epochs, arm, student, seeds)) is not None]
    notes = (f"{args.train_samples:,} training images (stratified, seed {args.subset_seed}) of the official 60,000; "
             f"test = the official {args.test_samples or 10000:,} images, also the per-epoch evaluation (no model "
             "selection on it: fixed T = 1, alpha = 1, last-epoch weights). One teacher (fmnist.toml, all labels) "
             f"for every run. {args.epochs} epochs, {len(jobs)} runs on {args.device}, {args.jobs} at a time: "
             f"{wall:.0f} s wall.")
    data_out = {"command": common.command_line(), "environment": common.environment(threads=args.threads),
                "notes": notes, "seeds": seeds, "work": str(work), "device": args.device, "jobs": args.jobs,
                "wall_seconds": round(wall, 1), "data": str(data), "teacher": str(teacher), "rows": rows,
                "unfinished": unfinished}
    name = common.result_name("patient", args.quick)
    md = quality.markdown(rows, None, data_out,
                          title=f"Patient distillation, {args.train_samples:,}-image Fashion-MNIST subset")
    md += "\n## Learning curves (test accuracy %, every epochs // 20)\n\n" + curve_markdown(rows) + "\n"
    if unfinished:
        md += (f"\n## Stopped at the {args.deadline:g} s deadline (they resume from their checkpoints)\n\n"
               + common.markdown_table(["run", "role", "epochs done", "finished", "s/epoch", "last test accuracy"],
                                       [[name, role, p["epochs_done"], "yes" if p["finished"] else "no",
                                         p["seconds_per_epoch"], p["last_test_accuracy"]]
                                        for name, info in unfinished.items() for role, p in info.items()]
                                       + [[name, "no epoch done", 0, "no", None, None]
                                          for name, info in unfinished.items() if not info]) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for png in plot_curves(args.out, name, rows, args.train_samples):
        md += f"\n![learning curves]({png.name})\n"
    json_path, md_path = common.write_results(args.out, name, data_out, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")
    if args.quick and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
