"""TensorRT engines (TensorRT 10.3 to 11.x): a pure build plan, the builder, and the device-side runner.

`plan()` turns (target, precision, ONNX input shape, TensorRT version) into every builder decision - network
typing, builder flags, the ONNX variant to parse, optimization profile, workspace, DLA settings - as plain
data, so those decisions are tested on machines without a GPU. `build_engine()` and `TrtRunner` apply the plan
through the real `tensorrt` API; CPU tests drive them through tests/fake_tensorrt.py, a strict stand-in
transcribed from the 10.3 and 11.1 Python binding sources.

Two API generations (TensorRT docs "Strong Typing vs Weak Typing", 11.x migration guide):
- TensorRT 10 (JetPack 6 ships 10.3): weakly typed networks with builder flags. fp16 sets BuilderFlag.FP16;
  int8 comes from an explicitly quantized (Q/DQ) ONNX and still needs BuilderFlag.INT8 (NVIDIA/TensorRT#4021),
  with FP16 so layers outside Q/DQ pairs run in fp16 (trtexec's `--int8 --fp16`).
- TensorRT 11 removed the FP16/INT8 flags and weak typing: every network is strongly typed and the ONNX types
  decide. fp16 parses an fp16-typed copy of the float ONNX (onnxconverter-common, `trt_onnx.to_fp16`); int8
  parses the Q/DQ ONNX as is (non-quantized layers in fp32).
- DLA (fp16/int8 only, one static batch, BuilderFlag.GPU_FALLBACK for layers it cannot run; the fallback count
  is recorded). On 10.x DLA does not run explicit Q/DQ networks, so int8 strips the Q/DQ nodes, writes their
  scales as a calibration cache and builds the float ONNX with implicit INT8 (NVIDIA's Q/DQ Translator route;
  Model Optimizer PR #1661: "DLA still only supports IQ"). TensorRT 11.0-11.4.0 have no DLA on Jetson; 11.4.1
  brings it back on AGX Orin with JetPack 7.2.2, strongly typed: fp16 from the fp16-typed ONNX; int8 is refused
  there (no calibrators in 11, and DLA under strong typing needs Q/DQ on every tensor, which the `tensorrt`
  scheme's placement does not give).

Buffers at run time come from NVIDIA's cuda-python (`cuda.bindings.runtime`): TensorRT's own Python samples use
it since 10.14, it installs on Jetson and CUDA hosts without torch, and every call returns its cudaError_t to
check. Where cuda-python is missing but torch with CUDA is present, torch's allocator is used instead.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.engines.registry import Backend, Runner, check_feeds
from edgekd.errors import EdgekdError

BACKEND = Backend(name="tensorrt", module=__name__, precisions=("fp32", "fp16", "int8"), devices=("cuda", "dla"),
                  default_scheme="tensorrt", source="onnx", batch_profile=True,
                  target_keys=("workspace_mb", "builder_optimization_level", "timing_cache", "dla_core"))
ENGINE_FILE = "model.engine"
CALIBRATION_FILE = "dla_int8.cache"
GPU_HINT = "TensorRT needs an NVIDIA GPU; not installable on this CPU machine"
SUPPORTED = "TensorRT 10.3 to 11.x"  # as the `tensorrt` extra in pyproject.toml
MIN_VERSION = (10, 3, 0)
DLA_11_MIN = (11, 4, 1)  # 11.4.1 release notes: DLA on Jetson AGX Orin with JetPack 7.2.2, strongly typed
MAX_TIMING_CACHE_BYTES = 256 << 20


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
    onnx_variant: str  # "as-is" | "fp16" (to_fp16 copy) | "implicit-int8" (stripped Q/DQ + cache)
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max) input shapes
    timing_cache: str | None
    notes: tuple[str, ...] = ()


def parse_version(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of tensorrt.__version__ ("10.3.0.26" -> (10, 3, 0))."""
    try:
        parts = [int(p) for p in str(version).split(".")[:3]]
    except ValueError:
        raise EdgekdError(f"cannot parse TensorRT version {version!r}") from None
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def _profile(target: Any, onnx_input_shape: tuple | list, input_name: str, dla: bool) -> tuple:
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
    return (tuple([lo, *rest]), tuple([opt, *rest]), tuple([hi, *rest]))


