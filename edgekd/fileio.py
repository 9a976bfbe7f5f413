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
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

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


def clean_stale_temps(path: Path) -> None:
    """Remove what killed writers of `path` left beside it (their pid is gone); its folder exists (atomic_path)."""
    for entry in path.parent.iterdir():
        pid = _temp_owner(entry.name, path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            _remove(entry)


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


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- Reading what a manifest names: confined, regular, bounded --------------------------------------------------
# Bundles, labels folders and teacher caches are data a user may have been handed: every name their manifest
# lists goes through `confined` before anything is opened, and manifest JSON through `read_json`.

MAX_JSON_BYTES = 16 * 2**20     # a manifest is kilobytes; a labels manifest of 10M samples is ~2 MB
MAX_JSON_DEPTH = 32             # edgekd's manifests nest 4 levels deep
SIGNATURE_KEY = "manifest_sha256"
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


def _fail(what: str, problem: str, remedy: str) -> NoReturn:
    from edgekd.errors import EdgekdError

    raise EdgekdError(f"{what}: {problem}; {remedy}")


def check_name(name: Any, *, what: str, remedy: str) -> str:
    """Refuse a listed name that is not a plain relative path of ordinary components ('a.npz', 'tokenizer/v.txt').

    No absolute paths, no '..' or '.', no empty, hidden or odd-character components, no backslashes: what a
    writer of this folder produces, nothing that could point elsewhere."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        _fail(what, f"lists a file name {name!r}; expected a relative file name inside the folder", remedy)
    parts = name.split("/")
    if not all(_NAME_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        _fail(what, f"lists the path {name!r}, which is not a plain relative name inside the folder (no absolute "
                    "paths, '..', hidden or unusual components)", remedy)
    return name


def confined(folder: str | Path, name: Any, *, what: str, remedy: str) -> Path:
    """`folder/name` resolved, after checking that `name` is a plain relative name and that the resolved path (symlinks
    followed) stays inside the resolved folder."""
    check_name(name, what=what, remedy=remedy)
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        _fail(what, f"{name!r} resolves to {path}, outside the folder {root} (a symlink leaving it)", remedy)
    return Path(path)


def open_confined(folder: str | Path, name: Any, *, what: str, remedy: str) -> BinaryIO:
    """Open `folder/name` for reading after `confined`; refuses anything but a regular file (a FIFO, a device, a
    folder) without blocking on it. The check is made on the opened descriptor, so a swap after it cannot matter."""
    path = confined(folder, name, what=what, remedy=remedy)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        _fail(what, f"file {name} is missing", remedy)
    except OSError as e:
        _fail(what, f"cannot open {name} ({e.strerror or e})", remedy)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        _fail(what, f"{name} is not a regular file (a device, FIFO or folder)", remedy)
    return os.fdopen(fd, "rb")


def read_confined(folder: str | Path, name: Any, *, what: str, remedy: str, sha256: str | None = None,
                  max_bytes: int | None = None) -> bytes:
    """The bytes of a listed file, checked against `sha256` (when given) on exactly the bytes returned."""
    with open_confined(folder, name, what=what, remedy=remedy) as f:
        data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        _fail(what, f"{name} is larger than {max_bytes} bytes", remedy)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        _fail(what, f"file {name} fails its sha256 check (tampered or truncated)", remedy)
    return data


def verify_confined(folder: str | Path, name: Any, sha256: Any, *, what: str, remedy: str) -> Path:
    """Check a listed file's sha256 (streamed from the opened descriptor); returns its resolved path."""
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        _fail(what, f"the sha256 listed for {name!r} is {sha256!r}, not 64 hex digits", remedy)
    with open_confined(folder, name, what=what, remedy=remedy) as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        _fail(what, f"file {name} fails its sha256 check (tampered or truncated)", remedy)
    return confined(folder, name, what=what, remedy=remedy)


def _depth(obj: Any) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_json(folder: str | Path, name: str, *, what: str, remedy: str) -> Any:
    """Parse a manifest: confined, a regular file, at most MAX_JSON_BYTES of UTF-8 JSON nested MAX_JSON_DEPTH deep."""
    data = read_confined(folder, name, what=what, remedy=remedy, max_bytes=MAX_JSON_BYTES)
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        _fail(what, f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)", remedy)
    except (UnicodeDecodeError, ValueError) as e:
        _fail(what, f"not valid JSON ({str(e).splitlines()[0]})", remedy)
    if _depth(obj) > MAX_JSON_DEPTH:
        _fail(what, f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)", remedy)
    return obj


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `manifest` without its own SIGNATURE_KEY (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_signed_json(path: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest` atomically with SIGNATURE_KEY set to its manifest_sha256; returns what was written."""
    out = {k: v for k, v in manifest.items() if k != SIGNATURE_KEY}
    out[SIGNATURE_KEY] = manifest_sha256(out)
    write_json(path, out)
    return out


def check_signed(manifest: dict[str, Any], *, what: str, remedy: str) -> None:
    """Refuse a manifest whose content does not match its SIGNATURE_KEY: edited by hand or by another program.

    A checksum, not a secret-keyed signature: it catches edits and partial copies, and whoever can rewrite the folder
    can recompute it, so what a manifest may say is still validated (it never names code, paths stay inside)."""
    stored = manifest.get(SIGNATURE_KEY)
    if stored is None:
        _fail(what, f"has no {SIGNATURE_KEY} (written by an older edgekd, or by hand)", remedy)
    if stored != manifest_sha256(manifest):
        _fail(what, f"was edited after edgekd wrote it ({SIGNATURE_KEY} does not match its content)", remedy)


_KINDS: dict[str, tuple[str, Any]] = {
    "count": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "index": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "positive": ("a finite number > 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and 0 < v < float("inf")),
    "str": ("a string", lambda v: isinstance(v, str)),
    "sha256": ("64 hex digits", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None),
    "shape": ("a list of integers >= 1", lambda v: isinstance(v, list) and all(_KINDS["count"][1](d) for d in v)),
    "list": ("a list", lambda v: isinstance(v, list)),
}


def check_fields(obj: Any, kinds: dict[str, str], *, what: str, remedy: str, optional: tuple[str, ...] = ()) -> None:
    """Refuse a manifest (or one entry of it) whose fields are missing or of the wrong kind, naming the key;
    `kinds` maps key -> one of count, index, positive, str, sha256, shape, list. Every key must be present; those in
    `optional` may be null."""
    if not isinstance(obj, dict):
        _fail(what, f"holds {type(obj).__name__} where an object was expected", remedy)
    for key, kind in kinds.items():
        expected, ok = _KINDS[kind]
        if key not in obj:
            _fail(what, f"has no {key!r}; expected {expected}", remedy)
        value = obj[key]
        if not (ok(value) or (value is None and key in optional)):
            _fail(what, f"{key} is {value!r:.80}; expected {expected}", remedy)
