"""Tests for .npy header parsing: real files from numpy.save, then malformed headers."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npformat

from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.npy import (
    MAX_HEADER_SIZE,
    NpyHeader,
    is_npy,
    npy_data_size,
    parse_npy_header,
)
from trainguard.artifacts.zipcheck import parse_zip, read_member


def _saved(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    out = io.BytesIO()
    if version is None:
        np.save(out, array, allow_pickle=True)
    else:
        npformat.write_array(out, array, version=version, allow_pickle=True)
    return out.getvalue()


def _parse(data: bytes) -> NpyHeader:
    return parse_npy_header(memoryview(data))


def _with_header(text: str, version: tuple[int, int] = (1, 0), body: bytes = b"") -> bytes:
    raw = text.encode("latin1" if version < (3, 0) else "utf8")
    length = struct.pack("<H" if version == (1, 0) else "<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + length + raw + body


STRUCTURED = np.dtype([("id", "<i4"), ("pos", "<f8", (3,)), ("inner", [("a", "u1"), ("b", ">i2")])])


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.arange(7, dtype=np.int16),
        np.zeros((2, 3), dtype=np.float32, order="F"),
        np.zeros(4, dtype=STRUCTURED),
        np.array(5.0),
        np.zeros((0, 3)),
        np.array(["ab", "cde"]),
        np.arange(6, dtype=">u4"),
    ],
    ids=["float", "int", "fortran", "structured", "scalar", "empty", "unicode", "big-endian"],
)
def test_numeric_arrays(array: np.ndarray) -> None:
    data = _saved(array)
    header = _parse(data)
    assert is_npy(data[:8])
    assert header.version == (1, 0)
    assert header.shape == array.shape
    assert header.fortran_order == (array.flags.f_contiguous and not array.flags.c_contiguous)
    assert not header.has_object
    assert header.itemsize == array.dtype.itemsize
    assert npy_data_size(header) == len(data) - header.data_offset == array.nbytes
    assert npformat.descr_to_dtype(header.descr) == array.dtype


def test_object_array_data_is_a_pickle() -> None:
    data = _saved(np.array([{"a": 1}, None, "x"], dtype=object))
    header = _parse(data)
    assert header.has_object
    assert npy_data_size(header) is None
    assert data[header.data_offset] == 0x80  # pickle protocol opcode
    structured = _parse(_saved(np.zeros(2, dtype=[("x", "f4"), ("o", "O")])))
    assert structured.has_object


@pytest.mark.parametrize("version", [(2, 0), (3, 0)])
def test_versions_2_and_3(version: tuple[int, int]) -> None:
    array = np.zeros(3, dtype=[("naïve", "<f4")]) if version == (3, 0) else np.arange(3)
    data = _saved(array, version)
    header = _parse(data)
    assert header.version == version
    assert npy_data_size(header) == len(data) - header.data_offset


def test_big_structured_header_numpy_writes_as_version_2() -> None:
    dtype = np.dtype([(f"field_{i}", "<f4") for i in range(4000)])
    with pytest.warns(UserWarning, match="format 2.0"):
        data = _saved(np.zeros(1, dtype=dtype))
    header = _parse(data)
    assert header.version == (2, 0)
    assert header.itemsize == 16000


def test_python2_long_integers() -> None:
    """Headers written by Python 2 say ``(3L,)``; numpy still reads them, so do we."""
    text = "{'descr': '<i8', 'fortran_order': False, 'shape': (3L, 2L), }\n"
    data = _with_header(text, body=b"\0" * 48)
    with pytest.warns(UserWarning, match="Python 2"):
        assert np.load(io.BytesIO(data)).shape == (3, 2)
    assert _parse(data).shape == (3, 2)
    with pytest.raises(FormatError):
        _parse(_with_header(text, (3, 0)))


def test_arrays_inside_npz_members(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    np.savez(path, a=np.arange(10), b=np.ones((2, 2), dtype=np.float32))
    buf = memoryview(path.read_bytes())
    for member in parse_zip(buf, Analysis("zip")):
        header = parse_npy_header(buf, member.data_offset, member=member.name)
        assert npy_data_size(header) == member.data_offset + member.size - header.data_offset
        assert _parse(read_member(buf, member, limit=1 << 20)).shape == header.shape


def test_is_npy() -> None:
    assert is_npy(b"\x93NUMPY\x01\x00")
    assert not is_npy(b"PK\x03\x04")
    assert not is_npy(b"\x93NUMP")


GOOD = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x93NUMPZ\x01\x00\x10\x00" + b" " * 16, "magic"),
        (b"\x93NUMPY\x01\x00", "magic"),
        (_with_header(GOOD)[:-1], "past the end"),
        (_with_header(GOOD, (4, 0)), "unknown format version 4.0"),
        (_with_header("[1, 2]"), "not a dict"),
        (_with_header("{'descr': '<f8', 'fortran_order': False}"), "not a dict"),
        (_with_header(GOOD[:-2] + "'extra': 1}"), "not a dict"),
        (_with_header(GOOD.replace("(2,)", "[2]")), "shape"),
        (_with_header(GOOD.replace("(2,)", "(-2,)")), "shape"),
        (_with_header(GOOD.replace("(2,)", "(True,)")), "shape"),
        (_with_header(GOOD.replace("(2,)", "(2.0,)")), "shape"),
        (_with_header(GOOD.replace("(2,)", "(" + "1," * 65 + ")")), "shape"),
        (_with_header(GOOD.replace("(2,)", "(2**62, 2**62)")), "not a python literal"),
        (_with_header(GOOD.replace("(2,)", "(2305843009213693952, 8)")), "larger than"),
        (_with_header(GOOD.replace("False", "0")), "fortran_order"),
        (_with_header(GOOD.replace("'<f8'", "'<q9'")), "descr"),
        (_with_header(GOOD.replace("'<f8'", "{'names': ['a']}")), "descr"),
        (_with_header(GOOD.replace("'<f8'", f"[('a', '<f8', ({2**40}, {2**40}))]")), "descr"),
        (_with_header(GOOD.replace("'<f8'", "[" * 40 + "]" * 40)), "nested"),
        (_with_header("(" * 30_000 + ")" * 30_000), "nested"),
        (_with_header("9" * 5000), "not a python literal"),
        (_with_header(GOOD, (2, 0))[:10], "truncated header length"),
    ],
)
def test_malformed_headers(data: bytes, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(FormatError, match=message):
        parse_npy_header(memoryview(data), member="x.npy")
    assert time.perf_counter() - started < 1


def test_invalid_utf8_in_version_3() -> None:
    data = _with_header(GOOD, (3, 0))
    data = data.replace(b"<f8", b"\xff\xfe8")
    with pytest.raises(FormatError, match="not valid utf8"):
        _parse(data)


def test_oversized_header_is_refused_before_reading() -> None:
    data = b"\x93NUMPY\x02\x00" + struct.pack("<I", MAX_HEADER_SIZE + 1) + b"{"
    with pytest.raises(FormatError, match="above the"):
        _parse(data)


def test_error_carries_member_and_offset() -> None:
    data = b"junk" + _with_header("[1]")
    with pytest.raises(FormatError) as caught:
        parse_npy_header(memoryview(data), 4, member="arr.npy")
    assert (caught.value.member, caught.value.offset) == ("arr.npy", 4)


def test_header_code_is_never_run(tmp_path: Path) -> None:
    """A header is a literal, never code: an expression that would create a marker fails."""
    marker = tmp_path / "PAYLOAD-RAN"
    call = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    text = f"{{'descr': {call} or '<f8', 'fortran_order': False, 'shape': (1,), }}"
    with pytest.raises(FormatError):
        _parse(_with_header(text, body=b"\0" * 8))
    assert not marker.exists()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_mutated_headers_only_raise_format_error(data: st.DataObject) -> None:
    original = bytearray(_saved(np.zeros(3, dtype=STRUCTURED)))
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, 127))
        original[position] = data.draw(st.integers(0, 255))
    try:
        header = _parse(bytes(original))
    except FormatError:
        return
    size = npy_data_size(header)
    assert size is None or size >= 0
