"""Atomic file writes and checksums: nothing half-written is ever left looking valid."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name starts with '.' and ends in '.tmp' so a killed writer leaves nothing that looks
    like the real artifact. Works for files and for directories (a bundle folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (as a file or a directory)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def verify_sha256(path: Path, expected: str, *, what: str, named_by: Path, remedy: str) -> None:
    """Refuse a file a manifest names when it is missing or its sha256 differs (changed, truncated, tampered)."""
    from edgekd.errors import EdgekdError

    if not path.is_file():
        raise EdgekdError(f"{what} {path}: file not found (named by {named_by}); {remedy}")
    if sha256_file(path) != expected:
        raise EdgekdError(f"{what} {path}: sha256 does not match {named_by}; the file changed or is corrupt ({remedy})")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
