"""TensorRT engines (TensorRT 10+): a pure build plan, the builder, and the device-side runner.

`plan()` turns (target, precision, ONNX input shape, TensorRT version) into every builder decision -
network typing, builder flags, optimization profile, workspace, DLA settings - as plain data, so those
decisions are tested on machines without a GPU. `build_engine()` and `TrtRunner` apply the plan through the
real `tensorrt` API and are imported/run only where TensorRT and a CUDA GPU exist.

Precision rules (TensorRT docs, "Working with Quantized Types" / "Strong Typing vs Weak Typing"):
- TensorRT 10: networks are always explicit-batch. fp16 sets BuilderFlag.FP16 on a weakly typed network. int8
  comes only from an explicitly quantized (Q/DQ) ONNX - the implicit-quantization calibrators are deprecated
  since 10.1. A weakly typed Q/DQ network still needs BuilderFlag.INT8 (NVIDIA/TensorRT#4021), and FP16 is set
  too so layers outside Q/DQ pairs run in fp16 instead of fp32 (trtexec's `--int8 --fp16`).
- TensorRT 11 removed the FP16/INT8 builder flags: networks are strongly typed and the ONNX types decide. An
  int8 Q/DQ ONNX builds as is (non-quantized layers in fp32); fp16 would need an fp16-typed ONNX, which edgekd
  does not produce, so it is refused with that explanation. DLA support ended with TensorRT 10.7 (JetPack 6
  ships 10.3), so DLA plans require TensorRT 10.
- DLA runs fp16/int8 only; BuilderFlag.GPU_FALLBACK lets unsupported layers run on the GPU. DLA engines are
  built for one static batch size.

Buffers at run time are torch CUDA tensors: torch is present on every machine that has TensorRT and CUDA
(JetPack wheels, CUDA hosts), and it saves a dependency on cuda-python/pycuda.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError

ENGINE_FILE = "model.engine"
GPU_HINT = "TensorRT needs an NVIDIA GPU; not installable on this CPU machine"


@dataclass(frozen=True)
class TrtBuildPlan:
    """Every TensorRT builder decision for one engine, as plain data."""

    trt_major: int
    strongly_typed: bool
    flags: tuple[str, ...]  # tensorrt.BuilderFlag member names
    device_type: str  # "GPU" | "DLA"
    dla_core: int | None
    workspace_bytes: int
    builder_optimization_level: int
    input_name: str
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) input shapes
    timing_cache: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise EdgekdError(f"cannot parse TensorRT version {version!r}") from None


def plan(target: Any, precision: str, onnx_input_shape: tuple | list, *, trt_version: str = "10.3",
         input_name: str = "input") -> TrtBuildPlan:
    """Decide how to build `target` at `precision` for an ONNX input of `onnx_input_shape`.

    `onnx_input_shape` includes the batch dimension, symbolic (a string, -1 or None) when the ONNX has a
    dynamic batch. `trt_version` is tensorrt.__version__ of the builder.
    """
    if target.runtime != "tensorrt":
        raise EdgekdError(f"target {target.name}: runtime is {target.runtime!r}, not 'tensorrt'")
    if precision not in target.precisions:
        raise EdgekdError(f"target {target.name} ({target.path}): precision {precision!r} is not offered "
                          f"(precisions: {', '.join(target.precisions)})")
    major = _major(trt_version)
    if major < 10:
        raise EdgekdError(f"TensorRT {trt_version} is too old: edgekd builds with TensorRT 10+ (explicit "
                          "Q/DQ quantization; JetPack 6 or a CUDA 12 host)")
    dla = target.device == "dla"
    notes: list[str] = []

    shape = list(onnx_input_shape)
    if len(shape) < 2:
        raise EdgekdError(f"ONNX input {input_name!r} has shape {shape}, expected (batch, ...)")
    batch, rest = shape[0], shape[1:]
    bad = [d for d in rest if not isinstance(d, int) or d <= 0]
    if bad:
        raise EdgekdError(f"ONNX input {input_name!r} has shape {shape}: only the batch dimension may be "
                          "dynamic")
    dynamic_onnx = not isinstance(batch, int) or batch <= 0
    if target.dynamic_batch:
        if not dynamic_onnx:
            raise EdgekdError(f"target {target.name}: wants a dynamic batch "
                              f"({target.min_batch}..{target.max_batch}) but the ONNX input has a fixed "
                              f"batch of {batch}; export with dynamic_batch=True")
        lo, opt, hi = target.min_batch, target.opt_batch, target.max_batch
    else:
        fixed = target.batch_sizes[0]
        if not dynamic_onnx and batch != fixed:
            raise EdgekdError(f"target {target.name}: builds for batch {fixed} but the ONNX input has a "
                              f"fixed batch of {batch}")
        lo = opt = hi = fixed
    if dla and lo != hi:
        raise EdgekdError(f"target {target.name}: DLA engines need a static batch (min_batch == max_batch), "
                          f"got {lo}..{hi}; set dynamic_batch = false and one batch size")
    profile = (tuple([lo, *rest]), tuple([opt, *rest]), tuple([hi, *rest]))

    flags: list[str] = []
    if major >= 11:
        strongly_typed = True
        if dla:
            raise EdgekdError(f"target {target.name}: DLA builds need TensorRT 10 (10.7 was the last release "
                              f"with DLA support); this builder is TensorRT {trt_version}")
        if precision == "fp16":
            raise EdgekdError(f"target {target.name}: TensorRT {trt_version} removed BuilderFlag.FP16 "
                              "(networks are strongly typed, precision comes from the ONNX types) and edgekd "
                              "exports fp32 ONNX; build fp16 engines with TensorRT 10, or use int8 (Q/DQ) "
                              "here")
        if precision == "int8":
            notes.append("strongly typed Q/DQ network: quantized layers in int8, the rest in the ONNX's fp32")
    else:
        strongly_typed = False
        if precision == "fp16":
            flags.append("FP16")
        elif precision == "int8":
            flags += ["INT8", "FP16"]
            notes.append("weakly typed Q/DQ network: INT8 for the Q/DQ-quantized layers, FP16 allowed "
                         "elsewhere")
        elif dla:
            raise EdgekdError(f"target {target.name}: DLA runs fp16 or int8 only, not {precision}")
    device_type = "GPU"
    if dla:
        device_type = "DLA"
        flags.append("GPU_FALLBACK")
        notes.append(f"DLA core {target.dla_core}; layers DLA cannot run fall back to the GPU")

    return TrtBuildPlan(
        trt_major=major,
        strongly_typed=strongly_typed,
        flags=tuple(flags),
        device_type=device_type,
        dla_core=target.dla_core if dla else None,
        workspace_bytes=int(target.workspace_mb) * (1 << 20),
        builder_optimization_level=int(target.builder_optimization_level),
        input_name=input_name,
        profile=profile,
        timing_cache=str(Path(target.timing_cache).expanduser()) if target.timing_cache else None,
        notes=tuple(notes),
    )


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise EdgekdError(f"this needs the `tensorrt` Python package, which is not installed ({e}). "
                          f"{GPU_HINT}: build TensorRT bundles on the device (JetPack) or a CUDA host with "
                          "`pip install tensorrt`") from e
    return tensorrt


def build_engine(source: Any, target: Any, precision: str, out: Path) -> dict[str, Any]:
    """Parse the ONNX, apply plan(), build and serialize model.engine into `out` (needs TensorRT + GPU)."""
    from edgekd.engines import check_onnx_source, cuda_device_count
    from edgekd.fileio import write_bytes

    trt = _trt()
    count, reason = cuda_device_count()
    if not count:
        raise EdgekdError(f"target {target.name}: cannot build a TensorRT engine here: {reason}")
    info = check_onnx_source(source, target, precision)
    p = plan(target, precision, info["input_shape"], trt_version=trt.__version__,
             input_name=info["input_name"])

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if p.strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgekdError(f"TensorRT {trt.__version__} cannot parse {source.onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, p.workspace_bytes)
    config.builder_optimization_level = p.builder_optimization_level
    for flag in p.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if p.device_type == "DLA":
        if builder.num_DLA_cores <= p.dla_core:
            raise EdgekdError(f"target {target.name}: asks for DLA core {p.dla_core}, this device has "
                              f"{builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = p.dla_core
    profile = builder.create_optimization_profile()
    profile.set_shape(p.input_name, *p.profile)
    config.add_optimization_profile(profile)

    cache_file = Path(p.timing_cache) if p.timing_cache else None
    cache_blob = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekdError(f"TensorRT {trt.__version__} failed to build {source.onnx_path} for target "
                          f"{target.name} at {precision} (see the TensorRT log above)")
    (out / ENGINE_FILE).write_bytes(bytes(serialized))
    if cache_file is not None:
        write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))

    engine = {
        "file": ENGINE_FILE,
        "plan": {"strongly_typed": p.strongly_typed, "flags": list(p.flags), "device_type": p.device_type,
                 "dla_core": p.dla_core, "workspace_bytes": p.workspace_bytes,
                 "builder_optimization_level": p.builder_optimization_level,
                 "profile": {"min": list(p.profile[0]), "opt": list(p.profile[1]), "max": list(p.profile[2])},
                 "timing_cache": p.timing_cache},
        "onnx_metadata": info["metadata"],
        "note": "TensorRT engines run only on the GPU model and TensorRT version that built them",
    }
    return {"engine": engine, "versions": {"tensorrt": trt.__version__}, "notes": list(p.notes),
            "input_name": info["input_name"], "output_name": info["output_name"]}


class TrtRunner:
    """Runs a TensorRT bundle with torch CUDA tensors as I/O buffers: logits = runner(x)."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        trt = _trt()
        try:
            import torch
        except ImportError as e:
            raise EdgekdError("running TensorRT bundles needs torch (with CUDA) for the GPU buffers; install "
                              f"the JetPack/CUDA torch wheel ({e})") from e
        if not torch.cuda.is_available():
            raise EdgekdError(f"bundle {bundle_dir}: TensorRT engine needs a CUDA GPU, and torch reports "
                              "none")
        self.torch = torch
        engine_info = manifest["engine"]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        dla_core = (engine_info.get("plan") or {}).get("dla_core")
        if dla_core is not None:
            self.runtime.DLA_core = int(dla_core)
        self.engine = self.runtime.deserialize_cuda_engine((bundle_dir / engine_info["file"]).read_bytes())
        if self.engine is None:
            raise EdgekdError(f"bundle {bundle_dir}: TensorRT {trt.__version__} cannot deserialize "
                              f"{engine_info['file']} (built by TensorRT "
                              f"{manifest['versions'].get('tensorrt')} on another GPU? rebuild it on this "
                              "device)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name, self.output_name = inputs[0], outputs[0]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        self.input_dtype = dtypes[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = dtypes[self.engine.get_tensor_dtype(self.output_name)]
        self.stream = torch.cuda.Stream()
        self.info = {"file": engine_info["file"], "tensorrt": trt.__version__,
                     "device": torch.cuda.get_device_name(0), "notes": []}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            xt = torch.from_numpy(x).to("cuda", dtype=self.input_dtype, non_blocking=False).contiguous()
            self.context.set_input_shape(self.input_name, tuple(xt.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                              device="cuda")
            self.context.set_tensor_address(self.input_name, xt.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EdgekdError(f"TensorRT execution failed for input shape {tuple(x.shape)}")
        self.stream.synchronize()
        return out.float().cpu().numpy()
