"""onnxruntime engines: build (optimize + serialize the graph) and run (the device side).

Build: the target's graph optimization level is applied once and the optimized graph is saved into the
bundle (SessionOptions.optimized_model_filepath), so the device loads it with optimizations disabled and
starts fast. onnxruntime warns that a graph optimized at level "all" contains layout transforms (NCHWc) tied
to the CPU that optimized it; for those bundles the portable model.onnx travels too, and the runner uses the
saved graph only on a host with the same fingerprint (arch, CPU vector ISA, onnxruntime version), otherwise
it loads model.onnx and optimizes at start-up. Levels up to "extended" are saved without a fallback.

Precisions: fp32, and int8 from a Q/DQ ONNX (onnxruntime fuses Q/DQ into QLinearConv/QGemm). fp16 only
with the TensorRT execution provider first (it builds fp16 kernels from the float graph, trt_fp16_enable);
onnxruntime's CPU provider has no fast fp16 kernels. For TensorRT EP targets (onnxruntime-gpu, a GPU path that
needs none of edgekd's TensorRT code) `trt_ep_options` writes the provider options: precision, engine and
timing caches, workspace, builder level and the optimization-profile shapes.

Only numpy and onnxruntime are imported at run time (`onnx` is used at build time only).
"""

from __future__ import annotations

import platform
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import tasks
from edgekd.engines.registry import Backend, Runner, check_feeds
from edgekd.errors import EdgekdError

BACKEND = Backend(name="onnxruntime", module=__name__, precisions=("fp32", "fp16", "int8"), devices=("cpu", "cuda"),
                  default_scheme="ort-cpu", source="onnx", auto_scheme_devices=("cpu",), layer_times=True,
                  # workspace and builder level: for the TensorRT execution provider (trt_ep_options)
                  target_keys=("providers", "provider_options", "graph_optimization_level", "workspace_mb",
                               "builder_optimization_level"))
ENGINE_FILE = "model.opt.onnx"
PORTABLE_FILE = "model.onnx"
HARDWARE_SPECIFIC_LEVELS = ("all",)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise EdgekdError(f"this bundle needs onnxruntime, which is not installed ({e}); pip install "
                          "onnxruntime") from e
    return onnxruntime


def availability() -> str:
    """"ok" when onnxruntime imports, else why not."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"not installed ({e}); pip install onnxruntime"
    return "ok"


def check_target(target: Any) -> str:
    """"ok" when this onnxruntime has the target's first execution provider, else why not."""
    available = _ort().get_available_providers()
    if target.providers and target.providers[0] not in available:
        return (f"target {target.name} wants {target.providers[0]}, but this onnxruntime has only "
                f"{', '.join(available)}")
    return "ok"


def target_rules(file: Any, v: dict[str, Any]) -> dict[str, Any]:
    """Providers (default: CUDA then CPU on device cuda, else CPU), options only for listed providers and with the
    TensorRT EP's real option names, fp16 only with the TensorRT EP first."""
    providers = v.get("providers")
    if providers is None:
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if v["device"] == "cuda" else (
            "CPUExecutionProvider",)
    provider_options = v.get("provider_options", {})
    stray = sorted(set(provider_options) - set(providers))
    if stray:
        raise EdgekdError(f"target file {file}: provider_options names provider {stray[0]!r}, which is not "
                          f"in providers {list(providers)}")
    if "fp16" in v["precisions"] and providers[:1] != (TRT_EP,):
        raise EdgekdError(f"target file {file}: precision 'fp16' is not supported by runtime 'onnxruntime' "
                          f"without {TRT_EP!r} first in providers (it builds the fp16 kernels)")
    if TRT_EP in provider_options:
        check_trt_ep_options(str(file), provider_options[TRT_EP])
    return {"providers": tuple(providers)}


def host_fingerprint() -> dict[str, Any]:
    """What must match for an optimized graph saved at level "all" to be reused on this host."""
    from edgekd.targets import cpu_flags

    return {"machine": platform.machine(), "system": platform.system(), "isa": cpu_flags()["flags"] or [],
            "onnxruntime": _ort().__version__}


