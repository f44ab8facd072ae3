"""Tests for the ZIP structure reader: real torch and numpy archives, then each ZIP trick.

Every malformed archive is built here from a real one (written by torch.save, numpy or
zipfile) by changing bytes; where a trick exists because PyTorch's reader (miniz) and
Python's zipfile disagree, the test also shows the disagreement with the real readers.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.zipcheck import (
    MAX_FINDINGS_PER_KIND,
    ZipMember,
    find_eocd,
    parse_zip,
    read_member,
    torch_archive_prefix,
)
from trainguard.errors import Finding, Severity

HIGH, MEDIUM = Severity.HIGH, Severity.MEDIUM
EOCD_SIG = b"PK\x05\x06"


# -- helpers -------------------------------------------------------------------------------


def _parse(data: bytes) -> tuple[list[ZipMember], list[Finding]]:
    analysis = Analysis("zip")
    members = parse_zip(memoryview(data), analysis)
    assert all(f.detector == "zip" for f in analysis.findings)
    return members, analysis.findings


def _has(findings: list[Finding], severity: Severity, *words: str) -> bool:
    return any(f.severity == severity and all(w in f.message for w in words) for f in findings)


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(out, "w", method) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return out.getvalue()


def _eocd(data: bytes) -> int:
    return data.rfind(EOCD_SIG)


def _central_records(data: bytes) -> list[int]:
    """Offsets of the central directory records, walked with struct (independently)."""
    eocd = _eocd(data)
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    records, pos = [], cd_offset
    while pos < cd_offset + cd_size:
        records.append(pos)
        name, extra, comment = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + name + extra + comment
    return records


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _local_offsets(data: bytes) -> list[int]:
    return [info.header_offset for info in zipfile.ZipFile(io.BytesIO(data)).infolist()]


def _to_zip64(data: bytes, extensible: bytes = b"") -> bytes:
    """Rewrite a small archive the way a ZIP64 writer lays out a big one."""
    eocd = _eocd(data)
    count, _, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    directory = bytearray()
    for pos in _central_records(data):
        csize, usize = struct.unpack_from("<II", data, pos + 20)
        nlen, xlen, clen = struct.unpack_from("<HHH", data, pos + 28)
        (header,) = struct.unpack_from("<I", data, pos + 42)
        fixed = bytearray(data[pos : pos + 46])
        struct.pack_into("<II", fixed, 20, 0xFFFFFFFF, 0xFFFFFFFF)
        struct.pack_into("<I", fixed, 42, 0xFFFFFFFF)
        zip64 = struct.pack("<HHQQQ", 1, 24, usize, csize, header)
        struct.pack_into("<H", fixed, 30, xlen + len(zip64))
        rest = data[pos + 46 : pos + 46 + nlen + xlen]
        directory += (
            fixed + rest + zip64 + data[pos + 46 + nlen + xlen : pos + 46 + nlen + xlen + clen]
        )
    record_at = cd_offset + len(directory)
    record = struct.pack(
        "<4sQHHIIQQQQ", b"PK\x06\x06", 44 + len(extensible), 45, 45, 0, 0,
        count, count, len(directory), cd_offset,
    )  # fmt: skip
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at, 1)
    end = struct.pack("<4sHHHHIIH", EOCD_SIG, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:cd_offset] + bytes(directory) + record + extensible + locator + end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model = torch.nn.Linear(4, 3)
    torch.save({"model": model.state_dict(), "step": 7, "note": "x" * 300}, path)
    return path.read_bytes()


def _same_as_zipfile(data: bytes, members: list[ZipMember]) -> None:
    infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    ours = [(m.name, m.header_offset, m.compressed_size, m.size, m.crc, m.method) for m in members]
    theirs = [
        (i.filename, i.header_offset, i.compress_size, i.file_size, i.CRC, i.compress_type)
        for i in infos
    ]
    assert ours == theirs
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for member in members:
            assert read_member(memoryview(data), member, limit=1 << 24) == archive.read(member.name)


# -- real archives -------------------------------------------------------------------------


def test_torch_checkpoint_parses_like_zipfile_and_pytorch(checkpoint: bytes) -> None:
    members, findings = _parse(checkpoint)
    assert findings == []
    _same_as_zipfile(checkpoint, members)
    assert torch_archive_prefix(members) == "model"  # torch names the folder after the file
    reader = torch._C.PyTorchFileReader(io.BytesIO(checkpoint))
    for member in members:
        record = member.name.split("/", 1)[1]
        assert reader.get_record_offset(record) == member.data_offset
    assert find_eocd(memoryview(checkpoint)) == _eocd(checkpoint)


def test_torch_save_to_buffer_uses_archive_folder() -> None:
    buffer = io.BytesIO()
    torch.save([torch.ones(2), torch.zeros(3, dtype=torch.int64)], buffer)
    members, findings = _parse(buffer.getvalue())
    assert findings == []
    assert torch_archive_prefix(members) == "archive"
    assert {m.name for m in members} >= {"archive/data.pkl", "archive/data/0", "archive/data/1"}


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_numpy_npz_parses_like_zipfile(tmp_path: Path, save: object) -> None:
    path = tmp_path / "arrays.npz"
    save(path, a=np.arange(1000), b=np.ones((3, 3)))  # type: ignore[operator]
    data = path.read_bytes()
    members, findings = _parse(data)
    assert findings == []
    assert [m.name for m in members] == ["a.npy", "b.npy"]
    assert torch_archive_prefix(members) is None
    _same_as_zipfile(data, members)


def test_zip64_end_records_and_extra_fields() -> None:
    data = _to_zip64(_zip([("arc/a", b"alpha" * 10), ("arc/b", b"beta")]))
    assert [i.filename for i in zipfile.ZipFile(io.BytesIO(data)).infolist()] == ["arc/a", "arc/b"]
    members, findings = _parse(data)
    assert findings == []
    _same_as_zipfile(data, members)


def test_zip64_end_record_misplaced_for_zipfile() -> None:
    """Extensible data in the ZIP64 end record: miniz follows the locator, zipfile does not."""
    data = _to_zip64(_zip([("arc/a", b"alpha")]), extensible=b"\0" * 8)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(data))
    members, findings = _parse(data)
    assert [m.name for m in members] == ["arc/a"]
    assert _has(findings, HIGH, "zip64 end record")


def test_bzip2_and_lzma_members_are_read_and_flagged() -> None:
    payload = b"some bytes " * 500
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        data = _zip([("arc/x", payload)], method)
        members, findings = _parse(data)
        assert read_member(memoryview(data), members[0], limit=1 << 20) == payload
        assert _has(findings, MEDIUM, f"compression method {method}", "PyTorch")


# -- the tricks ----------------------------------------------------------------------------


def test_duplicate_names() -> None:
    """Duplicate names: zipfile reads the last copy, PyTorch's reader whichever copy its
    binary search over the sorted directory lands on (here the first)."""
    data = _zip([("arc/data.pkl", b"one"), ("arc/data.pkl", b"two"), ("arc/version", b"3\n")])
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    assert bytes(reader.get_record("data.pkl")) == b"one"
    assert zipfile.ZipFile(io.BytesIO(data)).read("arc/data.pkl") == b"two"
    members, findings = _parse(data)
    assert [m.name for m in members].count("arc/data.pkl") == 2
    assert _has(findings, HIGH, "2 entries named 'arc/data.pkl'")


def test_names_differing_only_in_case() -> None:
    """miniz looks names up case-insensitively: asking for data.pkl can return DATA.PKL."""
    data = _zip([("arc/version", b"3\n"), ("arc/data.pkl", b"good"), ("arc/DATA.PKL", b"evil")])
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    assert bytes(reader.get_record("data.pkl")) == b"evil"
    _, findings = _parse(data)
    assert _has(findings, HIGH, "letter case")


def test_local_header_name_differs(checkpoint: bytes) -> None:
    """A renamed local header: PyTorch reads the data anyway, zipfile refuses the member."""
    start = checkpoint.index(b"model/byteorder")  # first occurrence: the local header
    data = checkpoint[:start] + b"model/byteordeR" + checkpoint[start + 15 :]
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(data)).read("model/byteorder")
    assert bytes(torch._C.PyTorchFileReader(io.BytesIO(data)).get_record("byteorder"))
    members, findings = _parse(data)
    assert len(members) == len(_parse(checkpoint)[0])
    assert _has(findings, HIGH, "model/byteordeR", "Python's zipfile refuses")


def test_local_header_sizes_and_crc_differ() -> None:
    data = _zip([("arc/a", b"hello"), ("arc/b", b"world")])
    local = _local_offsets(data)[1]
    _, findings = _parse(_patch(data, local + 14, "<I", 0xDEADBEEF))
    assert _has(findings, HIGH, "crc")
    _, findings = _parse(_patch(data, local + 8, "<H", 8))
    assert _has(findings, HIGH, "method 8 vs 0")


def test_prefix_bytes_polyglot() -> None:
    """A pickle in front of a ZIP: torch.load unpickles it, zipfile sees the ZIP."""
    archive = _zip([("arc/data.pkl", pickle.dumps({"a": 1}))])
    data = pickle.dumps(["hidden"]) + archive
    assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["arc/data.pkl"]
    members, findings = _parse(data)
    assert [m.name for m in members] == ["arc/data.pkl"]
    assert members[0].header_offset == len(data) - len(archive)
    assert read_member(memoryview(data), members[0], limit=1000) == pickle.dumps({"a": 1})
    assert _has(findings, HIGH, "torch.load does not treat it as a ZIP")
    assert _has(findings, HIGH, "Python's zipfile shifts every offset")


def test_prefix_before_empty_archive() -> None:
    """An empty ZIP appended to a pickle shows a scanner nothing to scan."""
    empty = _zip([])
    assert _parse(empty) == ([], [])
    _, findings = _parse(pickle.dumps("payload") + empty)
    assert _has(findings, HIGH, "unpickles it")


def test_hidden_local_header_before_listed_members() -> None:
    hidden = _zip([("arc/data.pkl", b"hidden")])
    visible = _zip([("arc/data.pkl", b"shown")])
    cd = struct.unpack_from("<I", visible, _eocd(visible) + 16)[0]
    shifted = bytearray(visible)
    for pos in _central_records(visible):
        struct.pack_into(
            "<I", shifted, pos + 42, struct.unpack_from("<I", visible, pos + 42)[0] + len(hidden)
        )
    struct.pack_into("<I", shifted, _eocd(visible) + 16, cd + len(hidden))
    data = hidden + bytes(shifted)
    members, findings = _parse(data)
    assert [m.name for m in members] == ["arc/data.pkl"]
    assert read_member(memoryview(data), members[0], limit=100) == b"shown"
    assert _has(findings, HIGH, "bytes before the first member")


def test_trailing_bytes_and_bad_comment_length() -> None:
    data = _zip([("arc/a", b"x")])
    _, findings = _parse(data + b"appended payload")
    assert _has(findings, HIGH, "16 bytes after the end of central directory")
    _, findings = _parse(_patch(data, _eocd(data) + 20, "<H", 500))
    assert _has(findings, HIGH, "comment claims 500 bytes")


def test_second_end_record_signature_near_the_end() -> None:
    data = _zip([("arc/a", b"x")]) + EOCD_SIG + b"\0" * 4
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(data))
    members, findings = _parse(data)
    assert [m.name for m in members] == ["arc/a"]
    assert _has(findings, HIGH, "second end-record signature")


def test_encrypted_and_unusual_flags() -> None:
    data = _zip([("arc/a", b"x")])
    central, local = _central_records(data)[0], _local_offsets(data)[0]
    encrypted = _patch(_patch(data, central + 8, "<H", 1), local + 6, "<H", 1)
    _, findings = _parse(encrypted)
    assert _has(findings, HIGH, "encrypted")
    odd = _patch(_patch(data, central + 8, "<H", 0x10), local + 6, "<H", 0x10)
    _, findings = _parse(odd)
    assert _has(findings, MEDIUM, "flags 0x0010")
    assert not _has(findings, HIGH, "")


def test_unsafe_member_names() -> None:
    for name in ["../escape", "/etc/passwd", "C:/x", "arc\\x", "arc/nul\x01byte"]:
        data = _zip([("arc/ok", b""), (name, b"x")]).replace(b"nul\x01", b"nul\0")
        _, findings = _parse(data)
        assert _has(findings, MEDIUM, "unsafe member name"), name
    assert not _has(_parse(_zip([("arc/ok..x", b"")]))[1], MEDIUM, "")


def test_overlapping_entries() -> None:
    """Overlapping entries, the "better zip bomb" construction (Fifield, WOOT 2019)."""
    data = _zip([("arc/a", b"A" * 100), ("arc/b", b"B" * 100)])
    second = _central_records(data)[1]
    data = _patch(data, second + 42, "<I", 0)  # the first member's local header
    members, findings = _parse(data)
    assert _has(findings, HIGH, "overlaps")


def test_local_header_missing_and_entries_outside_the_file() -> None:
    data = _zip([("arc/a", b"A" * 100), ("arc/b", b"B")])
    second = _central_records(data)[1]
    offset = _local_offsets(data)[1]
    members, findings = _parse(_patch(data, second + 42, "<I", offset + 1))
    assert [m.name for m in members] == ["arc/a"]
    assert _has(findings, HIGH, "no local file header")
    members, findings = _parse(_patch(data, second + 42, "<I", 0x7FFFFFFF))
    assert [m.name for m in members] == ["arc/a"]
    assert _has(findings, HIGH, "outside the file")


def test_multi_gigabyte_sizes_are_refused_without_allocating() -> None:
    data = _zip([("arc/a", b"A" * 100)], zipfile.ZIP_DEFLATED)
    central = _central_records(data)[0]
    started = time.perf_counter()
    members, findings = _parse(_patch(data, central + 20, "<I", 0xFFFFFFF0))
    assert members == []
    assert _has(findings, HIGH, "runs past the end of the file")
    huge = _parse(_patch(data, central + 24, "<I", 0xFFFFFFF0))[0][0]
    assert huge.size == 0xFFFFFFF0
    with pytest.raises(FormatError, match="above the"):
        read_member(memoryview(data), huge, limit=1 << 20)
    assert time.perf_counter() - started < 1


def test_deflate_bomb() -> None:
    data = _zip([("arc/bomb", b"\0" * (20 << 20))], zipfile.ZIP_DEFLATED)
    assert len(data) < 100_000
    member = _parse(data)[0][0]
    started = time.perf_counter()
    with pytest.raises(FormatError, match="above the"):
        read_member(memoryview(data), member, limit=1 << 20)
    # the header lies about the size: inflation stops one byte past the declared size
    central = _central_records(data)[0]
    liar = _parse(_patch(data, central + 24, "<I", 1000))[0][0]
    with pytest.raises(FormatError, match="zip bomb"):
        read_member(memoryview(data), liar, limit=1 << 20)
    assert time.perf_counter() - started < 1


def test_read_member_detects_altered_and_truncated_data() -> None:
    data = _zip([("arc/a", b"hello world")])
    member = _parse(data)[0][0]
    altered = bytearray(data)
    altered[member.data_offset] ^= 0xFF
    with pytest.raises(FormatError, match="crc-32"):
        read_member(memoryview(bytes(altered)), member, limit=100)
    with pytest.raises(FormatError, match="past the end"):
        read_member(memoryview(data[: member.data_offset + 3]), member, limit=100)
    packed = _zip([("arc/a", b"hello world" * 50)], zipfile.ZIP_DEFLATED)
    member = _parse(packed)[0][0]
    cut = bytearray(packed)
    cut[member.data_offset + member.compressed_size // 2 :] = b"\0" * (
        len(packed) - member.data_offset - member.compressed_size // 2
    )
    with pytest.raises(FormatError):
        read_member(memoryview(bytes(cut)), member, limit=10_000)


def test_truncated_or_inconsistent_central_directory(checkpoint: bytes) -> None:
    with pytest.raises(FormatError, match="no end of central directory"):
        _parse(checkpoint[:-10])
    with pytest.raises(FormatError, match="no end of central directory"):
        _parse(b"")
    data = _zip([("arc/a", b"x"), ("arc/bb", b"y")])
    eocd = _eocd(data)
    cd_size = struct.unpack_from("<I", data, eocd + 12)[0]
    with pytest.raises(FormatError, match="truncated central directory entry"):
        _parse(_patch(data, eocd + 12, "<I", cd_size - 10))
    with pytest.raises(FormatError, match="inconsistent"):
        _parse(_patch(data, eocd + 12, "<I", 0x7FFFFFFF))
    members, findings = _parse(_patch(data, eocd + 16, "<I", 3))
    assert members == []  # zipfile's view, but every offset is off by the same shift
    assert _has(findings, HIGH, "declared at 3", "PyTorch's reader cannot")
    assert _has(findings, HIGH, "no local file header")
    with pytest.raises(FormatError, match="no central directory"):
        _parse(_patch(data, _central_records(data)[0], "<I", 0))
    # torch writes ZIP64 end records: the classic fields are not the ones that count
    record = checkpoint.rfind(b"PK\x06\x06")
    assert record > 0
    cd_size = struct.unpack_from("<Q", checkpoint, record + 40)[0]
    with pytest.raises(FormatError, match="runs past the directory"):
        _parse(_patch(checkpoint, record + 40, "<Q", cd_size - 10))
    with pytest.raises(FormatError, match="no zip64 end record"):
        _parse(_patch(checkpoint, record, "<I", 0))


def test_entry_count_mismatch_and_limit() -> None:
    data = _zip([("arc/a", b"x"), ("arc/b", b"y")])
    members, findings = _parse(_patch(data, _eocd(data) + 8, "<HH", 1, 1))
    assert len(members) == 2
    assert _has(findings, HIGH, "declares 1 entries", "PyTorch's reader sees 1")
    data64 = _to_zip64(data)
    record = data64.rfind(b"PK\x06\x06")
    with pytest.raises(FormatError, match="above the limit"):
        _parse(_patch(data64, record + 24, "<QQ", 2_000_000, 2_000_000))


def test_many_hostile_entries_are_bounded() -> None:
    """Thousands of entries all pointing at one local header: capped findings, bounded time."""
    count = 20_000
    data = _zip([("arc/a", b"x")])
    record = data[_central_records(data)[0] : _eocd(data)]
    end = struct.pack("<4sHHHHIIH", EOCD_SIG, 0, 0, count, count, len(record) * count, 0, 0)
    cd_offset = _central_records(data)[0]
    data = data[:cd_offset] + record * count + _patch(end, 16, "<I", cd_offset)
    started = time.perf_counter()
    members, findings = _parse(data)
    assert len(members) == count
    assert len(findings) <= 3 * (MAX_FINDINGS_PER_KIND + 1)
    assert _has(findings, HIGH, "more findings of kind 'overlap'")
    assert time.perf_counter() - started < 5


# the folder's autouse marker check is function-scoped and harmless to share
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_checkpoint_only_raises_format_error(
    checkpoint: bytes, data: st.DataObject
) -> None:
    mutated = bytearray(checkpoint)
    cd_offset = struct.unpack_from("<I", checkpoint, _eocd(checkpoint) + 16)[0]
    position = st.one_of(st.integers(0, len(mutated) - 1), st.integers(cd_offset, len(mutated) - 1))
    for pos, value in data.draw(st.lists(st.tuples(position, st.integers(0, 255)), max_size=8)):
        mutated[pos] = value
    cut = data.draw(st.integers(0, len(mutated)))
    if data.draw(st.booleans()):
        mutated = mutated[:cut]
    try:
        members, _ = _parse(bytes(mutated))
    except FormatError:
        return
    for member in members:
        with contextlib.suppress(FormatError):
            read_member(memoryview(bytes(mutated)), member, limit=1 << 20)
