"""Parts found by name: each backend (edgekd/engines) and each task (edgekd/tasks) is one module that defines a
module-level name (BACKEND, TASK), so adding one is adding its file; what such a part needs from a heavy module is
named "module:name" and imported when used. Imports nothing heavy (the device runtime uses it)."""

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


class lazy:
    """A class attribute naming "module:name", imported when read: a task's run context (torch) or report functions
    (scipy, tabulate, matplotlib) stay out of the numpy-only module that names them."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        module, _, name = self.spec.partition(":")
        return getattr(importlib.import_module(module), name)
