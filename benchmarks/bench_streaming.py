"""Streaming image folders (issue 14): peak memory of `edgekd distill` at 2,000 and 20,000 images of 224x224,
and the wall time of one distillation epoch against a hand-written Dataset + DataLoader + KD loop.

    flock /work/bench.lock python benchmarks/bench_streaming.py            # 20,000 and 2,000 images
    python benchmarks/bench_streaming.py --quick                            # 400 and 200 images, ~1 minute

Data: Fashion-MNIST training images (Debian's dataset-fashion-mnist) upsampled 28 -> 224 and tinted with a
random colour per image, saved as JPEG (quality 90) in one folder per class under benchmarks/data/ (git-ignored;
made once). The small folder holds hard links to a stratified part of the large one.

Memory: each `edgekd distill` runs in its own process; peak RSS is the kernel's maximum resident set of that
process (wait4's ru_maxrss: the largest of the process and its DataLoader workers), and the process tree's peak
PSS (proportional set size, so pages the workers share with the parent count once) is sampled every 0.1 s.

Pools (`--pools`, issue 14): peak RSS of `edgekd label --pool FOLDER` and `edgekd cache-teacher` (training split
+ `[data] unlabeled = FOLDER`) over a large and a small pool folder of the same images, side by side, each in its
own process; the teacher is trained once on a 200-image folder. Flat memory = ratio large / small near 1.

    flock /work/bench.lock python benchmarks/bench_streaming.py --pools    # pools of 8,000 and 800 images

Time: the same student, teacher, batch size, workers, threads, transform (decode, RGB, /255, normalize), flip
augmentation and KD loss in both; edgekd's figure is the student (KD) epoch it reports, the hand-written loop's
is its own epoch, run in its own process right after. Ratio = edgekd / hand-written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as common

DATA = Path(__file__).resolve().parent / "data" / "streaming"
STUDENT, TEACHER = "bench_streaming:student", "bench_streaming:teacher"   # small: the data path dominates
MEAN, STD = [0.25, 0.25, 0.25], [0.3, 0.3, 0.3]   # fixed, so neither side spends time estimating them
SPLIT = {"test_fraction": 0.05, "val_fraction": 0.05}


# ----------------------------------------------------------------------------------------------- models


def _small_cnn(input_shape: tuple[int, ...], num_classes: int, width: int):
    """4x4 average pooling first (224 -> 56), then two conv-BN-ReLU blocks: cheap enough that one epoch over
    20,000 images of 224 px runs in minutes on 2 cores, so the data path is what the timings compare."""
    from torch import nn

    return nn.Sequential(
        nn.AvgPool2d(4), nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def student(input_shape: tuple[int, ...], num_classes: int):
    return _small_cnn(input_shape, num_classes, 4)


def teacher(input_shape: tuple[int, ...], num_classes: int):
    return _small_cnn(input_shape, num_classes, 16)


# ------------------------------------------------------------------------------------------------- data


def make_folder(root: Path, n: int) -> Path:
    """n tinted 224x224 JPEGs, n/10 per Fashion-MNIST class (first images of each class); kept once made."""
    if (root / ".complete").is_file():
        return root
    import numpy as np
    from PIL import Image

    from edgekd.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

    if not FASHION_MNIST_DIR.is_dir():
        sys.exit(f"{FASHION_MNIST_DIR} not found: sudo apt-get install -y dataset-fashion-mnist")
    x = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    y = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        folder = root / f"{c}-{name.replace('/', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(y == c)[: n // 10]:
            grey = np.asarray(Image.fromarray(x[i]).resize((224, 224), Image.BILINEAR), np.float32)
            tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
            px = (grey[:, :, None] * tint + 20).clip(0, 255).astype(np.uint8)
            Image.fromarray(px).save(folder / f"{i:05d}.jpg", quality=90)
    (root / ".complete").write_text(str(n))
    return root


def linked_subset(big: Path, root: Path, n: int) -> Path:
    """A folder of hard links to the first n/10 files of each class of `big`."""
    if (root / ".complete").is_file():
        return root
    for folder in sorted(p for p in big.iterdir() if p.is_dir()):
        (root / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.iterdir())[: n // 10]:
            if not (root / folder.name / f.name).exists():
                os.link(f, root / folder.name / f.name)
    (root / ".complete").write_text(str(n))
    return root


# ----------------------------------------------------------------------------------------------- memory


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `cmd`; its peak RSS (MiB, wait4) and the peak PSS of its process tree (MiB, sampled), wall seconds."""
    peak = [0]
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], sum(_pss_kib(p) for p in _tree(proc.pid)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "peak_tree_pss_mib": peak[0] / 1024, "wall_seconds": wall}


