"""Our own reader of the ZIP structure, reporting where PyTorch's and Python's readers diverge.

``torch.load`` reads checkpoints with miniz (caffe2's ``PyTorchStreamReader``): it only
treats a file as a ZIP if it starts with a local header, takes the central directory at
the offset the end record declares, looks names up case-insensitively by binary search,
and reads data after the *local* header using the local header's name and extra lengths.
``numpy.load`` and most tools use Python's ``zipfile``, which finds the directory relative
to the end record (tolerating prepended data), lets the last duplicate name win and refuses
a local header whose name differs. Whoever controls the bytes can show a scanner one
archive and the loader another, so this module parses the structure itself, reports every
disagreement as a finding and returns the members PyTorch would see.

Everything works on a ``memoryview`` of the whole file and is bounded in time and memory
by the file size; malformed bytes raise :class:`FormatError` and nothing else.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass

from trainguard.artifacts.interface import Analysis, FormatError
from trainguard.errors import Severity

HIGH, MEDIUM = Severity.HIGH, Severity.MEDIUM

DETECTOR = "zip"
#: more entries than this and the archive is refused outright
MAX_ENTRIES = 1_000_000
#: findings of one kind beyond this are counted, not listed
MAX_FINDINGS_PER_KIND = 20

STORED, DEFLATED, BZIP2, LZMA = 0, 8, 12, 14

_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"

_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_MAX_COMMENT = 0xFFFF
_U32_MAX = 0xFFFFFFFF

_FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x0008, 0x0800
# traditional encryption, strong encryption, masked local headers
_ENCRYPTION_FLAGS = 0x0001 | 0x0040 | 0x2000
# Bits 1-2 only tune the deflate level (bit 1 marks an LZMA end marker): harmless hints
# that Info-ZIP and zipfile set, so flagging them would condemn ordinary archives.
_OPTION_FLAGS = {DEFLATED: 0x0006, LZMA: 0x0002}


@dataclass(frozen=True)
class ZipMember:
    """One central directory entry, located in the buffer through its local header."""

    name: str
    header_offset: int
    data_offset: int
    compressed_size: int
    size: int
    method: int
    flags: int
    crc: int


@dataclass(frozen=True)
class _Entry:
    raw_name: bytes
    name: str
    name_ok: bool
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int


class _Reporter:
    """Adds findings, at most MAX_FINDINGS_PER_KIND of each kind, then one summary."""

    def __init__(self, analysis: Analysis) -> None:
        self._analysis = analysis
        self._counts: Counter[str] = Counter()
        self._severity: dict[str, Severity] = {}

    def __call__(
        self, kind: str, severity: Severity, message: str, *, member: str | None = None,
        offset: int | None = None,
    ) -> None:  # fmt: skip
        self._counts[kind] += 1
        self._severity[kind] = max(severity, self._severity.get(kind, severity))
        if self._counts[kind] <= MAX_FINDINGS_PER_KIND:
            self._analysis.add(severity, DETECTOR, message, member=member, offset=offset)

    def finish(self) -> None:
        for kind, count in self._counts.items():
            if count > MAX_FINDINGS_PER_KIND:
                hidden = count - MAX_FINDINGS_PER_KIND
                self._analysis.add(
                    self._severity[kind],
                    DETECTOR,
                    f"{hidden} more findings of kind '{kind}' not listed (hostile archive?)",
                )


def find_eocd(buf: memoryview) -> int | None:
    """Offset of the end-of-central-directory record, or None.

    Like miniz, takes the last signature in the final 64 KiB + 22 bytes that leaves room
    for a whole record. ZIP64 archives keep a classic end record too; :func:`parse_zip`
    follows the ZIP64 locator just before it.
    """
    if len(buf) < _EOCD.size:
        return None
    start = max(0, len(buf) - _EOCD.size - _MAX_COMMENT)
    tail = bytes(buf[start:])
    pos = tail.rfind(_EOCD_SIG, 0, len(tail) - _EOCD.size + len(_EOCD_SIG))
    return None if pos < 0 else start + pos


def _extra_fields(extra: bytes, where: int) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + length > len(extra):
            raise FormatError(f"corrupt extra field {tag:#06x}: zipfile refuses it", offset=where)
        fields.setdefault(tag, extra[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return fields


def _zip64_sizes(extra: bytes, values: list[int], where: int) -> list[int]:
    """Replace the 0xFFFFFFFF values, in order, with the ZIP64 extra field's 8-byte ones."""
    data = _extra_fields(extra, where).get(0x0001, b"")
    out, pos = [], 0
    for value in values:
        if value == _U32_MAX:
            if pos + 8 > len(data):
                raise FormatError("zip64 extra field is missing a size or offset", offset=where)
            value = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        out.append(value)
    return out


