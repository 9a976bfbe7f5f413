"""Engine builds: one (model, target, precision) -> one bundle folder.

`build` validates what is common to every runtime (precision offered by the target, quantized ONNX for int8,
eval set shapes), lets the runtime's module write its engine files into a temporary folder, adds eval.npz
and manifest.json, and renames the folder into place, so a bundle folder either is complete or does not
exist. Which module builds (and later opens) an engine is the registry's answer (edgekd.engines.registry): one
module per runtime. Runtime libraries are imported lazily: importing this package needs neither torch, onnx,
onnxruntime nor tensorrt (the device-side runners in ort.py / trt.py / pytorch.py are opened through edgekd.runtime).
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd import tasks
from edgekd.bundle import FORMAT, MANIFEST, edgekd_version, write_manifest
from edgekd.engines import registry
from edgekd.engines.registry import backend, backends, needs_accelerator
from edgekd.errors import EdgekdError
from edgekd.fileio import atomic_path, write_signed_json

if TYPE_CHECKING:
    import onnx

    from edgekd.targets import Target

QUANTIZATIONS = ("none", *registry.QUANTIZATIONS)   # "none": a float model
HOST_EVAL_BATCH = 64   # test samples per engine call when the build host measures accuracy on the test split


@dataclass(frozen=True)
class EngineSource:
    """What a build starts from: an ONNX (onnxruntime/tensorrt) or safetensors + model spec (torch)."""

    model_name: str
    onnx_path: Path | None
    weights_path: Path | None
    model_spec: str | None
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...]
    normalization: dict
    quantization: str = "none"
    preprocessing: dict | None = None   # the eval PreprocessSpec.to_dict() of image inputs (edgekd.preprocess)
    task: str = "classification"        # edgekd.tasks: names, dtypes and dynamic axes of input and output
    input_options: dict | None = None   # extra input facts the task records (text: pad_id, max_length)
    files: tuple[tuple[str, str], ...] = ()   # (name in the bundle, path here): files the device needs (tokenizer)


def cuda_device_count() -> tuple[int, str]:
    """Count CUDA devices through the driver library (no torch needed); returns (count, reason if 0)."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no NVIDIA driver (libcuda) on this machine"
    if lib.cuInit(0) != 0:
        return 0, "the NVIDIA driver is present but cuInit failed (no usable GPU)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count.value, ""


def available_runtimes() -> dict[str, str]:
    """Runtime name -> "ok" or why it cannot be used on this machine (for `edgekd doctor`), from each backend.

    "ok" means the library imports (and, for TensorRT, a CUDA GPU is present); per-target details such as
    an onnxruntime execution provider or torch CUDA are checked by `check_target`.
    """
    return {name: b.availability() for name, b in backends().items()}


def check_target(target: Target) -> str:
    """"ok" if this machine can build and run `target`, else the reason (to skip targets with a message)."""
    b = backends().get(target.runtime)
    status = b.availability() if b is not None else f"unknown runtime {target.runtime!r}"
    if status != "ok":
        return f"target {target.name}: {target.runtime} {status}"
    return b.check_target(target)


