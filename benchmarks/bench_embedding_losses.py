"""Which embedding-distillation loss and initialisation: held-out agreement of the same student trained each way.

    OMP_NUM_THREADS=1 python benchmarks/bench_embedding_losses.py [--run runs/minilm-shakespeare] [--epochs 2]

Reuses the teacher embeddings a `edgekd run benchmarks/recipes/minilm-shakespeare.toml` run cached in its
folder (teacher-embeddings.npz; computed here if missing), then trains the recipe's student (PyTorch, FP32)
with each variant for the same epochs and reports cosine and nearest-neighbour retrieval agreement with the
teacher on the held-out plays. Writes benchmarks/results/embedding_losses.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekd import embedding as E  # noqa: E402
from edgekd.recipe import load_recipe  # noqa: E402
from edgekd.tasks import embedding_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "MSE (= cosine on unit vectors), PCA init": {},
    "MSE + in-batch similarity matrix, PCA init": {"similarity_weight": 1.0},
    "MSE, random init": {"init": "random"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=HERE / "recipes" / "minilm-shakespeare.toml")
    parser.add_argument("--run", type=Path, default=Path("runs/minilm-shakespeare"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    recipe = load_recipe(args.recipe)
    cfg = dataclasses.replace(recipe.embedding, epochs=args.epochs)
    E.teacher_stage(dataclasses.replace(recipe, embedding=cfg), args.run, progress=False)
    split = E.read_split(args.run)
    corpus = json.loads((args.run / "corpus.json").read_text())["info"]
    rows, held_rows, t_train, t_held = split.rows, split.held_rows, split.train_emb, split.held_emb
    teacher = E.load_teacher(cfg)[0]
    table, position = E._input_embeddings(teacher)
    word = table.weight
    results = []
    for name, change in VARIANTS.items():
        v = dataclasses.replace(cfg, **change)
        student = E.build_student(v, word.shape[0], t_train.shape[1], teacher.pad_id)
        if v.init == "pca":
            E.init_from_teacher(student, word, position)
        t0 = time.perf_counter()
        E.train_student(student, rows, t_train, v, pad_id=teacher.pad_id, epochs=v.epochs, lr=v.lr, progress=False)
        seconds = time.perf_counter() - t0
        student.eval()
        m = embedding_metrics(E.encode(student, held_rows, teacher.pad_id), t_held)
        results.append({"variant": name, "changes": change, "train_seconds": round(seconds, 1), **m})
        print(name, {k: round(x, 4) if isinstance(x, float) else x for k, x in m.items()}, flush=True)
    out = {"command": " ".join(["python", *sys.argv]), "machine": platform.machine(), "torch": torch.__version__,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "epochs": args.epochs, "corpus": corpus,
           "student": {k: getattr(cfg, k) for k in ("layers", "hidden", "heads", "intermediate", "lr", "batch_size")},
           "results": results, "total_seconds": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embedding_losses.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# Embedding-distillation loss and initialisation, all-MiniLM-L6-v2 -> 2 x 192 student", "",
             f"Command: `{out['command']}`  ", f"{out['machine']}, torch {out['torch']}, OMP_NUM_THREADS="
             f"{out['omp_num_threads']}; {corpus['train_sentences']} training sentences, "
             f"{corpus['heldout_sentences']} held-out sentences ({', '.join(corpus['heldout_documents'])}); "
             f"{args.epochs} epochs each, FP32 PyTorch. Total {out['total_seconds']:.0f} s.", "",
             "| variant | cosine | retrieval top-1 | top-5 overlap | teacher top-1 in student top-5 | train s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['cosine']:.4f} | {r['retrieval_top1']:.3f} | {r['retrieval_top5']:.3f} "
                     f"| {r['teacher_top1_in_student_top5']:.3f} | {r['train_seconds']:.0f} |")
    (args.out / "embedding_losses.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
