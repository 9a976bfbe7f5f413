"""The registry of backends: runtime name -> what it supports, how it builds a bundle, how it runs one.

Each runtime is one module in edgekd/engines/ (found there by name) that declares `BACKEND = Backend(...)` and defines

    availability() -> str                                  "ok", or why this machine cannot use the runtime
    check_target(target) -> str                            "ok", or why this machine cannot run that target
    target_rules(file, values) -> dict                     the runtime's own target-file rules (raise EdgekdError
                                                           naming file and key) and the Target fields they fill
    build_engine(source, target, precision, out) -> dict   write the engine files of a bundle into `out`
    open_runner(bundle_dir, manifest, threads) -> Runner   the device side: open a verified bundle's engine

and imports its runtime library (onnxruntime, tensorrt, torch) inside those functions only, so this registry, the
target files' validation and edgekd.runtime import with numpy alone. Targets, the build, the pipeline, the runtime and
the profiler ask the registry instead of naming runtimes. Adding a runtime: one module here and
a target file in targets/.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.plugins import declared

MODULES: tuple[str, ...] = ()   # backend modules outside edgekd/engines (a plugin's), besides those found there
PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("cpu", "cuda", "dla")
HOST_DEVICES = ("cpu",)   # engines for other devices may fail to build or run where the accelerator is missing
# The int8 Q/DQ placements (edgekd.quantize implements one quantizer per name); "none" = float engines only.
QUANT_SCHEMES = ("ort-cpu", "ort-cpu-avx2", "tensorrt")
NO_SCHEME = "none"
QUANTIZATIONS = ("ptq", "qat")   # how a quantized (int8) model is made; "none" = a float model
FUNCTIONS = ("availability", "check_target", "target_rules", "build_engine", "open_runner")   # each backend defines


@dataclass(frozen=True)
class Backend:
    """What one runtime supports; the functions that build and open its engines live in `module`."""

    name: str                         # the `runtime` of target files and manifests
    module: str
    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    default_scheme: str               # a target's quant_scheme when its file sets none
    source: str                       # "onnx": built from an exported ONNX; "weights": from safetensors + model spec
    batch_profile: bool = False       # the engine takes only batches in the manifest's batch.min..max
    target_keys: tuple[str, ...] = ()   # target-file keys only this runtime reads
    auto_scheme_devices: tuple[str, ...] = ()   # devices where quant_scheme = "auto" picks from the CPU's flags
    layer_times: bool = False         # per-layer kernel times can be measured (the INT8-vs-FP32 fallback)

    def functions(self) -> Any:
        """The backend's module, which defines FUNCTIONS."""
        return importlib.import_module(self.module)

    def __getattr__(self, name: str) -> Any:
        """`backend.build_engine(...)` etc.: the FUNCTIONS of the backend's module, imported on first use."""
        if name not in FUNCTIONS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.functions(), name)


class Runner:
    """The device-side protocol every backend's runner follows: `run({input name: array})` -> {output name: array},
    names as the engine (the ONNX graph, or the manifest for weight-based engines) gives them, in `input_names` and
    `output_names`; `info` says how it was opened (file, threads, providers, notes). `runner(x)` is the
    single-input, single-output convenience: run({input_names[0]: x})[output_names[0]]."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    info: dict[str, Any]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(self.input_names) != 1 or not self.output_names:
            raise EdgekdError(f"this engine takes inputs {list(self.input_names)}: call run() with a dict of them")
        return self.run({self.input_names[0]: x})[self.output_names[0]]


def check_feeds(runner: Runner, feeds: Any) -> None:
    """The feeds name exactly the runner's inputs (a one-line error naming the missing or unknown ones)."""
    if not isinstance(feeds, dict):
        raise EdgekdError(f"run() takes a dict of named numpy inputs {list(runner.input_names)}, got "
                          f"{type(feeds).__name__}")
    if set(feeds) != set(runner.input_names):
        raise EdgekdError(f"run() got inputs {sorted(feeds)}, this engine takes {list(runner.input_names)}")


@cache
def backends() -> dict[str, Backend]:
    """Every backend, by runtime name in name order: each module in edgekd/engines that defines BACKEND, and MODULES."""
    found = declared("edgekd.engines", "BACKEND", MODULES)
    return {b.name: b for b in sorted((b for b in found if isinstance(b, Backend)), key=lambda b: b.name)}


def runtimes() -> tuple[str, ...]:
    """The runtime names target files and manifests may use."""
    return tuple(backends())


def backend(name: Any, where: str = "") -> Backend:
    """The backend of runtime `name`; an unknown name is a one-line error naming `where` and the valid names."""
    found = backends().get(name) if isinstance(name, str) else None
    if found is None:
        raise EdgekdError(f"{where + ': ' if where else ''}unknown runtime {name!r} (expected one of "
                          f"{', '.join(backends())})")
    return found


def needs_accelerator(device: str) -> bool:
    """Engines for this device may fail to build or run on a host without it (then skipped, with the reason)."""
    return device not in HOST_DEVICES
