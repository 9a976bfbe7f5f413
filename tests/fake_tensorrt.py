"""A strict stand-in for the `tensorrt` Python module, for CPU tests of edgekd.engines.trt.

TensorRT cannot be installed on machines without an NVIDIA GPU. This module is transcribed by hand - names,
keyword names, return conventions - from NVIDIA/TensorRT's own binding sources, for the part of the API edgekd
uses, per release:
  - release/10.3 and release/11.1: python/src/infer/pyCore.cpp, python/src/infer/pyGraph.cpp,
    python/src/infer/pyFoundationalTypes.cpp, python/src/parsers/pyOnnx.cpp,
    python/docstrings/infer/pyCoreDoc.h (set_timing_cache "returns a BOOL indicating whether the operation is
    done successfully"; create_timing_cache(b"") makes a new cache);
  - release/10.3 only: python/src/infer/pyInt8.cpp (IInt8EntropyCalibrator2; removed in 11);
  - DLA availability on 11.x from the TensorRT 11.4.1 release notes.
The 11.x enums hold the members release/11.0 and release/11.1 share (checked on both branches). Version
differences kept: BuilderFlag.FP16/INT8/OBEY_PRECISION_CONSTRAINTS and
NetworkDefinitionCreationFlag.EXPLICIT_BATCH exist only in 10.x; OnnxParserFlag.ADJUST_FOR_DLA only in 11.x;
IBuilderConfig.int8_calibrator only in 10.x.

Strict: enums hold only the release's members; classes use __slots__, so a misspelled attribute raises
AttributeError as pybind11 does; methods take the bindings' keyword names; set_input_shape/set_tensor_address/
execute_async_v3/set_timing_cache/parse_from_file return bools as the C++ API does, and
OptimizationProfile.set_shape raises RuntimeError on inconsistent shapes (opt_profile_set_shape's
PY_ASSERT_RUNTIME_ERROR). What a GPU would compute is simulated: the "engine" keeps the ONNX it was built
from and executes it with onnxruntime on the host, reading and writing the memory object the test gives it.
`FAKE_NAMES` lists every attribute path the fake defines; tests/test_engines_trt.py checks on a GPU machine
that they all exist in the real module, so the fake cannot drift from the real API.
"""

from __future__ import annotations

import base64
import json
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ENUMS_10 = {
    "BuilderFlag": "FP16 BF16 INT8 DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS SAFETY_SCOPE "
                   "OBEY_PRECISION_CONSTRAINTS PREFER_PRECISION_CONSTRAINTS DIRECT_IO VERSION_COMPATIBLE "
                   "EXCLUDE_LEAN_RUNTIME FP8 ERROR_ON_TIMING_CACHE_MISS DISABLE_COMPILATION_CACHE WEIGHTLESS "
                   "STRIP_PLAN REFIT_IDENTICAL WEIGHT_STREAMING INT4 REFIT_INDIVIDUAL",
    "NetworkDefinitionCreationFlag": "EXPLICIT_BATCH STRONGLY_TYPED",
    "OnnxParserFlag": "NATIVE_INSTANCENORM",
}
ENUMS_11 = {
    "BuilderFlag": "DEBUG GPU_FALLBACK REFIT DISABLE_TIMING_CACHE EDITABLE_TIMING_CACHE TF32 SPARSE_WEIGHTS "
                   "SAFETY_SCOPE DIRECT_IO VERSION_COMPATIBLE EXCLUDE_LEAN_RUNTIME ERROR_ON_TIMING_CACHE_MISS "
                   "DISABLE_COMPILATION_CACHE STRIP_PLAN REFIT_IDENTICAL WEIGHT_STREAMING REFIT_INDIVIDUAL "
                   "STRICT_NANS MONITOR_MEMORY DISTRIBUTIVE_INDEPENDENCE",
    "NetworkDefinitionCreationFlag": "STRONGLY_TYPED PREFER_AOT_PYTHON_PLUGINS",  # 11.1 adds PREFER_JIT_...
    "OnnxParserFlag": "NATIVE_INSTANCENORM ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA ENABLE_PLUGIN_OVERRIDE "
                      "ADJUST_FOR_DLA",
}
ENUMS_COMMON = {
    "MemoryPoolType": "WORKSPACE DLA_MANAGED_SRAM DLA_LOCAL_DRAM DLA_GLOBAL_DRAM TACTIC_DRAM TACTIC_SHARED_MEMORY",
    "DeviceType": "GPU DLA",
    "TensorIOMode": "NONE INPUT OUTPUT",
    "DataType": "FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4",  # 11.x adds FP4 E8M0
    "ProfilingVerbosity": "LAYER_NAMES_ONLY DETAILED NONE",
}
SEVERITIES = "INTERNAL_ERROR ERROR WARNING INFO VERBOSE".split()
_TAG = "edgekd-fake-tensorrt"