def _decode_name(raw: bytes, flags: int) -> tuple[str, bool]:
    # zipfile's rule: UTF-8 when flagged, else cp437 (miniz compares the raw bytes).
    if flags & _FLAG_UTF8:
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return raw.decode("utf-8", "surrogateescape"), False
    return raw.decode("cp437"), True


def _read_end(buf: memoryview, eocd: int, report: _Reporter) -> tuple[int, int | None, int, int]:
    """(declared directory offset, where zipfile finds it or None, its size, entry count)."""
    size = len(buf)
    _, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(buf, eocd)
    after = size - eocd - _EOCD.size
    if comment > after:
        message = f"the archive comment claims {comment} bytes but only {after} remain"
        report("trailer", HIGH, message, offset=eocd)
    elif comment < after:
        message = (
            f"{after - comment} bytes after the end of central directory record and its comment"
        )
        report("trailer", HIGH, message, offset=eocd + _EOCD.size + comment)
    later = bytes(buf[eocd + 1 :]).find(_EOCD_SIG)
    if later >= 0:
        message = (
            "a second end-record signature too close to the end of the file: Python's "
            "zipfile picks it and cannot open the archive, PyTorch's reader uses the earlier one"
        )
        report("trailer", HIGH, message, offset=eocd + 1 + later)
    python_cd: int | None = eocd - cd_size
    locator = eocd - _ZIP64_LOCATOR.size
    if locator >= 0 and buf[locator : locator + 4] == _ZIP64_LOCATOR_SIG:
        _, _, record, _ = _ZIP64_LOCATOR.unpack_from(buf, locator)
        if record + _ZIP64_EOCD.size > locator or buf[record : record + 4] != _ZIP64_EOCD_SIG:
            raise FormatError("the zip64 locator points to no zip64 end record", offset=locator)
        _, rest, _, _, _, _, _, count, cd_size, cd_offset = _ZIP64_EOCD.unpack_from(buf, record)
        if rest < _ZIP64_EOCD.size - 12:
            raise FormatError("zip64 end record is too short", offset=record)
        # zipfile assumes the ZIP64 record sits right before the locator; miniz follows it.
        python_cd = record - cd_size
        if record != locator - _ZIP64_EOCD.size:
            python_cd = None
            message = (
                "the zip64 end record is not where Python's zipfile looks for it: "
                "zipfile and PyTorch's reader read different directories"
            )
            report("directory", HIGH, message, offset=record)
    if count > MAX_ENTRIES:
        raise FormatError(f"{count} entries declared, above the limit of {MAX_ENTRIES}")
    if cd_size > size or cd_size < count * _CENTRAL.size:
        raise FormatError(
            f"central directory size {cd_size} is inconsistent with {count} entries "
            f"in a {size}-byte file",
            offset=eocd,
        )
    return cd_offset, python_cd, cd_size, count


def _has_directory(buf: memoryview, start: int | None, cd_size: int) -> bool:
    if start is None or start < 0 or start + cd_size > len(buf):
        return False
    return cd_size == 0 or buf[start : start + 4] == _CENTRAL_SIG


