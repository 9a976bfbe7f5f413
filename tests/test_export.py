"""ONNX export: a valid single-file model with metadata, a dynamic batch, and parity with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekd.engines import onnx_info
from edgekd.errors import EdgekdError
from edgekd.export import export_onnx, parity


def test_checker_and_single_file(edge_onnx: Path) -> None:
    model = onnx.load(str(edge_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert sorted(p.name for p in edge_onnx.parent.iterdir()) == [edge_onnx.name], "no external data side files"
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]


def test_metadata(edge_onnx: Path) -> None:
    meta = onnx_info(edge_onnx)["metadata"]
    assert meta["input_name"] == "input"
    assert json.loads(meta["input_shape"]) == ["batch", 1, 8, 8]
    assert json.loads(meta["class_names"])[0] == "class0"
    assert json.loads(meta["normalization"]) == {"mean": [0.5], "std": [0.25]}
    assert meta["model_spec"] == "cnn:widths=4,8"
    assert meta["edgekd_version"]


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(edge_onnx: Path, edge_model: torch.nn.Module, batch: int) -> None:
    """Exported from a batch-1 example, the ONNX still runs any batch size."""
    session = ort.InferenceSession(str(edge_onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).standard_normal((batch, 1, 8, 8)).astype(np.float32)
    got = session.run(None, {"input": x})[0]
    with torch.no_grad():
        want = edge_model(torch.from_numpy(x)).numpy()
    assert got.shape == (batch, 10)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_parity(edge_onnx: Path, edge_model: torch.nn.Module, edge_eval) -> None:
    result = parity(edge_model, edge_onnx, edge_eval[0], batch_size=20)
    assert result["samples"] == len(edge_eval[0])
    assert result["max_abs_diff"] < 1e-4
    assert result["top1_agreement"] == 1.0


def test_bad_example_and_missing_file(edge_model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(EdgekdError, match="batched tensor"):
        export_onnx(edge_model, torch.zeros(8), tmp_path / "m.onnx", metadata={})
    with pytest.raises(EdgekdError, match="not found"):
        parity(edge_model, tmp_path / "missing.onnx", np.zeros((2, 1, 8, 8), np.float32))
    assert not list(tmp_path.iterdir()), "a failed export leaves nothing behind"


def test_quantized_graph_module(edge_qdq, edge_eval) -> None:
    """A torchao-converted GraphModule (which refuses .eval()) exports to a Q/DQ ONNX that matches it."""
    gm, path = edge_qdq
    assert isinstance(gm, torch.fx.GraphModule)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert onnx_info(path)["metadata"]["quant_scheme"] == "ort-cpu-avx2"
    result = parity(gm, path, edge_eval[0])
    assert result["max_abs_diff"] < 0.05
    assert result["top1_agreement"] >= 0.9