class _Member:
    __slots__ = ("name", "value")

    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"<{self.name}: {self.value}>"


def _enum(name: str, members: str) -> type:
    ns = {m: _Member(m, i) for i, m in enumerate(members.split())}
    ns["__slots__"] = ()
    return type(name, (), ns)


@dataclass
class FakeState:
    """What the test controls and observes: the call log and the simulated device's behaviour."""

    version: str
    gpu: str = "FakeGPU sm_87"
    num_dla_cores: int = 0
    dla_incapable_ops: frozenset = frozenset({"ReduceMean", "Reshape", "Flatten"})
    parse_errors: list[str] = field(default_factory=list)
    refuse_empty_timing_cache: bool = False
    execute_ok: bool = True
    memory: Any = None  # the CUDA binding test double: read(ptr, nbytes) -> bytes, write(ptr, data)
    calls: list[tuple] = field(default_factory=list)

    def log(self, *call: Any) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def cache_tag(self) -> str:
        return f"{_TAG}-timing:{self.gpu}:{self.version}"


class _Dims(tuple):
    """tensorrt.Dims behaves as a sequence of ints."""


def make(version: str = "10.3.0.26", **state: Any) -> types.ModuleType:
    """A fresh fake `tensorrt` module of `version` ("10.3.0.26", "11.1.0.6", "11.4.1.3"); `state` sets FakeState
    fields. The module's `fake` attribute is the FakeState (not part of the real API: never in FAKE_NAMES)."""
    major = int(version.split(".")[0])
    st = FakeState(version=version, **state)
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    enums = {**ENUMS_COMMON, **(ENUMS_10 if major == 10 else ENUMS_11)}
    for name, members in enums.items():
        setattr(mod, name, _enum(name, members))
    DataType, TensorIOMode, DeviceType = mod.DataType, mod.TensorIOMode, mod.DeviceType

    class ILogger:
        __slots__ = ()

    for i, sev in enumerate(SEVERITIES):
        setattr(ILogger, sev, _Member(sev, i))

    class Logger(ILogger):
        __slots__ = ("min_severity",)

        def __init__(self, min_severity: Any = ILogger.WARNING) -> None:
            self.min_severity = min_severity

    class ITensor:
        __slots__ = ("name", "shape", "dtype")

        def __init__(self, name: str, shape: list, dtype: Any) -> None:
            self.name, self.shape, self.dtype = name, _Dims(shape), dtype

    class ILayer:
        __slots__ = ("name", "type", "num_inputs", "num_outputs")

        def __init__(self, name: str, op: str) -> None:
            self.name, self.type, self.num_inputs, self.num_outputs = name, op, 0, 1

    class INetworkDefinition:
        __slots__ = ("_layers", "_inputs", "_outputs", "_onnx", "_flags", "name")

        def __init__(self, flags: int) -> None:
            self._layers, self._inputs, self._outputs, self._onnx, self._flags = [], [], [], b"", flags
            self.name = "network"

        @property
        def num_layers(self) -> int:
            return len(self._layers)

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_layer(self, index: int) -> ILayer:
            return self._layers[index]

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class ParserError:
        __slots__ = ("_desc", "_node")

        def __init__(self, desc: str, node: int) -> None:
            self._desc, self._node = desc, node

        def desc(self) -> str:
            return self._desc

        def node(self) -> int:
            return self._node

        def __str__(self) -> str:
            return f"In node {self._node}: {self._desc}"

    class OnnxParser:
        __slots__ = ("_network", "_errors", "flags")

        def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
            st.log("OnnxParser")
            self._network, self._errors, self.flags = network, [], 0

        def parse_from_file(self, model: str) -> bool:
            import onnx

            st.log("parse_from_file", model)
            if st.parse_errors:
                self._errors = [ParserError(e, i) for i, e in enumerate(st.parse_errors)]
                return False
            proto = onnx.load(model)
            net = self._network
            net._onnx = proto.SerializeToString()
            types_ = {1: DataType.FLOAT, 10: DataType.HALF}
            inits = {t.name for t in proto.graph.initializer}

            def tensor(v: Any) -> ITensor:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                return ITensor(v.name, dims, types_.get(v.type.tensor_type.elem_type, DataType.FLOAT))

            net._inputs = [tensor(v) for v in proto.graph.input if v.name not in inits]
            net._outputs = [tensor(v) for v in proto.graph.output]
            net._layers = [ILayer(n.name or f"{n.op_type}_{i}", n.op_type) for i, n in enumerate(proto.graph.node)]
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def set_flag(self, flag: Any) -> None:
            self.flags |= 1 << int(flag)

    class IOptimizationProfile:
        __slots__ = ("_shapes",)

        def __init__(self) -> None:
            self._shapes: dict[str, tuple] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - binding names
            st.log("set_shape", input, tuple(min), tuple(opt), tuple(max))
            lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
            if not (len(lo) == len(mid) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True))):
                raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
            self._shapes[input] = (lo, mid, hi)

        def __bool__(self) -> bool:
            return bool(self._shapes)

    class ITimingCache:
        __slots__ = ("_tag", "_entries")

        def __init__(self, tag: str, entries: int) -> None:
            self._tag, self._entries = tag, entries

        def serialize(self) -> bytes:
            return json.dumps({"tag": self._tag, "entries": self._entries}).encode()

        def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
            self._entries += input_cache._entries
            return True

        def reset(self) -> bool:
            self._entries = 0
            return True

    config_slots = ["_flags", "_pools", "builder_optimization_level", "default_device_type", "DLA_core",
                    "_profiles", "_cache", "profiling_verbosity"]
    if major == 10:
        config_slots.append("int8_calibrator")

    class IBuilderConfig:
        __slots__ = tuple(config_slots)

        def __init__(self) -> None:
            self._flags, self._pools, self._profiles, self._cache = set(), {}, [], None
            self.builder_optimization_level, self.default_device_type, self.DLA_core = 3, DeviceType.GPU, -1
            self.profiling_verbosity = None
            if major == 10:
                self.int8_calibrator = None

        def set_flag(self, flag: Any) -> None:
            if not isinstance(flag, _Member) or getattr(mod.BuilderFlag, flag.name, None) is not flag:
                raise TypeError(f"set_flag(): incompatible function arguments: {flag!r}")
            st.log("set_flag", flag.name)
            self._flags.add(flag.name)

        def get_flag(self, flag: Any) -> bool:
            return flag.name in self._flags

        def set_memory_pool_limit(self, pool: Any, pool_size: int) -> None:
            st.log("set_memory_pool_limit", pool.name, pool_size)
            self._pools[pool.name] = pool_size

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            st.log("add_optimization_profile")
            if not profile:
                return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache | None:
            blob = bytes(serialized_timing_cache)
            st.log("create_timing_cache", len(blob))
            if not blob:
                return ITimingCache(st.cache_tag(), 0)
            try:
                data = json.loads(blob)
                return ITimingCache(str(data["tag"]), int(data["entries"]))
            except (ValueError, KeyError, TypeError):
                return None  # a corrupt blob: the C++ createTimingCache returns nullptr

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            ok = cache._tag == st.cache_tag() or bool(ignore_mismatch)
            if st.refuse_empty_timing_cache:
                ok = False
            st.log("set_timing_cache", ok)
            if ok:
                self._cache = cache
            return ok

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

        def can_run_on_DLA(self, layer: ILayer) -> bool:
            return layer.type not in st.dla_incapable_ops

    class IHostMemory(bytes):
        """IHostMemory exposes the buffer protocol; bytes(serialized) copies it."""

    class Builder:
        __slots__ = ("logger",)

        def __init__(self, logger: ILogger) -> None:
            st.log("Builder")
            self.logger = logger

        @property
        def num_DLA_cores(self) -> int:
            return st.num_dla_cores

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            st.log("create_network", flags)
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            st.log("create_builder_config")
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Any:
            st.log("build_serialized_network")
            ops = {layer.type for layer in network._layers}
            typed_flag = 1 << int(mod.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            strongly = major >= 11 or bool(network._flags & typed_flag)
            problems = []
            if ops & {"QuantizeLinear", "DequantizeLinear"} and not strongly and "INT8" not in config._flags:
                problems.append("Q/DQ network without BuilderFlag.INT8 (weakly typed)")
            if any(-1 in t.shape for t in network._inputs) and not config._profiles:
                problems.append("dynamic input without an optimization profile")
            if config._cache is None:
                problems.append("no timing cache attached")
            calibrator = getattr(config, "int8_calibrator", None)
            if calibrator is not None and "INT8" not in config._flags:
                problems.append("int8_calibrator without BuilderFlag.INT8")
            if config.default_device_type is DeviceType.DLA and "GPU_FALLBACK" not in config._flags and any(
                    not config.can_run_on_DLA(layer) for layer in network._layers):
                problems.append("a layer DLA cannot run and no GPU_FALLBACK")
            if problems:
                st.log("build_failed", problems)
                return None
            config._cache._entries += len(network._layers)
            cache = calibrator.read_calibration_cache() if calibrator is not None else None
            plan = {"tag": _TAG, "version": st.version, "gpu": st.gpu, "flags": sorted(config._flags),
                    "strongly_typed": strongly, "device": config.default_device_type.name,
                    "dla_core": config.DLA_core, "calibration_cache": None if cache is None else bytes(cache).decode(),
                    "profiles": [{k: [list(s) for s in v] for k, v in p._shapes.items()} for p in config._profiles],
                    "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network._inputs],
                    "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network._outputs],
                    "onnx": base64.b64encode(network._onnx).decode()}
            return IHostMemory(json.dumps(plan).encode())

    class IExecutionContext:
        __slots__ = ("_engine", "_shapes", "_addresses")

        def __init__(self, engine: ICudaEngine) -> None:
            self._engine, self._shapes, self._addresses = engine, {}, {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            st.log("set_input_shape", name, shape)
            profile = self._engine._plan["profiles"][0].get(name)
            if profile is None:
                return False
            lo, _, hi = profile
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)):
                return False
            self._shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> _Dims:
            io = self._engine._io[name]
            if io["mode"] is TensorIOMode.OUTPUT:
                batch = next(iter(self._shapes.values()), (-1,))[0]
                return _Dims([batch if d == -1 else d for d in io["shape"]])
            return _Dims(self._shapes.get(name, io["shape"]))

        def set_tensor_address(self, name: str, memory: int) -> bool:
            st.log("set_tensor_address", name, int(memory))
            if name not in self._engine._io or not int(memory):
                return False
            self._addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            st.log("execute_async_v3", int(stream_handle))
            io = self._engine._io
            if not st.execute_ok or set(self._addresses) != set(io) or len(self._shapes) != sum(
                    1 for v in io.values() if v["mode"] is TensorIOMode.INPUT):
                return False
            self._engine._run(self)
            return True

    class ICudaEngine:
        __slots__ = ("_plan", "_io", "_names", "_session")

        def __init__(self, plan: dict) -> None:
            self._plan = plan
            self._io, self._names = {}, []
            for mode, key in ((TensorIOMode.INPUT, "inputs"), (TensorIOMode.OUTPUT, "outputs")):
                for name, shape, dtype in plan[key]:
                    self._io[name] = {"mode": mode, "shape": shape, "dtype": getattr(DataType, dtype)}
                    self._names.append(name)
            self._session = None

        @property
        def num_io_tensors(self) -> int:
            return len(self._names)

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_mode(self, name: str) -> Any:
            return self._io[name]["mode"] if name in self._io else TensorIOMode.NONE

        def get_tensor_dtype(self, name: str) -> Any:
            return self._io[name]["dtype"]

        def create_execution_context(self) -> IExecutionContext:
            st.log("create_execution_context")
            return IExecutionContext(self)

        def _run(self, ctx: IExecutionContext) -> None:
            """Simulated execution: read inputs from the test's memory, run the ONNX, write the outputs."""
            import onnxruntime as ort

            if self._session is None:
                self._session = ort.InferenceSession(base64.b64decode(self._plan["onnx"]),
                                                     providers=["CPUExecutionProvider"])
            feeds = {}
            for name, io in self._io.items():
                if io["mode"] is TensorIOMode.INPUT:
                    dtype = np.float16 if io["dtype"] is DataType.HALF else np.float32
                    shape = ctx._shapes[name]
                    raw = st.memory.read(ctx._addresses[name], int(np.prod(shape)) * np.dtype(dtype).itemsize)
                    feeds[name] = np.frombuffer(raw, dtype).reshape(shape)
            for (name, _, _), value in zip(self._plan["outputs"], self._session.run(None, feeds), strict=True):
                dtype = np.float16 if self._io[name]["dtype"] is DataType.HALF else np.float32
                st.memory.write(ctx._addresses[name], np.ascontiguousarray(value, dtype).tobytes())

    class Runtime:
        __slots__ = ("logger", "DLA_core")

        def __init__(self, logger: ILogger) -> None:
            st.log("Runtime")
            self.logger, self.DLA_core = logger, -1

        @property
        def num_DLA_cores(self) -> int:
            return st.num_dla_cores

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            st.log("deserialize_cuda_engine")
            try:
                plan = json.loads(bytes(serialized_engine))
            except ValueError:
                return None
            if plan.get("tag") != _TAG or plan.get("version") != st.version or plan.get("gpu") != st.gpu:
                return None  # engines run only on the GPU and TensorRT version that built them
            return ICudaEngine(plan)

    exported = dict(ILogger=ILogger, Logger=Logger, ITensor=ITensor, ILayer=ILayer,
                    INetworkDefinition=INetworkDefinition, ParserError=ParserError, OnnxParser=OnnxParser,
                    IOptimizationProfile=IOptimizationProfile, ITimingCache=ITimingCache,
                    IBuilderConfig=IBuilderConfig, IHostMemory=IHostMemory, Builder=Builder,
                    IExecutionContext=IExecutionContext, ICudaEngine=ICudaEngine, Runtime=Runtime)
    if major == 10:
        class IInt8Calibrator:
            def __init__(self) -> None:
                pass

        class IInt8EntropyCalibrator2(IInt8Calibrator):
            def __init__(self) -> None:
                IInt8Calibrator.__init__(self)

        exported.update(IInt8Calibrator=IInt8Calibrator, IInt8EntropyCalibrator2=IInt8EntropyCalibrator2)
    for name, value in exported.items():
        value.__name__ = value.__qualname__ = name
        setattr(mod, name, value)
    mod.fake = st
    return mod


