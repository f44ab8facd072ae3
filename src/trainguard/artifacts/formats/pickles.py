"""Pickle streams: plain pickles (protocols 0-5), legacy PyTorch files and joblib dumps.

A legacy (pre-zip) PyTorch file is a sequence of pickles (magic number, protocol,
system info, the object, the storage keys) followed by raw storage bytes. A joblib dump
is a pickle interrupted by raw array bytes after each ``NumpyArrayWrapper``; object
arrays are nested pickles. All three are walked without reading tensor bytes.
"""

from __future__ import annotations

import bz2
import io
import lzma
import pickle
import zlib
from collections.abc import Callable
from typing import Any

from trainguard.artifacts.budget import BudgetExceeded
from trainguard.artifacts.formats.joblib_arrays import joblib_hook, plain_reading
from trainguard.artifacts.interface import Analysis, Format, FormatError, NotLoadable
from trainguard.artifacts.pickle_analysis import (
    BuildHook,
    Const,
    Container,
    Global,
    PickleResult,
    Value,
    analyse_pickle,
)
from trainguard.artifacts.pickle_ops import OPCODES
from trainguard.artifacts.unpickler import (
    RestrictedUnpickler,
    StorageType,
    restorer,
    storage_view,
    typed_storage,
    validate_sparse,
)
from trainguard.errors import Severity, UnsupportedFormatError

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


class PickleFormat:
    """A file that starts with a pickle: plain, legacy PyTorch, or joblib."""

    name = Format.PICKLE

    def sniff(self, head: bytes, size: int) -> bool:
        if not head:
            return False
        if head[0] == 0x80:
            return len(head) > 1 and head[1] <= 5
        return head[0] in _PROTO01_FIRST and head[0] in OPCODES

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        analyse_stream(buf, analysis, member=None)

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        buf = memoryview(data)
        if analysis.format is Format.TORCH_LEGACY:
            return load_torch_legacy(data, buf, map_location)
        if analysis.format is Format.PICKLE:
            end = analyse_pickle(buf, 0, Analysis(Format.PICKLE)).end
            return RestrictedUnpickler(io.BytesIO(buf[:end])).load()
        raise NotLoadable  # joblib dumps: scanned only


def analyse_stream(
    buf: memoryview, analysis: Analysis, *, member: str | None, plain: bool = True
) -> None:
    """Analyse every pickle in ``buf``; recognise legacy PyTorch and joblib on the way.

    A joblib stream is read twice, as joblib reads it and as a plain unpickler does
    (``plain``, unless the stream was decompressed: plain loaders cannot read it then);
    the worst reading wins.
    """
    hook = joblib_hook(buf, analysis, member)
    first = analyse_pickle(buf, 0, analysis, member=member, build_hook=hook)
    if hook.skipped and plain:
        plain_reading(buf, analysis, member)
    if any(g.module == "joblib.numpy_pickle" for g in first.globals):
        analysis.format = Format.JOBLIB
    if const(first.root) == LEGACY_MAGIC:
        analysis.format = Format.TORCH_LEGACY
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


def load_torch_legacy(data: bytearray, buf: memoryview, map_location: Any) -> Any:
    """A legacy (pre-zip) checkpoint rebuilt from ``data``: its storages are views."""
    import torch

    bounds = []
    pos = 0
    for _ in range(5):
        end = analyse_pickle(buf, pos, Analysis(Format.TORCH_LEGACY), allow_persistent=True).end
        bounds.append((pos, end))
        pos = end
    head = [RestrictedUnpickler(io.BytesIO(buf[a:b])).load() for a, b in bounds[:3]]
    if head[0] != LEGACY_MAGIC or head[1] != 1001:
        raise UnsupportedFormatError(f"legacy protocol {head[1]!r} is not supported")
    if not head[2].get("little_endian", True):
        raise UnsupportedFormatError("big-endian checkpoints are not supported")
    keys = RestrictedUnpickler(io.BytesIO(buf[bounds[4][0] : bounds[4][1]])).load()
    main_pickle = analyse_pickle(
        buf, bounds[3][0], Analysis(Format.TORCH_LEGACY), allow_persistent=True
    )
    itemsizes = storage_itemsizes(main_pickle)
    records: dict[str, tuple[int, int]] = {}  # key -> (data offset, element count)
    for key in keys:
        numel = int.from_bytes(buf[pos : pos + 8], "little", signed=True)
        records[key] = (pos + 8, numel)
        if key not in itemsizes:
            raise FormatError(f"storage {key!r} has no known element size")
        pos += 8 + numel * itemsizes[key]
    restore = restorer(map_location)
    roots: dict[str, Any] = {}

    def persistent_load(pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError("unexpected persistent id")
        _, storage_type, root_key, location, _numel, view = pid
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError("persistent id without a storage type")
        itemsize = storage_type.itemsize
        if root_key not in roots:
            offset, count = records[root_key]
            roots[root_key] = typed_storage(
                restore(storage_view(data, offset, count * itemsize), location), storage_type
            )
        root = roots[root_key]
        if view is None:
            return root
        _view_key, view_offset, view_size = view
        start = view_offset * itemsize
        part = root._untyped_storage[start : start + view_size * itemsize]
        return torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
            wrap_storage=part, dtype=root.dtype, _internal=True
        )

    main = buf[bounds[3][0] : bounds[3][1]]
    result = RestrictedUnpickler(io.BytesIO(main), persistent_load).load()
    validate_sparse()
    return result


# --- compressed joblib dumps -----------------------------------------------------------