def load_onnx(model: Any, *, external_data: bool = True) -> onnx.ModelProto:
    """`model` itself if it is a ModelProto, else the ONNX file at that path (a one-line error when it is missing
    or unreadable); `external_data=False` leaves the weights of external-data files unread."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise EdgekdError(f"ONNX file {path}: not found")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as e:
        raise EdgekdError(f"ONNX file {path}: cannot be read ({e})") from e


def onnx_info(path: Path) -> dict[str, Any]:
    """Input/output names and shapes, Q/DQ presence and metadata of an ONNX file (build side; needs onnx)."""
    proto = load_onnx(path, external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise EdgekdError(f"ONNX file {path}: expected one input and one output, got inputs "
                          f"{[i.name for i in inputs]} and outputs {[o.name for o in proto.graph.output]}")

    def dims(value: Any) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value.type.tensor_type.shape.dim]

    ops = {n.op_type for n in proto.graph.node}
    return {
        "input_name": inputs[0].name,
        "input_shape": dims(inputs[0]),
        "output_name": proto.graph.output[0].name,
        "output_shape": dims(proto.graph.output[0]),
        "has_qdq": bool(ops & {"QuantizeLinear", "DequantizeLinear"}),
        "metadata": {p.key: p.value for p in proto.metadata_props},
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
    }


def check_onnx_source(source: EngineSource, target: Target, precision: str) -> dict[str, Any]:
    """Checks shared by the ONNX-based builders: file present, input shape, Q/DQ matches the precision."""
    if source.onnx_path is None:
        raise EdgekdError(f"build {source.model_name} for {target.name}: runtime {target.runtime} needs an "
                          "ONNX file (EngineSource.onnx_path is None)")
    path = Path(source.onnx_path)
    info = onnx_info(path)
    got = tuple(info["input_shape"][1:])
    if got != tuple(source.input_shape):
        raise EdgekdError(f"ONNX file {path}: input {info['input_name']!r} has shape {info['input_shape']}, "
                          f"expected (batch, {', '.join(map(str, source.input_shape))})")
    if precision == "int8" and not info["has_qdq"]:
        raise EdgekdError(f"ONNX file {path}: precision int8 needs a quantized ONNX with QuantizeLinear/"
                          "DequantizeLinear nodes (run PTQ or QAT for this target first); this one has none")
    if precision != "int8" and info["has_qdq"]:
        raise EdgekdError(f"ONNX file {path}: contains QuantizeLinear/DequantizeLinear nodes but precision "
                          f"is {precision}; build it as int8, or export the float model for {precision}")
    scheme = info["metadata"].get("quant_scheme")
    if precision == "int8" and scheme and scheme != target.quant_scheme:
        raise EdgekdError(f"ONNX file {path}: was quantized with scheme {scheme!r} but target {target.name} "
                          f"expects {target.quant_scheme!r} (Q/DQ placement must follow the runtime)")
    return info


def _check_eval(source: EngineSource, eval_data: tuple | dict) -> dict[str, Any]:
    """The eval set as the task's named arrays, shapes checked without reading them: x may be memory-mapped or a
    lazy array-like source (edgekd.streaming) that decodes only the rows it is indexed with. A classifier's may be
    given as the tuple (x, y, reference logits or None)."""
    task = tasks.get(source.task, f"build {source.model_name}")
    if isinstance(eval_data, tuple) and task is tasks.CLASSIFICATION and len(eval_data) == 3:
        eval_data = dict(zip(("x", "y", "reference_logits"), eval_data, strict=True))
    if not isinstance(eval_data, dict) or not set(list(task.eval_arrays)[:2]) <= set(eval_data) <= set(
            task.eval_arrays):
        raise EdgekdError(f"build: eval_data must be the {task.name} task's arrays ({', '.join(task.eval_arrays)})"
                          + (" or a tuple (x, y, reference_logits or None)" if task is tasks.CLASSIFICATION else ""))
    return task.check_eval(eval_data, source.input_shape, source.num_classes)


def _write_eval(path: Path, task: tasks.Task, evals: dict[str, Any], k: int) -> dict | None:
    """Write eval.npz with a bounded sample of the eval set (min(k, n) items drawn uniformly without replacement,
    seeded, in order; k = 0: none); returns the manifest entry."""
    n = len(next(iter(evals.values())))
    idx = np.arange(n) if k >= n else np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))
    if not len(idx):
        return None
    arrays = {name: np.asarray(a, dtype=task.eval_arrays[name]) if not np.ndim(a) else np.ascontiguousarray(
              (a if hasattr(a, "shape") else np.asarray(a))[idx], dtype=task.eval_arrays[name])   # a lazy x: rows idx
              for name, a in evals.items()}
    np.savez(path, **arrays)
    return {"file": path.name, "samples": int(len(idx)), "has_reference_logits": "reference_logits" in evals}


def _test_metrics(bundle_dir: Path, task: tasks.Task, evals: dict[str, Any]) -> dict[str, Any]:
    """Accuracy/agreement of the built engine on the whole test split, run here on the build host in batches."""
    from edgekd import runtime

    engine = runtime.load(bundle_dir)
    result = task.evaluate(engine.logits, evals, HOST_EVAL_BATCH)
    return {**result, "measured_on": platform.node(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _preprocessing(source: EngineSource) -> dict[str, Any]:
    """The manifest's preprocessing: normalization and layout, plus for image inputs the eval spec (what
    edgekd.runtime applies to image files) and the range its normalized output takes, [(0 - mean) / std,
    (255 * scale - mean) / std] over the channels, which the runtime uses to refuse input in the wrong scale.
    Without a spec the range observed on the test split is recorded when the engine is scored."""
    rank = len(source.input_shape)
    out: dict[str, Any] = {"normalization": dict(source.normalization or {}),
                           "layout": {1: "NC", 2: "NCL", 3: "NCHW", 4: "NCDHW"}.get(rank, "N" + "?" * rank)}
    if source.preprocessing is not None:
        from edgekd.preprocess import PreprocessSpec

        spec = PreprocessSpec.from_dict(dict(source.preprocessing), where=f"build {source.model_name}: preprocessing")
        mean, std = np.asarray(spec.mean), np.asarray(spec.std)
        ends = np.concatenate([(0.0 - mean) / std, (255.0 * spec.scale - mean) / std])
        out.update(spec=spec.to_dict(), normalization={"mean": list(spec.mean), "std": list(spec.std)},
                   input_range=[float(ends.min()), float(ends.max())])
    return out


def _signature(task: tasks.Task, source: EngineSource, result: dict[str, Any], batch: int | str) -> dict[str, Any]:
    """The manifest's input and output entries: the task's signature, with the names the engine's graph has."""
    sig = task.signature(tuple(source.input_shape), source.num_classes, batch=batch, **(source.input_options or {}))
    sig["input"]["name"] = result.get("input_name", sig["input"]["name"])
    sig["output"]["name"] = result.get("output_name", sig["output"]["name"])
    return sig


