"""Hostile input: every case ends in a finding or a clear error, quickly, never a traceback."""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

import trainguard
from trainguard.artifacts.interface import Verdict
from trainguard.cli import main


def checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(64, dtype=torch.float32), "epoch": 2}, buf)
    return buf.getvalue()


def test_every_truncation_of_a_checkpoint_is_unverifiable_or_refused(tmp_path):
    data = checkpoint_bytes()
    path = tmp_path / "cut.pt"
    cuts = sorted({*range(0, len(data), max(1, len(data) // 97)), len(data) - 1, len(data) - 22})
    for cut in cuts:
        path.write_bytes(data[:cut])
        (file,) = trainguard.scan(path).files
        assert file.verdict is not Verdict.SAFE, f"truncated at {cut} scanned SAFE"
        with pytest.raises(trainguard.Error):
            trainguard.load(path)


def test_zip_bomb_in_the_pickle_member(tmp_path):
    path = tmp_path / "bomb.pt"
    payload = b"\x80\x02]" + b"\x00" * (1 << 31)  # inflates past the member limit
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\x00" * (1 << 24)
    body = compressor.compress(payload[:3])
    for _ in range((1 << 31) // len(chunk)):
        body += compressor.compress(chunk)
    body += compressor.flush()
    header_size = len(payload)
    with zipfile.ZipFile(path, "w") as archive:
        info = zipfile.ZipInfo("bomb/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, b"placeholder")
    # replace the member's data with the bomb by rebuilding the archive by hand
    raw = path.read_bytes()
    path.write_bytes(_restuff(raw, body, header_size))
    (file,) = trainguard.scan(path).files
    assert file.verdict is Verdict.UNVERIFIABLE
    assert any("limit" in f.message or "inflates" in f.message for f in file.findings)


def _restuff(raw: bytes, body: bytes, size: int) -> bytes:
    """Swap the single member's compressed data for ``body`` and fix the sizes."""
    name_len, extra_len = struct.unpack("<HH", raw[26:30])
    old_size = struct.unpack("<I", raw[18:22])[0]
    start = 30 + name_len + extra_len
    crc = 0
    local = bytearray(raw[:start])
    struct.pack_into("<III", local, 14, crc, len(body), size & 0xFFFFFFFF)
    rest = bytearray(raw[start + old_size :])
    cd = rest.index(b"PK\x01\x02")
    struct.pack_into("<III", rest, cd + 16, crc, len(body), size & 0xFFFFFFFF)
    eocd = rest.index(b"PK\x05\x06")
    struct.pack_into("<I", rest, eocd + 16, len(local) + len(body) + cd)
    return bytes(local) + body + bytes(rest)


def test_symlink_loop_in_a_folder_terminates(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_bytes(checkpoint_bytes())
    os.symlink(tmp_path / "m", tmp_path / "m" / "loop")
    os.symlink(tmp_path / "m" / "nowhere", tmp_path / "m" / "dangling")
    report = trainguard.scan(tmp_path / "m")
    assert [Path(f.path).name for f in report.files] == ["model.pt"]
    assert any("dangling" in e for e in report.errors)


def test_fifo_in_a_folder_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    done = threading.Event()

    def run() -> None:
        trainguard.scan(tmp_path)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(10), "scan hung on a FIFO"


def test_empty_and_unknown_files_are_skipped_known_unread_formats_unsupported(tmp_path):
    """Empty and unrecognised files are not model files (no loader reads them): skipped.
    Formats recognised but not analysed (GGUF, HDF5) stay UNSUPPORTED: exit 1."""
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"\x00\x01 not a model")
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 32)
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 32)
    report = trainguard.scan(tmp_path)
    assert {Path(f.path).name: f.verdict for f in report.files} == {
        "empty.bin": Verdict.SKIPPED,
        "notes.txt": Verdict.SKIPPED,
        "model.gguf": Verdict.UNSUPPORTED,
        "model.h5": Verdict.UNSUPPORTED,
    }
    assert main(["scan", str(tmp_path)]) == 1
    assert main(["scan", str(tmp_path / "empty.bin"), str(tmp_path / "notes.txt")]) == 0


def test_missing_path_is_an_io_error(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err
    assert "Traceback" not in err


def test_load_of_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(trainguard.InputError, match="directory"):
        trainguard.load(tmp_path)


def test_convert_of_garbage_exits_1_without_traceback(tmp_path, capsys):
    source = tmp_path / "garbage.pt"
    source.write_bytes(b"\x80\x02" + b"\xff" * 100)
    assert main(["convert", str(source), "-o", str(tmp_path / "out.safetensors")]) == 1
    assert not (tmp_path / "out.safetensors").exists()
    assert "Traceback" not in capsys.readouterr().err
