"""The torch runtime: the reference engine (safetensors weights of a built-in model family, run by PyTorch).

It executes the same model code that was trained, so its logits are the baseline the exported engines are
compared against, and it is the GPU fallback where TensorRT is missing. torch.compile is tried when the
target asks for it; if compiling fails (no C++ compiler or Triton, unsupported GPU) the runner runs eager and
says so.

A bundle is data, so it never names code: the manifest's model spec must be a built-in family (`mlp:...`,
`cnn:...`, parsed by edgekd), never a `package.module:function` factory, and the weights are safetensors whose
tensor names and shapes must match that architecture (checked on the meta device, before anything is
allocated). An exported program (`torch.export.save` / `.pt2`) is not used: in torch 2.13 `torch.export.load`
unpickles tensor-subclass weights and opaque constants (`torch.load(weights_only=False)`, `pickle.loads`), falls
back to `weights_only=False` for the sample inputs, and evaluates symbolic-shape strings with `sympy.sympify` (an
`eval`); a .pt2 whose shape expression is `__import__('os').system(...)` runs that command on load. Models built
by a factory go to onnxruntime or TensorRT targets instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekd.engines.registry import Backend, Runner, check_feeds
from edgekd.errors import EdgekdError

if TYPE_CHECKING:
    import torch

BACKEND = Backend(name="torch", module=__name__, precisions=("fp32", "fp16"), devices=("cpu", "cuda"),
                  default_scheme="none", source="weights", target_keys=("compile",))
WEIGHTS_FILE = "model.safetensors"


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise EdgekdError(f"the torch runtime needs torch installed ({e})") from e
    return torch


def availability() -> str:
    """"ok" when torch imports, else why not."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return f"not installed ({e})"
    return "ok"


def target_rules(file: Any, v: dict[str, Any]) -> dict[str, Any]:
    """fp16 only on CUDA (CPU fp16 kernels are slower than fp32)."""
    if v["device"] == "cpu" and "fp16" in v["precisions"]:
        raise EdgekdError(f"target file {file}: precision 'fp16' with the torch runtime needs device 'cuda' "
                          "(CPU fp16 kernels are slower than fp32)")
    return {}


def check_target(target: Any) -> str:
    """"ok" unless the target runs on CUDA and this torch sees no CUDA device."""
    torch = _torch()
    if target.device == "cuda" and not torch.cuda.is_available():
        return (f"target {target.name} needs CUDA, but torch {torch.__version__} reports "
                "torch.cuda.is_available() == False")
    return "ok"


def _refused() -> str:
    from edgekd.models import FAMILIES

    return (f"the torch runtime carries weights for a built-in model family ({', '.join(sorted(FAMILIES))}) only: a "
            "bundle never names code to import, and exported programs (.pt2) are refused because torch.export.load "
            "runs code from the file (pickle, sympy eval); use an onnxruntime or tensorrt target for this model")


def _check_builtin(spec: Any, who: str) -> str:
    from edgekd.models import FAMILIES

    if not isinstance(spec, str) or spec.partition(":")[0] not in FAMILIES:
        raise EdgekdError(f"{who}: model spec {spec!r:.200} is not a built-in family; {_refused()}")
    return spec