TRT_EP = "TensorrtExecutionProvider"
# Option names of onnxruntime's TensorRT EP (onnxruntime/core/providers/tensorrt/
# tensorrt_execution_provider_info.cc, provider_option_names; documented on onnxruntime.ai's TensorRT EP page).
TRT_EP_OPTION_NAMES = frozenset("""
device_id has_user_compute_stream user_compute_stream trt_max_partition_iterations trt_min_subgraph_size
trt_max_workspace_size trt_fp16_enable trt_bf16_enable trt_int8_enable trt_int8_calibration_table_name
trt_int8_use_native_calibration_table trt_dla_enable trt_dla_core trt_dump_subgraphs trt_engine_cache_enable
trt_engine_cache_path trt_weight_stripped_engine_enable trt_onnx_model_folder_path trt_engine_cache_prefix
trt_engine_decryption_enable trt_engine_decryption_lib_path trt_force_sequential_engine_build
trt_context_memory_sharing_enable trt_layer_norm_fp32_fallback trt_timing_cache_enable trt_timing_cache_path
trt_force_timing_cache trt_detailed_build_log trt_build_heuristics_enable trt_sparsity_enable
trt_builder_optimization_level trt_auxiliary_streams trt_tactic_sources trt_extra_plugin_lib_paths
trt_profile_min_shapes trt_profile_max_shapes trt_profile_opt_shapes trt_cuda_graph_enable
trt_ep_context_embed_mode trt_ep_context_file_path trt_dump_ep_context_model
""".split())
_TRT_EP_PRECISION_KEYS = ("trt_fp16_enable", "trt_int8_enable")


def check_trt_ep_options(file: str, options: dict[str, Any]) -> None:
    """Refuse a TensorRT EP option name onnxruntime does not define (a typo would be silently ignored)."""
    unknown = sorted(set(options) - TRT_EP_OPTION_NAMES)
    if unknown:
        raise EdgekdError(f"target file {file}: provider_options.{TRT_EP}.{unknown[0]} is not a TensorRT "
                          "execution provider option (see onnxruntime's TensorRT EP docs)")


def _text(v: Any) -> str:
    # onnxruntime's Python API takes provider options as strings (booleans "true"/"false").
    return str(v).lower() if isinstance(v, bool) else str(v)


def trt_ep_options(target: Any, precision: str, input_name: str, input_shape: tuple[int, ...]) -> dict[str, str]:
    """onnxruntime TensorRT EP options for `target` at `precision`, as strings.

    Generated: trt_fp16_enable (fp16, and int8 so layers outside Q/DQ pairs run fp16, as trtexec --int8 --fp16),
    trt_int8_enable (int8: TensorRT 10 needs the INT8 flag for a Q/DQ network; no calibration table, the scales
    are in the ONNX), engine and timing caches under ~/.cache/edgekd/ort-trt/<target>, workspace, builder level,
    and profile shapes "name:NxCxHxW" from the target's batch range. The target's own options win, except that
    a precision switch contradicting `precision` is an error.
    """
    user = dict(target.provider_options.get(TRT_EP, {}))
    check_trt_ep_options(target.path or target.name, user)
    dims = "x".join(str(d) for d in input_shape)
    cache = f"~/.cache/edgekd/ort-trt/{target.name}"
    generated: dict[str, Any] = {
        "trt_fp16_enable": precision in ("fp16", "int8"),
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
        "trt_max_workspace_size": int(target.workspace_mb) << 20,
        "trt_builder_optimization_level": int(target.builder_optimization_level),
        "trt_profile_min_shapes": f"{input_name}:{target.min_batch}x{dims}",
        "trt_profile_opt_shapes": f"{input_name}:{target.opt_batch}x{dims}",
        "trt_profile_max_shapes": f"{input_name}:{target.max_batch}x{dims}",
    }
    for key in _TRT_EP_PRECISION_KEYS:
        if key in user and _text(user[key]).lower() != _text(generated[key]).lower():
            raise EdgekdError(f"target {target.name}: provider_options.{TRT_EP}.{key} = {user[key]!r} "
                              f"contradicts precision {precision} (edgekd sets {key} from the precision)")
    return {k: _text(v) for k, v in {**generated, **user}.items()}


def _provider_options(providers: list[str], options: dict[str, dict]) -> list[dict[str, str]]:
    """Per-provider option strings; cache paths ("~/...") expanded and created on this host."""
    out = []
    for p in providers:
        opts = {k: _text(v) for k, v in options.get(p, {}).items()}
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            if key in opts:
                opts[key] = str(Path(opts[key]).expanduser())
                Path(opts[key]).mkdir(parents=True, exist_ok=True)
        out.append(opts)
    return out


