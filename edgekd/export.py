"""ONNX export (torch dynamo exporter) and the PyTorch-vs-onnxruntime parity check.

One exporter path for float and quantized models: `torch.onnx.export(dynamo=True)` is the only one that
writes QuantizeLinear/DequantizeLinear for torchao-converted models (the legacy exporter fails on
`quantized_decomposed` ops). The ONNX carries what a deployer needs (input name/shape, class names,
normalization) in its metadata_props, so an .onnx found on its own still says how to feed it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgekd import tasks
from edgekd.bundle import edgekd_version
from edgekd.engines.trt_onnx import TRT_OPSET_RANGE
from edgekd.errors import EdgekdError
from edgekd.fileio import write_bytes

# Pinned, not the exporter's default (which moves with torch): the newest opset the ONNX parser of the oldest
# supported TensorRT reads; onnxruntime reads it too.
OPSET = TRT_OPSET_RANGE[1]


def _to_eval(model: torch.nn.Module) -> None:
    # torch.export'ed GraphModules (torchao PT2E) refuse .eval(); their train/eval state is set by torchao's
    # move_exported_model_to_eval, which the quantize stage already ran.
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()


def _no_torchvision_notice(record: logging.LogRecord) -> bool:
    """The exporter logs "torchvision is not installed. Skipping torchvision::nms" (and three more ops) on every
    export; edgekd never exports torchvision ops, so the notice is nothing the user can act on."""
    return not record.getMessage().startswith("torchvision is not installed")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, *, metadata: dict[str, str],
                dynamic_batch: bool = True, task: tasks.Task = tasks.CLASSIFICATION,
                max_length: int | None = None) -> Path:
    """Export `model` to one self-contained ONNX file at `path` (atomically) and return the path.

    `example` is a batch of inputs (N, *input_shape) of the task's input dtype; input and output are named as
    the task says. With `dynamic_batch` the task's dynamic axes are symbolic (a text task's sequence axis too, up
    to `max_length`); torch.export specializes a size-1 dimension, so a batch-1 example is repeated to 2.
    `metadata` values are stored as strings (non-strings as JSON) next to task, input_name, input_shape and
    edgekd_version. In a Q/DQ model, constant zero pads in front of convs are folded into the convs
    (`edgekd.qdq.fold_pads_into_convs`).
    """
    path = Path(path)
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise EdgekdError(f"export {path}: example must be a batched tensor (N, *input_shape), got "
                          f"{getattr(example, 'shape', type(example).__name__)}")
    example = example.detach().to("cpu", getattr(torch, task.input_dtype))
    if dynamic_batch and example.shape[0] == 1:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    _to_eval(model)
    dynamic_shapes = (dynamic_dims(task, max_length),) if dynamic_batch else None

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(_no_torchvision_notice)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not the user's
            if isinstance(model, torch.fx.GraphModule):  # its .training flag cannot be cleared (see _to_eval)
                warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
            # No file: the program's ModelProto is what ONNXProgram.save would write (weights inline, < 2 GB).
            proto = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET,
                                      dynamic_shapes=dynamic_shapes, input_names=[task.input_name],
                                      output_names=[task.output_name], verbose=False).model_proto
    except Exception as e:
        raise EdgekdError(f"export {path}: torch.onnx.export failed for input shape "
                          f"{tuple(example.shape)} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    finally:
        registration.removeFilter(_no_torchvision_notice)
    if any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
        from edgekd.qdq import fold_pads_into_convs

        fold_pads_into_convs(proto)   # ZeroPad2d between Q/DQ -> the conv's own pads (onnxruntime fuses it)

    input_shape: list[int | str] = list(example.shape)
    if dynamic_batch:
        input_shape[:len(task.dynamic_axes)] = task.dynamic_axes
    props = {
        "task": task.name,
        "input_name": task.input_name,
        "output_name": task.output_name,
        "input_shape": json.dumps(input_shape),
        "edgekd_version": edgekd_version(),
    }
    for key, value in metadata.items():
        props[str(key)] = value if isinstance(value, str) else json.dumps(value)
    onnx.helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise EdgekdError(f"export {path}: the exported ONNX fails onnx.checker ({e})") from e
    write_bytes(path, proto.SerializeToString())   # what onnx.save writes for a model without external data
    return path


def dynamic_dims(task: tasks.Task, max_length: int | None = None) -> dict[int, Any]:
    """torch.export dynamic shapes of the task's input, by position: the batch alone for a classifier; batch and
    sequence for text, the sequence bounded by max_length when given (the position table's size)."""
    axes = task.dynamic_axes
    if len(axes) == 1:
        return {0: torch.export.Dim(axes[0])}
    dims = {i: torch.export.Dim(name, min=1) for i, name in enumerate(axes)}
    if max_length:
        dims[len(axes) - 1] = torch.export.Dim(axes[-1], min=1, max=max_length)
    return dims


def parity(model: torch.nn.Module, onnx_path: str | Path, x: np.ndarray, batch_size: int = 256, *,
           task: tasks.Task = tasks.CLASSIFICATION) -> dict:
    """Compare PyTorch and onnxruntime (graph optimizations off) outputs on `x` (a batch of the task's inputs).

    Returns the task's parity figures (classification: max_abs_diff, top1_agreement; embedding: max_abs_diff,
    min_cosine) and "samples". Optimizations are off so the check measures the export, not onnxruntime's fused
    kernels (which legitimately differ by ~1e-3 on int8 graphs).
    """
    from edgekd.engines.ort import _session

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EdgekdError(f"parity: ONNX file {onnx_path} not found")
    x = np.ascontiguousarray(x, dtype=task.input_dtype)
    if x.ndim < 2 or len(x) == 0:
        raise EdgekdError(f"parity: x must be a non-empty batch (N, *input_shape), got shape {x.shape}")
    session = _session(onnx_path, "disable")
    name = session.get_inputs()[0].name
    _to_eval(model)
    refs, ours = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            try:
                ours.append(session.run(None, {name: chunk})[0])
            except Exception as e:
                expected = [d if isinstance(d, int) else "batch" for d in session.get_inputs()[0].shape]
                raise EdgekdError(f"parity: onnxruntime cannot run {onnx_path} on input shape {chunk.shape} "
                                  f"(expected {expected}): {e}") from e
            refs.append(model(torch.from_numpy(chunk)).detach().float().cpu().numpy())
    return {**task.parity(np.concatenate(refs), np.concatenate(ours)), "samples": int(len(x))}
