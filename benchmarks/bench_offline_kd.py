"""Offline KD from the teacher cache against online KD and plain training; hard vs top-k vs online targets.

    python benchmarks/bench_offline_kd.py [--train 20000] [--quick]

On Fashion-MNIST (Debian's dataset-fashion-mnist; `apt-get install dataset-fashion-mnist`):
1. Epoch time of the same student trained with plain cross-entropy, online KD (a teacher forward pass per
   batch) and offline KD from `edgekd cache-teacher`'s top-k cache, interleaved in one process and
   reported as ratios to plain training (this machine is noisy; ratios are what is comparable).
2. Test accuracy of the student trained on the same inputs from the teacher's hard labels only, from its
   top-k soft labels (`edgekd label`), and with full online KD; plus the scratch baseline on true labels.
Writes benchmarks/results/offline_kd.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekd import cache as teacher_cache  # noqa: E402
from edgekd import labels as teacher_labels  # noqa: E402
from edgekd.data import load_data  # noqa: E402
from edgekd.distillation import distill, train_teacher  # noqa: E402
from edgekd.models import build_model, load_weights  # noqa: E402
from edgekd.objective import Objective, ObjectiveConfig, OfflineTargets  # noqa: E402
from edgekd.recipe import recipe_from_dict  # noqa: E402
from edgekd.teachers import TorchTeacher  # noqa: E402
from edgekd.train import fit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=20000, help="training samples used (of 55,000)")
    parser.add_argument("--epochs", type=int, default=4, help="student epochs for the accuracy table")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes, one timing round")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.train, args.epochs = 2000, 1
    torch.set_num_threads(2)
    started = time.perf_counter()

    raw = {"data": {"source": "fashion-mnist", "val_fraction": 0.0},
           "teacher": {"model": "cnn:widths=32,64,128", "epochs": 1 if args.quick else 3, "batch_size": 128},
           "student": {"model": "cnn:widths=8,16", "epochs": args.epochs, "batch_size": 128},
           "distill": {"temperature": 4.0, "alpha": 0.9, "baseline": False}}
    recipe = recipe_from_dict(raw)
    full = load_data(recipe.data)
    rng = np.random.default_rng(0)
    keep = np.sort(rng.permutation(len(full.x_train))[:args.train])
    data = dataclasses.replace(full, x_train=full.x_train[keep], y_train=full.y_train[keep],
                               x_unlabeled=full.x_train[keep])
    dev = torch.device("cpu")
    result: dict = {"command": " ".join(["python", *sys.argv]), "machine": platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__, "train_samples": int(len(keep)),
                    "test_samples": int(len(data.x_test))}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_teacher(recipe, tmp / "t", device="cpu", progress=False, data=data)
        teacher = build_model(recipe.teacher.model, data.input_shape, data.num_classes)
        load_weights(teacher, tmp / "t" / "teacher.safetensors")
        t = TorchTeacher(teacher, identity="bench-teacher")

        # 1. epoch time, interleaved rounds
        t0 = time.perf_counter()
        teacher_cache.build_cache(t, data.x_train, tmp / "cache", top_k=args.top_k, epochs=1, augment=None, seed=0)
        cache_build_s = time.perf_counter() - t0
        c = teacher_cache.load_cache(tmp / "cache", x=data.x_train, augment_key="none", seed=0, top_k=args.top_k)
        offline = OfflineTargets(lambda epoch, idx, _batch: (None, *c.lookup(0, idx)), "logits")
        cfg = dataclasses.replace(recipe.student, epochs=1)
        kd = ObjectiveConfig(4.0, 0.9)
        modes = {"plain CE": {}, "online KD": {"objective": Objective(kd, teacher=teacher)},
                 "offline KD (cache)": {"objective": Objective(kd, offline=offline)}}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(1 if args.quick else 3):
            for name, extra in modes.items():
                student = build_model(recipe.student.model, data.input_shape, data.num_classes)
                start = time.perf_counter()
                fit(student, data.x_train, data.y_train, cfg, device=dev, desc=name, progress=False, **extra)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["plain CE"])
        result["epoch_time"] = {m: {"median_s": statistics.median(v), "ratio_to_plain": statistics.median(v) / base,
                                    "runs_s": v} for m, v in times.items()}
        result["cache_build_s"] = cache_build_s

        # 2. accuracy from hard labels, top-k soft labels, online KD (same inputs, same schedule)
        acc = {}
        for keep_kind in ("labels", "topk"):
            out = tmp / f"labels-{keep_kind}"
            teacher_labels.label_pool(t, data.x_unlabeled, out, top_k=args.top_k, temperature=4.0, keep=keep_kind)
            m = distill(recipe, tmp / f"s-{keep_kind}", device="cpu", progress=False, data=data, labels=out)
            acc["teacher hard labels" if keep_kind == "labels" else f"teacher top-{args.top_k} soft labels"] = \
                m["student"]["accuracy"]
        r_online = dataclasses.replace(recipe, distill=dataclasses.replace(recipe.distill, baseline=True))
        (tmp / "online").mkdir()
        (tmp / "online" / "teacher.safetensors").write_bytes((tmp / "t" / "teacher.safetensors").read_bytes())
        m = distill(r_online, tmp / "online", device="cpu", progress=False, data=data)
        acc["full online KD"] = m["student"]["accuracy"]
        acc["scratch (true labels)"] = m["scratch"]["accuracy"]
        acc["teacher"] = m["teacher"]["accuracy"]
        result["accuracy"] = acc
    result["total_s"] = time.perf_counter() - started

    name = "offline_kd_quick" if args.quick else "offline_kd"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Offline KD (teacher cache) vs online KD vs plain training, Fashion-MNIST", "",
             f"Command: `{result['command']}`  ",
             f"{result['machine']}, {result['cpus']} threads, torch {result['torch']}; {result['train_samples']} "
             f"training images, {result['test_samples']} test images; student {recipe.student.model}, teacher "
             f"{recipe.teacher.model}. Total {result['total_s']:.0f} s.", "",
             "| training | epoch time (median s) | vs plain CE |", "|---|---|---|"]
    lines += [f"| {m} | {v['median_s']:.2f} | {v['ratio_to_plain']:.2f}x |" for m, v in result["epoch_time"].items()]
    lines += ["", f"Building the top-{args.top_k} cache (one teacher pass): {cache_build_s:.1f} s.", "",
              f"| student trained from ({args.epochs} epochs, same inputs) | test accuracy |", "|---|---|"]
    lines += [f"| {k} | {v * 100:.2f} |" for k, v in acc.items()]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
