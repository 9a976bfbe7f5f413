"""edgekd.manifest_folder: the signed-manifest reader and resume check that labels and the teacher cache share."""

import pytest

from edgekd import fileio
from edgekd.errors import EdgekdError
from edgekd.manifest_folder import MANIFEST, entry_ok, read_manifest

SPEC = dict(kind="things", fmt="edgekd-things/1", fields={"n": "count", "files": "list"}, optional=(),
            entries="files", entry_fields={"file": "str", "sha256": "sha256"}, remedy="rebuild it")


def test_a_manifest_is_read_checked_and_its_files_verified(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    entry = {"file": "a.bin", "sha256": fileio.sha256_file(tmp_path / "a.bin")}
    fileio.write_signed_json(tmp_path / MANIFEST, {"format": "edgekd-things/1", "n": 1, "files": [entry]})
    assert read_manifest(tmp_path, **SPEC)["files"] == [entry]
    assert entry_ok(tmp_path, entry, "things", "rebuild it")
    (tmp_path / "a.bin").write_bytes(b"abd")
    assert not entry_ok(tmp_path, entry, "things", "rebuild it")   # changed: redone on resume
    fileio.write_signed_json(tmp_path / MANIFEST, {"format": "edgekd-things/1", "n": 1,
                                                   "files": [{**entry, "file": "../a.bin"}]})
    with pytest.raises(EdgekdError, match=r"things manifest .*manifest.json"):
        read_manifest(tmp_path, **SPEC)
    fileio.write_signed_json(tmp_path / MANIFEST, {"format": "other/1", "n": 1, "files": []})
    with pytest.raises(EdgekdError, match=r"not an edgekd things manifest \(expected format 'edgekd-things/1'\)"):
        read_manifest(tmp_path, **SPEC)
    fileio.write_signed_json(tmp_path / MANIFEST, {"format": "edgekd-things/1", "files": []})
    with pytest.raises(EdgekdError, match=r"things manifest .*\bn\b"):
        read_manifest(tmp_path, **SPEC)