def build(source: EngineSource, target: Target, precision: str, out_dir: str | Path, *,
          eval_data: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None) -> Path:
    """Build one engine for `target` at `precision` and write its bundle folder at `out_dir`; returns it.

    `eval_data` = (x already normalized, y, PyTorch reference logits or None) is the test split (x may be
    memory-mapped). The built engine runs all of it here, in batches, into manifest metrics["test"] (accuracy,
    agreement, samples); eval.npz keeps only a seeded sample of `target.eval_samples` items (0: none) so the
    device can spot-check accuracy and agreement with only numpy and its runtime installed.
    """
    out_dir = Path(out_dir)
    if precision not in target.precisions:
        raise EdgekdError(f"target {target.name} ({target.path}): precision {precision!r} is not offered "
                          f"(precisions: {', '.join(target.precisions)})")
    if source.quantization not in QUANTIZATIONS:
        raise EdgekdError(f"build {source.model_name}: quantization must be one of "
                          f"{', '.join(QUANTIZATIONS)}, got {source.quantization!r}")
    if (precision == "int8") != (source.quantization != "none"):
        raise EdgekdError(f"build {source.model_name} for {target.name}: precision {precision} does not "
                          f"match quantization {source.quantization!r} (int8 engines come from a PTQ/QAT "
                          "Q/DQ model, fp32/fp16 engines from the float model)")
    if len(source.class_names) not in (0, source.num_classes):
        raise EdgekdError(f"build {source.model_name}: {len(source.class_names)} class names for "
                          f"{source.num_classes} classes")
    task = tasks.get(source.task, f"build {source.model_name}")
    if task.runtimes is not None and target.runtime not in task.runtimes:
        raise EdgekdError(f"target {target.name}: {task.name} engines are built for {', '.join(task.runtimes)} "
                          f"targets only, not {target.runtime}")
    evals = _check_eval(source, eval_data) if eval_data is not None else None
    runtime = backend(target.runtime, f"target {target.name} ({target.path})")

    started = time.perf_counter()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        result = runtime.build_engine(source, target, precision, tmp)
        for name, path in source.files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / name)
        eval_entry = _write_eval(tmp / "eval.npz", task, evals, target.eval_samples) if evals is not None else None
        batch_dim: int | str = "batch" if target.dynamic_batch else target.batch_sizes[0]
        manifest = {
            "format": FORMAT,
            "model": source.model_name,
            "target": target.name,
            "target_file": target.path,
            "target_description": target.description,
            "runtime": target.runtime,
            "device": target.device,
            "precision": precision,
            "quantization": source.quantization,
            "quant_scheme": {"scheme": target.quant_scheme, "reason": target.quant_scheme_reason},
            "task": task.name,
            **_signature(task, source, result, batch_dim),
            "preprocessing": _preprocessing(source),
            "class_names": list(source.class_names),
            "batch": {"sizes": list(target.batch_sizes), "dynamic": target.dynamic_batch,
                      "min": target.min_batch, "opt": target.opt_batch, "max": target.max_batch},
            "budgets": {"latency_ms": target.latency_budget_ms, "memory_mb": target.memory_budget_mb},
            "engine": result["engine"],
            "eval": eval_entry,
            "versions": {"edgekd": edgekd_version(), "python": platform.python_version(),
                         "numpy": np.__version__, **result.get("versions", {})},
            "build": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "host": {"machine": platform.machine(), "system": platform.system(),
                               "node": platform.node()},
                      "seconds": round(time.perf_counter() - started, 3),
                      "notes": list(result.get("notes", []))},
            "metrics": {},
        }
        written = write_manifest(tmp, manifest)
        if evals is not None and len(next(iter(evals.values()))):
            try:
                test = _test_metrics(tmp, task, evals)
            except EdgekdError as e:
                if not needs_accelerator(target.device):
                    raise
                # A GPU engine built where it cannot run (no CUDA device or binding here): the build stands, the
                # report falls back to the eval.npz sample measured where the bundle is profiled.
                test = {"not_measured": f"the build host could not run the engine ({e})"}
            pre = manifest["preprocessing"]
            observed = {"input_range": test.pop("input_range")} if "input_range" in test and "input_range" not in pre \
                else {}
            # the files are unchanged since write_manifest hashed them: only the manifest is rewritten and re-signed
            write_signed_json(tmp / MANIFEST, {**written, "preprocessing": {**pre, **observed},
                                               "metrics": {"test": test}})
    return out_dir
