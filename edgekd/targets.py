"""Deployment targets: one TOML file per device class in the repo's `targets/` folder.

A target says *where* an engine runs (runtime, device, threads, precisions, batch sizes, budgets), never
*what* runs there; the same student is built for every target. Files are strict: an unknown key or a value
of the wrong type is an error that names the file and the key, because a typo in a deployment file silently
falling back to a default is how engines get built for the wrong hardware.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgekd.engines import registry
from edgekd.errors import EdgekdError

# What each runtime supports (precisions, devices, default scheme, its own keys) is its backend's declaration
# (edgekd.engines.registry); int8 always means "from a Q/DQ ONNX", never calibration inside the builder.
OPT_LEVELS = ("disable", "basic", "extended", "all")
QUANT_SCHEMES = (*registry.QUANT_SCHEMES, registry.NO_SCHEME)
AUTO = "auto"   # quant_scheme = "auto": pick from the CPU the target builds for (cpu_quant_scheme)

# Instruction sets that decide int8 speed and exactness, as the Linux kernel names them in /proc/cpuinfo.
ISA_FLAGS = {
    "x86_64": ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8",
               "amx_bf16"),
    "aarch64": ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16"),   # NEON, dot product, int8 matrix multiply
}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


@dataclass(frozen=True)
class Target:
    """One deployment target, as read from its TOML file (see targets/*.toml for the documented keys)."""

    name: str
    description: str
    runtime: str
    device: str
    precisions: tuple[str, ...]
    batch_sizes: tuple[int, ...] = (1,)
    dynamic_batch: bool = True
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    threads: int | None = None
    providers: tuple[str, ...] = ()
    provider_options: dict = field(default_factory=dict)
    graph_optimization_level: str = "all"
    workspace_mb: int = 1024
    builder_optimization_level: int = 3
    timing_cache: str | None = None
    dla_core: int | None = None
    compile: bool = False
    latency_budget_ms: float | None = None
    memory_budget_mb: float | None = None
    quant_scheme: str = "none"
    quant_scheme_reason: str = ""   # why this scheme: pinned by the file, the runtime's default, or the CPU's flags
    eval_samples: int = 256
    path: str = ""


# key -> (expected kind, description for error messages); the kinds are _KINDS's.
_SCHEMA: dict[str, tuple[str, str]] = {
    "name": ("str", "a string"),
    "description": ("str", "a string"),
    "runtime": ("str", "a runtime name"),
    "device": ("str", f"one of {', '.join(registry.DEVICES)}"),
    "precisions": ("strs", f"a list drawn from {', '.join(registry.PRECISIONS)}"),
    "batch_sizes": ("ints", "a list of positive integers"),
    "dynamic_batch": ("bool", "true or false"),
    "min_batch": ("count", "a positive integer"),
    "opt_batch": ("count", "a positive integer"),
    "max_batch": ("count", "a positive integer"),
    "threads": ("count", "a positive integer"),
    "providers": ("strs", "a list of onnxruntime execution provider names"),
    "provider_options": ("table", "a table of tables keyed by provider name"),
    "graph_optimization_level": ("str", f"one of {', '.join(OPT_LEVELS)}"),
    "workspace_mb": ("count", "a positive integer (MiB)"),
    "builder_optimization_level": ("level", "an integer 0..5"),
    "timing_cache": ("str", "a file path"),
    "dla_core": ("int", "a DLA core index (0 or 1 on AGX Orin)"),
    "compile": ("bool", "true or false"),
    "latency_budget_ms": ("positive", "a positive number of milliseconds"),
    "memory_budget_mb": ("positive", "a positive number of MiB"),
    "quant_scheme": ("str", f"one of {', '.join(QUANT_SCHEMES)}, or {AUTO!r} (from the CPU's instruction sets)"),
    "eval_samples": ("index", ">= 0, a number of test samples (0: no eval.npz in the bundle)"),
}


def targets_dir() -> Path:
    """The catalog folder: $EDGEKD_TARGETS if set, else the repository's top-level `targets/`."""
    env = os.environ.get("EDGEKD_TARGETS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "targets"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# kind -> (the test a TOML value must pass, what it becomes)
_KINDS: dict[str, tuple[Any, Any]] = {
    "str": (lambda v: isinstance(v, str), str),
    "int": (_is_int, int),
    "count": (lambda v: _is_int(v) and v >= 1, int),
    "index": (lambda v: _is_int(v) and v >= 0, int),
    "level": (lambda v: _is_int(v) and 0 <= v <= 5, int),
    "positive": (lambda v: (_is_int(v) or isinstance(v, float)) and v > 0, float),
    "bool": (lambda v: isinstance(v, bool), bool),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), tuple),
    "ints": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x > 0 for x in v), tuple),
    "table": (lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
              lambda v: {str(p): dict(o) for p, o in v.items()}),
}


def _check_type(file: Path, key: str, value: Any) -> Any:
    kind, expected = _SCHEMA[key]
    valid, convert = _KINDS[kind]
    if not valid(value):
        raise EdgekdError(f"target file {file}: key {key!r} must be {expected}, got {value!r} "
                          f"({type(value).__name__})")
    if kind == "table":
        for provider, options in value.items():
            for opt_key, opt_value in options.items():
                if not isinstance(opt_value, (str, int, float, bool)):
                    raise EdgekdError(f"target file {file}: provider_options.{provider}.{opt_key} must be a "
                                      f"string, number or boolean, got {opt_value!r}")
    return convert(value)


def _choice(file: Path, key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise EdgekdError(f"target file {file}: key {key!r} must be one of {', '.join(allowed)}, got "
                          f"{value!r}")


def _from_dict(file: Path, data: dict[str, Any]) -> Target:
    """Validate a parsed TOML table and fill the defaults that depend on runtime/device."""
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise EdgekdError(f"target file {file}: unknown key {unknown[0]!r} (valid keys: "
                          f"{', '.join(_SCHEMA)})")
    for required in ("runtime", "device", "precisions"):
        if required not in data:
            raise EdgekdError(f"target file {file}: missing required key {required!r} "
                              f"({_SCHEMA[required][1]})")
    v = {key: _check_type(file, key, value) for key, value in data.items()}

    runtime, device = v["runtime"], v["device"]
    _choice(file, "runtime", runtime, registry.runtimes())
    backend = registry.backend(runtime)
    _choice(file, "device", device, registry.DEVICES)
    if device not in backend.devices:
        raise EdgekdError(f"target file {file}: runtime {runtime!r} cannot run on device {device!r} (it "
                          f"supports {', '.join(backend.devices)})")
    runtime_keys = {k for b in registry.backends().values() for k in b.target_keys}   # keys some runtime owns
    for key in sorted(set(v) & runtime_keys - set(backend.target_keys)):
        owners = [b.name for b in registry.backends().values() if key in b.target_keys]
        raise EdgekdError(f"target file {file}: key {key!r} only applies to runtime "
                          f"{' or '.join(repr(o) for o in owners)} (this target's runtime is {runtime!r})")
    precisions = v["precisions"]
    if not precisions:
        raise EdgekdError(f"target file {file}: key 'precisions' must list at least one of "
                          f"{', '.join(registry.PRECISIONS)}")
    for p in precisions:
        _choice(file, "precisions", p, registry.PRECISIONS)
        if p not in backend.precisions:
            raise EdgekdError(f"target file {file}: precision {p!r} is not supported by runtime {runtime!r} "
                              f"(supported: {', '.join(backend.precisions)})")

    level = v.get("graph_optimization_level", "all")
    _choice(file, "graph_optimization_level", level, OPT_LEVELS)
    scheme = v.get("quant_scheme", backend.default_scheme)
    reason = f"pinned by {file.name}" if "quant_scheme" in v else f"the {runtime} runtime's default"
    if scheme == AUTO:
        if device not in backend.auto_scheme_devices:
            offered = " or ".join(f"runtime {b.name!r} on device {'/'.join(map(repr, b.auto_scheme_devices))}"
                                  for b in registry.backends().values() if b.auto_scheme_devices)
            raise EdgekdError(f"target file {file}: quant_scheme {AUTO!r} applies to {offered} (this target is "
                              f"{runtime} on {device})")
        scheme, reason = cpu_quant_scheme()
    _choice(file, "quant_scheme", scheme, QUANT_SCHEMES)
    if "int8" in precisions and scheme == "none":
        raise EdgekdError(f"target file {file}: precision 'int8' needs an int8 quant_scheme "
                          f"({', '.join(registry.QUANT_SCHEMES)}), got 'none'")

    batch_sizes = tuple(sorted(set(v.get("batch_sizes", (1,)))))
    dynamic = v.get("dynamic_batch", True)
    min_b = v.get("min_batch", batch_sizes[0] if not dynamic else 1)
    max_b = v.get("max_batch", batch_sizes[-1])
    opt_b = v.get("opt_batch", max(min_b, min(batch_sizes[-1], max_b)))
    if not min_b <= opt_b <= max_b:
        raise EdgekdError(f"target file {file}: batch profile must satisfy min_batch <= opt_batch <= "
                          f"max_batch, got {min_b} <= {opt_b} <= {max_b}")
    outside = [b for b in batch_sizes if not min_b <= b <= max_b]
    if outside:
        raise EdgekdError(f"target file {file}: batch_sizes {list(outside)} fall outside "
                          f"min_batch..max_batch = {min_b}..{max_b}")
    if not dynamic and (len(batch_sizes) != 1 or min_b != max_b):
        raise EdgekdError(f"target file {file}: dynamic_batch = false builds for one batch size; give "
                          f"exactly one value in batch_sizes (got {list(batch_sizes)}) and leave "
                          "min/opt/max_batch unset")

    own = backend.target_rules(file, v)   # the runtime's own rules and the defaults that follow

    # The keys taken as the file gives them; a key it leaves out gets Target's default (one place for each).
    given = {k: v[k] for k in ("threads", "provider_options", "workspace_mb", "builder_optimization_level",
                               "timing_cache", "dla_core", "compile", "latency_budget_ms", "memory_budget_mb",
                               "eval_samples") if k in v}
    return Target(name=v.get("name", file.stem), description=v.get("description", ""), runtime=runtime, device=device,
                  precisions=precisions, batch_sizes=batch_sizes, dynamic_batch=dynamic, min_batch=min_b,
                  opt_batch=opt_b, max_batch=max_b, providers=own.get("providers", v.get("providers", ())),
                  graph_optimization_level=level, quant_scheme=scheme,
                  quant_scheme_reason=reason, path=str(file), **given)


def _read(file: Path) -> Target:
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise EdgekdError(f"target file {file}: cannot read it ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise EdgekdError(f"target file {file}: not valid TOML ({e})") from e
    return _from_dict(file, data)


def list_targets() -> list[Target]:
    """Every target in the catalog folder, sorted by name (a broken file raises, naming itself)."""
    return [_read(p) for p in sorted(targets_dir().glob("*.toml"))]


def cpu_flags() -> dict[str, Any]:
    """This machine's architecture and which of ISA_FLAGS its CPU has, read from /proc/cpuinfo (the kernel's own
    report; Linux, where engines are built). Elsewhere `flags` is None: unknown, not absent."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"arch": arch, "flags": None}
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(value.split())
    return {"arch": arch, "flags": [f for f in ISA_FLAGS.get(arch, ()) if f in found]}


def cpu_quant_scheme(cpu: dict[str, Any] | None = None) -> tuple[str, str]:
    """The onnxruntime CPU int8 scheme for a CPU, and why: "ort-cpu" (8-bit weights) where VNNI exists, whose u8 x s8
    dot products do not saturate; else "ort-cpu-avx2" (7-bit weights), because the AVX2 kernels without VNNI saturate
    on pairs of large products (see targets/x86-cpu-ort.toml)."""
    cpu = cpu or cpu_flags()
    flags = cpu["flags"]
    if flags is None:
        return "ort-cpu-avx2", f"{cpu['arch']}: CPU flags unknown (no /proc/cpuinfo); the 7-bit scheme is exact " \
                               "everywhere"
    vnni = [f for f in VNNI_FLAGS if f in flags]
    if vnni:
        return "ort-cpu", f"this CPU has {'/'.join(vnni)}: 8-bit weights run exactly"
    if cpu["arch"] == "x86_64":
        return "ort-cpu-avx2", "this CPU has no VNNI (avx512_vnni/avx_vnni): 7-bit weights avoid the saturating AVX2 " \
                               "int8 kernels"
    return "ort-cpu", f"{cpu['arch']} CPU: onnxruntime's int8 kernels there do not saturate like x86 AVX2 ones"


def load_target(name_or_path: str | Target) -> Target:
    """Load a catalog target by name (e.g. 'x86-cpu-ort') or any target file by path; a Target passes through, so
    a target is resolved once and handed on."""
    if isinstance(name_or_path, Target):
        return name_or_path
    name_or_path = str(name_or_path)
    candidate = Path(name_or_path).expanduser()
    if name_or_path.endswith(".toml") or os.sep in name_or_path or "/" in name_or_path:
        if not candidate.is_file():
            raise EdgekdError(f"target file {candidate}: file not found")
        return _read(candidate)
    file = targets_dir() / f"{name_or_path}.toml"
    if file.is_file():
        return _read(file)
    folder = targets_dir()
    names = sorted(p.stem for p in folder.glob("*.toml"))   # none when the folder is missing
    raise EdgekdError(f"unknown target {name_or_path!r}; available in {folder}: "
                      f"{', '.join(names) if names else '(none)'} (or pass a path to a .toml file)")
