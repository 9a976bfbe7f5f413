"""edgekd: distill a large model into a small one, quantize it, build and profile engines for edge targets.

The public API is imported lazily, so `import edgekd` (and `import edgekd.runtime` on a device without
torch) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_recipe": "edgekd.recipe",
    "Recipe": "edgekd.recipe",
    "load_data": "edgekd.data",
    "build_model": "edgekd.models",
    "train_teacher": "edgekd.distillation",
    "distill": "edgekd.distillation",
    "EdgekdError": "edgekd.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgekd' has no attribute {name!r}")