# ------------------------------------------------------------------------------------------------ edgekd


RECIPE = """[data]
source = "{folder}"
image_size = [224, 224]
mean = {mean}
std = {std}
test_fraction = {test_fraction}
val_fraction = {val_fraction}
num_workers = {workers}

[teacher]
model = "{teacher}"
epochs = 1
batch_size = {batch}

[student]
model = "{student}"
epochs = 1
batch_size = {batch}

[distill]
baseline = false

[augment]
flip = true
"""


def run_edgekd(folder: Path, out: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe-in.toml"
    recipe.write_text(RECIPE.format(folder=folder, mean=MEAN, std=STD, workers=args.workers, teacher=TEACHER,
                                    student=STUDENT, batch=args.batch, **SPLIT))
    for stale in ("teacher.safetensors", "student.safetensors", "metrics.json"):
        (out / stale).unlink(missing_ok=True)
    log = out / "log.txt"
    cmd = [sys.executable, "-m", "edgekd", "distill", str(recipe), "--out", str(out), "--device", "cpu"]
    row = run_measured(cmd, env, log)
    text = log.read_text()
    epoch = re.findall(r"student \(KD\) epoch 1/1: .*\(([\d.]+)s\)", text)
    metrics = json.loads((out / "metrics.json").read_text())
    row.update(images=metrics["data"]["images"], train_samples=metrics["student"]["samples"],
               kd_epoch_seconds=float(epoch[-1]) if epoch else None,
               student_accuracy=metrics["student"]["accuracy"], command=" ".join(cmd))
    return row


# ------------------------------------------------------------------------------------------ hand-written


def hand_written(folder: Path, train_samples: int, workers: int, batch: int) -> dict:
    """One KD epoch the way a user would write it: a Dataset of (path, label), PIL decode, the same
    normalization, a DataLoader with the same workers and batch size, flip per batch, KL * T^2 + CE."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from edgekd.models import build_model

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    items = [(str(f), c) for c, name in enumerate(classes) for f in sorted((folder / name).glob("*.jpg"))]
    keep = np.random.default_rng(0).permutation(len(items))[:train_samples]
    items = [items[i] for i in sorted(keep)]
    mean = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(STD, np.float32).reshape(3, 1, 1)

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int):
            path, label = items[i]
            with Image.open(path) as im:
                x = np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
            return torch.from_numpy(np.ascontiguousarray((x - mean) / std)), label

    torch.manual_seed(0)
    teacher = build_model(TEACHER, (3, 224, 224), len(classes)).eval()
    student = build_model(STUDENT, (3, 224, 224), len(classes)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=2 if workers else None)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader))
    t, alpha = 4.0, 0.9
    start = time.perf_counter()
    for x, y in loader:
        flip = torch.rand(len(x)) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        with torch.no_grad():
            soft = F.softmax(teacher(x) / t, dim=1)
        logits = student(x)
        loss = (alpha * t * t * F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean")
                + (1 - alpha) * F.cross_entropy(logits, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {"epoch_seconds": time.perf_counter() - start, "samples": len(items)}


def run_hand(folder: Path, train_samples: int, args: argparse.Namespace, env: dict[str, str], log: Path) -> dict:
    result = log.with_suffix(".json")
    cmd = [sys.executable, __file__, "--hand", str(folder), "--hand-samples", str(train_samples),
           "--hand-out", str(result), "--workers", str(args.workers), "--batch", str(args.batch)]
    row = run_measured(cmd, env, log)
    row.update(json.loads(result.read_text()))
    return row


# ------------------------------------------------------------------------------------------------ pools


POOL_RECIPE = """[data]
source = "{source}"
image_size = [224, 224]
mean = {mean}
std = {std}
val_fraction = 0.0
num_workers = {workers}
{extra}
[teacher]
model = "{teacher}"
epochs = 1
batch_size = {batch}
{checkpoint}
[student]
model = "{student}"
"""


def run_pools(args: argparse.Namespace, env: dict[str, str], environment: dict) -> None:
    """Peak RSS of `edgekd label` and `edgekd cache-teacher` over a large and a small pool folder."""
    import shutil

    sizes = [int(s) for s in (args.sizes or ("600,300" if args.quick else "8000,800")).split(",")]
    big = make_folder(DATA / f"fm{sizes[0]}", sizes[0])
    pools = [big] + [linked_subset(big, DATA / f"fm{n}", n) for n in sizes[1:]]
    source = linked_subset(big, DATA / "fm200", 200)
    runs = common.REPO / "runs" / "bench-streaming-pools"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    fmt = {"source": source, "mean": MEAN, "std": STD, "workers": args.workers, "teacher": TEACHER,
           "student": STUDENT, "batch": args.batch}
    (runs / "teacher.toml").write_text(POOL_RECIPE.format(**fmt, extra="", checkpoint=""))
    edgekd = [sys.executable, "-m", "edgekd"]
    run_measured([*edgekd, "teacher", str(runs / "teacher.toml"), "--out", str(runs / "teacher"), "--device", "cpu",
                  "--quiet"], env, runs / "teacher.log")
    weights = runs / "teacher" / "teacher.safetensors"
    rows = []
    for n, pool in zip(sizes, pools, strict=True):
        label = [*edgekd, "label", str(runs / "teacher.toml"), "--teacher", str(weights), "--pool", str(pool),
                 "--out", str(runs / f"labels-{n}"), "--quiet"]
        recipe = runs / f"cache-{n}.toml"
        recipe.write_text(POOL_RECIPE.format(**fmt, extra=f'unlabeled = "{pool}"',
                                             checkpoint=f'checkpoint = "{weights}"'))
        cache = [*edgekd, "cache-teacher", str(recipe), "--out", str(runs / f"cache-{n}"), "--augment", "flip",
                 "--device", "cpu", "--quiet"]
        row = {"pool_images": n, "label": run_measured(label, env, runs / f"label-{n}.log"),
               "cache_teacher": run_measured(cache, env, runs / f"cache-{n}.log")}
        row["label"]["command"], row["cache_teacher"]["command"] = " ".join(label), " ".join(cache)
        rows.append(row)
        print(json.dumps(row), flush=True)
    large, small = rows[0], rows[-1]
    # the large pool's cache-teacher again with glibc's mmap threshold fixed at its 128 KiB default (it
    # otherwise rises to the largest freed block, so freed activation-sized blocks stay in a growing heap):
    # what remains is what the process holds, not allocator fragmentation
    shutil.rmtree(runs / f"cache-{sizes[0]}")   # built again from scratch, not resumed
    diag = run_measured(large["cache_teacher"]["command"].split(), {**env, "MALLOC_MMAP_THRESHOLD_": "131072"},
                        runs / "cache-fixed-threshold.log")
    large["cache_teacher_fixed_mmap_threshold"] = diag
    summary = {f"{k}_rss_large_over_small": large[k]["peak_rss_mib"] / small[k]["peak_rss_mib"]
               for k in ("label", "cache_teacher")}
    summary["cache_teacher_fixed_threshold_large_over_small"] = diag["peak_rss_mib"] / small["cache_teacher"][
        "peak_rss_mib"]
    summary.update({f"{k}_pss_large_over_small": large[k]["peak_tree_pss_mib"] / small[k]["peak_tree_pss_mib"]
                    for k in ("label", "cache_teacher")})
    array_mib = {n: n * 3 * 224 * 224 * 4 / 2**20 for n in sizes}
    environment["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    data = {"command": common.command_line(), "environment": environment, "workers": args.workers,
            "batch": args.batch, "rows": rows, "summary": summary, "pool_as_float32_array_mib": array_mib}
    table = common.markdown_table(
        ["pool images", "as a float32 array MiB", "label peak RSS MiB", "label tree PSS MiB", "label s",
         "cache-teacher peak RSS MiB", "cache-teacher tree PSS MiB", "cache-teacher s"],
        [[r["pool_images"], array_mib[r["pool_images"]], r["label"]["peak_rss_mib"],
          r["label"]["peak_tree_pss_mib"], r["label"]["wall_seconds"], r["cache_teacher"]["peak_rss_mib"],
          r["cache_teacher"]["peak_tree_pss_mib"], r["cache_teacher"]["wall_seconds"]] for r in rows])
    md = "\n".join([common.header_markdown("Streaming pools: edgekd label and cache-teacher", data["command"],
                                            environment), "", table, "",
                    f"Peak RSS, large / small pool: label {summary['label_rss_large_over_small']:.3f}, "
                    f"cache-teacher {summary['cache_teacher_rss_large_over_small']:.3f} (tree PSS "
                    f"{summary['label_pss_large_over_small']:.3f}, "
                    f"{summary['cache_teacher_pss_large_over_small']:.3f}). cache-teacher on the large pool with "
                    f"MALLOC_MMAP_THRESHOLD_=131072: peak RSS {diag['peak_rss_mib']:.1f} MiB, "
                    f"{summary['cache_teacher_fixed_threshold_large_over_small']:.3f} of the small pool's. Load "
                    f"average at end: {environment['load_average_at_end']}."])
    paths = common.write_results(args.out, common.result_name("streaming_pools", args.quick), data, md)
    print(md)
    print(f"wrote {paths[0]} and {paths[1]}")


# -------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p, default_threads=1)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers on both sides (default 1)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default=None, help="image counts, large first (default 20000,2000; quick 400,200)")
    p.add_argument("--pools", action="store_true", help="peak RSS of edgekd label / cache-teacher over pools")
    p.add_argument("--hand", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--hand-samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--hand-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hand:
        import torch

        torch.set_num_threads(args.threads)
        res = hand_written(args.hand, args.hand_samples, args.workers, args.batch)
        args.hand_out.write_text(json.dumps(res))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(common.REPO), str(Path(__file__).resolve().parent)])}
    environment = common.environment(threads=args.threads)
    if args.pools:
        return run_pools(args, env, environment)
    sizes = [int(s) for s in (args.sizes or ("400,200" if args.quick else "20000,2000")).split(",")]
    big = make_folder(DATA / f"fm{sizes[0]}", sizes[0])
    folders = [big] + [linked_subset(big, DATA / f"fm{n}", n) for n in sizes[1:]]
    runs = common.REPO / "runs" / "bench-streaming"
    rows = []
    for n, folder in zip(sizes, folders, strict=True):
        row = run_edgekd(folder, runs / f"edgekd-{n}", args, env)
        if n == sizes[0]:   # the time comparison, on the large folder, right after edgekd's run
            hand = run_hand(folder, row["train_samples"], args, env, runs / f"hand-{n}.log")
            row["hand"] = hand
            row["epoch_ratio"] = row["kd_epoch_seconds"] / hand["epoch_seconds"]
        rows.append(row)
        print(json.dumps({"images": n, **row}), flush=True)
    large, small = rows[0], rows[-1]
    summary = {"rss_large_over_small": large["peak_rss_mib"] / small["peak_rss_mib"],
               "pss_large_over_small": large["peak_tree_pss_mib"] / small["peak_tree_pss_mib"],
               "epoch_ratio_edgekd_over_hand": large["epoch_ratio"]}
    environment["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    data = {"command": common.command_line(), "environment": environment, "workers": args.workers,
            "batch": args.batch, "student": STUDENT, "teacher": TEACHER, "rows": rows, "summary": summary}
    table = common.markdown_table(
        ["images", "train samples", "peak RSS MiB", "peak tree PSS MiB", "KD epoch s", "hand-written epoch s",
         "hand-written peak RSS MiB", "ratio"],
        [[r["images"], r["train_samples"], r["peak_rss_mib"], r["peak_tree_pss_mib"], r["kd_epoch_seconds"],
          r.get("hand", {}).get("epoch_seconds"), r.get("hand", {}).get("peak_rss_mib"), r.get("epoch_ratio")]
         for r in rows])
    md = "\n".join([common.header_markdown("Streaming image folders", data["command"], environment),
                    "", table, "",
                    f"Peak RSS, large / small folder: {summary['rss_large_over_small']:.3f} "
                    f"(tree PSS {summary['pss_large_over_small']:.3f}); KD epoch, edgekd / hand-written: "
                    f"{summary['epoch_ratio_edgekd_over_hand']:.3f}. Load average at end: "
                    f"{environment['load_average_at_end']}."])
    paths = common.write_results(args.out, common.result_name("streaming", args.quick), data, md)
    print(md)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
