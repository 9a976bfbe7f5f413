"""Guard on the private torchao names edgekd.quantize relies on (written against torchao 0.18).

edgekd wraps torchao's QAT conv-bn passes (`qat_utils._fuse_conv_bn_qat_helper` / `_fold_conv_bn_qat_helper`, to skip
conv kinds a graph lacks), records the train/eval mode under `export_utils._EXPORTED_TRAINING_ATTR`, computes observer
qparams with `HistogramObserver._calculate_qparams`, marks nodes with `QuantizationAnnotation._annotated` under
torchao's annotation key, and imports `Q_ANNOTATION_KEY` and `getattr_from_fqn` from torchao submodules. An upgrade
that renames or removes any of them fails here, naming it. pyproject.toml bounds torchao below the next minor release:
raise the bound only once this file passes with the new release.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("torchao")
import torch  # noqa: E402
from torchao.quantization.pt2e import HistogramObserver, export_utils, qat_utils  # noqa: E402
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation  # noqa: E402

from edgekd import quantize  # noqa: E402
from edgekd.models import build_model  # noqa: E402

HELPERS = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
UPGRADE = "torchao changed a private name edgekd.quantize relies on; adapt quantize.py, then raise the torchao bound"


@pytest.mark.parametrize("name", HELPERS)
def test_qat_conv_bn_helpers_exist_with_the_signature_edgekd_wraps(name: str) -> None:
    helper = getattr(qat_utils, name, None)
    assert helper is not None, f"torchao.quantization.pt2e.qat_utils.{name} is gone: {UPGRADE}"
    params = list(inspect.signature(helper).parameters)
    assert params == ["m", "conv_fn", "example_inputs", "is_cuda"], \
        f"qat_utils.{name} now takes {params}, edgekd calls it as (m, conv_fn, example_inputs, is_cuda=...): {UPGRADE}"


def test_private_constants_and_methods_exist() -> None:
    attr = getattr(export_utils, "_EXPORTED_TRAINING_ATTR", None)
    assert isinstance(attr, str), f"export_utils._EXPORTED_TRAINING_ATTR is {attr!r}, not a name: {UPGRADE}"
    calc = getattr(HistogramObserver, "_calculate_qparams", None)
    assert calc is not None and list(inspect.signature(calc).parameters) == ["self", "min_val", "max_val"], \
        f"HistogramObserver._calculate_qparams(min_val, max_val) changed or is gone: {UPGRADE}"
    assert "_annotated" in {f.name for f in dataclasses.fields(QuantizationAnnotation)}, \
        f"QuantizationAnnotation has no _annotated field: {UPGRADE}"


def test_public_helpers_edgekd_imports_from_torchao_submodules_behave() -> None:
    """Names edgekd.quantize takes from torchao submodules (not the package's __all__): the annotation key that
    annotate_output_qspec writes under, and getattr_from_fqn resolving a dotted attribute path."""
    from torchao.quantization.pt2e.quantizer import annotate_output_qspec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
    from torchao.quantization.pt2e.utils import getattr_from_fqn

    node = torch.fx.Graph().placeholder("x")
    annotate_output_qspec(node, "spec")
    assert list(node.meta) == [Q_ANNOTATION_KEY] and node.meta[Q_ANNOTATION_KEY].output_qspec == "spec", \
        f"annotate_output_qspec no longer writes under Q_ANNOTATION_KEY: {UPGRADE}"
    outer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert getattr_from_fqn(outer, "0.bias") is outer[0].bias, f"getattr_from_fqn changed: {UPGRADE}"


def test_torchao_calls_the_patched_helpers_and_reads_the_mode_attribute(monkeypatch, one_thread) -> None:
    """Behaviour, not just names: QAT prepare and convert go through the module-level helpers edgekd patches (a
    torchao that bound them elsewhere would skip edgekd's wrapper), and torchao's own mode switch reads and writes
    the attribute edgekd sets."""
    calls = {name: 0 for name in HELPERS}
    for name in HELPERS:
        original = getattr(qat_utils, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(qat_utils, name, counted)
    torch.manual_seed(0)
    model = build_model("cnn:widths=4", (1, 8, 8), 3)
    prepared = quantize.prepare(model, torch.randn(4, 1, 8, 8), quantize.QuantConfig(), qat=True)
    attr = export_utils._EXPORTED_TRAINING_ATTR
    assert getattr(prepared, attr) is True
    prepared(torch.randn(4, 1, 8, 8))   # one training step's forward: the fake-quant observers see data
    quantize.convert(prepared)
    assert calls == {"_fuse_conv_bn_qat_helper": 1, "_fold_conv_bn_qat_helper": 1}, \
        f"torchao called the patched QAT helpers {calls} times (expected once each, conv2d only): {UPGRADE}"
    assert getattr(prepared, attr) is False   # convert moved it to eval through torchao, which wrote the attribute


def test_pyproject_bounds_torchao_to_the_checked_minor_release() -> None:
    """The installed torchao is inside pyproject's bound, and the bound stops before the next minor release."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    req = next(Requirement(d) for d in deps["dependencies"] if Requirement(d).name == "torchao")
    installed = Version(version("torchao"))
    assert installed in req.specifier, f"torchao {installed} is outside pyproject's {req}"
    assert Version(f"{installed.major}.{installed.minor + 1}.0") not in req.specifier, \
        f"pyproject's {req} admits the next torchao minor release, which this file has not checked"
