"""Tests for safetensors validation: every file the library writes passes, every corruption fails.

Where a corruption is one the library itself refuses, the test shows that too, so the
checker is never stricter by accident; the few rules it adds on purpose are tested as such.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_numpy
from safetensors.torch import load, save, save_file

from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.safetensors_check import (
    DTYPE_BITS,
    MAX_HEADER_SIZE,
    TensorInfo,
    check_safetensors,
    is_safetensors,
)


def _check(data: bytes) -> dict[str, TensorInfo]:
    return check_safetensors(memoryview(data), Analysis("safetensors"))


def _split(data: bytes) -> tuple[str, bytes]:
    length = int.from_bytes(data[:8], "little")
    return data[8 : 8 + length].decode(), data[8 + length :]


def _build(header: str | dict[str, object], body: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _library_refuses(data: bytes) -> bool:
    try:
        load(data)
    except (safetensors.SafetensorError, KeyError, ValueError):
        return True
    return False


@pytest.fixture
def two_tensors() -> tuple[dict[str, object], bytes]:
    """A header with tensors ``a`` (4 x F32, bytes 0-16) and ``b`` (2 x I64, 16-32), and data."""
    header: dict[str, object] = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "I64", "shape": [2], "data_offsets": [16, 32]},
    }
    body = np.ones(4, dtype="<f4").tobytes() + np.array([1, 2], dtype="<i8").tobytes()
    assert load(_build(header, body))["b"].tolist() == [1, 2]
    return header, body


# -- what the library writes passes --------------------------------------------------------


def test_files_written_by_the_library_pass(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5, dtype=torch.float16),
        "bf16": torch.randn(2, 2, dtype=torch.bfloat16),
        "f64": torch.randn(1, dtype=torch.float64),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.arange(7, dtype=torch.uint8),
        "i16": torch.tensor([1], dtype=torch.int16),
        "i32": torch.tensor([1, 2, 3], dtype=torch.int32),
        "i64": torch.tensor([[1], [2]]),
        "bool": torch.tensor([True, False, True]),
        "f8e4m3": torch.zeros(3, dtype=torch.float8_e4m3fn),
        "f8e5m2": torch.zeros(2, dtype=torch.float8_e5m2),
        "c64": torch.zeros(2, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 5),
        "also_empty": torch.zeros(0),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "ünïcode"})
    data = path.read_bytes()
    infos = _check(data)
    assert set(infos) == set(tensors)
    header = json.loads(_split(data)[0])
    for name, tensor in tensors.items():
        info = infos[name]
        assert info.shape == tuple(tensor.shape)
        assert [info.begin, info.end] == header[name]["data_offsets"]
        assert info.dtype == header[name]["dtype"]
    assert is_safetensors(data[:64], len(data))


def test_empty_file_and_numpy_writer_pass() -> None:
    assert _check(save({})) == {}
    data = save_numpy({"x": np.arange(6, dtype=np.uint16).reshape(2, 3)})
    assert _check(data) == {"x": TensorInfo("U16", (2, 3), 0, 12)}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.tuples(
            st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=6,
    )
)
def test_any_file_the_library_writes_passes(spec: dict[str, tuple[torch.dtype, list[int]]]) -> None:
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    infos = _check(save(tensors))
    assert {name: info.shape for name, info in infos.items()} == {
        name: tuple(t.shape) for name, t in tensors.items()
    }


def test_sub_byte_dtypes() -> None:
    assert _check(_build({"t": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"ab"))
    six = {"t": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}
    assert _check(_build(six, b"abc"))["t"].dtype == "F6_E2M3"
    odd = _build({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"ab")
    assert _library_refuses(odd)
    with pytest.raises(FormatError, match="not whole bytes"):
        _check(odd)


def _library_dtypes() -> set[str]:
    """The dtype names the installed safetensors knows, from its own error message."""
    raw = b'{"t": {"dtype": "NO_SUCH_DTYPE", "shape": [0], "data_offsets": [0, 0]}}'
    with pytest.raises(safetensors.SafetensorError) as caught:
        load(struct.pack("<Q", len(raw)) + raw)
    return set(re.findall(r"`(\w+)`", str(caught.value).split("expected one of", 1)[1]))


def test_dtypes_and_sizes_match_the_installed_library(tmp_path: Path) -> None:
    """A newer safetensors with new dtypes fails here: add them to DTYPE_BITS."""
    assert set(DTYPE_BITS) == _library_dtypes()
    path = tmp_path / "one.safetensors"
    for dtype, bits in DTYPE_BITS.items():
        size = bits  # 8 elements of `bits` bits
        for body, valid in ((b"\0" * size, True), (b"\0" * (size + 1), False)):
            header = {"t": {"dtype": dtype, "shape": [8], "data_offsets": [0, len(body)]}}
            path.write_bytes(_build(header, body))
            try:
                with safetensors.safe_open(path, framework="numpy") as opened:
                    assert list(opened.keys()) == ["t"]
            except safetensors.SafetensorError:
                assert not valid, dtype
            else:
                assert valid, dtype
            if valid:
                assert _check(path.read_bytes())["t"].end == size
            else:
                with pytest.raises(FormatError):
                    _check(path.read_bytes())


# -- corruptions ---------------------------------------------------------------------------


def test_header_length_past_the_end(two_tensors: tuple[dict[str, object], bytes]) -> None:
    header, body = two_tensors
    data = _build(header, body)
    cut = data[:20]
    assert _library_refuses(cut)
    with pytest.raises(FormatError, match="runs past the end"):
        _check(cut)
    with pytest.raises(FormatError, match="shorter than"):
        _check(b"\x01\x02")


def test_huge_header_length_is_refused_without_reading() -> None:
    data = struct.pack("<Q", 2**62) + b"{}"
    started = time.perf_counter()
    with pytest.raises(FormatError, match="above the"):
        _check(data)
    with pytest.raises(FormatError, match="above the"):
        _check(struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}")
    assert time.perf_counter() - started < 0.5
    assert not is_safetensors(data, len(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"b": [8, 24]}, "overlaps"),  # b starts inside a
        ({"b": [24, 40]}, "unaccounted bytes"),  # gap between a and b
        ({"a": [0, 12], "b": [12, 28]}, "needs 16 bytes"),  # a's size no longer matches
    ],
)
def test_offsets_that_overlap_leave_gaps_or_mismatch(
    two_tensors: tuple[dict[str, object], bytes], change: dict[str, list[int]], message: str
) -> None:
    header, body = two_tensors
    for name, offsets in change.items():
        header[name]["data_offsets"] = offsets  # type: ignore[index]
    data = _build(header, body + b"\0" * 8)
    assert _library_refuses(data)
    with pytest.raises(FormatError, match=message):
        _check(data)


def test_trailing_bytes(two_tensors: tuple[dict[str, object], bytes]) -> None:
    header, body = two_tensors
    data = _build(header, body + b"hidden")
    assert _library_refuses(data)
    with pytest.raises(FormatError, match="6 trailing bytes"):
        _check(data)
    with pytest.raises(FormatError, match="1 bytes missing"):
        _check(_build(header, body[:-1]))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "F128", "unknown dtype"),
        ("dtype", 7, "unknown dtype"),
        ("shape", [2, 3], "needs 24 bytes"),
        ("shape", [4.0], "non-negative integers"),
        ("shape", [-4], "non-negative integers"),
        ("shape", [True, 4], "non-negative integers"),
        ("shape", [2**40, 2**40], "overflows"),
        ("data_offsets", [0, 16, 16], "two non-negative integers"),
        ("data_offsets", [16, 0], "end before"),
        ("data_offsets", [0, 2**64], "two non-negative integers"),
    ],
)
def test_bad_tensor_entries(
    two_tensors: tuple[dict[str, object], bytes], field: str, value: object, message: str
) -> None:
    header, body = two_tensors
    header["a"][field] = value  # type: ignore[index]
    data = _build(header, body)
    assert _library_refuses(data)
    with pytest.raises(FormatError, match=message) as caught:
        _check(data)
    assert "'a'" in str(caught.value)


def test_duplicate_keys(two_tensors: tuple[dict[str, object], bytes]) -> None:
    """Two entries with one name: JSON parsers disagree on which wins."""
    _, body = two_tensors
    entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    other = '{"dtype": "I64", "shape": [2], "data_offsets": [16, 32]}'
    text = f'{{"a": {entry}, "a": {entry}, "b": {other}}}'
    with pytest.raises(FormatError, match="duplicate key 'a'"):
        _check(_build(text, body))
    meta = '{"__metadata__": {"k": "1", "k": "2"}}'
    with pytest.raises(FormatError, match="duplicate key 'k'"):
        _check(_build(meta, b""))


@pytest.mark.parametrize(
    "metadata",
    [{"format": 1}, {"format": None}, ["format"], "pt"],
)
def test_non_string_metadata(metadata: object) -> None:
    data = _build({"__metadata__": metadata}, b"")
    assert _library_refuses(data)
    with pytest.raises(FormatError, match="__metadata__"):
        _check(data)


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'"x"',
        b"{",
        b'{"a": NaN}',
        b"{} x",
        b"\xff{}",
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' + b"9" * 5000 + b"}",
        b'{"\\ud800": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}',
    ],
)
def test_header_that_is_not_valid_json_object(raw: bytes) -> None:
    data = struct.pack("<Q", len(raw)) + raw
    assert _library_refuses(data)
    with pytest.raises(FormatError):
        _check(data)


def test_stricter_than_the_library() -> None:
    """What the library tolerates but no writer produces is refused: room to hide things."""
    tensor = {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}
    for header in (
        {"t": {**tensor, "payload": "hidden"}},
        {"__metadata__": None, "t": tensor},
        " " + json.dumps({"t": tensor}),
    ):
        data = _build(header, b"ab")
        assert not _library_refuses(data)
        with pytest.raises(FormatError):
            _check(data)


def test_sniff() -> None:
    data = save({"a": torch.ones(2)})
    assert is_safetensors(data[:16], len(data))
    assert is_safetensors(struct.pack("<Q", 3) + b"  {", 11)
    assert not is_safetensors(b"PK\x03\x04" + b"\0" * 60, 64)
    assert not is_safetensors(b"\x93NUMPY\x01\x00v\x00{'descr'", 200)
    assert not is_safetensors(struct.pack("<Q", 100) + b"{", 50)
    assert not is_safetensors(b"\x08\0\0\0", 4)