def _precision_10(precision: str, dla: bool) -> tuple[list[str], str, list[str]]:
    """TensorRT 10: (flags, onnx variant, notes) for a weakly typed network."""
    if precision == "fp16":
        return ["FP16"], "as-is", []
    if precision == "int8" and dla:
        return ["INT8", "FP16"], "implicit-int8", [
            "DLA on TensorRT 10 runs implicit INT8 only: the Q/DQ nodes are stripped and their scales given as a "
            "calibration cache (tensors without a scale run in fp16 or fall back to the GPU)"]
    if precision == "int8":
        return ["INT8", "FP16"], "as-is", [
            "weakly typed Q/DQ network: INT8 for the Q/DQ-quantized layers, FP16 allowed elsewhere"]
    return [], "as-is", []


def _precision_11(target: Any, precision: str, dla: bool, version: tuple[int, int, int]) -> tuple[
        list[str], str, list[str]]:
    """TensorRT 11: strongly typed, no precision flags; (flags, onnx variant, notes)."""
    shown = ".".join(map(str, version))
    if dla and version < DLA_11_MIN:
        raise EdgekdError(f"target {target.name}: TensorRT {shown} has no DLA on Jetson (DLA was unavailable "
                          "in 11.0-11.3 and 11.4.0 had it only on Windows on ARM); use TensorRT >= 11.4.1 "
                          "with JetPack 7.2.2 on AGX Orin, or TensorRT 10.x on JetPack 6")
    if dla and precision == "int8":
        raise EdgekdError(f"target {target.name}: int8 on DLA with TensorRT {shown} is refused: TensorRT 11 has "
                          "no implicit INT8 (calibrators were removed) and a strongly typed DLA network needs a "
                          "Q/DQ scale on every tensor, which the 'tensorrt' scheme's placement does not give; "
                          "build int8 DLA engines with TensorRT 10.x (JetPack 6), or fp16 here")
    if precision == "fp16":
        return [], "fp16", ["strongly typed: fp16 comes from an fp16-typed copy of the ONNX (onnxconverter-common,"
                            " float32 inputs/outputs kept)"]
    if precision == "int8":
        return [], "as-is", ["strongly typed Q/DQ network: quantized layers in int8, the rest in the ONNX's fp32"]
    return [], "as-is", []


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
    version = parse_version(trt_version)
    if version < MIN_VERSION:
        raise EdgekdError(f"TensorRT {trt_version} is too old: edgekd builds with {SUPPORTED} (explicit Q/DQ "
                          "quantization; JetPack 6 or a CUDA 12 host)")
    if version[0] > 11:
        raise EdgekdError(f"TensorRT {trt_version} is newer than edgekd supports ({SUPPORTED}); its Python API "
                          "has not been checked")
    dla = target.device == "dla"
    if dla and precision not in ("fp16", "int8"):
        raise EdgekdError(f"target {target.name}: DLA runs fp16 or int8 only, not {precision}")
    profile = _profile(target, onnx_input_shape, input_name, dla)
    if version[0] >= 11:
        flags, variant, notes = _precision_11(target, precision, dla, version)
    else:
        flags, variant, notes = _precision_10(precision, dla)
    if dla:
        flags.append("GPU_FALLBACK")
        notes.append(f"DLA core {target.dla_core}; layers DLA cannot run fall back to the GPU (counted in the "
                     "manifest's engine.dla)")
    return TrtBuildPlan(
        trt_major=version[0],
        strongly_typed=version[0] >= 11,
        flags=tuple(flags),
        device_type="DLA" if dla else "GPU",
        dla_core=target.dla_core if dla else None,
        workspace_bytes=int(target.workspace_mb) * (1 << 20),
        builder_optimization_level=int(target.builder_optimization_level),
        input_name=input_name,
        profile=profile,
        timing_cache=str(Path(target.timing_cache).expanduser()) if target.timing_cache else None,
        onnx_variant=variant,
        notes=tuple(notes),
    )


def availability() -> str:
    """"ok" when tensorrt imports and a CUDA GPU is present, else why not."""
    from edgekd.engines import cuda_device_count

    try:
        import tensorrt as trt
    except ImportError:
        return ("not installed: TensorRT needs an NVIDIA GPU (JetPack on Jetson; `pip install tensorrt` on x86/SBSA "
                "GPU hosts)")
    except Exception as e:  # a broken install (missing libnvinfer) raises other errors at import
        return f"installed but fails to import ({type(e).__name__}: {e})"
    count, reason = cuda_device_count()
    return "ok" if count else f"tensorrt {trt.__version__} is installed but {reason}"


