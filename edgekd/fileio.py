"""Atomic file writes and checksums: nothing half-written is ever left looking valid."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def is_temp(path: str | Path) -> bool:
    """A writer's temporary (or set-aside) file or folder: hidden, ending in '.tmp'. Readers skip these."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _temp_owner(name: str, stem: str) -> int | None:
    """The pid in a temp name `.{stem}.{pid}.{random}.tmp`; None when it is not one of ours for `stem`."""
    if not (name.startswith(f".{stem}.") and name.endswith(TEMP_SUFFIX)):
        return None
    m = re.fullmatch(r"(?:(\d+)\.)?[a-z0-9_]{8}", name[len(stem) + 2:-len(TEMP_SUFFIX)])
    if m is None:
        return None
    return int(m.group(1)) if m.group(1) else 0   # 0: an older edgekd's temp (no pid in the name)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it (their pid is gone); returns what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        pid = _temp_owner(entry.name, path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            _remove(entry)
            removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):   # old kernel or a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; put it in place of `path` only if the block succeeds.

    The temporary name is `.{name}.{pid}.{random}.tmp`, so a killed writer leaves nothing that looks like the
    real artifact (readers skip is_temp() names), and the next write of `path` removes what dead writers left.
    A file is renamed over the old one. A folder (a bundle) is swapped with the old one in one step
    (renameat2 RENAME_EXCHANGE) and the old one removed after, so at every instant `path` is the complete old
    or the complete new folder; where the swap is unsupported the old folder is renamed aside first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    prefix = f".{path.name}.{os.getpid()}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (as a file or a directory)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            if not _exchange(tmp, path):
                aside = Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent))
                os.replace(path, aside / "old")
                os.replace(tmp, path)
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)   # after an exchange: the old folder


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) for the block, so `finally` blocks run (temporary files removed, a
    run folder's lock released, a teacher command's process group ended) instead of the process dying on the
    spot. Only where SIGTERM still has its default action, and only in the main thread (the only one that may
    set handlers)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
