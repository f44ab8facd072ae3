"""Pickle streams: plain pickles (protocols 0-5), legacy PyTorch files and joblib dumps.

A legacy (pre-zip) PyTorch file is a sequence of pickles (magic number, protocol,
system info, the object, the storage keys) followed by raw storage bytes. A joblib dump
is a pickle interrupted by raw array bytes after each ``NumpyArrayWrapper``; object
arrays are nested pickles. All three are walked without reading tensor bytes.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable

from trainguard.artifacts.budget import BudgetExceeded
from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.artifacts.pickle_analysis import (
    BuildHook,
    Const,
    Container,
    Global,
    Made,
    PickleResult,
    Value,
    analyse_pickle,
)
from trainguard.artifacts.pickle_ops import OPCODES
from trainguard.errors import Severity

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: At most this many pickles back to back in one stream.
MAX_PICKLES = 10_000
#: Decompressed joblib dumps larger than this are not scanned (zip-bomb guard).
MAX_DECOMPRESSED = 1 << 30

#: Bytes per element of each legacy storage class.
STORAGE_ITEMSIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
    "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt8": 1,
    "QUInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1,
}  # fmt: skip

# Opcodes a pickle can start with besides PROTO. The unpickler does not check opcodes
# against the protocol, so a stream with no PROTO may open with a protocol 2-5 opcode
# (FRAME, SHORT_BINUNICODE, NEWTRUE, LONG1, ...) and still run under pickle.load.
_PROTO01_FIRST = frozenset(b"(cdl}]NIFLSVX)ijpgGJKMTUBCRP\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x95\x96")


def itemsize_of(storage: Value) -> int | None:
    """Element size of a storage class global such as ``torch.FloatStorage``."""
    if not isinstance(storage, Global):
        return None
    name = storage.name
    return STORAGE_ITEMSIZE.get(name[: -len("Storage")]) if name.endswith("Storage") else None


def const(value: Value | None) -> object:
    return value.value if isinstance(value, Const) else None


def dict_items(value: Value | None) -> dict[object, Value]:
    """The constant-keyed entries of a simulated dict (later keys win, as in Python)."""
    if not isinstance(value, Container) or value.kind != "dict":
        return {}
    items = value.items
    return {const(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


class PickleFormat:
    """A file that starts with a pickle: plain, legacy PyTorch, or joblib."""

    name = "pickle"

    def sniff(self, head: bytes, size: int) -> bool:
        if not head:
            return False
        if head[0] == 0x80:
            return len(head) > 1 and head[1] <= 5
        return head[0] in _PROTO01_FIRST and head[0] in OPCODES

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        analyse_stream(buf, analysis, member=None)


def analyse_stream(buf: memoryview, analysis: Analysis, *, member: str | None) -> None:
    """Analyse every pickle in ``buf``; recognise legacy PyTorch and joblib on the way."""
    hook = joblib_hook(buf, analysis, member)
    first = analyse_pickle(buf, 0, analysis, member=member, build_hook=hook)
    if any(g.module == "joblib.numpy_pickle" for g in first.globals):
        analysis.format = "joblib"
    if const(first.root) == LEGACY_MAGIC:
        analysis.format = "torch-legacy"
        end = _legacy_torch(buf, first, analysis, member)
    else:
        end = first.end
    analyse_tail(buf, end, analysis, member=member, hook=hook)


def analyse_tail(
    buf: memoryview,
    pos: int,
    analysis: Analysis,
    *,
    member: str | None,
    hook: BuildHook | None = None,
) -> None:
    """Bytes after the last expected pickle: further pickles are analysed too."""
    count = 0
    while pos < len(buf):
        count += 1
        if count > MAX_PICKLES:
            raise FormatError("more than 10,000 pickles in one stream", member=member, offset=pos)
        try:
            result = analyse_pickle(buf, pos, analysis, member=member, build_hook=hook)
        except FormatError as exc:
            raise FormatError(
                f"{len(buf) - pos} bytes after the pickle do not parse ({exc})",
                member=member,
                offset=pos,
            ) from exc
        if count == 1:
            analysis.add(
                Severity.LOW,
                "pickle",
                "another pickle follows the first (read by a second load call)",
                member=member,
                offset=pos,
            )
        pos = result.end


def storage_itemsizes(main: PickleResult) -> dict[object, int]:
    """Element size of each legacy root storage, by key, from the persistent ids."""
    sizes: dict[object, int] = {}
    for ref in main.persistent_ids:
        pid = ref.pid.items if isinstance(ref.pid, Container) else []
        if len(pid) >= 3 and const(pid[0]) == "storage":
            itemsize = itemsize_of(pid[1])
            if itemsize is not None:
                sizes[const(pid[2])] = itemsize
    return sizes


def _legacy_torch(
    buf: memoryview, first: PickleResult, analysis: Analysis, member: str | None
) -> int:
    pos = first.end
    for _ in range(2):  # protocol version, system info
        pos = analyse_pickle(buf, pos, analysis, member=member).end
    main = analyse_pickle(buf, pos, analysis, member=member, allow_persistent=True)
    keys = analyse_pickle(buf, main.end, analysis, member=member)
    sizes = storage_itemsizes(main)
    names = keys.root.items if isinstance(keys.root, Container) else []
    pos = keys.end
    for key in names:
        itemsize = sizes.get(const(key))
        if itemsize is None:
            raise FormatError(f"storage {const(key)!r} has no known element size", member=member)
        if pos + 8 > len(buf):
            raise FormatError("truncated storage data", member=member, offset=pos)
        numel = int.from_bytes(buf[pos : pos + 8], "little", signed=True)
        end = pos + 8 + numel * itemsize
        if numel < 0 or end > len(buf):
            raise FormatError(
                f"storage {const(key)!r} claims {numel} elements, past the end of the file",
                member=member,
                offset=pos,
            )
        pos = end
    return pos


def joblib_hook(buf: memoryview, analysis: Analysis, member: str | None) -> BuildHook:
    """Skip (or analyse, for object arrays) the array bytes joblib writes after BUILD."""

    def after_build(wrapper: Made, pos: int) -> int:
        state = dict_items(wrapper.state)
        dtype = state.get("dtype")
        shape = state.get("shape")
        if not (isinstance(dtype, Made) and isinstance(shape, Container)):
            raise FormatError("joblib array wrapper without dtype and shape", member=member)
        args = dtype.args.items if isinstance(dtype.args, Container) else []
        descr = const(args[0]) if args else None
        dstate = dtype.state.items if isinstance(dtype.state, Container) else []
        flags = const(dstate[7]) if len(dstate) > 7 else 0
        if not isinstance(descr, str):
            raise FormatError("joblib array wrapper with an unreadable dtype", member=member)
        if descr.startswith("O") or (isinstance(flags, int) and flags & 1):
            nested = analyse_pickle(buf, pos, analysis, member=member, build_hook=after_build)
            return nested.end
        elsize = const(dstate[5]) if len(dstate) > 5 else -1
        itemsize = elsize if isinstance(elsize, int) and elsize > 0 else _itemsize(descr, member)
        count = 1
        for dim in shape.items:
            n = const(dim)
            if not isinstance(n, int) or n < 0:
                raise FormatError("joblib array with an invalid shape", member=member)
            count *= n
        if "numpy_array_alignment_bytes" in state and pos < len(buf):
            pos += 1 + buf[pos]
        end = pos + count * itemsize
        if end > len(buf):
            raise FormatError("joblib array data runs past the end", member=member, offset=pos)
        return end

    return after_build


def _itemsize(descr: str, member: str | None) -> int:
    import numpy

    if len(descr) > 64:
        raise FormatError("joblib dtype description too long", member=member)
    try:
        return int(numpy.dtype(descr).itemsize)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"joblib array with unknown dtype {descr!r}", member=member) from exc


# --- compressed joblib dumps -----------------------------------------------------------

_Decompressor = Callable[[], "zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor"]
_COMPRESSED: list[tuple[bytes, str, _Decompressor]] = [
    (b"\x78", "zlib", lambda: zlib.decompressobj()),
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    (b"BZh", "bz2", bz2.BZ2Decompressor),
    (b"\xfd7zXZ\x00", "xz", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
    (b"\x5d\x00\x00", "lzma", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE)),
]


class CompressedPickleFormat:
    """joblib's compressed dumps (zlib, gzip, bz2, xz, lzma): inflated, bounded, analysed."""

    name = "joblib-compressed"

    def sniff(self, head: bytes, size: int) -> bool:
        return self._codec(head) is not None

    def _codec(self, head: bytes) -> tuple[str, _Decompressor] | None:
        for magic, codec, make in _COMPRESSED:
            if head.startswith(magic):
                if codec == "zlib" and (len(head) < 2 or (head[0] * 256 + head[1]) % 31):
                    continue  # not a valid zlib header
                if codec == "bz2" and head[4:10] != b"1AY&SY":
                    continue
                return codec, make
        return None

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        found = self._codec(bytes(buf[:16]))
        assert found is not None
        codec, make = found
        limit = min(MAX_DECOMPRESSED, analysis.budget.available)
        data = decompress_bounded(buf, make(), codec, limit)
        analysis.format = f"joblib ({codec})"
        with analysis.budget.hold(len(data), f"the decompressed {codec} stream"):
            analyse_stream(memoryview(data), analysis, member=f"<{codec} stream>")


def decompress_bounded(
    buf: memoryview, engine: object, codec: str, limit: int = MAX_DECOMPRESSED
) -> bytearray:
    """Decompress with a hard cap (``limit`` bytes: the memory budget) on the output size."""
    out = bytearray()
    step = 1 << 20
    pos = 0
    decompress = engine.decompress  # type: ignore[attr-defined]
    try:
        while pos < len(buf) and not getattr(engine, "eof", False):
            chunk = bytes(buf[pos : pos + step])
            pos += len(chunk)
            out += decompress(chunk, limit + 1 - len(out))
            tail = getattr(engine, "unconsumed_tail", b"")
            if len(out) > limit or tail:
                raise BudgetExceeded(
                    f"{codec} stream inflates past {limit} bytes, what the memory budget "
                    "leaves (--max-memory)"
                )
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
        raise FormatError(f"corrupt {codec} stream: {exc}") from exc
    if not getattr(engine, "eof", True):
        raise FormatError(f"truncated {codec} stream")
    return out
