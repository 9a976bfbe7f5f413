"""Compression stage: PTQ baseline and quantization-aware distillation (QAT with the KD loss), per scheme.

Both start from the distilled FP32 student and use the same torchao quantizer (edgekd.quantize), so PTQ
and QAT differ only in training. QAT runs the teacher's KD loss on fake-quantized weights and
activations; for the last `freeze_fraction` of its epochs the observers and BatchNorm statistics are
frozen (as the QAT literature recommends), then it is converted to Q/DQ and exported to ONNX.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekd import calibration, fileio
from edgekd.errors import EdgekdError
from edgekd.recipe import QuantizeConfig, resolved

CALIBRATION_BATCH = 64


def calibration_batches(ctx: Any, cfg: QuantizeConfig) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The manifest's set when the recipe names one, else a seeded draw from the training split, in batches of
    CALIBRATION_BATCH as the observers see them; and what it was, for the report."""
    if cfg.calibration:
        x, manifest = calibration.load(ctx.recipe.path(cfg.calibration), ctx.data.input_shape)
        info = {"manifest": cfg.calibration, "samples": int(len(x)), "seed": manifest.get("seed"),
                "sha256": manifest["sha256"]}
    else:
        x = calibration.draw(ctx.data, cfg.calibration_size, cfg.calibration_seed)
        info = {"manifest": None, "split": "train", "samples": int(len(x)), "seed": cfg.calibration_seed}
    return [torch.from_numpy(x[i:i + CALIBRATION_BATCH]) for i in range(0, len(x), CALIBRATION_BATCH)], info


def _export(ctx: Any, gm: nn.Module, quantization: str, scheme: str, path: Path | None = None,
            **metadata: Any) -> Path:
    """The converted student as Q/DQ ONNX (at `path`, default the run's file for `quantization` and `scheme`) with
    the run's example input, task signature and export options; `metadata` adds to what it records."""
    from edgekd.export import export_onnx

    path = path or ctx.onnx_path("student", quantization, scheme)
    export_onnx(gm, ctx.example(), path, task=ctx.task, **ctx.export_options("student"),
                metadata=ctx.metadata("student", {"quantization": quantization, "quant_scheme": scheme, **metadata}))
    if scheme == "tensorrt":  # the gate: what TensorRT 10's parser and explicit quantization accept
        from edgekd.engines.trt_onnx import require_tensorrt_onnx

        try:
            require_tensorrt_onnx(path)
        except EdgekdError:
            path.unlink()  # nothing that looks like a usable TensorRT model stays behind
            raise
    return path


def _qat_mode(frozen: list[bool]):
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    from edgekd.quantize import freeze

    def set_mode(model: nn.Module, training: bool) -> None:
        if not training:
            move_exported_model_to_eval(model)
        elif frozen[0]:
            freeze(model)   # BN keeps running statistics, observers stay off
        else:
            move_exported_model_to_train(model)
    return set_mode


def _no_mode(model: nn.Module, training: bool) -> None:
    """A converted graph is scored as it is (exported PT2E graphs refuse .train()/.eval())."""


def _exported(ctx: Any, result: dict[str, Any], kind: str, model: nn.Module, scheme: str, start: float) -> None:
    """Export the converted `kind` ("ptq", "qat") model into result["onnx"][kind], then result[section][kind] for
    each score the run gives it and its ONNX file, and result[kind_seconds] since `start`."""
    path = _export(ctx, model, kind, scheme)
    result["onnx"][kind] = str(path)
    for section, value in ctx.quant_scores(model, _no_mode, path).items():
        result.setdefault(section, {})[kind] = value
    result[f"{kind}_seconds"] = round(time.perf_counter() - start, 2)


