"""Embedding API for devices: load a bundle, give it images or numpy, get class names or numpy logits.

    import edgekd.runtime as rt
    engine = rt.load("bundles/student-x86-cpu-ort-int8")
    names, probs = engine.classify(["cat.jpg", "dog.png"])   # paths, bytes, PIL images, uint8 (H, W, C) arrays
    logits = engine(engine.preprocess(raw))                  # raw: (N, C, H, W) floats in the training scale

    outputs = engine.run({name: array, ...})                 # every named input/output the engine has

Only numpy, the standard library, edgekd.bundle and the backend registry (edgekd.engines.registry) are imported
here (Pillow and edgekd.preprocess when images are given); the runtime library (onnxruntime, tensorrt, torch) is
imported by the bundle's backend when it is loaded, so a device needs nothing else (`pip install
edgekd-runtime[ort]`, see runtime/pyproject.toml). The command line for devices without the edgekd CLI's
dependencies is edgekd.profile's (this module only hands `python -m edgekd.runtime ...` over to it):

    python -m edgekd.runtime profile BUNDLE [--json OUT] [--batch 1,8] [--threads N]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgekd import tasks
from edgekd.bundle import REMEDY, read_manifest
from edgekd.engines import registry
from edgekd.errors import EdgekdError

RANGE_MARGIN = 1.0   # inputs may exceed the recorded input range by this many times its width before refusal
RANGE_CHECK_VALUES = 4096   # values of each input batch the range check reads


class Engine:
    """A loaded bundle: `engine(x)` -> logits for normalized float input, `engine.classify(images)` -> class
    names and probabilities for images, with the manifest's input contract and preprocessing applied;
    `engine.run({name: array})` -> {name: array} for every named input and output of the engine."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], runner: registry.Runner) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.runner = runner
        self.task = tasks.of_manifest(manifest, f"bundle {bundle_dir}")
        self.input_shape = self.task.sample_shape(manifest["input"]["shape"])   # None: a dynamic axis
        self.max_length = manifest["input"].get("max_length")   # longest sequence a text engine takes
        batch = manifest.get("batch") or {}
        # Engines with a batch profile (TensorRT's optimization profile) only accept batches inside it.
        profiled = registry.backend(manifest["runtime"], f"bundle {bundle_dir}").batch_profile
        self.min_batch = int(batch.get("min", 1)) if profiled else 1
        self.max_batch = int(batch["max"]) if profiled and "max" in batch else None
        self.class_names = list(manifest.get("class_names") or [])
        self.info: dict[str, Any] = dict(getattr(runner, "info", {}))
        pre = manifest.get("preprocessing") or {}
        self.spec = _spec(bundle_dir, pre.get("spec"), self.input_shape)
        norm = pre.get("normalization") or {}
        self.mean = np.asarray(self.spec.mean if self.spec else norm.get("mean", [0.0]), np.float32)
        self.std = np.asarray(self.spec.std if self.spec else norm.get("std", [1.0]), np.float32)
        self.input_range = _input_range(bundle_dir, pre.get("input_range"))

    def _check(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise EdgekdError(f"bundle {self.bundle_dir}: input must be a numpy array, got "
                              f"{type(x).__name__}")
        kind = np.dtype(self.task.input_dtype).kind
        if x.dtype.kind != kind and not (kind == "i" and x.dtype.kind == "u"):
            hint = ("(normalized); give uint8 pixels or image files to engine.classify() or engine.preprocess()"
                    if kind == "f" else f"({self.task.input_name}, the tokenizer's ids)")
            raise EdgekdError(f"bundle {self.bundle_dir}: input dtype {x.dtype}, expected {self.task.input_dtype} "
                              + hint)
        dims = [str(d) if d is not None else name for d, name in
                zip(self.input_shape, self.task.dynamic_axes[1:] + ("?",) * len(self.input_shape), strict=False)]
        if x.ndim != len(self.input_shape) + 1 or any(d is not None and d != got for d, got in
                                                      zip(self.input_shape, x.shape[1:], strict=True)):
            raise EdgekdError(f"bundle {self.bundle_dir}: input shape {tuple(x.shape)} does not match the "
                              f"engine's (N, {', '.join(dims)})")
        if self.max_length is not None and x.ndim > 1 and not 1 <= x.shape[1] <= self.max_length:
            raise EdgekdError(f"bundle {self.bundle_dir}: input of {x.shape[1]} tokens per row; this engine takes "
                              f"1..{self.max_length} (truncate to max_length when tokenizing)")
        self._check_batch(x.shape[0])
        x = np.ascontiguousarray(x, dtype=self.task.input_dtype)
        self._check_range(x)
        return x

    def _check_batch(self, n: int) -> None:
        if n < 1 or n < self.min_batch or (self.max_batch is not None and n > self.max_batch):
            hi = self.max_batch if self.max_batch is not None else "any"
            raise EdgekdError(f"bundle {self.bundle_dir}: batch of {n} is outside the engine's batch range "
                              f"{self.min_batch}..{hi}")

    def _check_range(self, x: np.ndarray) -> None:
        """Refuse input in the wrong scale: normalized input lies in the manifest's input_range ((0 - mean) / std
        to (255 * scale - mean) / std for images); 0-255 pixels or unnormalized data land far outside it. Reads
        at most RANGE_CHECK_VALUES evenly spaced values, so the check costs the same at any input size."""
        if self.input_range is None or not x.size:
            return
        lo, hi = self.input_range
        margin = RANGE_MARGIN * max(hi - lo, 1.0)
        flat = x.reshape(-1)
        flat = flat[::max(1, flat.size // RANGE_CHECK_VALUES)]
        x_lo, x_hi = float(np.min(flat)), float(np.max(flat))
        if not (np.isfinite(x_lo) and np.isfinite(x_hi)) or x_lo < lo - margin or x_hi > hi + margin:
            raise EdgekdError(f"bundle {self.bundle_dir}: input values span [{x_lo:.4g}, {x_hi:.4g}], but this "
                              f"engine's normalized input lies in [{lo:.4g}, {hi:.4g}]; raw pixels (0-255) or "
                              "unnormalized data? Give images or uint8 pixels to engine.classify(), raw arrays to "
                              "engine.preprocess()")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for a normalized batch x of shape (N, *input_shape)."""
        return np.asarray(self.runner(self._check(x)), dtype=np.float32)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output of the engine by name, for numpy inputs by name (`runner.input_names`), each a batch
        inside the engine's batch range; the runner checks the names."""
        if isinstance(feeds, dict):
            for name, value in feeds.items():
                if not isinstance(value, np.ndarray) or value.ndim < 1:
                    raise EdgekdError(f"bundle {self.bundle_dir}: input {name!r} must be a numpy array with a "
                                      f"batch axis, got {type(value).__name__}")
                self._check_batch(value.shape[0])
        return self.runner.run(feeds)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a normalized batch of any size: split at the engine's maximum batch, the last part padded
        (with copies of its last sample) to its minimum."""
        if self.max_batch is None and len(x) >= self.min_batch:
            return self(x)
        step = self.max_batch or len(x)
        parts = [self(_pad(x[i:i + step], self.min_batch))[:len(x[i:i + step])] for i in range(0, len(x), step)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)), np.float32)

    def preprocess(self, raw: Any) -> np.ndarray:
        """What an application has -> the engine's normalized float32 (N, *input_shape) batch.

        - images: a path, encoded bytes, a PIL image, a uint8 (H, W[, C]) RGB/grey array, or a list of them,
          or a uint8 (N, H, W[, C]) batch: the bundle's preprocessing spec (colour mode, resize, crop,
          scale, mean/std; edgekd.preprocess.apply, the function the training eval transform calls). Needs a
          bundle built from images (manifest preprocessing.spec).
        - float arrays in the training scale (pixels * scale, e.g. [0, 1]), (N, *input_shape) or one sample:
          (raw - mean) / std per channel; uint8 arrays of that shape in bundles without a spec are scaled by
          1/255 first (as an .npz data source is).
        The result is checked against the engine's input range, so 0-255 floats are refused, not misread.
        """
        self._classifier_only("preprocess")
        if self.spec is not None and _is_images(raw):
            x = self._images(raw)
        elif isinstance(raw, np.ndarray) and raw.dtype.kind in "fiu" and raw.dtype != np.bool_:
            x = self._raw(raw)
        else:
            raise EdgekdError(f"bundle {self.bundle_dir}: cannot preprocess {type(raw).__name__}: "
                              + ("expected image paths, bytes, PIL images, uint8 (H, W[, C]) arrays or float "
                                 "arrays" if self.spec is not None else
                                 "this bundle records no image preprocessing (built from an array data source, "
                                 "or by an older edgekd), so it takes numeric arrays of shape (N, "
                                 f"{', '.join(map(str, self.input_shape))})"))
        self._check_range(x)
        return x

    def _images(self, raw: Any) -> np.ndarray:
        from edgekd.preprocess import apply

        items = list(raw) if isinstance(raw, (list, tuple)) or (isinstance(raw, np.ndarray) and raw.ndim == 4) \
            else [raw]
        if not items:
            raise EdgekdError(f"bundle {self.bundle_dir}: no images given")
        out = np.empty((len(items), *self.input_shape), np.float32)
        for i, item in enumerate(items):
            x = apply(self.spec, item)
            if x.shape != self.input_shape:
                name = item if isinstance(item, (str, Path)) else f"#{i} ({type(item).__name__})"
                raise EdgekdError(f"image {name}: preprocessed to shape {x.shape}, but the engine takes "
                                  f"{self.input_shape}; this bundle's spec has no resize/crop to that size, so "
                                  "give images of the training size")
            out[i] = x
        return out

    def _raw(self, raw: np.ndarray) -> np.ndarray:
        x = raw.astype(np.float32)
        if raw.dtype == np.uint8:
            x *= np.float32(self.spec.scale if self.spec is not None else 1.0 / 255.0)
        if x.shape == self.input_shape:
            x = x[None]
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise EdgekdError(f"bundle {self.bundle_dir}: raw input shape {tuple(np.shape(raw))} does not "
                              f"match (N, {', '.join(map(str, self.input_shape))}) or a single sample "
                              f"{self.input_shape}")
        shape = [1, -1] + [1] * (x.ndim - 2)
        return ((x - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def classify(self, images: Any, batch_size: int = 64) -> tuple[list[str], np.ndarray]:
        """Top-1 class names and softmax probabilities (N, num_classes) for images (anything preprocess()
        takes), decoded and run `batch_size` at a time (or the engine's maximum batch), so a long list of files
        never sits in memory at once. Names are class indices as strings when the bundle has no class names."""
        if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim >= 4):
            if not len(images):
                raise EdgekdError(f"bundle {self.bundle_dir}: no images given")
            step = min(batch_size, self.max_batch or batch_size)
            logits = np.concatenate([self.logits(self.preprocess(images[i:i + step]))
                                     for i in range(0, len(images), step)])
        else:
            logits = self.logits(self.preprocess(images))
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        top = probs.argmax(axis=1)
        return [self.class_names[i] if self.class_names else str(i) for i in top], probs

    def _classifier_only(self, what: str) -> None:
        if self.task is not tasks.CLASSIFICATION:
            raise EdgekdError(f"bundle {self.bundle_dir}: engine.{what}() is for classifiers; this bundle's task is "
                              f"{self.task.name}: call engine(x) with {self.task.input_name} ({self.task.input_dtype})")

    def predict(self, x: np.ndarray) -> list[str] | np.ndarray:
        """Top-1 class names (or indices when the bundle has no class names) for a normalized batch."""
        self._classifier_only("predict")
        top = self(x).argmax(axis=1)
        return [self.class_names[i] for i in top] if self.class_names else top


def _check_contract(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """The manifest fields the Engine relies on have the types it expects (a checksummed manifest can still have been
    written by someone else): input shape (batch, positive ints...), class names, normalization, batch range."""
    def bad(key: str, value: Any, expected: str) -> EdgekdError:
        return EdgekdError(f"bundle {bundle_dir}: manifest.json {key} is {value!r:.200}; expected {expected}; "
                           + REMEDY)

    def ints(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and np.isfinite(x) for x in v)

    task = tasks.of_manifest(manifest, f"bundle {bundle_dir}")
    shape = (manifest.get("input") or {}).get("shape") if isinstance(manifest.get("input"), dict) else None
    if not isinstance(shape, list) or len(shape) < 2 or not all(ints(d) or d in task.dynamic_axes[1:]
                                                                for d in shape[1:]):
        raise bad("input.shape", shape, "[batch, positive ints" + "".join(f" or {a!r}" for a in task.dynamic_axes[1:])
                  + "...]")
    if not all(manifest["input"].get(k) is None or ints(manifest["input"][k]) for k in ("max_length",)):
        raise bad("input.max_length", manifest["input"]["max_length"], "a positive int")
    names = manifest.get("class_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("class_names", names, "a list of strings")
    pre = manifest.get("preprocessing") or {}
    norm = (pre.get("normalization") or {}) if isinstance(pre, dict) else None
    if not isinstance(norm, dict) or any(not numbers(norm[k]) for k in ("mean", "std") if k in norm) \
            or any(x == 0 for x in norm.get("std", [1.0])):
        raise bad("preprocessing.normalization", norm, "{'mean': [numbers], 'std': [non-zero numbers]}")
    batch = manifest.get("batch") or {}
    if not isinstance(batch, dict) or any(batch.get(k) is not None and not ints(batch[k]) for k in ("min", "max")) \
            or not isinstance(batch.get("sizes") or [], list) or not all(ints(b) for b in batch.get("sizes") or []):
        raise bad("batch", batch, "{'sizes': [positive ints], 'min': positive int, 'max': positive int, ...}")
    if not isinstance(manifest.get("device"), str):
        raise bad("device", manifest.get("device"), "a device name")


def _is_images(raw: Any) -> bool:
    """Images, not a float/uint8 tensor in the model's layout: paths, bytes, PIL images, lists of them, and
    uint8 arrays whose last axis is a colour axis (H, W, C) / (N, H, W, C) or plain (H, W)."""
    if isinstance(raw, np.ndarray):
        return raw.dtype == np.uint8 and (raw.ndim == 2 or (raw.ndim in (3, 4) and raw.shape[-1] in (1, 3, 4)))
    return True


def _pad(x: np.ndarray, min_batch: int) -> np.ndarray:
    """Repeat the last sample so a short final chunk still meets an engine's minimum batch."""
    return np.pad(x, [(0, max(min_batch - len(x), 0))] + [(0, 0)] * (x.ndim - 1), mode="edge")


def _input_range(bundle_dir: Path, value: Any) -> tuple[float, float] | None:
    """The manifest's preprocessing.input_range [lo, hi] (None in bundles written before it was recorded)."""
    if value is None:
        return None
    ok = (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
          and all(np.isfinite(value)) and value[0] <= value[1])
    if not ok:
        raise EdgekdError(f"bundle {bundle_dir}: manifest.json preprocessing.input_range is {value!r}; expected "
                          "[lo, hi], two finite numbers with lo <= hi")
    return float(value[0]), float(value[1])


def _spec(bundle_dir: Path, d: Any, input_shape: tuple[int, ...]) -> Any:
    """The manifest's preprocessing spec, checked against the engine's input shape; None when it has none."""
    if d is None:
        return None
    from edgekd.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(d, where=f"bundle {bundle_dir}: manifest.json preprocessing.spec")
    size = spec.crop or (spec.resize if isinstance(spec.resize, tuple) else None)
    if len(input_shape) != 3 or spec.channels != input_shape[0] or (size and tuple(size) != input_shape[1:]):
        raise EdgekdError(f"bundle {bundle_dir}: manifest.json preprocessing.spec ({spec.mode}, resize "
                          f"{spec.resize}, crop {spec.crop}) does not produce the engine's input {input_shape}")
    return spec


def load(bundle_dir: str | Path, *, threads: int | None = None) -> Engine:
    """Verify a bundle (its manifest's checksum, every listed file's sha256, names confined to the folder) and open
    its engine with the bundle's backend. The manifest never names code: each backend opens only its own format."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=True)
    runtime = manifest.get("runtime")
    backend = registry.backend(runtime, f"bundle {bundle_dir}: manifest.json")
    _check_contract(bundle_dir, manifest)
    try:
        runner = backend.open_runner(bundle_dir, manifest, threads)
    except EdgekdError:
        raise
    except Exception as e:  # the runtime library refused what the manifest describes
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise EdgekdError(f"bundle {bundle_dir}: {runtime} cannot open engine {manifest['engine'].get('file')!r} "
                          f"({type(e).__name__}: {first}); rebuild the bundle with `edgekd build`") from e
    return Engine(bundle_dir, manifest, runner)


if __name__ == "__main__":   # `python -m edgekd.runtime ...`: the device command line is edgekd.profile.main
    from edgekd.profile import main

    sys.exit(main())