def _choose_directory(
    buf: memoryview, declared: int, python_cd: int | None, cd_size: int, report: _Reporter
) -> tuple[int, int]:
    """(directory offset, shift to add to every header offset) for the view to analyse."""
    torch_ok = _has_directory(buf, declared, cd_size)
    if python_cd is None or python_cd == declared:
        if not torch_ok:
            raise FormatError("no central directory at the declared offset", offset=declared)
        return declared, 0
    python_ok = _has_directory(buf, python_cd, cd_size)
    shift = python_cd - declared
    if torch_ok and python_ok:
        message = (
            f"two central directories: PyTorch's reader reads the one at {declared}, Python's "
            f"zipfile the one at {python_cd} with every offset shifted by {shift} bytes"
        )
        report("directory", HIGH, message, offset=declared)
        return declared, 0
    if python_ok:
        message = (
            f"the central directory is declared at {declared} but sits at {python_cd} (data "
            f"added before the archive): Python's zipfile shifts every offset by {shift} "
            "bytes and opens it, PyTorch's reader cannot"
        )
        report("directory", HIGH, message, offset=python_cd)
        return python_cd, shift
    if torch_ok:
        message = (
            f"the central directory at {declared} does not end at the end record: "
            "PyTorch's reader opens the archive, Python's zipfile cannot"
        )
        report("directory", HIGH, message, offset=declared)
        return declared, 0
    raise FormatError("no central directory at the declared offset", offset=declared)


def _walk_directory(buf: memoryview, start: int, cd_size: int) -> list[_Entry]:
    entries: list[_Entry] = []
    pos, end = start, start + cd_size
    # zipfile walks the directory's bytes (miniz counts entries); walk like zipfile and
    # compare the count afterwards.
    while pos < end:
        if pos + _CENTRAL.size > end:
            raise FormatError("truncated central directory entry", offset=pos)
        fields = _CENTRAL.unpack_from(buf, pos)
        if fields[0] != _CENTRAL_SIG:
            raise FormatError("bad central directory entry signature", offset=pos)
        flags, method, _, _, crc, csize, usize, nlen, xlen, clen = fields[3:13]
        header_offset = fields[16]
        name_at = pos + _CENTRAL.size
        following = name_at + nlen + xlen + clen
        if following > end:
            raise FormatError("central directory entry runs past the directory", offset=pos)
        raw_name = bytes(buf[name_at : name_at + nlen])
        extra = bytes(buf[name_at + nlen : name_at + nlen + xlen])
        _extra_fields(extra, pos)
        if _U32_MAX in (usize, csize, header_offset):
            usize, csize, header_offset = _zip64_sizes(extra, [usize, csize, header_offset], pos)
        name, name_ok = _decode_name(raw_name, flags)
        entries.append(
            _Entry(raw_name, name, name_ok, flags, method, crc, csize, usize, header_offset)
        )
        if len(entries) > MAX_ENTRIES:
            raise FormatError(f"more than {MAX_ENTRIES} central directory entries", offset=pos)
        pos = following
    return entries


