"""Run folders that cannot mix: one writer at a time, and every artifact records what it was made from.

- `locked(folder, command)`: an OS file lock (`fcntl.flock` on `folder/.edgekd.lock`) held while a command
  writes into the folder; a second writer gets an EdgekdError naming the holder's pid and command line. The
  lock is re-entrant within a process (`run` calls `distill` calls `train_teacher`), taken by rank 0 only
  under torchrun, and its file is removed on release, so a finished command leaves the folder as it found it.
- `provenance.json`: for each artifact (a file or a bundle folder, by its path relative to the run folder) its
  own hash and `made_from`, a dict of inputs to hashes: `[section]` -> the digest of that resolved recipe
  section, `file:<relative path>` -> the sha256 of another artifact of the folder, other keys -> the digest of
  an input from outside (a checkpoint, a labels manifest, a target). `stale()` compares a record with what an
  artifact should be made from now and follows `file:` inputs, so a stage can refuse (or rebuild) an input that
  was made from another recipe, another student or another ONNX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.errors import EdgekdError
from edgekd.fileio import is_temp, sha256_file, write_json
from edgekd.recipe import SECTIONS, load_recipe, resolved

LOCK = ".edgekd.lock"
PROVENANCE = "provenance.json"
FORMAT = "edgekd-provenance/1"
_held: dict[str, list[int]] = {}   # real path of a locked folder -> [fd, depth]


def _is_main_rank() -> bool:
    """torchrun starts one process per rank; only rank 0 writes files (see edgekd.distributed)."""
    return os.environ.get("RANK", "0") == "0"


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} (`{info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another edgekd process"


def _acquire(folder: Path) -> int:
    import fcntl

    path = folder / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EdgekdError(f"{folder}: cannot write into this run folder ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise EdgekdError(f"{folder}: in use by {holder}; wait for it to finish or use another folder") from None
        except OSError as e:   # a file system without flock (some network mounts): run unlocked, as before
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            break
        # the holder before us may have removed the file between our open and our lock: try again
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    info = {"pid": os.getpid(), "command": shlex.join(["edgekd", *sys.argv[1:]]),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[Path]:
    """Hold the run folder's lock for the block (creating the folder); see the module docstring.

    A folder this call created is removed again when the block fails before writing anything into it.
    """
    folder = Path(folder)
    if not _is_main_rank() or sys.platform == "win32":
        yield folder
        return
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield folder
        finally:
            _held[key][1] -= 1
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgekdError(f"{folder}: cannot create the run folder ({e.strerror or e})") from None
    _held[key] = [_acquire(folder), 1]
    try:
        yield folder
    finally:
        fd = _held.pop(key)[0]
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK)   # while still holding it (see _acquire)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()   # only when empty: a failure before anything was written


# --- Provenance --------------------------------------------------------------------------------------------


def digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (a recipe section, a target, a manifest)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sections(recipe: Any, *names: str) -> dict[str, str]:
    """`[name]` -> digest of that section of the resolved recipe (what a saved recipe.toml says)."""
    r = resolved(recipe)
    return {f"[{name}]": digest(dataclasses.asdict(getattr(r, name))) for name in names}


def artifact_hash(path: Path) -> str:
    """sha256 of a file; for a folder (a bundle), a digest over its files except the manifest (`profile`
    rewrites it with metrics; the bundle's own checks cover it) and writers' temporaries."""
    if path.is_file():
        return sha256_file(path)
    files = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
             if p.is_file() and not p.is_symlink() and not p.name.startswith("manifest")
             and not any(is_temp(part) for part in p.relative_to(path).parts)}
    return digest(files)


def file_key(folder: Path, path: Path) -> tuple[str, str]:
    """The made_from entry of an input file: `file:<relative path>` inside the run folder (followed by
    stale()), else `<name>` -> its sha256 (a checkpoint from elsewhere)."""
    inside = path.resolve().is_relative_to(folder.resolve())
    key = f"file:{path.resolve().relative_to(folder.resolve()).as_posix()}" if inside else f"external:{path.name}"
    return key, sha256_file(path)


def _read(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise EdgekdError(f"{path}: not valid JSON ({type(e).__name__}); delete it (the artifacts it described "
                          "will be rebuilt or refused)") from None
    artifacts = data.get("artifacts") if isinstance(data, dict) else None
    return artifacts if isinstance(artifacts, dict) else {}


def record(folder: str | Path, rel: str, made_from: dict[str, str]) -> None:
    """Record that `folder/rel` (just written) was made from `made_from`. Call it under locked(folder)."""
    folder = Path(folder)
    if not _is_main_rank():
        return
    artifacts = _read(folder)
    artifacts[rel] = {"sha256": artifact_hash(folder / rel), "made_from": dict(made_from)}
    write_json(folder / PROVENANCE, {"format": FORMAT, "artifacts": artifacts})


def stale(folder: str | Path, rel: str, expected: dict[str, str] | None = None, _depth: int = 0,
          _hashed: bool = False) -> list[str] | None:
    """Why `folder/rel` is not what it should be made from now: None when it has no record (an older run
    folder, or hand-placed), [] when it is current, else one phrase per difference.

    Differences: the artifact is not the one recorded (replaced since); a key of `expected` differs from the
    record; a `file:` input has changed (or is itself stale, followed a few levels down).
    """
    folder = Path(folder)
    entry = _read(folder).get(rel)
    if not isinstance(entry, dict) or not isinstance(entry.get("made_from"), dict):
        return None
    path = folder / rel
    if not _hashed and (not path.exists() or artifact_hash(path) != entry.get("sha256")):
        return [f"{rel} is not the one recorded (replaced since)"]
    made_from: dict[str, str] = entry["made_from"]
    differ = [f"{key} differs" for key, value in (expected or {}).items() if made_from.get(key) != value]
    for key, value in made_from.items():
        if not key.startswith("file:"):
            continue
        dep = key.removeprefix("file:")
        if not (folder / dep).exists() or artifact_hash(folder / dep) != value:
            differ.append(f"{dep} has changed since")
        elif _depth < 4 and (deeper := stale(folder, dep, None, _depth + 1, _hashed=True)):
            differ += deeper
    return differ


def check_resume(folder: str | Path, recipe: Any) -> None:
    """`--resume` continues only the run the folder's recipe.toml describes: refuse a changed recipe, naming the
    `[section].key` entries whose values differ (both recipes resolved) with both values."""
    path = Path(folder) / "recipe.toml"
    if not path.is_file():
        return
    a, b = resolved(load_recipe(path)), resolved(recipe)
    keys = []
    for name in SECTIONS:
        da, db = ({} if s is None else dataclasses.asdict(s) for s in (getattr(a, name), getattr(b, name)))
        keys += [f"[{name}].{key} ({da.get(key)!r} -> {db.get(key)!r})" for key in sorted(set(da) | set(db))
                 if da.get(key) != db.get(key)]
    if keys:
        raise EdgekdError(f"--resume {folder}: the recipe differs from {path} at {', '.join(keys)}; resume with "
                          "the same recipe, or start a new run in another folder")
