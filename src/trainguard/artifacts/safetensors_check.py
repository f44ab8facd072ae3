"""Validation of the safetensors format, as strict as the safetensors library and a bit more.

A safetensors file is an 8-byte little-endian header length, a UTF-8 JSON header mapping
tensor names to ``{dtype, shape, data_offsets}`` (plus an optional ``__metadata__``
string map), then the tensor bytes. The library refuses files whose offsets leave gaps,
overlap or do not cover the data exactly; we check the same rules without loading
anything, and also refuse what it tolerates but no writer produces (duplicate keys,
unknown fields, a null ``__metadata__``, leading whitespace), because a file two parsers
read differently is a place to hide things.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trainguard.artifacts.budget import MemoryBudget
from trainguard.artifacts.interface import Analysis, FormatError

#: the library refuses longer headers
MAX_HEADER_SIZE = 100_000_000
_U64_MAX = 2**64 - 1
#: memory per byte of header text once parsed (dicts, lists and ints of a hostile header)
JSON_COST = 16
_JSON_SPACE = b" \t\r\n"
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})

#: bits per element of every dtype the safetensors library (0.8) knows
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; ``begin``/``end`` count from the end of the JSON header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def is_safetensors(head: bytes, size: int) -> bool:
    """Cheap sniff: a plausible header length followed by JSON that opens an object."""
    if len(head) < 9 or size < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    if length < 2 or length > MAX_HEADER_SIZE or length > size - 8:
        return False
    return head[8 : 8 + length].lstrip(_JSON_SPACE)[:1] == b"{"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise FormatError(f"duplicate key {key!r} in the header")
        seen.add(key)
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise FormatError(f"{name} is not valid JSON")


def _is_count(value: object) -> bool:
    """A JSON integer that fits the library's usize (bools are not integers there)."""
    return type(value) is int and 0 <= value <= _U64_MAX


def _check_text(value: str, what: str) -> None:
    # json accepts lone surrogate escapes; the library's serde_json refuses them
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{what} is not valid unicode") from None


def _load_header(buf: memoryview, budget: MemoryBudget) -> tuple[dict[str, Any], int]:
    size = len(buf)
    if size < 8:
        raise FormatError("file is shorter than the 8-byte header length")
    length = int.from_bytes(buf[:8], "little")
    if length > MAX_HEADER_SIZE:
        raise FormatError(f"header length {length} is above the {MAX_HEADER_SIZE}-byte limit")
    if 8 + length > size:
        raise FormatError(f"header length {length} runs past the end of the {size}-byte file")
    # parsed JSON costs several times its text: bounded by the budget before parsing
    budget.check(length * JSON_COST, "the JSON header")
    try:
        text = bytes(buf[8 : 8 + length]).decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("header is not valid utf-8", offset=8) from None
    if not text.startswith("{"):
        raise FormatError("header does not start with '{'", offset=8)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"header is not valid json: {exc}", offset=8) from None
    if not isinstance(header, dict):
        raise FormatError("header is not a json object", offset=8)
    return header, 8 + length


def _check_metadata(metadata: object) -> None:
    if not isinstance(metadata, dict):
        raise FormatError("__metadata__ is not a json object")
    for key, value in metadata.items():
        _check_text(key, "a __metadata__ key")
        if not isinstance(value, str):
            raise FormatError(f"__metadata__ value for {key!r} is not a string")
        _check_text(value, f"__metadata__ value for {key!r}")


def _tensor(name: str, entry: object) -> TensorInfo:
    _check_text(name, "a tensor name")
    if not isinstance(entry, dict):
        raise FormatError(f"tensor {name!r}: entry is not a json object")
    keys = set(entry)
    if keys != _TENSOR_KEYS:
        missing, unknown = sorted(_TENSOR_KEYS - keys), sorted(keys - _TENSOR_KEYS)
        raise FormatError(f"tensor {name!r}: missing fields {missing}, unknown fields {unknown}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"tensor {name!r}: shape is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise FormatError(f"tensor {name!r}: data_offsets is not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise FormatError(f"tensor {name!r}: data_offsets end before they begin")
    elements = 1
    for dim in shape:
        elements *= dim
        # stop before a hostile shape builds a huge integer; the library overflows here too
        if elements > _U64_MAX:
            raise FormatError(f"tensor {name!r}: shape overflows a 64-bit element count")
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8:
        raise FormatError(f"tensor {name!r}: {elements} {dtype} elements are not whole bytes")
    if bits // 8 != end - begin:
        raise FormatError(
            f"tensor {name!r}: shape {shape} of {dtype} needs {bits // 8} bytes, "
            f"data_offsets give {end - begin}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def check_safetensors(buf: memoryview, analysis: Analysis) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, in header order, once the whole layout checks out.

    Raises :class:`FormatError` naming the tensor at the first violation; offsets in the
    returned :class:`TensorInfo` count from the first byte after the header.
    """
    header, data_start = _load_header(buf, analysis.budget)
    if "__metadata__" in header:
        _check_metadata(header.pop("__metadata__"))
    tensors = {name: _tensor(name, entry) for name, entry in header.items()}
    expected = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin > expected:
            raise FormatError(
                f"tensor {name!r}: {info.begin - expected} unaccounted bytes before its data",
                offset=data_start + expected,
            )
        if info.begin < expected:
            raise FormatError(
                f"tensor {name!r}: data overlaps the previous tensor",
                offset=data_start + info.begin,
            )
        expected = info.end
    data_end = data_start + expected
    if data_end > len(buf):
        raise FormatError(
            f"tensor data runs past the end of the file ({data_end - len(buf)} bytes missing)",
            offset=len(buf),
        )
    if data_end < len(buf):
        raise FormatError(
            f"{len(buf) - data_end} trailing bytes after the last tensor", offset=data_end
        )
    return tensors