def _locate(buf: memoryview, entry: _Entry, shift: int, report: _Reporter) -> ZipMember | None:
    """The member behind ``entry``, checked against its local header; None to skip it."""
    name, size = entry.name, len(buf)
    start = entry.header_offset + shift
    if start < 0 or start + _LOCAL.size > size:
        report("outside", HIGH, "entry points outside the file", member=name)
        return None
    sig, _, flags, method, _, _, crc, csize, usize, nlen, xlen = _LOCAL.unpack_from(buf, start)
    if sig != _LOCAL_SIG:
        message = "no local file header at the offset the central directory declares"
        report("local", HIGH, message, member=name, offset=start)
        return None
    data_offset = start + _LOCAL.size + nlen + xlen
    if data_offset + entry.compressed_size > size:
        report("outside", HIGH, "member data runs past the end of the file", member=name)
        return None
    local_name = bytes(buf[start + _LOCAL.size : start + _LOCAL.size + nlen])
    if local_name != entry.raw_name:
        shown = local_name.decode("utf-8", "replace")
        message = (
            f"the local header names this member {shown!r}: PyTorch's reader reads it as "
            f"{name!r}, Python's zipfile refuses to open it"
        )
        report("mismatch", HIGH, message, member=name, offset=start)
    differences = []
    if method != entry.method:
        differences.append(f"method {method} vs {entry.method}")
    if flags != entry.flags:
        differences.append(f"flags {flags:#x} vs {entry.flags:#x}")
    if not flags & _FLAG_DESCRIPTOR:
        if _U32_MAX in (usize, csize):
            extra = bytes(buf[start + _LOCAL.size + nlen : data_offset])
            try:
                usize, csize = _zip64_sizes(extra, [usize, csize], start)
            except FormatError:
                differences.append("corrupt zip64 extra field")
        if crc != entry.crc:
            differences.append(f"crc {crc:#010x} vs {entry.crc:#010x}")
        if (csize, usize) != (entry.compressed_size, entry.size):
            differences.append(f"sizes {csize}/{usize} vs {entry.compressed_size}/{entry.size}")
    if differences:
        message = (
            "local header disagrees with the central directory (local vs central: "
            + ", ".join(differences)
            + "): streaming readers see different data"
        )
        report("mismatch", HIGH, message, member=name, offset=start)
    return ZipMember(
        name, start, data_offset, entry.compressed_size, entry.size, entry.method,
        entry.flags, entry.crc,
    )  # fmt: skip


def _check_entry(entry: _Entry, report: _Reporter) -> None:
    name, flags, method = entry.name, entry.flags, entry.method
    if not entry.name_ok:
        message = (
            "name flagged UTF-8 is not valid UTF-8: Python's zipfile cannot open the archive, "
            "PyTorch's reader can"
        )
        report("name", HIGH, message, member=name)
    if flags & _ENCRYPTION_FLAGS:
        message = "encrypted entry: its content cannot be checked, PyTorch's reader refuses it"
        report("encrypted", HIGH, message, member=name)
    unusual = flags & ~(_ENCRYPTION_FLAGS | _FLAG_DESCRIPTOR | _FLAG_UTF8)
    unusual &= ~_OPTION_FLAGS.get(method, 0)
    if unusual:
        report("flags", MEDIUM, f"unusual general purpose flags {unusual:#06x}", member=name)
    if method not in (STORED, DEFLATED):
        message = f"compression method {method}: PyTorch's reader cannot read it"
        report("method", MEDIUM, message, member=name)
    if (method == STORED and entry.compressed_size != entry.size) or (
        entry.size and not entry.compressed_size
    ):
        message = (
            f"inconsistent sizes {entry.compressed_size}/{entry.size}: "
            "PyTorch's reader refuses the archive"
        )
        report("sizes", HIGH, message, member=name)
    parts = name.split("/")
    if (
        ".." in parts
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":" and name[0].isalpha())
        or "\\" in name
        or "\x00" in name
    ):
        message = "unsafe member name ('..', absolute path, backslash or NUL byte)"
        report("name", MEDIUM, message, member=name)


def _check_duplicates(entries: list[_Entry], report: _Reporter) -> None:
    copies = Counter(e.name for e in entries)
    for name, count in copies.items():
        if count > 1:
            message = (
                f"{count} entries named {name!r}: Python's zipfile reads the last one, "
                "PyTorch's reader looks names up by binary search and reads another"
            )
            report("duplicate", HIGH, message, member=name)
    # miniz lower-cases ASCII letters when it looks a name up; only PyTorch's reader
    # (archives with pickles) uses it: NumPy's npz goes through case-sensitive zipfile.
    if not any(e.name.endswith(".pkl") for e in entries):
        return
    folded: defaultdict[bytes, set[str]] = defaultdict(set)
    for entry in entries:
        folded[entry.raw_name.lower()].add(entry.name)
    for names in folded.values():
        if len(names) > 1:
            variants = sorted(names)
            message = (
                f"names differ only in letter case ({', '.join(map(repr, variants[:3]))}): "
                "PyTorch's reader looks names up case-insensitively and may read the wrong one"
            )
            report("duplicate", HIGH, message, member=variants[0])


