"""Built-in student/teacher families and `package.module:factory` models; safetensors checkpoints.

A model spec is a string: `"mlp:hidden=128,64"`, `"cnn:widths=32,64"` (optionally `,dropout=0.1`), or
`"package.module:factory"`, a callable `factory(input_shape, num_classes) -> nn.Module`
(`"package.module:factory,width=1.5"` calls it with `width=1.5`: how `edgekd size` scales a factory).

`module:function` specs (models, and data sources) are imported from the folders of the recipes loaded in this
process, then the current directory, then the usual `sys.path`: a `mymodels.py` beside the recipe is found
without setting PYTHONPATH.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edgekd.errors import EdgekdError
from edgekd.fileio import atomic_path


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
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


_RECIPE_DIRS: list[str] = []


def add_import_dir(folder: str | Path) -> None:
    """Put a recipe's folder on the import path of `module:function` specs (first added, first searched)."""
    folder = str(Path(folder).resolve())
    if folder not in _RECIPE_DIRS:
        _RECIPE_DIRS.append(folder)


def import_dirs() -> list[str]:
    """Where `module:function` specs are looked for before sys.path: the recipes' folders, then the cwd."""
    return list(dict.fromkeys([*_RECIPE_DIRS, os.getcwd()]))


def load_factory(ref: str, what: str) -> Callable[..., Any]:
    """Import `package.module:function` from import_dirs() + sys.path; the error names the reference and where
    it looked."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise EdgekdError(f"{what} {ref!r}: expected 'package.module:function'")
    extra = [d for d in import_dirs() if d not in sys.path]
    sys.path[:0] = extra
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing_itself = e.name is not None and (module_name == e.name or module_name.startswith(e.name + "."))
        if not missing_itself:   # the module was found but imports something that is not installed
            raise EdgekdError(f"{what} {ref!r}: importing module {module_name!r} failed ({type(e).__name__}: {e})"
                              ) from e
        raise EdgekdError(f"{what} {ref!r}: cannot import module {module_name!r}: not in the recipe's folder, the "
                          f"current directory or sys.path (looked in {', '.join(import_dirs())} first); put "
                          f"{module_name.replace('.', '/')}.py beside the recipe or set PYTHONPATH") from e
    except Exception as e:  # the module raising at import time
        raise EdgekdError(f"{what} {ref!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    finally:
        for d in extra:
            sys.path.remove(d)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EdgekdError(f"{what} {ref!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _family_kwargs(spec: str) -> tuple[type[nn.Module], dict[str, Any]] | None:
    """(class, keyword arguments) of a built-in family spec, each knob parsed and range-checked; None for a
    `package.module:factory` spec."""
    name, _, body = spec.partition(":")
    if name not in FAMILIES:
        if ":" in spec and "=" not in body.partition(",width=")[0]:   # a factory, maybe scaled by edgekd size
            return None
        raise EdgekdError(f"model spec {spec!r}: unknown family {name!r} (expected one of {sorted(FAMILIES)} "
                          "or 'package.module:factory')")
    cls, knob_kinds = FAMILIES[name]
    kwargs: dict[str, Any] = {}
    for key, value in _parse_knobs(spec, body).items():
        if key not in knob_kinds:
            raise EdgekdError(f"model spec {spec!r}: unknown knob {key!r} (expected one of {sorted(knob_kinds)})")
        if knob_kinds[key] == "ints":
            kwargs[key] = _ints(value, key, spec)
            if not kwargs[key] or min(kwargs[key]) < 1:
                raise EdgekdError(f"model spec {spec!r}: {key} must be positive integers like 32,64, got {value!r}")
        else:
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise EdgekdError(f"model spec {spec!r}: {key} must be a number, got {value!r}") from None
            if not 0.0 <= kwargs[key] < 1.0:
                raise EdgekdError(f"model spec {spec!r}: {key} must be in [0, 1), got {value}")
    return cls, kwargs


def check_spec(spec: str, where: str = "model spec") -> None:
    """Check a spec before any data is loaded: a built-in family's knobs parse and are in range; a factory's
    module imports and names a callable. Building it needs the data's input shape (build_model)."""
    if not isinstance(spec, str) or not spec.strip():
        raise EdgekdError(f"{where}: expected a model spec like 'cnn:widths=32,64', got {spec!r}")
    if _family_kwargs(spec) is None:
        load_factory(spec.partition(",width=")[0], "model factory")


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a model from its spec string for inputs of `input_shape` (no batch dim) and `num_classes` outputs.

    Anything torch raises while allocating it (a model too big for memory, sizes it rejects) is an EdgekdError
    naming the spec.
    """
    family = _family_kwargs(spec)
    if family is not None:
        cls, kwargs = family
        try:
            return cls(tuple(input_shape), num_classes, **kwargs)
        except EdgekdError as e:  # name the spec: the family alone does not say which model of the recipe
            raise EdgekdError(f"model spec {spec!r}: {e}") from None
        except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
            raise EdgekdError(f"model spec {spec!r}: cannot build it for inputs {tuple(input_shape)} and "
                              f"{num_classes} classes ({type(e).__name__}: "
                              f"{(str(e).strip() or 'no message').splitlines()[0][:300]})") from None
    ref, _, width = spec.partition(",width=")   # a factory scaled by edgekd size (see scaled_spec)
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


SCALED_KNOBS = {"mlp": "hidden", "cnn": "widths"}   # the knob a width multiplier scales, per family


def scaled_spec(spec: str, multiplier: float, divisor: int = 8) -> str:
    """`spec` with every width times `multiplier`, each rounded to a multiple of `divisor` (at least `divisor`):
    width' = max(d, d * floor(w * m / d + 1/2)). A `package.module:factory` spec gets `,width=m` instead, and is
    built as factory(input_shape, num_classes, width=m)."""
    name, _, body = spec.partition(":")
    if name not in FAMILIES:
        return f"{spec.split(',width=')[0]},width={multiplier:.6g}"
    knobs = _parse_knobs(spec, body)
    knobs[SCALED_KNOBS[name]] = ",".join(str(max(divisor, divisor * math.floor(w * multiplier / divisor + 0.5)))
                                         for w in family_widths(spec))
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
    path = Path(path)
    if not path.is_file():
        raise EdgekdError(f"checkpoint {path}: file not found")
    if _looks_like_pickle(path):
        raise EdgekdError(f"checkpoint {path}: looks like a pickle/torch.save file; edgekd only loads safetensors "
                          "(convert it with safetensors.torch.save_file)")
    try:
        with safe_open(str(path), framework="pt") as f:   # what safetensors.torch.load_file does, plus metadata
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}
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
