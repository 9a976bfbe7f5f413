"""GPU check: teacher training, distillation and QAT on CUDA with bf16, then the `torch` runtime target.

One command, a few minutes on one GPU:

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

Uses only torch, onnx and onnxruntime beyond edgekd's pure-Python dependencies (click, safetensors, tqdm,
tabulate, tomli-w, numpy); the data is synthetic so scikit-learn is not needed. torchao may be absent:
its QAT part is then skipped with a message. Writes timings and accuracies as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic(path: Path, n_train: int = 20000, n_test: int = 2000, classes: int = 10, seed: int = 0) -> None:
    """Class-conditional 16x16 images: a per-class template plus noise, learnable but not trivial."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(classes, 1, 16, 16)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return (templates[y] + 1.5 * rng.normal(size=(n, 1, 16, 16))).astype(np.float32), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args()

    import torch

    from edgekd.distillation import distill, train_teacher
    from edgekd.recipe import recipe_from_dict

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        return 1
    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "python": platform.python_version(), "steps": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic(tmp / "data.npz")
        recipe = recipe_from_dict({
            "data": {"source": str(tmp / "data.npz"), "val_fraction": 0.1},
            "teacher": {"model": "cnn:widths=64,128,256", "epochs": 5, "batch_size": 256, "amp": "bf16"},
            "student": {"model": "cnn:widths=16,32", "epochs": 5, "batch_size": 256, "amp": "bf16"},
            "distill": {"temperature": 4.0, "alpha": 0.9, "teacher_bf16": True},
            "quantize": {"mode": "qat", "epochs": 2, "calibration_size": 512},
        })
        run = tmp / "run"
        t = time.perf_counter()
        metrics = train_teacher(recipe, run, device="cuda", progress=False)
        result["steps"]["teacher_bf16_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        metrics = distill(recipe, run, device="cuda", progress=False)
        result["steps"]["distill_bf16_s"] = round(time.perf_counter() - t, 2)
        result["metrics"] = {k: {"accuracy": v["accuracy"], "params": v["params"]} for k, v in metrics.items()}

        try:
            import torchao  # noqa: F401
        except ImportError as e:
            print(f"gpu_check: torchao is not installed ({e}); skipping QAT")
            result["qat"] = "skipped: torchao not installed"
        else:
            from edgekd.pipeline import RunContext, quantize

            t = time.perf_counter()
            q = quantize(run, "tensorrt", ctx=RunContext(run, recipe), device="cuda", progress=False)
            result["steps"]["qat_s"] = round(time.perf_counter() - t, 2)
            result["qat"] = {"pytorch_accuracy": q["pytorch_accuracy"]}

        from edgekd.pipeline import build, profile

        t = time.perf_counter()
        built = build(run, "cuda-torch", ctx=RunContext(run, dataclasses.replace(recipe)))
        result["steps"]["build_torch_runtime_s"] = round(time.perf_counter() - t, 2)
        result["skipped"] = built["skipped"]
        if built["built"]:
            profiles = profile(run, "cuda-torch")
            result["profile"] = [{"model": p["model"], "precision": p["precision"], "accuracy": p["accuracy"],
                                  "agreement": p["agreement"], "rows": p["rows"]} for p in profiles]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
