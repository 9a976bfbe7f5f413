"""Bundle manifests: checksums written, verified, and a tampered or missing file refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgekd.bundle import FORMAT, read_manifest, update_metrics, write_manifest
from edgekd.errors import EdgekdError
from edgekd.fileio import sha256_file, write_signed_json


def _bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "b"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\x08\x01engine bytes" * 10)
    (folder / "sub" / "extra.bin").write_bytes(b"abc")
    write_manifest(folder, {"model": "student", "runtime": "onnxruntime", "engine": {"file": "model.onnx"}})
    return folder


def _flip_byte(path: Path, offset: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_write_and_read(tmp_path: Path) -> None:
    folder = _bundle(tmp_path)
    manifest = read_manifest(folder)
    assert manifest["format"] == FORMAT
    assert manifest["files"] == {"model.onnx": sha256_file(folder / "model.onnx"),
                                 "sub/extra.bin": sha256_file(folder / "sub" / "extra.bin")}
    assert manifest["metrics"] == {}
    assert read_manifest(folder, verify=True) == manifest
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_tampered_file_is_named(tmp_path: Path) -> None:
    folder = _bundle(tmp_path)
    _flip_byte(folder / "model.onnx")
    with pytest.raises(EdgekdError, match=r"file model\.onnx fails its sha256 check \(tampered or truncated\); "
                                          "rebuild the bundle"):
        read_manifest(folder)
    read_manifest(folder, verify=False)  # reading without checks still works (for inspection)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    folder = _bundle(tmp_path)
    (folder / "sub" / "extra.bin").write_bytes(b"ab")
    with pytest.raises(EdgekdError, match="sub/extra.bin fails its sha256"):
        read_manifest(folder)
    (folder / "sub" / "extra.bin").unlink()
    with pytest.raises(EdgekdError, match="file sub/extra.bin is missing"):
        read_manifest(folder)


def test_missing_manifest_folder_and_bad_format(tmp_path: Path) -> None:
    with pytest.raises(EdgekdError, match="folder not found"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgekdError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")
    folder = _bundle(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = "something-else/9"
    write_signed_json(folder / "manifest.json", manifest)
    with pytest.raises(EdgekdError, match="format 'something-else/9'"):
        read_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(EdgekdError, match="not valid JSON"):
        read_manifest(folder)


def test_update_metrics(tmp_path: Path) -> None:
    folder = _bundle(tmp_path)
    update_metrics(folder, {"accuracy": 0.9})
    update_metrics(folder, {"p50_ms": 1.5})
    manifest = read_manifest(folder)
    assert manifest["metrics"] == {"accuracy": 0.9, "p50_ms": 1.5}
    assert "manifest.json" not in manifest["files"]
    _flip_byte(folder / "model.onnx")
    with pytest.raises(EdgekdError, match="model.onnx fails its sha256"):
        update_metrics(folder, {"accuracy": 1.0})


def test_real_bundle_tampered_is_refused(edge_ort_bundle: Path, tmp_path: Path) -> None:
    from edgekd import runtime

    copy = tmp_path / "bundle"
    shutil.copytree(edge_ort_bundle, copy)
    _flip_byte(copy / "model.opt.onnx", offset=40)
    for fn in (read_manifest, runtime.load):
        with pytest.raises(EdgekdError, match=r"model\.opt\.onnx fails its sha256 check"):
            fn(copy)


def test_bundle_module_imports_no_torch() -> None:
    code = "import edgekd.bundle, sys; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)