def _check_shapes(spec: str, input_shape: tuple[int, ...], num_classes: int, weights: Path, who: str) -> None:
    """The architecture `spec` builds (on the meta device: no memory) has exactly the tensors of the safetensors
    header of `weights`, so nothing bigger than the checksummed file is ever allocated."""
    from safetensors import safe_open

    from edgekd.models import build_model

    with _torch().device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(spec, input_shape, num_classes).state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise EdgekdError(f"{who}: {weights.name} is not a valid safetensors file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if saved != expected:
        diff = sorted(set(saved) ^ set(expected)) or [k for k in expected if saved[k] != expected[k]]
        raise EdgekdError(f"{who}: {weights.name} does not hold the weights of model {spec!r} for input shape "
                          f"{tuple(input_shape)} and {num_classes} classes (first difference: {diff[0]!r})")


def _build_model(spec: str, input_shape: tuple[int, ...], num_classes: int, weights: Path,
                 who: str) -> torch.nn.Module:
    from edgekd.models import build_model, load_weights

    _check_builtin(spec, who)
    _check_shapes(spec, tuple(input_shape), num_classes, weights, who)
    model = build_model(spec, tuple(input_shape), num_classes)
    load_weights(model, weights)
    return model.eval()


def build_engine(source: Any, target: Any, precision: str, out: Path) -> dict[str, Any]:
    """Copy the checkpoint into the bundle after checking it loads into `source.model_spec` and runs."""
    if source.weights_path is None or not source.model_spec:
        raise EdgekdError(f"build {source.model_name} for {target.name}: the torch runtime needs "
                          "EngineSource.weights_path (safetensors) and model_spec")
    if source.quantization != "none":
        raise EdgekdError(f"build {source.model_name} for {target.name}: the torch runtime runs float models "
                          f"only, got quantization {source.quantization!r}")
    torch = _torch()
    weights = Path(source.weights_path)
    who = f"build {source.model_name} for {target.name}"
    model = _build_model(source.model_spec, source.input_shape, source.num_classes, weights, who)
    with torch.no_grad():
        logits = model(torch.zeros((target.min_batch, *source.input_shape)))
    if tuple(logits.shape) != (target.min_batch, source.num_classes):
        raise EdgekdError(f"model {source.model_spec!r} with {weights}: output shape {tuple(logits.shape)}, "
                          f"expected ({target.min_batch}, {source.num_classes})")
    shutil.copyfile(weights, out / WEIGHTS_FILE)
    engine = {
        "file": WEIGHTS_FILE,
        "model_spec": source.model_spec,
        "num_classes": source.num_classes,
        "input_shape": list(source.input_shape),
        "dtype": "float16" if precision == "fp16" else "float32",
        "compile": bool(target.compile),
        "threads": target.threads,
    }
    notes = []
    if target.compile:
        notes.append("torch.compile is attempted at load time on the device; it falls back to eager if it "
                     "fails")
    return {"engine": engine, "versions": {"torch": torch.__version__}, "notes": notes}


def _engine_contract(bundle_dir: Path, manifest: dict[str, Any]) -> tuple[str, tuple[int, ...], int, Path]:
    """(model spec, input shape, classes, weights path) from a verified manifest, each checked: the spec is a built-in
    family, the file a listed .safetensors inside the bundle, the shapes agree with the manifest's input/output."""
    from edgekd.bundle import REMEDY
    from edgekd.fileio import confined

    engine = manifest["engine"]
    who = f"bundle {bundle_dir}"
    spec = _check_builtin(engine.get("model_spec"), who)
    name = engine["file"]
    if not name.endswith(".safetensors"):
        raise EdgekdError(f"{who}: engine.file {name!r} is not a .safetensors file; {_refused()}")
    shape, classes = engine.get("input_shape"), engine.get("num_classes")
    want = list(manifest["input"]["shape"][1:])
    if shape != want or not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
        raise EdgekdError(f"{who}: engine input_shape {shape!r} / num_classes {classes!r} do not match the manifest's "
                          f"input shape {want} and a positive class count; {REMEDY}")
    return spec, tuple(shape), classes, confined(bundle_dir, name, what=who, remedy=REMEDY)


class TorchRunner(Runner):
    """Runs a torch bundle on the target's device: run({input name: x}) -> {output name: logits}, the names the
    manifest records (a built-in model family has one input and one output)."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        try:
            torch = self.torch = _torch()
        except EdgekdError as e:
            raise EdgekdError(f"bundle {bundle_dir}: {e}") from e
        engine = manifest["engine"]
        device = manifest["device"]
        if device == "cuda" and not torch.cuda.is_available():
            raise EdgekdError(f"bundle {bundle_dir}: target {manifest.get('target')} runs on CUDA, but torch "
                              f"{torch.__version__} sees no CUDA device (CPU build of torch, or no "
                              "GPU/driver)")
        threads = threads or engine.get("threads")
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.dtype = torch.float16 if engine.get("dtype") == "float16" else torch.float32
        model = _build_model(*_engine_contract(bundle_dir, manifest), f"bundle {bundle_dir}")
        model = model.to(self.device, self.dtype)
        self.info: dict[str, Any] = {"file": engine["file"], "device": str(self.device), "compiled": False,
                                     "threads": threads, "notes": []}
        self.model = model
        self.input_names = (str(manifest["input"].get("name", "input")),)
        self.output_names = (str((manifest.get("output") or {}).get("name", "logits")),)
        if engine.get("compile"):
            try:
                compiled = torch.compile(model)
                with torch.no_grad():  # compilation happens on the first call; fail here, not mid-profile
                    compiled(torch.zeros((1, *engine["input_shape"]), device=self.device, dtype=self.dtype))
                self.model = compiled
                self.info["compiled"] = True
            except Exception as e:
                self.info["notes"].append(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
                                          "running eager")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self, feeds)
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.from_numpy(feeds[self.input_names[0]]).to(self.device, self.dtype))
        return {self.output_names[0]: out.float().cpu().numpy()}


open_runner = TorchRunner   # the registry's device side: open_runner(bundle_dir, manifest, threads)
