"""A bounded reader of pickle opcode streams over a memoryview.

``pickletools.genops`` reads every argument into memory, so a 1 GB ``BINBYTES8``
costs 1 GB; this reader returns large arguments as their length only and never
allocates from an untrusted length field. Opcode metadata comes from ``pickletools``.
"""

from __future__ import annotations

import codecs
import pickletools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from trainguard.artifacts.interface import FormatError

#: Arguments longer than this are not decoded: only their length is kept.
MAX_DECODED_ARG = 1 << 16
#: A protocol 0 line longer than this is treated as hostile.
MAX_LINE = 1 << 26

OPCODES: dict[int, pickletools.OpcodeInfo] = {ord(op.code): op for op in pickletools.opcodes}

_UP_TO_NEWLINE = pickletools.UP_TO_NEWLINE
_LEN1 = pickletools.TAKEN_FROM_ARGUMENT1
_LEN4 = pickletools.TAKEN_FROM_ARGUMENT4
_LEN4U = pickletools.TAKEN_FROM_ARGUMENT4U
_LEN8U = pickletools.TAKEN_FROM_ARGUMENT8U


@dataclass(frozen=True, slots=True)
class Blob:
    """An argument too long to decode; only its size is known."""

    kind: str
    length: int


@dataclass(frozen=True, slots=True)
class Op:
    """One opcode: its name, decoded argument, and where it starts and ends."""

    name: str
    arg: object
    offset: int
    end: int


class OpReader:
    """Iterates over the opcodes of one pickle, starting at ``start`` in ``buf``."""

    def __init__(self, buf: memoryview, start: int = 0, *, member: str | None = None) -> None:
        self.buf = buf
        self.pos = start
        self.member = member

    def error(self, message: str, offset: int | None = None) -> FormatError:
        where = self.pos if offset is None else offset
        return FormatError(message, member=self.member, offset=where)

    def _take(self, n: int) -> memoryview:
        if n < 0:
            raise self.error(f"negative length {n}")
        end = self.pos + n
        if end > len(self.buf):
            raise self.error(f"truncated: needs {n} bytes, {len(self.buf) - self.pos} remain")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def _line(self) -> bytes:
        limit = min(len(self.buf), self.pos + MAX_LINE)
        # memoryview has no find(); search a bounded bytes copy in growing windows
        # so a megabyte line costs a megabyte, not the whole file.
        window = 256
        while True:
            stop = min(limit, self.pos + window)
            chunk = bytes(self.buf[self.pos : stop])
            nl = chunk.find(b"\n")
            if nl >= 0:
                self.pos += nl + 1
                return chunk[:nl]
            if stop >= limit:
                if limit == len(self.buf):
                    raise self.error("truncated: line without newline")
                raise self.error("protocol 0 line longer than the limit")
            window *= 4

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._take(n), "little", signed=False)

    def _sized(self, n: int, kind: str) -> bytes | Blob:
        if n > len(self.buf) - self.pos:
            raise self.error(f"truncated: {kind} of {n} bytes runs past the end")
        if n > MAX_DECODED_ARG:
            self.pos += n
            return Blob(kind, n)
        return bytes(self._take(n))

    def __iter__(self) -> Iterator[Op]:
        return self

    def __next__(self) -> Op:
        if self.pos >= len(self.buf):
            raise self.error("truncated: no STOP opcode")
        start = self.pos
        code = self.buf[self.pos]
        info = OPCODES.get(code)
        if info is None:
            raise self.error(f"invalid opcode 0x{code:02x}")
        self.pos += 1
        arg = self._argument(info)
        return Op(info.name, arg, start, self.pos)

    def _argument(self, info: pickletools.OpcodeInfo) -> object:
        spec = info.arg
        if spec is None:
            return None
        name, n = spec.name, spec.n
        if n == _UP_TO_NEWLINE:
            return self._text_argument(name)
        if n == _LEN1:
            size = self._uint(1)
        elif n == _LEN4:
            size = int.from_bytes(self._take(4), "little", signed=True)
            if size < 0:
                raise self.error(f"negative length {size}")
        elif n in (_LEN4U, _LEN8U):
            size = self._uint(4 if n == _LEN4U else 8)
        else:
            return self._fixed_argument(name, n)
        return self._sized_argument(name, size)

    def _fixed_argument(self, name: str, n: int) -> object:
        raw = self._take(n)
        if name == "float8":
            return _float8(raw)
        signed = name.startswith("int")
        return int.from_bytes(raw, "little", signed=signed)

    def _sized_argument(self, name: str, size: int) -> object:
        data = self._sized(size, name)
        if isinstance(data, Blob):
            return data
        if name.startswith("unicodestring"):
            try:
                return data.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise self.error(f"invalid utf-8 in {name}") from exc
        if name.startswith("string"):
            # Python 3 decodes BINSTRING with the unpickler's encoding (ASCII by default).
            return data.decode("latin-1")
        if name in ("long1", "long4"):
            return (
                int.from_bytes(data, "little", signed=True) if len(data) <= 64 else Blob(name, size)
            )
        return data

    def _text_argument(self, name: str) -> object:
        line = self._line()
        if name == "stringnl_noescape_pair":
            second = self._line()
            return (_ascii(line), _ascii(second))
        if name == "stringnl_noescape":
            return _ascii(line)
        if name == "stringnl":
            return self._repr_string(line)
        if name == "unicodestringnl":
            try:
                return line.decode("raw-unicode-escape")
            except UnicodeDecodeError as exc:
                raise self.error("invalid raw-unicode-escape string") from exc
        if name in ("decimalnl_short", "decimalnl_long"):
            text = line.rstrip(b"L")
            if len(text) > 40:
                return Blob(name, len(text))
            try:
                return int(text)
            except ValueError as exc:
                raise self.error(f"invalid integer literal {line[:40]!r}") from exc
        if name == "floatnl":
            try:
                return float(line[:64])
            except ValueError as exc:
                raise self.error("invalid float literal") from exc
        raise self.error(f"unknown argument type {name}")

    def _repr_string(self, line: bytes) -> str:
        if len(line) >= 2 and line[0] == line[-1] and line[:1] in (b"'", b'"'):
            try:
                return codecs.escape_decode(line[1:-1])[0].decode("latin-1")
            except ValueError as exc:
                raise self.error("invalid escape in STRING") from exc
        raise self.error("STRING argument is not quoted")


def _ascii(raw: bytes) -> str:
    # The unpickler decodes GLOBAL/INST names as UTF-8; keep every byte visible.
    return raw.decode("utf-8", "backslashreplace")


def _float8(raw: memoryview) -> float:
    value: float = struct.unpack(">d", raw)[0]
    return value
