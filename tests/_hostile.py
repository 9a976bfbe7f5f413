"""Shared checks for the hostile-input tests (tests/test_untrusted_*.py): bundles, manifests, labels, caches and
checkpoints are data a user may have been handed, and every refusal must be clean and touch nothing outside.

A case is refused cleanly when: the CLI exits 2 with exactly one stderr line `error: ...` and no traceback (the
API raises EdgekdError with a one-line message); no path outside the folders named was opened (Python's `open`
audit events, in-process or through a sitecustomize hook in the subprocess); no payload marker file appeared; and
the folders that existed before are unchanged by sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgekd.errors import EdgekdError
from edgekd.fileio import write_signed_json

TIMEOUT = 120
# Logs every path Python opens (the `open` audit event: open(), os.open(), io.open_code()) to $EDGEKD_OPEN_LOG.
SITECUSTOMIZE = '''
import os, sys
_log = os.environ.get("EDGEKD_OPEN_LOG")
if _log:
    _f = open(_log, "a")
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            _f.write(os.fsdecode(args[0]) + "\\n")
            _f.flush()
    sys.addaudithook(_hook)
'''

_opened: list[str] | None = None


def _hook(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_hook)   # cannot be removed; records only inside `watch_opens`


@contextmanager
def watch_opens() -> Iterator[list[str]]:
    """Collect the paths this process opens inside the block."""
    global _opened
    _opened = seen = []
    try:
        yield seen
    finally:
        _opened = None


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every regular file under `roots` (symlinks and FIFOs by their kind, never opened)."""
    out: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_fifo():
                out[str(p)] = "fifo"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def outside_opened(opened: list[str], forbidden: list[Path]) -> list[str]:
    """The opened paths that are (or resolve to) one of `forbidden` or lie under a forbidden folder."""
    bad = [os.path.realpath(f) for f in forbidden]
    hits = []
    for p in opened:
        real = os.path.realpath(p)
        if any(real == b or real.startswith(b + os.sep) for b in bad) or p.startswith("/proc/self/mem") \
                or p.startswith("/dev/"):
            hits.append(p)
    return hits


def resign(folder: Path, manifest: dict[str, Any]) -> None:
    """Rewrite folder/manifest.json with a valid checksum: what someone who edits a bundle on purpose can do."""
    write_signed_json(folder / "manifest.json", manifest)


def edit_json(path: Path, change: Any) -> dict[str, Any]:
    manifest = json.loads(path.read_text())
    change(manifest)
    return manifest


def check_api_refusal(fn: Any, fragments: tuple[str, ...], *, forbidden: list[Path], watch: list[Path],
                      marker: Path | None = None) -> str:
    """Call fn(); it must raise EdgekdError with a one-line message holding every fragment, open nothing forbidden,
    leave `watch` unchanged and never create `marker`. Returns the message."""
    before = snapshot(*watch)
    with watch_opens() as opened, pytest.raises(EdgekdError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not outside_opened(opened, forbidden), f"opened {outside_opened(opened, forbidden)}"
    assert snapshot(*watch) == before, "a refused load changed a folder that existed before it"
    assert marker is None or not marker.exists(), "a payload ran"
    return message


def cli(args: list[str], *, cwd: Path, module: str = "edgekd", env_extra: dict[str, str] | None = None
        ) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python -m MODULE ARGS` with every opened path logged; returns (result, opened paths)."""
    hook_dir = cwd / "_hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = cwd / f"_opened-{os.getpid()}-{len(list(cwd.glob('_opened-*')))}.log"
    env = {**os.environ, **(env_extra or {}), "EDGEKD_OPEN_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), (env_extra or {}).get("PYTHONPATH"),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("EDGEKD_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=TIMEOUT)
    opened = log.read_text().splitlines() if log.is_file() else []
    return r, opened


def check_cli_refusal(args: list[str], fragments: tuple[str, ...], *, cwd: Path, forbidden: list[Path],
                      watch: list[Path], module: str = "edgekd", marker: Path | None = None,
                      env_extra: dict[str, str] | None = None) -> str:
    """Run the CLI; exit 2, one `error:` line with every fragment, no traceback, nothing forbidden opened, `watch`
    unchanged, no `marker`. Returns the message."""
    before = snapshot(*watch)
    r, opened = cli(args, cwd=cwd, module=module, env_extra=env_extra)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not outside_opened(opened, forbidden), f"opened {outside_opened(opened, forbidden)}"
    assert snapshot(*watch) == before, "a refused command changed a folder that existed before it"
    assert marker is None or not marker.exists(), "a payload ran"
    return lines[0]
