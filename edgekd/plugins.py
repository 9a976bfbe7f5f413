"""Parts found by folder: each backend (edgekd/engines) and each task (edgekd/tasks) is one module that defines a
module-level name (BACKEND, TASK), so adding one is adding its file. Imports nothing heavy (the device runtime
uses it)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def declared(package: str, name: str, modules: tuple[str, ...] = ()) -> list[Any]:
    """`name` of every module in `package`'s folder(s) (private `_x` modules skipped) and in `modules` that defines
    it, in module-name order. Listing reads file names only; only edgekd's own folders and the modules the caller
    names are imported."""
    folder = importlib.import_module(package).__path__
    found = sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(folder) if not m.name.startswith("_"))
    return [getattr(m, name) for m in map(importlib.import_module, (*found, *modules)) if hasattr(m, name)]