def quantize_student(ctx: Any, scheme: str, *, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """PTQ (and QAT when the recipe asks) of the run's student for one quantization scheme, for any task: the
    run context supplies what differs (calibration batches, the traced example and its dynamic shapes, QAT's
    training, the scores). Writes onnx/quantize-<scheme>.json; returns {"onnx": {"ptq": path, "qat": path},
    "calibration": ..., "pytorch_accuracy": {kind: the task's headline score in PyTorch}, ...}."""
    from edgekd import quantize

    cfg = ctx.recipe.quantize
    if cfg.mode == "none":
        return {"onnx": {}}
    cal, cal_info = ctx.calibration_batches(cfg)
    student = ctx.model("student")
    example, shapes = ctx.quant_example()
    result: dict[str, Any] = {"scheme": scheme, "calibration": cal_info, "onnx": {}, "pytorch_accuracy": {}}
    qcfg = quantize.QuantConfig(scheme=scheme, observer=cfg.observer, percentile=cfg.percentile)
    if cfg.keep_float:
        rows = quantize.sensitivity(student, example, cal, lambda m: ctx.quant_accuracy(m, _no_mode, "val"), qcfg)
        qcfg = replace(qcfg, skip=tuple(r["layer"] for r in rows[:cfg.keep_float]))
        result["sensitivity"] = rows
        result["kept_float"] = list(qcfg.skip)

    start = time.perf_counter()
    _exported(ctx, result, "ptq", quantize.ptq(ctx.model("student"), example, cal, qcfg, dynamic_shapes=shapes),
              scheme, start)

    if cfg.mode == "qat" and cfg.epochs > 0:
        start = time.perf_counter()
        prepared = quantize.prepare(student, example, qcfg, qat=True, dynamic_shapes=shapes)
        quantize.calibrate(prepared, cal)     # start the fake-quant ranges from calibration data
        frozen = [False]
        freeze_from = cfg.epochs - math.ceil(cfg.epochs * cfg.freeze_fraction)

        def on_epoch(epoch: int) -> None:
            if epoch >= freeze_from and not frozen[0]:
                frozen[0] = True
                quantize.freeze(prepared)

        result["qat_history"], trained = ctx.qat_fit(prepared, _qat_mode(frozen), on_epoch, device=device,
                                                     progress=progress)
        result.update(trained)
        prepared.to("cpu")
        result["qat_fake_quant_accuracy"] = ctx.quant_accuracy(prepared, _qat_mode(frozen), "test")
        _exported(ctx, result, "qat", quantize.convert(prepared), scheme, start)
    fileio.write_json(ctx.dir / "onnx" / f"quantize-{scheme}.json", result)
    return result


def qat_fit(ctx: Any, prepared: nn.Module, set_mode: Any, on_epoch: Any, *, device: str, progress: bool
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """QAT-KD of a classifier: `fit` with the FP32 student's objective (edgekd.objective) at the T and alpha its
    distillation used (the search's choice, from the run's metrics.json; the recipe's without a record), on
    the same transfer set (labelled + unlabelled pool) and [augment] views. Returns (history, {"qat_objective":
    what it trained with and what it received}) for quantize-<scheme>.json."""
    from edgekd.distillation import (
        fixed_teacher_views,
        read_metrics,
        role_augment,
        teacher_objective,
        transfer_set,
    )
    from edgekd.objective import config_from_recipe
    from edgekd.train import fit, predict_logits, resolve_device

    recipe, dev, d, q = ctx.recipe, resolve_device(device), resolved(ctx.recipe).distill, ctx.recipe.quantize
    teacher = ctx.model("teacher")
    student = read_metrics(ctx.dir).get("student") or {}
    recorded = isinstance(student.get("temperature"), (int, float)) and isinstance(student.get("alpha"), (int, float))
    cfg = config_from_recipe(recipe, **({"temperature": student["temperature"], "alpha": student["alpha"]}
                                        if recorded else {}))
    x, y = transfer_set(ctx.data)
    fixed = fixed_teacher_views(recipe) and not cfg.hinted
    objective = teacher_objective(recipe, cfg, teacher, predict_logits(teacher, x, dev) if fixed else None)
    augment = role_augment(recipe, "student") if objective.offline is None else None
    info = {**objective.describe(), "temperature_from": "metrics.json student" if recorded else "recipe",
            "samples": int(len(x)), "labelled": int((y >= 0).sum()), "augment": repr(augment) if augment else None}
    history = fit(prepared, x, y, recipe.student, device=dev, desc="student (QAT-KD)", objective=objective,
                  epochs=q.epochs, lr=q.lr, batch_size=d.batch_size, seed=d.seed, progress=progress,
                  set_mode=set_mode, on_epoch=on_epoch, augment=augment)
    return history, {"qat_objective": {**info, "received": dict(objective.received)}}


def layer_latency(ctx: Any, fp32_onnx: Path, int8_onnx: Path, batch: int, threads: int | None) -> list[dict]:
    """Per quantizable student layer: onnxruntime kernel milliseconds in the INT8 and the FP32 model at `batch`
    (`edgekd.engines.ort.segment_times`: a layer's kernels with its BatchNorm, activation and Q/DQ), the layer
    INT8 slows down most first. Empty when the two graphs do not split into the same layers."""
    from edgekd.engines.ort import segment_layers, segment_times
    from edgekd.quantize import quantizable_layers

    names = segment_layers(int8_onnx, quantizable_layers(ctx.model("student")))
    x = ctx.data.x_test[:batch]
    x = np.concatenate([x] * -(-batch // len(x)))[:batch]
    int8, fp32 = segment_times(int8_onnx, x, threads=threads), segment_times(fp32_onnx, x, threads=threads)
    if len(int8) != len(fp32) or len(int8) != len(names):
        return []
    rows = [{"layer": n, "int8_ms": round(a, 4), "fp32_ms": round(b, 4)}
            for n, a, b in zip(names, int8, fp32, strict=True) if n]
    return sorted(rows, key=lambda r: r["int8_ms"] - r["fp32_ms"], reverse=True)


def ptq_keep_float(ctx: Any, scheme: str, layers: tuple[str, ...], path: Path) -> Path:
    """PTQ of the student with `layers` kept in float, exported to `path` (the layers in its metadata)."""
    from edgekd import quantize

    cfg = ctx.recipe.quantize
    cal, _ = ctx.calibration_batches(cfg)
    skip = tuple(dict.fromkeys(layers))
    qcfg = quantize.QuantConfig(scheme=scheme, observer=cfg.observer, percentile=cfg.percentile, skip=skip)
    example, shapes = ctx.quant_example()
    model = quantize.ptq(ctx.model("student"), example, cal, qcfg, dynamic_shapes=shapes)
    return _export(ctx, model, "ptq", scheme, path, kept_float=list(skip))


def require_torchao() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise EdgekdError(f"[quantize] needs torchao ({e}); install it with `pip install torchao`") from None
