"""Parsing of NumPy ``.npy`` headers, alone or inside ``.npz`` archives and checkpoints.

An ``.npy`` file is a magic string, a version, a header length, then a Python dict literal
(``descr``, ``fortran_order``, ``shape``) padded with spaces, then the array's bytes. For
object arrays those bytes are a pickle, so the scanner needs to know exactly where the
header ends and whether the dtype holds objects. The header is attacker-controlled text
fed to ``ast.literal_eval``, so it is size-capped and its nesting depth bounded first.
"""

from __future__ import annotations

import ast
import io
import re
import struct
import tokenize
from dataclasses import dataclass
from typing import Any

from trainguard.artifacts.interface import FormatError

MAGIC = b"\x93NUMPY"
#: numpy itself refuses headers over 10,000 characters unless told to trust the file
MAX_HEADER_SIZE = 1 << 20
MAX_NESTING = 32
#: numpy's NPY_MAXDIMS
MAX_DIMS = 64
_INTP_MAX = 2**63 - 1
_KEYS = frozenset({"descr", "fortran_order", "shape"})
_LENGTH_FORMATS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
# brackets inside strings count too: stricter than needed, never wrong for numpy's headers
_BRACKETS = re.compile(r"[][(){}]")
_LITERAL_ERRORS = (
    SyntaxError,
    ValueError,
    TypeError,
    MemoryError,
    RecursionError,
    tokenize.TokenError,
)


@dataclass(frozen=True)
class NpyHeader:
    """An ``.npy`` header; ``data_offset`` is where the array (or its pickle) starts."""

    version: tuple[int, int]
    descr: str | list[Any]
    fortran_order: bool
    shape: tuple[int, ...]
    data_offset: int
    has_object: bool
    itemsize: int


def is_npy(head: bytes) -> bool:
    """True if ``head`` starts with the ``.npy`` magic string."""
    return head[:6] == MAGIC


def _nesting(text: str) -> int:
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        if match.group() in "([{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _drop_python2_longs(text: str) -> str:
    """Remove the ``L`` suffix Python 2 wrote after integers (``(3L, 4L)``), as numpy does."""
    tokens = []
    previous_was_number = False
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if previous_was_number and token.type == tokenize.NAME and token.string == "L":
            continue
        tokens.append(token)
        previous_was_number = token.type == tokenize.NUMBER
    return tokenize.untokenize(tokens)


def _literal(text: str, version: tuple[int, int]) -> object:
    try:
        return ast.literal_eval(text)
    except SyntaxError:
        if version > (2, 0):
            raise
    # only files written by Python 2 need this slower second attempt
    return ast.literal_eval(_drop_python2_longs(text))


def _dtype_facts(descr: Any) -> tuple[bool, int]:
    """(has_object, itemsize) of the dtype ``descr`` describes."""
    from numpy.lib.format import descr_to_dtype

    dtype = descr_to_dtype(descr)
    return bool(dtype.hasobject), int(dtype.itemsize)


def parse_npy_header(buf: memoryview, offset: int = 0, *, member: str | None = None) -> NpyHeader:
    """Parse the ``.npy`` header starting at ``offset`` of ``buf``.

    Raises :class:`FormatError` for anything numpy would refuse, and for headers above
    :data:`MAX_HEADER_SIZE`, nested deeper than :data:`MAX_NESTING` or with values numpy
    would accept only by accident (booleans as dimensions, negative dimensions).
    """

    def fail(message: str) -> FormatError:
        return FormatError(f"npy header: {message}", member=member, offset=offset)

    if offset < 0 or offset + 10 > len(buf) or buf[offset : offset + 6] != MAGIC:
        raise fail("no .npy magic string")
    version = (buf[offset + 6], buf[offset + 7])
    if version not in _LENGTH_FORMATS:
        raise fail(f"unknown format version {version[0]}.{version[1]}")
    length_format, encoding = _LENGTH_FORMATS[version]
    start = offset + 8 + struct.calcsize(length_format)
    if start > len(buf):
        raise fail("truncated header length")
    (length,) = struct.unpack_from(length_format, buf, offset + 8)
    if length > MAX_HEADER_SIZE:
        raise fail(f"header of {length} bytes is above the {MAX_HEADER_SIZE}-byte limit")
    if start + length > len(buf):
        raise fail(f"header of {length} bytes runs past the end of the data")
    try:
        text = bytes(buf[start : start + length]).decode(encoding)
    except UnicodeDecodeError:
        raise fail(f"header is not valid {encoding}") from None
    # bounded before the parser sees it: deep nesting costs the compiler stack and time
    if _nesting(text) > MAX_NESTING:
        raise fail(f"header is nested more than {MAX_NESTING} levels deep")
    try:
        fields = _literal(text, version)
    except _LITERAL_ERRORS as exc:
        raise fail(f"not a python literal ({type(exc).__name__})") from None
    if not isinstance(fields, dict) or set(fields) != _KEYS:
        raise fail("not a dict with exactly the keys descr, fortran_order and shape")
    shape, fortran_order, descr = fields["shape"], fields["fortran_order"], fields["descr"]
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_DIMS
        or not all(type(dim) is int and 0 <= dim <= _INTP_MAX for dim in shape)
    ):
        raise fail(f"shape is not a tuple of at most {MAX_DIMS} non-negative integers")
    if not isinstance(fortran_order, bool):
        raise fail("fortran_order is not a bool")
    if not isinstance(descr, str | list):
        raise fail("descr is neither a dtype string nor a list of fields")
    try:
        has_object, itemsize = _dtype_facts(descr)
    # numpy raises a variety of exceptions for malformed descriptors; all mean "malformed"
    except Exception as exc:
        raise fail(f"descr is not a valid dtype ({type(exc).__name__})") from None
    header = NpyHeader(
        version, descr, fortran_order, tuple(shape), start + length, has_object, itemsize
    )
    size = npy_data_size(header)
    if size is not None and size > _INTP_MAX:
        raise fail("array is larger than numpy can address")
    return header


def npy_data_size(header: NpyHeader) -> int | None:
    """Bytes of array data after the header; None for object arrays (their data is a pickle)."""
    if header.has_object:
        return None
    elements = 1
    for dim in header.shape:
        elements *= dim
    return elements * header.itemsize