def _check_layout(
    buf: memoryview, members: list[ZipMember], cd_start: int, report: _Reporter
) -> None:
    regions = [(m.header_offset, m.data_offset + m.compressed_size, m.name) for m in members]
    regions.append((cd_start, len(buf), "the central directory"))
    regions.sort()
    first = regions[0][0]
    # torch.load only opens files starting with a local header as ZIPs; anything else it
    # unpickles, so a prefix turns the file into two different things (a bare empty
    # archive starts with its end record and is harmless).
    if buf[:4] != _LOCAL_SIG and (members or buf[:4] not in (_EOCD_SIG, _ZIP64_EOCD_SIG)):
        message = (
            "the file does not start with a local file header: torch.load does not treat "
            "it as a ZIP archive (it unpickles it as a legacy checkpoint) while Python's "
            "zipfile opens the archive"
        )
        report("prefix", HIGH, message, offset=0)
    elif first > 0:
        message = f"{first} bytes before the first member the central directory lists"
        report("prefix", HIGH, message, offset=0)
    furthest, owner = -1, ""
    for start, end, name in regions:
        if start < furthest:
            message = (
                f"data overlaps {owner!r} (overlapping entries: a zip bomb or a disguised member)"
            )
            report("overlap", HIGH, message, member=name, offset=start)
        if end > furthest:
            furthest, owner = end, name


def parse_zip(buf: memoryview, analysis: Analysis) -> list[ZipMember]:
    """Every central directory entry, in order, that can be located in the file.

    Adds a finding (detector ``"zip"``) for every structural anomaly, naming which reader
    sees what where they would differ; raises :class:`FormatError` when there is no
    usable central directory.
    """
    report = _Reporter(analysis)
    try:
        eocd = find_eocd(buf)
        if eocd is None:
            raise FormatError("no end of central directory record: not a zip or truncated")
        declared, python_cd, cd_size, count = _read_end(buf, eocd, report)
        cd_start, shift = _choose_directory(buf, declared, python_cd, cd_size, report)
        entries = _walk_directory(buf, cd_start, cd_size)
        if len(entries) != count:
            message = (
                f"the end record declares {count} entries but the central directory holds "
                f"{len(entries)}: PyTorch's reader sees {count}, Python's zipfile "
                f"{len(entries)}"
            )
            report("directory", HIGH, message, offset=cd_start)
        members = []
        for entry in entries:
            _check_entry(entry, report)
            member = _locate(buf, entry, shift, report)
            if member is not None:
                members.append(member)
        _check_duplicates(entries, report)
        _check_layout(buf, members, cd_start, report)
    finally:
        report.finish()
    return members


def torch_archive_prefix(members: list[ZipMember]) -> str | None:
    """The folder PyTorch's reader prefixes every record name with, or None if it has none."""
    if not members:
        return None
    name = members[0].name
    slash = name.find("/")
    return None if slash < 0 else name[:slash]


def _lzma_decompressor(data: memoryview, member: ZipMember) -> tuple[lzma.LZMADecompressor, int]:
    # zip's LZMA: 2-byte version, 2-byte properties size, the properties, a raw LZMA1 stream
    if len(data) < 9:
        raise FormatError("truncated lzma header", member=member.name)
    props_size = int.from_bytes(data[2:4], "little")
    if props_size != 5 or len(data) < 4 + props_size:
        raise FormatError("unsupported lzma properties", member=member.name)
    props = data[4]
    if props >= 9 * 5 * 5:
        raise FormatError("invalid lzma properties", member=member.name)
    lc, lp, pb = props % 9, props // 9 % 5, props // 45
    dict_size = int.from_bytes(data[5:9], "little")
    flt = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[flt]), 9