_Decompressor = Callable[[], "zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor"]
_COMPRESSED: list[tuple[bytes, str, _Decompressor]] = [
    (b"ZF", "zfile", lambda: zlib.decompressobj()),
    (b"\x78", "zlib", lambda: zlib.decompressobj()),
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    (b"BZh", "bz2", bz2.BZ2Decompressor),
    (b"\xfd7zXZ\x00", "xz", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
    (b"\x5d\x00\x00", "lzma", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE)),
]
#: Codecs joblib reads with ``bz2.BZ2File`` and ``lzma.LZMAFile``: they go on into every
#: stream concatenated after the first (any lzma container, whatever the first was) and
#: ignore trailing bytes that start none. Its zlib and gzip readers stop at the first.
_NEXT_STREAM: dict[str, _Decompressor] = {
    "bz2": bz2.BZ2Decompressor,
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_AUTO),
    "lzma": lambda: lzma.LZMADecompressor(lzma.FORMAT_AUTO),
}
_CODEC_FORMAT = {
    "zlib": Format.JOBLIB_ZLIB,
    "gzip": Format.JOBLIB_GZIP,
    "bz2": Format.JOBLIB_BZ2,
    "xz": Format.JOBLIB_XZ,
    "lzma": Format.JOBLIB_LZMA,
}
#: joblib < 0.10 wrote "ZF", the uncompressed length in hex padded to 19 characters,
#: then a zlib stream; joblib.load still reads it (``load_compatibility``).
_ZFILE_HEADER = 2 + 19
_BZ2_STARTS = (b"1AY&SY", b"\x17rE8P\x90")  # a block, or the end of an empty stream


def _zfile_length(head: bytes) -> int | None:
    try:
        return int(head[2:_ZFILE_HEADER], 16)
    except ValueError:
        return None


class CompressedPickleFormat:
    """joblib's compressed dumps (zlib, gzip, bz2, xz, lzma, and joblib < 0.10's zlib
    files): inflated as joblib inflates them, bounded, analysed."""

    name = Format.JOBLIB_COMPRESSED

    def sniff(self, head: bytes, size: int) -> bool:
        return self._codec(head) is not None

    def _codec(self, head: bytes) -> tuple[str, _Decompressor] | None:
        for magic, codec, make in _COMPRESSED:
            if head.startswith(magic):
                if codec == "zlib" and (len(head) < 2 or (head[0] * 256 + head[1]) % 31):
                    continue  # not a valid zlib header
                if codec == "bz2" and (
                    head[3:4] not in b"123456789" or head[4:10] not in _BZ2_STARTS
                ):
                    continue
                if codec == "zfile" and _zfile_length(head) is None:
                    continue
                return codec, make
        return None

    def analyse(self, buf: memoryview, analysis: Analysis) -> None:
        found = self._codec(bytes(buf[:_ZFILE_HEADER]))
        assert found is not None
        codec, make = found
        limit = min(MAX_DECOMPRESSED, analysis.budget.available)
        if codec == "zfile":
            declared = _zfile_length(bytes(buf[:_ZFILE_HEADER]))
            # joblib skips one space after the header (Python 2 wrote one more)
            start = _ZFILE_HEADER + (bytes(buf[_ZFILE_HEADER : _ZFILE_HEADER + 1]) == b" ")
            data = decompress_bounded(buf[start:], make(), "zlib", limit)
            if len(data) != declared:
                raise FormatError(
                    f"old joblib file declares {declared} bytes but holds {len(data)}: "
                    "joblib.load refuses it"
                )
            analysis.format = Format.JOBLIB_ZFILE
        else:
            data = decompress_bounded(buf, make(), codec, limit)
            analysis.format = _CODEC_FORMAT[codec]
        with analysis.budget.hold(len(data), f"the decompressed {codec} stream"):
            analyse_stream(memoryview(data), analysis, member=f"<{codec} stream>", plain=False)

    def load(self, data: bytearray, analysis: Analysis, map_location: Any) -> Any:
        raise NotLoadable  # compressed joblib dumps: scanned only


def decompress_bounded(
    buf: memoryview, engine: object, codec: str, limit: int = MAX_DECOMPRESSED
) -> bytearray:
    """Decompress with a hard cap (``limit`` bytes: the memory budget) on the output size.

    For bz2, xz and lzma, the streams concatenated after the first are decompressed too,
    as joblib's readers do.
    """
    out = bytearray()
    step = 1 << 20
    pos = 0
    restart = _NEXT_STREAM.get(codec)
    pending = b""
    following = False  # a stream after the first, that has produced nothing yet
    try:
        while True:
            if getattr(engine, "eof", False):
                rest = bytes(getattr(engine, "unused_data", b""))
                if restart is None or (not rest and pos >= len(buf)):
                    break
                engine, pending, following = restart(), rest, True
            if pending:
                chunk, pending = pending, b""
            elif pos < len(buf):
                chunk = bytes(buf[pos : pos + step])
                pos += len(chunk)
            else:
                break
            try:
                produced = engine.decompress(chunk, limit + 1 - len(out))  # type: ignore[attr-defined]
            except (OSError, lzma.LZMAError):
                if following:
                    return out  # trailing bytes that start no stream: ignored, as joblib does
                raise
            following = following and not produced
            out += produced
            tail = getattr(engine, "unconsumed_tail", b"")
            if len(out) > limit or tail:
                raise BudgetExceeded(
                    f"{codec} stream inflates past {limit} bytes, what the memory budget "
                    "leaves (--max-memory)"
                )
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as exc:
        raise FormatError(f"corrupt {codec} stream: {exc}") from exc
    if not getattr(engine, "eof", True) and not following:
        raise FormatError(f"truncated {codec} stream")
    return out
