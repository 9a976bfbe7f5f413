"""Bundle folders: an engine, its optional eval set and a manifest.json with a sha256 per file.

A bundle is what gets copied to a device. The manifest is the single description of how to feed the engine
(input name/shape/dtype, normalization, class names) and of how it was built (target, precision, library
versions), and its checksums make a truncated `scp` or an edited engine fail loudly at load instead of
returning wrong logits. The manifest carries its own checksum too (edited preprocessing, class names or engine
entry are refused), every name it lists must stay inside the folder, and every file it names must be listed
(see edgekd.fileio: the one place that confines and bounds what manifests name). Standard library only: this
module runs on devices that have numpy and a runtime library but no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgekd import fileio
from edgekd.errors import EdgekdError

FORMAT = "edgekd-bundle/1"
MANIFEST = "manifest.json"


def edgekd_version() -> str:
    """The installed edgekd version, or 'dev' when running from a source checkout that is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgekd")
    except PackageNotFoundError:
        return "dev"


REMEDY = "rebuild the bundle (`edgekd build`), or copy the whole bundle folder again from where it was built"


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file in `bundle_dir` into manifest['files'] and write manifest.json atomically, with the
    manifest's own checksum (fileio.SIGNATURE_KEY) so an edited manifest is refused like an edited engine.

    Returns the manifest as written.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise EdgekdError(f"bundle {bundle_dir}: folder not found")
    out = {**manifest, "format": FORMAT}
    names = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                   if p.is_file() and not p.is_symlink() and p.name != MANIFEST and not p.name.startswith("."))
    out["files"] = {name: fileio.sha256_file(bundle_dir / name) for name in names}
    out.setdefault("metrics", {})
    _check_named_files(bundle_dir, out)
    return fileio.write_signed_json(bundle_dir / MANIFEST, out)


def _check_named_files(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest names (engine.file, engine.fallback_file, eval.file, any other `*file` key of those
    sections) must be a listed, checksummed entry of `files`; there is no other way to name a file."""
    for section in ("engine", "eval"):
        entry = manifest.get(section)
        if entry is None and section == "eval":
            continue
        if not isinstance(entry, dict):
            raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} has no {section!r} entry (an object); {REMEDY}")
        for key, name in entry.items():
            if (key == "file" or key.endswith("_file")) and name is not None and name not in manifest["files"]:
                raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} {section}.{key} names {name!r}, which is not a "
                                  f"listed, checksummed file of the bundle; {REMEDY}")
        if not isinstance(entry.get("file"), str):
            raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} {section}.file is {entry.get('file')!r}; expected "
                              f"a file name; {REMEDY}")


def read_manifest(bundle_dir: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read manifest.json (bounded JSON, its own checksum checked) and (by default) every listed file's sha256.

    Every listed name must be a plain relative name that stays inside the bundle, and every file the manifest names
    must be listed. A missing, tampered or out-of-folder file, or an edited manifest, raises EdgekdError naming
    it: a bundle is used whole or not at all.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise EdgekdError(f"bundle {bundle_dir}: folder not found (build it with `edgekd build`)")
    if not os.path.lexists(bundle_dir / MANIFEST):
        raise EdgekdError(f"bundle {bundle_dir}: no {MANIFEST}; not an edgekd bundle, or its build was "
                          "interrupted")
    what = f"bundle {bundle_dir}: {MANIFEST}"
    manifest = fileio.read_json(bundle_dir, MANIFEST, what=what, remedy=REMEDY)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} has format {got!r}, expected {FORMAT!r}")
    fileio.check_signed(manifest, what=what, remedy=REMEDY)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise EdgekdError(f"bundle {bundle_dir}: {MANIFEST} lists no files; {REMEDY}")
    for name in files:
        fileio.check_name(name, what=what, remedy=REMEDY)
    _check_named_files(bundle_dir, manifest)
    if verify:
        for name, digest in files.items():
            fileio.verify_confined(bundle_dir, name, digest, what=f"bundle {bundle_dir}", remedy=REMEDY)
    return manifest


def read_eval(bundle_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The arrays of the bundle's eval set (manifest 'eval'.file, which must be listed), or None when it has none.

    Loaded without pickles from bytes checked against the listed sha256 (so a file replaced after `read_manifest`
    verified it is still refused)."""
    import io

    import numpy as np

    entry = manifest.get("eval")
    if not entry:
        return None
    name, files = entry["file"], manifest.get("files") or {}
    if name not in files:
        raise EdgekdError(f"bundle {bundle_dir}: {name} is not listed in {MANIFEST}; {REMEDY}")
    data = fileio.read_confined(bundle_dir, name, what=f"bundle {bundle_dir}", remedy=REMEDY, sha256=files[name])
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        raise EdgekdError(f"bundle {bundle_dir}: {name} is not a readable .npz without pickles "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {REMEDY}") from None


def update_metrics(bundle_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Merge measured metrics into manifest['metrics'] and rewrite manifest.json atomically, re-signed.

    The manifest and the engine files are verified first: metrics must describe the files that are actually there.
    """
    manifest = read_manifest(bundle_dir, verify=True)
    manifest["metrics"] = {**(manifest.get("metrics") or {}), **metrics}
    fileio.write_signed_json(Path(bundle_dir) / MANIFEST, manifest)