#: deflate cannot expand one compressed byte to more than 1032 bytes (RFC 1951's limit)
_DEFLATE_RATIO = 1032
#: inflation proceeds in steps of this many bytes, into one buffer of the declared size
_STEP = 1 << 20


def read_member(
    buf: memoryview, member: ZipMember, *, limit: int, check_crc: bool = True
) -> bytes | bytearray:
    """The member's uncompressed bytes, checked against its size and CRC-32.

    Raises :class:`FormatError` when the data runs past the buffer, would inflate beyond
    ``limit`` bytes (the memory the caller can spare: checked on the declared size, before
    anything is allocated), does not decompress to the declared size, or fails its CRC.
    Memory is the declared size plus one step, whatever the stream holds.
    """
    name = member.name
    end = member.data_offset + member.compressed_size
    if member.data_offset < 0 or end > len(buf):
        raise FormatError("member data runs past the end of the file", member=name)
    if member.size > limit:
        from trainguard.artifacts.budget import BudgetExceeded

        raise BudgetExceeded(
            f"member declares {member.size} bytes, above the {limit} bytes the memory "
            "budget leaves (--max-memory)",
            member=name,
        )
    if member.method == DEFLATED and member.size > member.compressed_size * _DEFLATE_RATIO + 64:
        raise FormatError(
            f"member declares {member.size} bytes, more than deflate can produce from "
            f"{member.compressed_size}",
            member=name,
        )
    data = buf[member.data_offset : end]
    out: bytes | bytearray
    if member.method == STORED:
        if member.compressed_size != member.size:
            raise FormatError("stored member with two different sizes", member=name)
        out = bytes(data)
    else:
        try:
            out = _inflate(data, member)
        except (zlib.error, OSError, lzma.LZMAError, EOFError, ValueError) as exc:
            raise FormatError(f"corrupt compressed data: {exc}", member=name) from None
    if len(out) != member.size:
        raise FormatError(
            f"member decompresses to {len(out)} bytes, not the declared {member.size}",
            member=name,
        )
    if check_crc and zlib.crc32(out) != member.crc:
        raise FormatError("crc-32 mismatch: the member was altered", member=name)
    return out


def _inflate(data: memoryview, member: ZipMember) -> bytearray:
    decompressor: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor
    if member.method == DEFLATED:
        decompressor = zlib.decompressobj(-15)
    elif member.method == BZIP2:
        decompressor = bz2.BZ2Decompressor()
    elif member.method == LZMA:
        decompressor, skip = _lzma_decompressor(data, member)
        data = data[skip:]
    else:
        raise FormatError(f"unsupported compression method {member.method}", member=member.name)
    size = member.size
    # One buffer of the declared size (already checked against the budget), filled step by
    # step: a stream that holds more than it declares is caught one step past the size,
    # and the output is never copied or grown.
    out = bytearray(size)
    filled = fed = 0
    pending: bytes | memoryview = b""
    is_zlib = member.method == DEFLATED
    while not decompressor.eof:
        if is_zlib or getattr(decompressor, "needs_input", True):
            if not pending and fed < len(data):
                pending = data[fed : fed + _STEP]
                fed += len(pending)
            feed, pending = pending, b""
        else:
            feed = b""
        chunk = decompressor.decompress(feed, min(_STEP, size + 1 - filled))
        if is_zlib:
            pending = decompressor.unconsumed_tail  # type: ignore[union-attr]
        if filled + len(chunk) > size:
            raise FormatError(
                f"member inflates past its declared {size} bytes (zip bomb)", member=member.name
            )
        out[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
        if not chunk and not feed and not pending and fed >= len(data):
            break  # no input left and nothing more comes out
    if not decompressor.eof and not (member.method == LZMA and filled == size):
        raise FormatError("compressed stream is truncated", member=member.name)
    if decompressor.unused_data or pending or fed < len(data):
        raise FormatError("bytes after the end of the compressed stream", member=member.name)
    del out[filled:]
    return out
