"""The TensorRT runner's CUDA path on a real NVIDIA GPU, without TensorRT: what can be checked before one runs.

    python benchmarks/cuda_runner_check.py [--out cuda_runner_check.json]

1. `CudaPython` (cuda-python's runtime bindings): allocate, copy host -> device -> host on its stream,
   synchronize, and the error path (an impossible allocation names the CUDA error).
2. `TrtRunner` with real device buffers from cuda-python (and from torch, the fallback binding) driving the fake
   TensorRT module of tests/fake_tensorrt.py (10.3 and 11.1 bindings) whose "engine" reads its input from and
   writes its output to the real device pointers (cudaMemcpy), running the ONNX with onnxruntime: the runner's
   shape/address/enqueue calls, buffer reuse and the logits are checked against a numpy reference.
TensorRT itself is not exercised: where it is installed, run benchmarks/gpu_check.py instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def check_cuda_python(result: dict) -> None:
    from edgekd.engines.trt import CudaPython
    from edgekd.errors import EdgekdError

    cuda = CudaPython()
    result["device"] = cuda.device_name()
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ptr = cuda.malloc(x.nbytes)
    back = np.empty_like(x)
    cuda.to_device(ptr, x)
    cuda.to_host(back, ptr)
    cuda.synchronize()
    cuda.free(ptr)
    result["round_trip_equal"] = bool(np.array_equal(back, x))
    result["stream_handle_is_int"] = isinstance(cuda.stream_handle(), int) and cuda.stream_handle() != 0
    try:
        cuda.malloc(1 << 60)
        result["huge_malloc_error"] = "no error raised"
    except EdgekdError as e:
        result["huge_malloc_error"] = str(e)


class DeviceMemory:
    """What the fake engine reads/writes: real device memory through cuda-python's cudaMemcpy."""

    def __init__(self) -> None:
        from cuda.bindings import runtime as cudart

        self.rt = cudart

    def read(self, ptr: int, nbytes: int) -> bytes:
        err, = self.rt.cudaDeviceSynchronize()  # the runner copied on its own stream
        assert int(err) == 0, err
        host = np.empty(nbytes, np.uint8)
        err, = self.rt.cudaMemcpy(host.ctypes.data, ptr, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        assert int(err) == 0, err
        return host.tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        host = np.frombuffer(data, np.uint8).copy()
        err, = self.rt.cudaMemcpy(ptr, host.ctypes.data, len(data), self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)
        assert int(err) == 0, err


def tiny_onnx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Flatten -> Gemm classifier (3x8x8 -> 10) written with onnx.helper, and its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((10, 192)).astype(np.float32), rng.standard_normal(10).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], name="fc", transB=1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    model.metadata_props.add(key="input_name", value="input")
    onnx.save(model, str(path))
    return w, b


def check_runner(version: str, binding: str, work: Path) -> dict:
    from dataclasses import replace

    from edgekd import runtime
    from edgekd.bundle import read_manifest
    from edgekd.engines import EngineSource, build
    from edgekd.engines.trt import CudaPython, TorchCuda, TrtRunner
    from edgekd.targets import load_target
    from tests import fake_tensorrt

    trt = fake_tensorrt.make(version)
    sys.modules["tensorrt"] = trt
    trt.fake.memory = DeviceMemory()
    onnx_path = work / f"tiny-{version}.onnx"
    w, b = tiny_onnx(onnx_path)
    source = EngineSource(model_name="tiny", onnx_path=onnx_path, weights_path=None, model_spec=None,
                          input_shape=(3, 8, 8), num_classes=10, class_names=(), normalization={})
    target = replace(load_target("jetson-orin-nano-trt"), precisions=("fp32", "fp16"), timing_cache=None,
                     max_batch=32)
    out = build(source, target, "fp32", work / f"bundle-{version}-{binding}")
    manifest = read_manifest(out, verify=True)
    cuda = CudaPython() if binding == "cuda-python" else TorchCuda()
    engine = runtime.Engine(out, manifest, TrtRunner(out, manifest, cuda=cuda))
    row = {"tensorrt_fake": version, "binding": engine.info["cuda_binding"]}
    for n in (1, 8, 32, 4):
        x = np.random.default_rng(n).standard_normal((n, 3, 8, 8)).astype(np.float32)
        got = engine(x)
        want = x.reshape(n, -1) @ w.T + b
        row[f"max_abs_diff_batch{n}"] = float(np.abs(got - want).max())
    row["executes"] = trt.fake.names().count("execute_async_v3")
    streams = {c[1] for c in trt.fake.calls if c[0] == "execute_async_v3"}
    row["stream_handles"] = [hex(s) for s in streams]
    row["addresses"] = sorted({hex(c[2]) for c in trt.fake.calls if c[0] == "set_tensor_address"})
    engine.runner.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("cuda_runner_check.json"))
    args = parser.parse_args()
    result: dict = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("cuda.bindings", "torch", "onnx", "onnxruntime", "cupy"):
        try:
            m = __import__(mod, fromlist=["_"])
            result[f"{mod}_version"] = getattr(m, "__version__", "?")
        except ImportError as e:
            result[f"{mod}_version"] = f"missing: {e}"
    check_cuda_python(result)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in ("10.3.0.26", "11.1.0.6"):
            for binding in ("cuda-python", "torch"):
                try:
                    rows.append(check_runner(version, binding, Path(tmp)))
                except Exception as e:  # record and go on: one script run is all the device time there is
                    rows.append({"tensorrt_fake": version, "binding": binding,
                                 "error": f"{type(e).__name__}: {e}"})
    result["runner"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    ok = result["round_trip_equal"] and all("error" not in r and r["max_abs_diff_batch8"] < 1e-3 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