def _session(path: Path, level: str, threads: int | None = None, providers: list[str] | None = None,
             provider_options: dict | None = None, optimized_out: Path | None = None,
             profile_prefix: str | None = None) -> Any:
    """An onnxruntime session (CPU provider unless `providers`), optionally saving its optimized graph or profiling."""
    ort = _ort()
    providers = providers or ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, {
        "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
        "all": "ORT_ENABLE_ALL"}[level])
    options.log_severity_level = 3  # the "hardware specific" warning is handled (and recorded) by us
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized_out is not None:
        options.optimized_model_filepath = str(optimized_out)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), options, providers=providers,
                                    provider_options=_provider_options(providers, provider_options or {}))
    except Exception as e:
        raise EdgekdError(f"onnxruntime cannot load {path} with providers {providers} ({type(e).__name__}: "
                          f"{e})") from e


def build_engine(source: Any, target: Any, precision: str, out: Path) -> dict[str, Any]:
    """Write model.opt.onnx (+ model.onnx when the optimized graph is hardware specific) into `out`."""
    from edgekd.engines import check_onnx_source

    ort = _ort()
    requested = list(target.providers) or ["CPUExecutionProvider"]
    if precision == "fp16" and requested[0] != TRT_EP:
        raise EdgekdError(f"target {target.name}: onnxruntime engines are fp32 or int8 (Q/DQ); fp16 is not "
                          f"offered without the {TRT_EP} first in providers (the CPU provider has no fast fp16 "
                          "kernels and edgekd does not convert graphs to fp16) - or use a tensorrt or torch target")
    info = check_onnx_source(source, target, precision)
    notes: list[str] = []
    provider_options = dict(target.provider_options)
    if TRT_EP in requested:
        provider_options[TRT_EP] = trt_ep_options(target, precision, info["input_name"], tuple(source.input_shape))
    available = ort.get_available_providers()
    missing = [p for p in requested if p not in available]

    level = target.graph_optimization_level
    saved_level = level
    build_providers = requested
    if missing:
        # The graph cannot be optimized for providers this machine lacks; save the portable "basic" graph and
        # let the device apply the target's level at start-up.
        saved_level = "basic" if level != "disable" else "disable"
        build_providers = ["CPUExecutionProvider"]
        notes.append(f"providers {missing} are not available on the build host; saved the graph at level "
                     f"{saved_level!r}, the device applies {level!r} at start-up")
    hardware_specific = saved_level in HARDWARE_SPECIFIC_LEVELS

    portable = out / PORTABLE_FILE
    shutil.copyfile(source.onnx_path, portable)
    engine_file = out / ENGINE_FILE
    if saved_level == "disable":
        engine_file = portable
    else:
        _session(portable, saved_level, target.threads, build_providers, provider_options,
                 optimized_out=engine_file)
        if not engine_file.is_file():
            raise EdgekdError(f"onnxruntime did not write the optimized model {engine_file}")
        if info["metadata"]:   # onnxruntime drops metadata_props when it saves the optimized graph; put them back
            import onnx

            model = onnx.load(str(engine_file))
            onnx.helper.set_model_props(model, info["metadata"])
            onnx.save(model, str(engine_file))
        if hardware_specific:
            notes.append(f"graph saved at level {saved_level!r} contains CPU-specific layout transforms; it "
                         f"is reused only on a host matching build_fingerprint, elsewhere {PORTABLE_FILE} is "
                         "loaded and optimized at start-up")
        else:
            portable.unlink()

    # Smoke test: the saved graph loads with optimizations off and runs one batch.
    session = _session(engine_file, "disable", target.threads, build_providers, provider_options)
    batch = tasks.get(source.task).zeros(target.min_batch, tuple(source.input_shape))
    logits = session.run(None, {info["input_name"]: batch})[0]
    if logits.shape != (target.min_batch, source.num_classes):
        raise EdgekdError(f"ONNX file {source.onnx_path}: output shape {logits.shape}, expected "
                          f"({target.min_batch}, {source.num_classes})")

    engine = {
        "file": engine_file.name,
        "fallback_file": PORTABLE_FILE if hardware_specific else None,
        "graph_optimization_level": level,
        "saved_optimization_level": saved_level,
        "hardware_specific": hardware_specific,
        "build_fingerprint": host_fingerprint(),
        "providers": requested,
        "provider_options": provider_options,
        "threads": target.threads,
        "opset": info["opset"],
        "onnx_metadata": info["metadata"],
    }
    return {"engine": engine, "versions": {"onnxruntime": ort.__version__}, "notes": notes,
            "input_name": info["input_name"], "output_name": info["output_name"]}


