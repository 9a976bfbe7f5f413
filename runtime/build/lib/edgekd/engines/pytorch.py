"""The torch runtime: the reference engine (safetensors checkpoint + model spec, run by PyTorch).

It executes the same model code that was trained, so its logits are the baseline the exported engines are
compared against, and it is the GPU fallback where TensorRT is missing. torch.compile is tried when the
target asks for it; if compiling fails (no C++ compiler or Triton, unsupported GPU) the runner runs eager and
says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgekd.errors import EdgekdError

WEIGHTS_FILE = "model.safetensors"


def _build_model(spec: str, input_shape: tuple[int, ...], num_classes: int, weights: Path) -> torch.nn.Module:
    from edgekd.models import build_model, load_weights

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
    weights = Path(source.weights_path)
    model = _build_model(source.model_spec, source.input_shape, source.num_classes, weights)
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


class TorchRunner:
    """Runs a torch bundle on the target's device: logits = runner(x)."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], threads: int | None = None) -> None:
        engine = manifest["engine"]
        device = manifest["device"]
        if device == "cuda" and not torch.cuda.is_available():
            raise EdgekdError(f"bundle {bundle_dir}: target {manifest['target']} runs on CUDA, but torch "
                              f"{torch.__version__} sees no CUDA device (CPU build of torch, or no "
                              "GPU/driver)")
        threads = threads or engine.get("threads")
        if threads and device == "cpu":
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.dtype = torch.float16 if engine.get("dtype") == "float16" else torch.float32
        model = _build_model(engine["model_spec"], tuple(engine["input_shape"]), int(engine["num_classes"]),
                             bundle_dir / engine["file"])
        model = model.to(self.device, self.dtype)
        self.info: dict[str, Any] = {"file": engine["file"], "device": str(self.device), "compiled": False,
                                     "threads": threads, "notes": []}
        self.model = model
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

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.model(torch.from_numpy(x).to(self.device, self.dtype))
        return out.float().cpu().numpy()
