"""Task contracts, one module per task in this folder, each defining `TASK` (an edgekd.tasks.base.Task).

    task = tasks.get("embedding")
    task.signature((64,), 384)   # {"input": {"name": "input_ids", "shape": ["batch", "seq"], ...}, "output": ...}

Adding a task (detection, regression) is one more module here: the registry, bundle manifests, the runtime, the
profiler and the report find it by its file. numpy only: the device runtime reads it.
"""

from __future__ import annotations

from typing import Any

from edgekd.errors import EdgekdError
from edgekd.plugins import declared
from edgekd.tasks.base import EVAL_BATCH, Task
from edgekd.tasks.classification import per_class_accuracy
from edgekd.tasks.sentence_embedding import embed, embedding_metrics, pad_batch, unpad

__all__ = ["CLASSIFICATION", "EMBEDDING", "EVAL_BATCH", "TASKS", "Task", "embed", "embedding_metrics", "get",
           "of_manifest", "of_recipe", "pad_batch", "per_class_accuracy", "unpad"]

TASKS: dict[str, Task] = {t.name: t for t in declared(__name__, "TASK")}
CLASSIFICATION = TASKS["classification"]
EMBEDDING = TASKS["embedding"]


def get(name: Any, where: str = "task") -> Task:
    """The task named `name`; a bundle or ONNX file naming another is refused (it was made by another edgekd)."""
    if name not in TASKS:
        raise EdgekdError(f"{where}: unknown task {name!r} (this edgekd knows {', '.join(TASKS)}); use an edgekd "
                          "that made it, or rebuild it with this one")
    return TASKS[name]


def of_manifest(manifest: dict[str, Any], where: str) -> Task:
    """A bundle manifest's task; bundles written before tasks were recorded are classifiers."""
    return get(manifest.get("task", CLASSIFICATION.name), f"{where}: manifest.json task")


def of_recipe(recipe: Any) -> Task:
    """A recipe's task: the one whose recipe_section the recipe sets, else classification."""
    return next((t for t in TASKS.values() if t.recipe_section and getattr(recipe, t.recipe_section, None) is not None),
                CLASSIFICATION)