_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _segments(model: Any) -> tuple[dict[str, int], list[list[str]]]:
    """Split the graph at its Conv/Gemm/MatMul nodes: segment k is the k-th of them and every node after it up
    to the next (its BatchNorm, activation, Q/DQ, pooling), nodes before the first belong to segment 0.
    Returns (node name and output names -> k, the module scopes the torch exporter recorded for each k-th op).
    Float and Q/DQ exports of one model have the same segments in the same order."""
    import ast

    index: dict[str, int] = {}
    scopes: list[list[str]] = []
    for node in model.graph.node:
        if node.op_type in _WEIGHTED_OPS:
            meta = {p.key: p.value for p in node.metadata_props}
            try:   # a list literal written by the exporter: parsed, never run
                names = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
            except (ValueError, SyntaxError):
                names = []
            scopes.append([str(n) for n in names if n])
        for key in (node.name, *node.output):
            index.setdefault(key, max(len(scopes) - 1, 0))
    return index, scopes


def _source(kernel: str, known: dict[str, int]) -> int | None:
    """onnxruntime names a rewritten node after its source node (or its output) plus "_token_N" or "_nchwc"."""
    name = kernel.removesuffix("_kernel_time")
    while name not in known:
        stripped = re.sub(r"(_token_\d+|_nchwc)$", "", name)
        if stripped == name:
            return None
        name = stripped
    return known[name]


def segment_layers(onnx_path: Path, layers: list[str]) -> list[str | None]:
    """The module path (the deepest of `layers` in its exporter scopes) of each segment's Conv/Gemm/MatMul."""
    import onnx

    _, scopes = _segments(onnx.load(str(onnx_path), load_external_data=False))
    wanted = set(layers)
    return [next((s for s in reversed(names) if s in wanted), None) for names in scopes]


def segment_times(onnx_path: Path, x: np.ndarray, *, threads: int | None = None, runs: int = 20) -> list[float]:
    """Milliseconds per run that onnxruntime's CPU kernels spend in each segment (`_segments`) of the graph.

    Median over `runs` runs after 3 warm-up runs, at level "all" with onnxruntime's profiler on. Every kernel
    counts for the source node it was fused from: a QLinearConv and the Q/DQ around it for its conv, a float
    Conv fused with its ReLU too. Layout reorders and kernels named after no source node are not counted.
    """
    import json
    import tempfile

    import onnx

    known, scopes = _segments(onnx.load(str(onnx_path), load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="edgekd-segment-times-") as tmp:
        session = _session(onnx_path, "all", threads, profile_prefix=str(Path(tmp) / "profile"))
        feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
        for _ in range(runs + 3):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs_at = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("name") == "model_run")
    per_run = np.zeros((len(runs_at), max(len(scopes), 1)))
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            k = _source(event["name"], known)
            r = next((i for i, (start, end) in enumerate(runs_at) if start <= event["ts"] <= end), None)
            if k is not None and r is not None:
                per_run[r, k] += event.get("dur", 0) / 1000.0
    return [float(v) for v in np.median(per_run[min(3, len(per_run) - 1):], axis=0)]


class OrtRunner(Runner):
    """Runs an onnxruntime bundle: run({name: array}) -> {name: array}, names from the ONNX graph."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        ort = _ort()
        engine = manifest["engine"]
        notes: list[str] = []
        target_level = engine["graph_optimization_level"]
        file, level = engine["file"], "disable"
        if engine.get("hardware_specific"):
            here = host_fingerprint()
            if here != engine.get("build_fingerprint"):
                file, level = engine["fallback_file"], target_level
                notes.append(f"host {here} differs from the build host {engine.get('build_fingerprint')}: "
                             f"loaded {file} and optimized it at level {level!r} at start-up")
        elif engine.get("saved_optimization_level") != target_level:
            level = target_level
            notes.append(f"graph was saved at level {engine.get('saved_optimization_level')!r}; applied "
                         f"{target_level!r} at start-up")
        available = ort.get_available_providers()
        providers = [p for p in engine.get("providers") or ["CPUExecutionProvider"] if p in available]
        if not providers:
            raise EdgekdError(f"bundle {bundle_dir}: none of the providers {engine.get('providers')} is "
                              f"available in this onnxruntime ({', '.join(available)})")
        if providers != list(engine.get("providers") or []):
            notes.append(f"providers {engine.get('providers')} requested, using {providers}")
        threads = threads or engine.get("threads")
        self.session = _session(bundle_dir / file, level, threads, providers,
                                engine.get("provider_options") or {})
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.info = {"file": file, "optimization_level_at_load": level, "threads": threads,
                     "providers": self.session.get_providers(), "notes": notes}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        return dict(zip(self.output_names, self.session.run(list(self.output_names), feeds), strict=True))


open_runner = OrtRunner   # the registry's device side: open_runner(bundle_dir, manifest, threads)
