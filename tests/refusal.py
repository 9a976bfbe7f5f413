"""Helpers for hostile-input tests: run the real `edgekd` entry point in a subprocess and check that a refusal
is clean (exit 2, exactly one `error:` line naming what is at fault, no traceback) and that nothing was written
where it should not be (sha256 snapshots of folders taken before and after)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT = 300


def cli_env(tmpdir: Path | None = None) -> dict[str, str]:
    """The environment of a CLI run: no EDGEKD_DEBUG (the traceback is what the tests prove absent), the
    repository's targets, and TMPDIR pointed at `tmpdir` so leftover temporary files can be seen."""
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKD_DEBUG", "EDGEKD_TARGETS")}
    env["OMP_NUM_THREADS"] = "1"
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    return env


def edgekd(*args: object, cwd: Path, module: str = "edgekd", prefix: tuple[str, ...] = (),
           tmpdir: Path | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m edgekd ARGS` (or another module), optionally under a wrapper command `prefix`."""
    return subprocess.run([*prefix, sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=cli_env(tmpdir), timeout=timeout)


def assert_refused(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one `error:` line holding every fragment, no traceback; returns the message."""
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0].removeprefix("error: ")


def snapshot(*roots: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under the roots (symlinks and special files as their kind)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            key = f"{root.name}/{p.relative_to(root)}"
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                out[key] = "special"
            elif p.is_file():
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[key] = "dir"
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
