"""Bundle folders: an engine, its optional eval set and a manifest.json with a sha256 per file.

A bundle is what gets copied to a device. The manifest is the single description of how to feed the engine
(input name/shape/dtype, normalization, class names) and of how it was built (target, precision, library
versions), and its checksums make a truncated `scp` or an edited engine fail loudly at load instead of
returning wrong logits. Standard library only: this module runs on devices that have numpy and a runtime
library but no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekd.errors import EdgekdError
from edgekd.fileio import sha256_file, write_json

FORMAT = "edgekd-bundle/1"
MANIFEST = "manifest.json"


def edgekd_version() -> str:
    """The installed edgekd version, or 'dev' when running from a source checkout that is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "dev"
    try:
        return version("edgekd")
    except PackageNotFoundError:
        return "dev"


def _bundle_files(bundle_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(bundle_dir).as_posix()) for p in bundle_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `bundle_dir` into manifest['files'] and write manifest.json atomically.

    Returns the manifest as written. The manifest does not checksum itself (metrics are added later).
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise EdgekdError(f"bundle {bundle_dir}: folder not found")
    out = dict(manifest)
    out["format"] = FORMAT
    out["files"] = {name: sha256_file(bundle_dir / name) for name in _bundle_files(bundle_dir)}
    out.setdefault("metrics", {})
    write_json(bundle_dir / MANIFEST, out)
    return out


def read_manifest(bundle_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read manifest.json and (by default) check every listed file against its sha256.

    A missing or tampered file raises EdgekdError naming it: a bundle is used whole or not at all.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise EdgekdError(f"bundle {bundle_dir}: folder not found (build it with `edgekd build`)")
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise EdgekdError(f"bundle {bundle_dir}: no {MANIFEST}; not an edgekd bundle, or its build was "
                          "interrupted")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} is not valid JSON ({e}); rebuild the "
                          "bundle") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} has format {got!r}, expected {FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} lists no files; rebuild the bundle")
    if verify:
        for name, digest in files.items():
            file = bundle_dir / name
            if not file.is_file():
                raise EdgekdError(f"bundle {bundle_dir}: file {name} is missing; copy the whole bundle "
                                  "folder or rebuild it")
            if sha256_file(file) != digest:
                raise EdgekdError(f"bundle {bundle_dir}: file {name} fails its sha256 check (tampered or "
                                  "truncated); rebuild the bundle")
    return manifest


def verify(bundle_dir: str | Path) -> dict[str, Any]:
    """Check a bundle's checksums; returns its manifest (same as read_manifest(verify=True))."""
    return read_manifest(bundle_dir, verify=True)


def update_metrics(bundle_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Merge measured metrics into manifest['metrics'] and rewrite manifest.json atomically.

    The engine files are verified first: metrics must describe the files that are actually there.
    """
    manifest = read_manifest(bundle_dir, verify=True)
    merged = dict(manifest.get("metrics") or {})
    merged.update(metrics)
    manifest["metrics"] = merged
    write_json(Path(bundle_dir) / MANIFEST, manifest)