def fake_names(version: str) -> list[str]:
    """Every public attribute path of the fake for `version` ("Builder.create_network", "BuilderFlag.FP16")."""
    mod = make(version)
    out = []
    for name in sorted(vars(mod)):
        if name.startswith("_") or name == "fake":
            continue
        out.append(name)
        value = getattr(mod, name)
        if isinstance(value, type):
            own = {a for klass in value.__mro__ if klass.__module__ == __name__ for a in vars(klass)}
            out += [f"{name}.{attr}" for attr in sorted(own) if not attr.startswith("_")]
    return out


FAKE_NAMES = {"10": fake_names("10.3.0.26"), "11": fake_names("11.1.0.6")}


class HostCuda:
    """The CUDA binding interface of edgekd.engines.trt (CudaPython) over host memory, for CPU tests: addresses
    are fake, copies are checked against the allocation sizes, and every call is logged in `fake.calls`."""

    def __init__(self, state: FakeState) -> None:
        self.state, self.blocks, self.next = state, {}, 0x7000_0000
        state.memory = self

    def malloc(self, nbytes: int) -> int:
        ptr, self.next = self.next, self.next + max(nbytes, 1) + 256
        self.blocks[ptr] = bytearray(nbytes)
        self.state.log("cudaMalloc", nbytes)
        return ptr

    def free(self, ptr: int) -> None:
        self.blocks.pop(ptr)
        self.state.log("cudaFree", ptr)

    def _block(self, ptr: int, nbytes: int) -> bytearray:
        block = self.blocks[ptr]
        assert nbytes <= len(block), f"copy of {nbytes} bytes into a {len(block)}-byte allocation"
        return block

    def read(self, ptr: int, nbytes: int) -> bytes:
        return bytes(self._block(ptr, nbytes)[:nbytes])

    def write(self, ptr: int, data: bytes) -> None:
        self._block(ptr, len(data))[:len(data)] = data

    def to_device(self, ptr: int, host: np.ndarray) -> None:
        self.state.log("copy_to_device", host.nbytes)
        self.write(ptr, host.tobytes())

    def to_host(self, host: np.ndarray, ptr: int) -> None:
        self.state.log("copy_to_host", host.nbytes)
        host.reshape(-1).view(np.uint8)[:] = np.frombuffer(self.read(ptr, host.nbytes), np.uint8)

    def stream_handle(self) -> int:
        return 0x5151

    def synchronize(self) -> None:
        self.state.log("synchronize")

    def device_name(self) -> str:
        return self.state.gpu