def target_rules(file: Any, v: dict[str, Any]) -> dict[str, Any]:
    """DLA: fp16/int8 only, on the core named by dla_core (>= 0); dla_core only for device dla."""
    dla, dla_core = v["device"] == "dla", v.get("dla_core")
    if dla and "fp32" in v["precisions"]:
        raise EdgekdError(f"target file {file}: device 'dla' runs only fp16 and int8; remove 'fp32' from "
                          "precisions")
    if dla and dla_core is None:
        raise EdgekdError(f"target file {file}: device 'dla' needs key 'dla_core' (0 or 1)")
    if not dla and dla_core is not None:
        raise EdgekdError(f"target file {file}: key 'dla_core' only applies to device 'dla' (device is "
                          f"{v['device']!r})")
    if dla_core is not None and dla_core < 0:
        raise EdgekdError(f"target file {file}: key 'dla_core' must be >= 0, got {dla_core}")
    return {}


def check_target(target: Any) -> str:
    """Nothing beyond availability(): the target's DLA core and batch profile are checked when the engine builds."""
    return "ok"


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise EdgekdError(f"this needs the `tensorrt` Python package, which is not installed ({e}). "
                          f"{GPU_HINT}: build TensorRT bundles on the device (JetPack) or a CUDA host with "
                          "`pip install 'edgekd[tensorrt]'`") from e
    return tensorrt


# --------------------------------------------------------------------------------------------------- build


def _prepare_onnx(source: Any, p: TrtBuildPlan, trt_version: str, work: Path, out: Path) -> tuple[Path, bytes]:
    """The ONNX file to parse for this plan, and the calibration cache (b"" unless implicit-int8)."""
    from edgekd.engines import trt_onnx

    onnx_path = Path(source.onnx_path)
    if p.onnx_variant == "fp16":
        return trt_onnx.to_fp16(onnx_path, work / "model.fp16.onnx"), b""
    if p.onnx_variant == "implicit-int8":
        model, scales = trt_onnx.strip_qdq(onnx_path)
        path = work / "model.float.onnx"
        path.write_bytes(model.SerializeToString())   # what onnx.save writes for a model without external data
        cache = trt_onnx.calibration_cache(scales, trt_version)
        (out / CALIBRATION_FILE).write_bytes(cache)  # kept in the bundle: the scales the DLA engine used
        return path, cache
    return onnx_path, b""


