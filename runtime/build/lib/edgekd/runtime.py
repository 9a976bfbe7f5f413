"""Embedding API for devices: load a bundle, feed numpy, get numpy logits.

    import edgekd.runtime as rt
    engine = rt.load("bundles/student-x86-cpu-ort-int8")
    logits = engine(engine.preprocess(raw_images))      # raw: (N, C, H, W) float in the training scale

Only numpy, the standard library and edgekd.bundle are imported here; the runtime library (onnxruntime,
tensorrt, torch) is imported when a bundle that needs it is loaded, so a device needs nothing else.
Command line for devices without the edgekd CLI's dependencies:

    python -m edgekd.runtime profile BUNDLE [--json OUT] [--batch 1,8] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.bundle import read_manifest
from edgekd.errors import EdgekdError


def _open_ort(bundle_dir: Path, manifest: dict, threads: int | None) -> Any:
    from edgekd.engines.ort import OrtRunner

    return OrtRunner(bundle_dir, manifest, threads)


def _open_trt(bundle_dir: Path, manifest: dict, threads: int | None) -> Any:
    from edgekd.engines.trt import TrtRunner

    return TrtRunner(bundle_dir, manifest, threads)


def _open_torch(bundle_dir: Path, manifest: dict, threads: int | None) -> Any:
    try:
        from edgekd.engines.pytorch import TorchRunner
    except ImportError as e:
        raise EdgekdError(f"bundle {bundle_dir}: the torch runtime needs torch installed ({e})") from e
    return TorchRunner(bundle_dir, manifest, threads)


OPENERS = {"onnxruntime": _open_ort, "tensorrt": _open_trt, "torch": _open_torch}


class Engine:
    """A loaded bundle: `engine(x)` -> logits, with the manifest's input contract enforced."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], runner: Any) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.runner = runner
        self.input_shape = tuple(int(d) for d in manifest["input"]["shape"][1:])
        batch = manifest.get("batch") or {}
        self.dynamic_batch = bool(batch.get("dynamic", True))
        # TensorRT engines only accept batches inside their optimization profile.
        self.min_batch = int(batch.get("min", 1)) if manifest["runtime"] == "tensorrt" else 1
        self.max_batch = int(batch["max"]) if manifest["runtime"] == "tensorrt" and "max" in batch else None
        self.class_names = list(manifest.get("class_names") or [])
        self.info: dict[str, Any] = dict(getattr(runner, "info", {}))

    def _check(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise EdgekdError(f"bundle {self.bundle_dir}: input must be a numpy array, got "
                              f"{type(x).__name__}")
        if not np.issubdtype(x.dtype, np.floating):
            raise EdgekdError(f"bundle {self.bundle_dir}: input dtype {x.dtype}, expected float32")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise EdgekdError(f"bundle {self.bundle_dir}: input shape {tuple(x.shape)} does not match the "
                              f"engine's (N, {', '.join(map(str, self.input_shape))})")
        n = x.shape[0]
        if n < 1 or n < self.min_batch or (self.max_batch is not None and n > self.max_batch):
            hi = self.max_batch if self.max_batch is not None else "any"
            raise EdgekdError(f"bundle {self.bundle_dir}: batch of {n} is outside the engine's batch range "
                              f"{self.min_batch}..{hi}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for a normalized batch x of shape (N, *input_shape)."""
        return np.asarray(self.runner(self._check(x)), dtype=np.float32)

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        """Apply the manifest's per-channel normalization ((raw - mean) / std on axis 1); adds a batch axis to
        a single sample."""
        x = np.asarray(raw, dtype=np.float32)
        if x.shape == self.input_shape:
            x = x[None]
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise EdgekdError(f"bundle {self.bundle_dir}: raw input shape {tuple(np.shape(raw))} does not "
                              f"match (N, {', '.join(map(str, self.input_shape))}) or a single sample "
                              f"{self.input_shape}")
        norm = (self.manifest.get("preprocessing") or {}).get("normalization") or {}
        if not norm:
            return x
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = np.asarray(norm.get("mean", [0.0]), np.float32).reshape(shape)
        std = np.asarray(norm.get("std", [1.0]), np.float32).reshape(shape)
        return ((x - mean) / std).astype(np.float32)

    def predict(self, x: np.ndarray) -> list[str] | np.ndarray:
        """Top-1 class names (or indices when the bundle has no class names) for a normalized batch."""
        top = self(x).argmax(axis=1)
        return [self.class_names[i] for i in top] if self.class_names else top


def load(bundle_dir: str | Path, *, threads: int | None = None) -> Engine:
    """Verify a bundle's checksums and open its engine with the bundle's runtime."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, verify=True)
    runtime = manifest.get("runtime")
    if runtime not in OPENERS:
        raise EdgekdError(f"bundle {bundle_dir}: unknown runtime {runtime!r} in manifest.json (expected one "
                          f"of {', '.join(OPENERS)})")
    return Engine(bundle_dir, manifest, OPENERS[runtime](bundle_dir, manifest, threads))


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch must be comma-separated integers like 1,8, got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch must be positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """`python -m edgekd.runtime profile BUNDLE ...`: profile a bundle on the device, print a table."""
    parser = argparse.ArgumentParser(prog="python -m edgekd.runtime", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="latency/throughput/memory/accuracy of a bundle on this machine")
    prof.add_argument("bundle", type=Path)
    prof.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    prof.add_argument("--batch", type=_batches, default=None, help="batch sizes, e.g. 1,8 (default: the "
                                                                   "bundle's)")
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--warmup", type=int, default=10)
    prof.add_argument("--min-runs", type=int, default=30)
    prof.add_argument("--min-seconds", type=float, default=1.0)
    prof.add_argument("--save-metrics", action="store_true", help="write the results into the bundle's "
                                                                  "manifest")
    args = parser.parse_args(argv)

    from edgekd import profile

    try:
        result = profile.profile_bundle(args.bundle, batch_sizes=args.batch, warmup=args.warmup,
                                        min_runs=args.min_runs, min_seconds=args.min_seconds,
                                        threads=args.threads)
        if args.json is not None:
            from edgekd.fileio import write_json

            write_json(args.json, result)
        if args.save_metrics:
            from edgekd.bundle import update_metrics

            update_metrics(args.bundle, result)
    except EdgekdError as e:
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    print(profile.format_table(result))
    if args.json is not None:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
