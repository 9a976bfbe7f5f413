"""Folders of checksummed files listed by a signed manifest.json: `edgekd label` shards and the teacher cache.

What both do the same way: check their settings, read the manifest (bounded JSON, its own checksum, the fields
the caller reads, every listed file a plain name inside the folder), decide whether a listed file may be kept
on resume, and stamp a new manifest and a finished one.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from edgekd import fileio
from edgekd.errors import EdgekdError

MANIFEST = "manifest.json"


def check_counts(where: str, **values: Any) -> None:
    """Each of `values` (a build's sizes: top_k, epochs, batch_size, ...) a positive integer, else one error."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise EdgekdError(f"{where}: {name} must be a positive integer, got {value!r}")


def read_manifest(folder: Path, *, kind: str, fmt: str, fields: dict[str, str], optional: tuple[str, ...],
                  entries: str, entry_fields: dict[str, str], remedy: str, missing: str = "") -> dict[str, Any]:
    """`folder`/manifest.json checked: format `fmt`, signed, `fields` present with their types (bar
    `optional`), and each item of the list `entries` with `entry_fields`, its "file" a plain name. `kind`
    names the folder in messages ("labels", "teacher cache"); `missing` says how to make one when there is none."""
    if not os.path.lexists(folder / MANIFEST):
        raise EdgekdError(f"{kind} {folder}: no {MANIFEST}{missing}")
    what = f"{kind} manifest {folder / MANIFEST}"
    manifest = fileio.read_json(folder, MANIFEST, what=what, remedy=remedy)
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise EdgekdError(f"{what}: not an edgekd {kind} manifest (expected format {fmt!r})")
    fileio.check_signed(manifest, what=what, remedy=remedy)
    fileio.check_fields(manifest, fields, what=what, remedy=remedy, optional=optional)
    for entry in manifest[entries]:
        fileio.check_fields(entry, entry_fields, what=f"{what}: entry in {entries!r}", remedy=remedy)
        fileio.check_name(entry["file"], what=what, remedy=remedy)
    return manifest


def entry_ok(folder: Path, entry: dict[str, Any], kind: str, remedy: str) -> bool:
    """A listed file is kept on resume only when it is a regular file inside the folder with the recorded sha256."""
    try:
        fileio.verify_confined(folder, entry["file"], entry["sha256"], what=f"{kind} {folder}", remedy=remedy)
    except EdgekdError:
        return False
    return True


def new(fmt: str, **fields: Any) -> dict[str, Any]:
    """A new, incomplete manifest of format `fmt`, stamped with the time and the edgekd version."""
    from edgekd.bundle import edgekd_version

    return {"format": fmt, **fields, "complete": False, "created": now(), "edgekd_version": edgekd_version()}


def finish(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Mark the manifest complete, stamp the time and write it (signed); returns what was written."""
    manifest["complete"] = True
    manifest["completed"] = now()
    return fileio.write_signed_json(folder / MANIFEST, manifest)


def now() -> str:
    """UTC time of day for `created` / `completed`, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