def _calibrator(trt: Any, cache: bytes) -> Any:
    """An IInt8EntropyCalibrator2 that only hands TensorRT the precomputed cache (no calibration batches)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None  # never asked for data: every tensor's scale is in the cache

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, cache: bytes) -> None:
            return None

    return CacheCalibrator()


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """The parsed network and its parser (which owns the weights: keep it alive until the build)."""
    network = builder.create_network(0)  # TensorRT 10: weakly typed; 11: strongly typed is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgekdError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors or 'no error reported'}")
    return network, parser


def _attach_timing_cache(config: Any, path: Path | None, notes: list[str]) -> Any:
    """Load the timing cache file into `config`; a cache TensorRT rejects (another GPU or TensorRT version,
    or a corrupt file) is replaced by a fresh one, with a note. Returns the attached cache."""
    blob = b""
    if path is not None and path.is_file():
        if path.stat().st_size > MAX_TIMING_CACHE_BYTES:
            notes.append(f"timing cache {path} is larger than {MAX_TIMING_CACHE_BYTES >> 20} MiB; ignored it and "
                         "started a fresh one")
        else:
            blob = path.read_bytes()
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # a corrupt blob: the binding may raise instead of returning None
        cache = None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        if blob:
            notes.append(f"reused timing cache {path}")
        return cache
    if blob:
        notes.append(f"timing cache {path} was rejected (made by another GPU or TensorRT version, or corrupt); "
                     "built with a fresh cache, which replaces it")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EdgekdError("TensorRT refused even an empty timing cache (set_timing_cache returned False)")
    return cache


def _dla_fallback(config: Any, network: Any) -> dict[str, Any]:
    """Layers of the parsed network that DLA cannot run (they fall back to the GPU), by config.can_run_on_DLA."""
    names = [network.get_layer(i).name for i in range(network.num_layers)
             if not config.can_run_on_DLA(network.get_layer(i))]
    return {"layers": int(network.num_layers), "gpu_fallback_layers": len(names), "gpu_fallback_names": names[:50]}


def build_engine(source: Any, target: Any, precision: str, out: Path) -> dict[str, Any]:
    """Parse the ONNX, apply plan(), build and serialize model.engine into `out` (needs TensorRT + GPU)."""
    from edgekd.engines import check_onnx_source, cuda_device_count
    from edgekd.engines.trt_onnx import require_tensorrt_onnx
    from edgekd.fileio import write_bytes

    trt = _trt()
    count, reason = cuda_device_count()
    if not count:
        raise EdgekdError(f"target {target.name}: cannot build a TensorRT engine here: {reason}")
    info = check_onnx_source(source, target, precision)
    require_tensorrt_onnx(source.onnx_path)
    p = plan(target, precision, info["input_shape"], trt_version=trt.__version__, input_name=info["input_name"])
    notes = list(p.notes)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    with tempfile.TemporaryDirectory(prefix="edgekd-trt-") as tmp:
        onnx_path, calibration = _prepare_onnx(source, p, trt.__version__, Path(tmp), out)
        network, _parser = _parse(trt, builder, logger, onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, p.workspace_bytes)
        config.builder_optimization_level = p.builder_optimization_level
        # Layer precisions/devices stay inspectable (IEngineInspector, polygraphy inspect); no runtime cost.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        for flag in p.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        dla = None
        if p.device_type == "DLA":
            if builder.num_DLA_cores <= p.dla_core:
                raise EdgekdError(f"target {target.name}: asks for DLA core {p.dla_core}, this device has "
                                  f"{builder.num_DLA_cores} DLA cores")
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = p.dla_core
            dla = _dla_fallback(config, network)
            if calibration:
                dla["int8_scales"] = calibration.count(b"\n") - 1  # tensors the calibration cache gives a scale
            notes.append(f"DLA: {dla['gpu_fallback_layers']} of {dla['layers']} layers fall back to the GPU")
        if calibration:
            config.int8_calibrator = _calibrator(trt, calibration)
        profile = builder.create_optimization_profile()
        profile.set_shape(p.input_name, *p.profile)
        config.add_optimization_profile(profile)
        cache_file = Path(p.timing_cache) if p.timing_cache else None
        _attach_timing_cache(config, cache_file, notes)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekdError(f"TensorRT {trt.__version__} failed to build {source.onnx_path} for target "
                          f"{target.name} at {precision} (see the TensorRT log above)")
    (out / ENGINE_FILE).write_bytes(bytes(serialized))
    if cache_file is not None:
        write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))

    engine = {
        "file": ENGINE_FILE,
        "plan": {**{k: v for k, v in asdict(p).items() if k not in ("trt_major", "input_name", "notes")},
                 "flags": list(p.flags),
                 "profile": {k: list(shape) for k, shape in zip(("min", "opt", "max"), p.profile, strict=True)}},
        "dla": dla,
        "calibration_cache": CALIBRATION_FILE if calibration else None,
        "onnx_metadata": info["metadata"],
        "note": "TensorRT engines run only on the GPU model and TensorRT version that built them",
    }
    return {"engine": engine, "versions": {"tensorrt": trt.__version__}, "notes": notes,
            "input_name": info["input_name"], "output_name": info["output_name"]}


# ----------------------------------------------------------------------------------------------- run


class CudaPython:
    """Device memory and a stream through NVIDIA's cuda-python runtime bindings; every call's error checked."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (the `tensorrt` extra's bound)
        except ImportError as e:
            raise EdgekdError(f"cuda-python is not installed ({e}); pip install cuda-python") from e
        self.rt = cudart
        self.stream = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _call(self, result: tuple, what: str) -> Any:
        err = result[0]
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise EdgekdError(f"CUDA {what} failed: {name.decode() if isinstance(name, bytes) else name}")
        return result[1] if len(result) == 2 else result[1:] or None

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._call(self.rt.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream), "copy to device")

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream), "copy to host")

    def stream_handle(self) -> int:
        """The cudaStream_t address TensorRT's execute_async_v3 takes (int(stream) is deprecated since 12.9.1)."""
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            return int(self.stream)
        return int(get_cuda_native_handle(self.stream))

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def device_name(self) -> str:
        device = self._call(self.rt.cudaGetDevice(), "cudaGetDevice")
        props = self._call(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


class TorchCuda:
    """The same interface over torch's CUDA allocator and stream, for hosts that have torch but no cuda-python."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EdgekdError("torch reports no CUDA GPU (torch.cuda.is_available() is False)")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self._buffers: dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        buf = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self._buffers[buf.data_ptr()] = buf
        return buf.data_ptr()

    def free(self, ptr: int) -> None:
        self._buffers.pop(ptr, None)

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        with self.torch.cuda.stream(self.stream):
            self._buffers[ptr][:host.nbytes].copy_(self.torch.from_numpy(host.reshape(-1).view(np.uint8)))

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        with self.torch.cuda.stream(self.stream):
            data = self._buffers[ptr][:host.nbytes].cpu()
        host.reshape(-1).view(np.uint8)[:] = data.numpy()

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def device_name(self) -> str:
        return str(self.torch.cuda.get_device_name(0))


def cuda_binding() -> Any:
    """cuda-python if installed (no torch needed), else torch's CUDA; the error names both when neither works."""
    try:
        return CudaPython()
    except EdgekdError as first:
        try:
            return TorchCuda()
        except ImportError:
            raise first from None
        except EdgekdError as second:
            raise EdgekdError(f"{first}; torch fallback: {second}") from None


class TrtRunner(Runner):
    """Runs a TensorRT bundle: run({input name: array}) -> {output name: array}, names from the engine's I/O tensors;
    device buffers from `cuda` (default: cuda_binding())."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None,
                 cuda: Any = None) -> None:
        trt = _trt()
        engine_info = manifest["engine"]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        dla_core = (engine_info.get("plan") or {}).get("dla_core")
        if dla_core is not None:
            if self.runtime.num_DLA_cores <= int(dla_core):
                raise EdgekdError(f"bundle {bundle_dir}: engine runs on DLA core {dla_core}, this device has "
                                  f"{self.runtime.num_DLA_cores} DLA cores")
            self.runtime.DLA_core = int(dla_core)
        self.engine = self.runtime.deserialize_cuda_engine((bundle_dir / engine_info["file"]).read_bytes())
        if self.engine is None:
            raise EdgekdError(f"bundle {bundle_dir}: TensorRT {trt.__version__} cannot deserialize "
                              f"{engine_info['file']} (built by TensorRT "
                              f"{manifest['versions'].get('tensorrt')} on another GPU? rebuild it on this "
                              "device)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgekdError(f"bundle {bundle_dir}: TensorRT could not create an execution context")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if not self.input_names or not self.output_names:
            raise EdgekdError(f"bundle {bundle_dir}: engine has inputs {list(self.input_names)} and outputs "
                              f"{list(self.output_names)}, expected at least one of each")
        dtypes = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
                  trt.DataType.INT64: np.int64}
        got = {n: self.engine.get_tensor_dtype(n) for n in names}
        if any(d not in dtypes for d in got.values()):
            raise EdgekdError(f"bundle {bundle_dir}: engine I/O types {got}, expected float32, float16, int32 or "
                              "int64")
        self.dtypes = {n: dtypes[d] for n, d in got.items()}
        self.cuda = cuda if cuda is not None else cuda_binding()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity in bytes)
        self.info = {"file": engine_info["file"], "tensorrt": trt.__version__, "device": self.cuda.device_name(),
                     "cuda_binding": type(self.cuda).__name__, "dla": engine_info.get("dla"), "notes": []}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, size)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        hosts = {n: np.ascontiguousarray(feeds[n], dtype=self.dtypes[n]) for n in self.input_names}
        for name, host_in in hosts.items():
            if not self.context.set_input_shape(name, tuple(host_in.shape)):
                raise EdgekdError(f"TensorRT rejected input shape {tuple(host_in.shape)} for {name!r} "
                                  "(outside the engine's optimization profile?)")
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EdgekdError(f"TensorRT left output {name!r} with unresolved shape {shape}")
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
        pointers = {n: self._buffer(n, a.nbytes) for n, a in (*hosts.items(), *outputs.items())}
        for name, host_in in hosts.items():
            self.cuda.to_device(pointers[name], host_in)
        for name, ptr in pointers.items():
            if not self.context.set_tensor_address(name, ptr):
                raise EdgekdError(f"TensorRT rejected the device address of {name!r}")
        if not self.context.execute_async_v3(self.cuda.stream_handle()):
            shapes = ", ".join(f"{n} {tuple(a.shape)}" for n, a in hosts.items())
            raise EdgekdError(f"TensorRT execution failed for input shape {shapes}")
        for name, host_out in outputs.items():
            self.cuda.to_host(host_out, pointers[name])
        self.cuda.synchronize()
        return {n: a.astype(np.float32) if a.dtype == np.float16 else a for n, a in outputs.items()}

    def close(self) -> None:
        """Free the device buffers (also done when the runner is garbage collected)."""
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


open_runner = TrtRunner   # the registry's device side: open_runner(bundle_dir, manifest, threads)
