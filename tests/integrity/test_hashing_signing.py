"""Hashing against reference implementations, and key handling."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import blake3
import pytest

from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, main
from trainguard.integrity import KeyFileError, keygen
from trainguard.integrity.hashing import MMAP_THRESHOLD, hash_file, hash_files
from trainguard.integrity.signing import load_private


@pytest.fixture
def blobs(tmp_path):
    sizes = [0, 1, 4095, (1 << 20) + 3, MMAP_THRESHOLD + 17]
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"blob{i}"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    return paths


def test_sha256_is_spelled_as_record_spells_it(blobs):
    for p in blobs:
        data = p.read_bytes()
        want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        assert hash_file(str(p), "sha256") == (want.rstrip("="), len(data))


def test_blake3_matches_the_reference_streamed_and_mapped(blobs):
    for p in blobs:
        data = p.read_bytes()
        assert hash_file(str(p), "blake3") == (blake3.blake3(data).hexdigest(), len(data))


def test_parallel_hashing_reports_every_file_and_every_error(blobs, tmp_path):
    missing = str(tmp_path / "missing")
    seen = []
    result = hash_files(
        [*map(str, blobs), missing], "blake3", workers=4, progress=lambda d, t: seen.append(d)
    )
    assert set(result.digests) == set(map(str, blobs))
    assert set(result.errors) == {missing}
    assert result.bytes_hashed == sum(p.stat().st_size for p in blobs)
    assert seen[-1] == result.bytes_hashed


def test_symlink_is_hashed_as_a_link_not_followed(tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    result = hash_files([str(tmp_path / "link")], "blake3")
    assert result.digests[str(tmp_path / "link")][0].startswith("link:")


def test_keygen_writes_a_0600_private_key_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "k"
    assert main(["keygen", "-o", str(out), "--format", "json"]) == EXIT_CLEAN
    doc = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(os.stat(doc["private_key"]).st_mode) == 0o600
    before = (out / "trainguard.key").read_bytes()
    assert main(["keygen", "-o", str(out)]) == EXIT_ERROR
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "trainguard.key").read_bytes() == before


def test_a_private_key_others_can_read_is_refused(tmp_path):
    private, _ = keygen(tmp_path / "k")
    private.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private(private)
