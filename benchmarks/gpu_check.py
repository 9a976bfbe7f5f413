"""GPU check: training on CUDA (bf16), the `torch` runtime target, then TensorRT end to end.

One command, under five minutes on one GPU with TensorRT installed (`pip install 'edgekd[tensorrt]'`):

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--skip-training] [--dry-run]

Part 1 (CUDA + torch): teacher training, distillation and QAT with bf16, then the `cuda-torch` target.
Part 2 (TensorRT, `trt_check`): a small CNN trained for a few seconds is exported (float ONNX) and PTQ-quantized
with the `tensorrt` scheme (Q/DQ ONNX); both pass the export gate. Then, for the T4 and Orin Nano targets
(profiles/flags from their files; engines are built for the GPU at hand), fp16 and int8 engines are built and
run through `edgekd.runtime` (max abs difference and top-1 agreement against PyTorch); the timing cache is
reused, then corrupted (the build must fall back to a fresh cache and say so); the INT8 layers of each int8
engine are counted from TensorRT's engine inspector (what Polygraphy's layer inspection reads); the DLA target is
built where DLA cores exist (GPU-fallback layer count); `polygraphy run --trt --onnxrt` compares TensorRT with
onnxruntime. `--dry-run` goes as far as a CPU allows (models, ONNX, gate, the build plan for every target,
precision and TensorRT 10.3/11.4.1, the DLA calibration cache) and says where it stopped.

Uses torch, onnx and onnxruntime beyond edgekd's pure-Python dependencies; torchao for the int8 parts, the
`tensorrt` extra (tensorrt, cuda-python, onnxconverter-common, polygraphy) for part 2. Writes a JSON summary.
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


TRT_TARGETS = ("datacenter-t4-trt", "jetson-orin-nano-trt", "jetson-agx-orin-dla")
PLAN_VERSIONS = ("10.3.0", "11.4.1")
SHAPE = (1, 16, 16)


def _agreement(got: np.ndarray, ref: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(got - ref).max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def _models(work: Path) -> dict:
    """A small CNN trained briefly on the synthetic data, its float ONNX and its `tensorrt`-scheme PTQ ONNX."""
    import torch

    from edgekd.export import export_onnx
    from edgekd.models import build_model

    synthetic(work / "data.npz", n_train=4096, n_test=512)
    data = np.load(work / "data.npz")
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    torch.manual_seed(0)
    model = build_model("cnn:widths=16,32", SHAPE, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        idx = torch.randint(0, len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_test = data["x_test"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test)).numpy()
    out = {"model": model, "x": x_test, "y": data["y_test"], "ref_fp32": ref,
           "fp32_onnx": export_onnx(model, torch.from_numpy(x_test[:2]), work / "student.onnx", metadata={}),
           "test_accuracy": float((ref.argmax(1) == data["y_test"]).mean())}
    try:
        from edgekd import quantize as q
    except ImportError as e:
        out["int8_skipped"] = f"torchao is not installed ({e})"
        return out
    gm = q.ptq(model, torch.from_numpy(x_test[:8]), [x[i:i + 128] for i in range(0, 1024, 128)],
               q.QuantConfig(scheme="tensorrt"))
    with torch.no_grad():
        out["ref_int8"] = gm(torch.from_numpy(x_test)).numpy()
    out["int8_onnx"] = export_onnx(gm, torch.from_numpy(x_test[:2]), work / "student.ptq.onnx",
                                   metadata={"quant_scheme": "tensorrt"})
    return out


def _plans(onnx_shape: list, versions: tuple[str, ...]) -> list[dict]:
    from edgekd.engines.trt import plan
    from edgekd.errors import EdgekdError
    from edgekd.targets import load_target

    rows = []
    for name in TRT_TARGETS:
        target = load_target(name)
        for precision in target.precisions:
            for version in versions:
                row = {"target": name, "precision": precision, "tensorrt": version}
                try:
                    p = plan(target, precision, onnx_shape, trt_version=version)
                    row.update(flags=list(p.flags), strongly_typed=p.strongly_typed, onnx=p.onnx_variant,
                               device=p.device_type, profile=[list(s) for s in p.profile])
                except EdgekdError as e:
                    row["refused"] = str(e)
                rows.append(row)
    return rows


def _prepare(models: dict) -> dict:
    """Everything before the GPU: the export gate, plans, the fp16 ONNX and the DLA calibration cache."""
    from edgekd.engines import onnx_info, trt_onnx

    prep: dict = {"test_accuracy_pytorch": models["test_accuracy"],
                  "gate": {"fp32": trt_onnx.check_tensorrt_onnx(models["fp32_onnx"])}}
    shape = onnx_info(Path(models["fp32_onnx"]))["input_shape"]
    prep["plans"] = _plans(shape, PLAN_VERSIONS)
    try:
        fp16 = trt_onnx.to_fp16(models["fp32_onnx"], Path(models["fp32_onnx"]).with_suffix(".fp16.onnx"))
        prep["fp16_onnx_gate"] = trt_onnx.check_tensorrt_onnx(fp16)
    except Exception as e:  # onnxconverter-common missing: recorded, the rest goes on
        prep["fp16_onnx_gate"] = f"skipped: {e}"
    if "int8_onnx" in models:
        prep["gate"]["int8"] = trt_onnx.check_tensorrt_onnx(models["int8_onnx"])
        _, scales = trt_onnx.strip_qdq(models["int8_onnx"])
        prep["dla_calibration_cache_tensors"] = len(scales)
        prep["dla_calibration_cache_head"] = trt_onnx.calibration_cache(scales, "10.3.0").decode().splitlines()[:3]
    else:
        prep["int8"] = models["int8_skipped"]
    return prep


def _int8_layers(engine_file: Path) -> dict:
    """INT8 layers of a built engine, read as Polygraphy's layer inspection reads them (polygraphy/backend/trt/
    util.py): IEngineInspector.get_layer_information(i, JSON) per layer, a layer counting as INT8 when one of
    its input/output "Format/Datatype" strings says INT8. The engine was built with DETAILED verbosity."""
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
    inspector = engine.create_engine_inspector()
    layers = [json.loads(inspector.get_layer_information(i, trt.LayerInformationFormat.JSON))
              for i in range(engine.num_layers)]

    def formats(layer: dict) -> list[str]:
        return [str(t.get("Format/Datatype", "")).upper() for key in ("Inputs", "Outputs")
                for t in layer.get(key, []) if isinstance(t, dict)]

    int8 = [layer.get("Name", "?") for layer in layers if isinstance(layer, dict) and
            any("INT8" in f for f in formats(layer))]
    return {"layers": len(layers), "int8_layers": len(int8), "int8_layer_names": int8[:20]}


def _polygraphy_run(onnx_path: Path, extra: list[str]) -> dict:
    import shutil
    import subprocess

    exe = shutil.which("polygraphy")
    if exe is None:
        return {"skipped": "polygraphy is not installed (pip install polygraphy)"}
    shapes = [f"input:[1,{','.join(map(str, SHAPE))}]", f"input:[8,{','.join(map(str, SHAPE))}]",
              f"input:[64,{','.join(map(str, SHAPE))}]"]
    cmd = [exe, "run", str(onnx_path), "--trt", "--onnxrt", "--atol", "0.05", "--rtol", "0.05",
           "--input-shapes", shapes[1], "--trt-min-shapes", shapes[0], "--trt-opt-shapes", shapes[1],
           "--trt-max-shapes", shapes[2], *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return {"command": " ".join(cmd[1:]), "returncode": r.returncode, "passed": r.returncode == 0,
            "tail": (r.stdout + r.stderr).strip().splitlines()[-3:]}


def _build_and_run(models: dict, target: object, precision: str, out: Path) -> dict:
    from edgekd import runtime
    from edgekd.bundle import read_manifest
    from edgekd.engines import EngineSource, build

    int8 = precision == "int8"
    source = EngineSource(model_name="student", onnx_path=Path(models["int8_onnx" if int8 else "fp32_onnx"]),
                          weights_path=None, model_spec=None, input_shape=SHAPE, num_classes=10, class_names=(),
                          normalization={}, quantization="ptq" if int8 else "none")
    t = time.perf_counter()
    bundle = build(source, target, precision, out)
    row = {"build_s": round(time.perf_counter() - t, 2), "notes": read_manifest(bundle)["build"]["notes"]}
    engine = runtime.load(bundle)
    x = models["x"][: target.max_batch]
    row.update(_agreement(engine(x), models["ref_int8" if int8 else "ref_fp32"][: len(x)]))
    row["runner"] = engine.info.get("cuda_binding")
    row["dla"] = read_manifest(bundle)["engine"].get("dla")
    if int8:
        row["inspect"] = _int8_layers(bundle / "model.engine")
    return row


def trt_check(work: Path, *, dry_run: bool) -> dict:
    """Part 2: see the module docstring. Returns the JSON section; never raises for a missing GPU/TensorRT."""
    from dataclasses import replace

    from edgekd.engines import cuda_device_count
    from edgekd.targets import load_target

    models = _models(work)
    result = {"prepare": _prepare(models)}
    try:
        import tensorrt as trt
    except ImportError as e:
        trt, why = None, f"tensorrt is not installed ({e})"
    count, reason = cuda_device_count()
    if dry_run or trt is None or not count:
        result["stopped_before"] = "TensorRT engine builds"
        result["reason"] = "--dry-run" if dry_run else (why if trt is None else reason)
        return result
    result["tensorrt"] = trt.__version__
    result["plans_installed"] = _plans(["batch", *SHAPE], (trt.__version__,))
    rows = []
    for name in ("datacenter-t4-trt", "jetson-orin-nano-trt"):
        target = replace(load_target(name), timing_cache=str(work / f"{name}.timing"), max_batch=256,
                         workspace_mb=1024)
        for precision in target.precisions:
            if precision == "int8" and "int8_onnx" not in models:
                continue
            row = {"target": name, "precision": precision}
            try:
                row.update(_build_and_run(models, target, precision, work / f"{name}-{precision}"))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
    result["engines"] = rows
    # Timing cache: a second build reuses it; a corrupted file must fall back to a fresh cache with a note.
    nano = replace(load_target("jetson-orin-nano-trt"), timing_cache=str(work / "jetson-orin-nano-trt.timing"),
                   max_batch=256, workspace_mb=1024)
    cache = {"reuse": _build_and_run(models, nano, "fp16", work / "reuse")["notes"]}
    Path(nano.timing_cache).write_bytes(b"corrupt timing cache")
    cache["corrupt"] = _build_and_run(models, nano, "fp16", work / "corrupt")["notes"]
    result["timing_cache"] = cache
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    if builder.num_DLA_cores:
        dla = replace(load_target("jetson-agx-orin-dla"), timing_cache=None)
        result["dla"] = [{"precision": p, **_build_and_run(models, dla, p, work / f"dla-{p}")}
                         for p in dla.precisions if p != "int8" or "int8_onnx" in models]
    else:
        result["dla"] = "skipped: this GPU has no DLA cores (Jetson AGX Orin has two)"
    # TensorRT 10: precision flags; 11: strongly typed, fp16 from the fp16-typed ONNX (no --fp16 flag there).
    weak = int(trt.__version__.split(".")[0]) < 11
    fp16_onnx = Path(models["fp32_onnx"]).with_suffix(".fp16.onnx")
    result["polygraphy"] = {"fp32": _polygraphy_run(Path(models["fp32_onnx"]), []),
                            "fp16": (_polygraphy_run(Path(models["fp32_onnx"]), ["--fp16"]) if weak else
                                     _polygraphy_run(fp16_onnx, ["--strongly-typed"]))}
    if "int8_onnx" in models:
        extra = ["--int8", "--fp16"] if weak else ["--strongly-typed"]
        result["polygraphy"]["int8"] = _polygraphy_run(Path(models["int8_onnx"]), extra)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: prepare and check everything up to the TensorRT builds")
    parser.add_argument("--skip-training", action="store_true", help="only the TensorRT part")
    args = parser.parse_args()
    if args.dry_run or args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"python": platform.python_version(), "dry_run": args.dry_run,
                      "trt": trt_check(Path(tmp), dry_run=args.dry_run)}
        return _write(args.out, result)

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
        (tmp / "trt").mkdir()
        result["trt"] = trt_check(tmp / "trt", dry_run=False)
    return _write(args.out, result)


def _write(out: Path, result: dict) -> int:
    from edgekd.fileio import write_json

    write_json(out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
