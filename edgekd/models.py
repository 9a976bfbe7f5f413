"""Built-in student/teacher families and `package.module:factory` models; safetensors checkpoints.

A model spec is a string: `"mlp:hidden=128,64"`, `"cnn:widths=32,64"` (optionally `,dropout=0.1`), or
`"package.module:factory"`, a callable `factory(input_shape, num_classes) -> nn.Module`
(`"package.module:factory,width=1.5"` calls it with `width=1.5`: how `edgekd size` scales a factory).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import EdgekdError
from edgekd.fileio import atomic_path


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 1
        for d in input_shape:
            width *= d
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN(nn.Module):
    """Conv-BN-ReLU blocks, a 2x2 max-pool after each block while the map is larger than 2x2, global pooling."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (32, 64),
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise EdgekdError(f"cnn models need (channels, height, width) inputs, got input shape {input_shape}")
        channels, height, _ = input_shape
        blocks: list[nn.Module] = []
        size = height
        for w in widths:
            blocks += [nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if size > 2:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            channels = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pool(self.features(x))))


def _ints(value: str, key: str, spec: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.replace("-", ",").split(",") if v)
    except ValueError:
        raise EdgekdError(f"model spec {spec!r}: {key} must be integers like 32,64, got {value!r}") from None


def _parse_knobs(spec: str, body: str) -> dict[str, str]:
    """'widths=32,64,dropout=0.1' -> {'widths': '32,64', 'dropout': '0.1'} (a bare number continues a list)."""
    knobs: dict[str, str] = {}
    key = None
    for part in body.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, value = part.split("=", 1)
            knobs[key.strip()] = value.strip()
        elif key is not None:
            knobs[key] += "," + part
        else:
            raise EdgekdError(f"model spec {spec!r}: expected key=value knobs, got {part!r}")
    return knobs


FAMILIES: dict[str, tuple[type[nn.Module], dict[str, str]]] = {
    # family -> (class, {knob: kind})
    "mlp": (MLP, {"hidden": "ints", "dropout": "float"}),
    "cnn": (CNN, {"widths": "ints", "dropout": "float"}),
}


def load_factory(ref: str, what: str) -> Callable[..., Any]:
    """Import `package.module:function`, with an error that names the reference when it is not there."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise EdgekdError(f"{what} {ref!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module raising at import time
        raise EdgekdError(f"{what} {ref!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EdgekdError(f"{what} {ref!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model from its spec string for inputs of `input_shape` (no batch dim) and `num_classes` outputs."""
    name, _, body = spec.partition(":")
    if name in FAMILIES:
        cls, knob_kinds = FAMILIES[name]
        kwargs: dict[str, Any] = {}
        for key, value in _parse_knobs(spec, body).items():
            if key not in knob_kinds:
                raise EdgekdError(f"model spec {spec!r}: unknown knob {key!r} (expected one of {sorted(knob_kinds)})")
            if knob_kinds[key] == "ints":
                kwargs[key] = _ints(value, key, spec)
            else:
                try:
                    kwargs[key] = float(value)
                except ValueError:
                    raise EdgekdError(f"model spec {spec!r}: {key} must be a number, got {value!r}") from None
        try:
            return cls(tuple(input_shape), num_classes, **kwargs)
        except EdgekdError as e:  # name the spec: the family alone does not say which model of the recipe
            raise EdgekdError(f"model spec {spec!r}: {e}") from None
    ref, _, width = spec.partition(",width=")   # a factory scaled by edgekd size (see scaled_spec)
    if ":" in ref and "=" not in ref.partition(":")[2]:
        factory = load_factory(ref, "model factory")
        try:
            extra = {"width": float(width)} if width else {}
        except ValueError:
            raise EdgekdError(f"model spec {spec!r}: width must be a number, got {width!r}") from None
        try:
            model = factory(tuple(input_shape), num_classes, **extra)
        except Exception as e:
            raise EdgekdError(f"model factory {spec!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise EdgekdError(f"model factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
        return model
    raise EdgekdError(f"model spec {spec!r}: unknown family {name!r} (expected one of {sorted(FAMILIES)} "
                      "or 'package.module:factory')")


SCALED_KNOBS = {"mlp": "hidden", "cnn": "widths"}   # the knob a width multiplier scales, per family


def scaled_spec(spec: str, multiplier: float, divisor: int = 8) -> str:
    """`spec` with every width times `multiplier`, each rounded to a multiple of `divisor` (at least `divisor`):
    width' = max(d, d * floor(w * m / d + 1/2)). A `package.module:factory` spec gets `,width=m` instead, and is
    built as factory(input_shape, num_classes, width=m)."""
    name, _, body = spec.partition(":")
    if name not in FAMILIES:
        return f"{spec.split(',width=')[0]},width={multiplier:.6g}"
    key = SCALED_KNOBS[name]
    knobs = _parse_knobs(spec, body)
    cls = FAMILIES[name][0]
    base = _ints(knobs[key], key, spec) if key in knobs else inspect.signature(cls).parameters[key].default
    knobs[key] = ",".join(str(max(divisor, divisor * math.floor(w * multiplier / divisor + 0.5))) for w in base)
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in knobs.items())


def family_widths(spec: str) -> tuple[int, ...] | None:
    """The widths a multiplier scales in a built-in family spec (None for a factory)."""
    name, _, body = spec.partition(":")
    if name not in FAMILIES:
        return None
    key = SCALED_KNOBS[name]
    knobs = _parse_knobs(spec, body)
    return _ints(knobs[key], key, spec) if key in knobs else tuple(
        inspect.signature(FAMILIES[name][0]).parameters[key].default)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the model's state dict as safetensors (no pickle), atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {})


def _looks_like_pickle(path: Path) -> bool:
    """A pickle (protocol 2+ starts with 0x80) or a torch.save zip archive, and not a safetensors file (a
    little-endian u64 header length, then a JSON header '{'), whose first byte can also be 0x80."""
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors = len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8 \
        and head[8:] == b"{"
    return not safetensors and (head[:1] == b"\x80" or head[:2] == b"PK")


def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load safetensors weights into `model`, strictly; returns the file's metadata.

    Refuses pickles outright and names the file and the first mismatching tensor otherwise.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"checkpoint {path}: file not found")
    if _looks_like_pickle(path):
        raise EdgekdError(f"checkpoint {path}: looks like a pickle/torch.save file; edgekd only loads safetensors "
                          "(convert it with safetensors.torch.save_file)")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as e:
        raise EdgekdError(f"checkpoint {path}: not a valid safetensors file ({e})") from e
    expected = model.state_dict()
    saved_for = f" (its metadata says model {metadata['model']!r})" if metadata.get("model") else ""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EdgekdError(f"checkpoint {path}: does not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); was it saved for another architecture?{saved_for}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise EdgekdError(f"checkpoint {path}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                              f"{tuple(expected[key].shape)}; was it saved for another architecture?{saved_for}")
    model.load_state_dict(state, strict=True)
    return metadata
