"""Which files are model files: the rule that lets a folder scan skip text, configs and code.

Content decides, never the name. A file is reported SKIPPED (not a model file) only when
no loader ``scan`` stands in for (``pickle.load``, ``torch.load``, ``numpy.load`` with
``allow_pickle=True``, ``joblib.load``, safetensors) would accept its bytes, nor run
anything from them before it gives up:

- it is empty; or
- no format handler recognises its first bytes, no ZIP directory ends it, no tar header
  ``tarfile`` accepts starts it (those are analysed), and it does not start like a stream
  ``joblib.load`` opens that the scanner does not read (those stay UNSUPPORTED); or
- it starts like a protocol 0/1 pickle (plain text often does: a protocol-0 pickle is
  ASCII), or a compressed stream whose content does, and the opcode stream fails before
  its STOP, at a point where every unpickler fails (an invalid opcode, a stack or MARK
  error, a string that is not quoted, the end of the file), having imported and called
  nothing outside the allowlist. Two opcodes end the stream as surely: a persistent id
  (no loader gives a ``persistent_load`` to the pickle at byte 0, so all of them raise
  there) and an import of a module whose name is not a dotted Python identifier (such
  as the ``onfig: x`` of a YAML line ``config: x``) that the path finder does not find
  either: the import system does not require identifiers (the standard library has
  ``_sysconfigdata__linux_x86_64-linux-gnu``), it looks the name up in each folder.

Where the unpicklers part, the one that goes on decides: the C unpickler reads a number
line as a C string (a NUL ends it: ``I5\0x`` is 5); the pure-Python one (joblib's) reads
a FRAME longer than the file as the rest of it, and a last GLOBAL or INST line without its
newline (it imports, and INST calls, before it finds the end).

A failure that is only the scanner's own limit (a line or memory bound, a number syntax
the simulation reads more strictly than an unpickler) is not a reason to skip: the file
keeps the verdict of its analysis. A stream that starts with PROTO declares a binary
pickle, so one cut short stays UNVERIFIABLE.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import re
import tarfile

from trainguard.artifacts.allowlist import rule_for
from trainguard.artifacts.budget import BudgetExceeded
from trainguard.artifacts.installed import findable
from trainguard.artifacts.interface import (
    COMPRESSED_JOBLIB,
    UNSAFE_AT,
    Analysis,
    Format,
    FormatError,
    Verdict,
)
from trainguard.artifacts.pickle_analysis import PickleAnalyser
from trainguard.artifacts.pickle_ops import OpReader
from trainguard.errors import Finding

#: First bytes of streams ``joblib.load`` opens that the scanner does not analyse: joblib
#: < 0.10's zlib files and lz4 frames. They are UNSUPPORTED, never skipped.
JOBLIB_UNREAD = ((b"ZF", "an old joblib zlib file"), (b"\x04\x22\x4d\x18", "an lz4 frame"))

#: How a parse failure starts when every unpickler fails at the same point.
_CONCLUSIVE = (
    "invalid opcode",
    "stack underflow",
    "no MARK to pop to",
    "unexpected MARK",
    "truncated",
    "STRING argument is not quoted",
    "invalid escape in STRING",
    "invalid utf-8",
    "invalid raw-unicode-escape",
    "memo key",
    "invalid memo index",
    "odd number of items",
    "OBJ without a class",
    "unsupported pickle protocol",
    "negative length",
)
# Not "frame of N bytes runs past the end": the C unpickler fails there, but the
# pure-Python one (joblib's) reads what remains as the frame and runs it.
#: Every integer an unpickler reads (C ``strtol``/``PyLong_FromString`` and Python
#: ``int`` in base 0 or 10, octal ``010`` included, the protocol 0 ``L`` suffix) and every
#: float (``float()``, ``PyOS_string_to_double``, inf and nan) matches these, loosely: a
#: line that does not match fails in all of them.
_INT_SYNTAX = re.compile(
    rb"\s*[+-]?(0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+|[0-9][0-9_]*)[lL]?\s*"
)
_FLOAT_SYNTAX = re.compile(
    rb"\s*[+-]?([0-9_]*\.?[0-9_]*([eE][+-]?[0-9_]*)?|(?i:inf|infinity|nan))\s*"
)
#: Item, append and BUILD opcodes on a literal (str, bytes, number, None): the unpicklers
#: look the method up on a built-in type, which runs no code, and fail.
_ON_CONSTANT = re.compile(r"(APPENDS?|SETITEMS?|ADDITEMS|BUILD) on a constant \(")
#: The opcode walk that looks for where an unpickler must stop reads at most this many.
MAX_WALK = 1_000_000


def is_tar(buf: memoryview) -> bool:
    """True if ``tarfile`` (which torch.load's legacy reader tries first) reads a header at
    byte 0: any block whose checksum holds, with or without the ``ustar`` magic."""
    if len(buf) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(bytes(buf[: tarfile.BLOCKSIZE]), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def why_skipped(buf: memoryview, analysis: Analysis) -> str | None:
    """Why the analysed bytes are not a model file, or None if they are one (or may be)."""
    from trainguard.artifacts.formats.archives import has_trailing_zip

    if not buf:
        return "empty file"
    compressed = analysis.format in COMPRESSED_JOBLIB
    if analysis.format not in (Format.UNKNOWN, Format.PICKLE) and not compressed:
        return None
    if analysis.format is not Format.UNKNOWN and analysis.verdict is Verdict.SAFE:
        return None
    if is_tar(buf) or has_trailing_zip(buf):
        return None
    head = bytes(buf[:8])
    if analysis.format is Format.UNKNOWN:
        if any(head.startswith(magic) for magic, _ in JOBLIB_UNREAD):
            return None
        return "no pickle, PyTorch, NumPy, joblib or safetensors loader reads these bytes"
    if analysis.format is Format.PICKLE and head[:1] != b"\x80":
        why = inert_failure(buf, analysis)
        return None if why is None else f"read as a pickle, {why}"
    if compressed:
        return _compressed(buf, analysis)
    return None


def _compressed(buf: memoryview, analysis: Analysis) -> str | None:
    """A compressed stream (git keeps its objects so) whose content is not a pickle."""
    from trainguard.artifacts.formats.pickles import CompressedPickleFormat, decompress_bounded

    codec = CompressedPickleFormat()._codec(bytes(buf[:16]))
    if codec is None:
        return None
    name, make = codec
    try:
        data = decompress_bounded(buf, make(), name, analysis.budget.available // 2)
    except (FormatError, MemoryError):
        return None  # corrupt or too large: joblib may still unpickle what came before
    if data[:1] == b"\x80":
        return None
    why = inert_failure(memoryview(data), analysis)
    return None if why is None else f"decompressed ({name}) and read as a pickle, {why}"


def inert_failure(buf: memoryview, analysis: Analysis) -> str | None:
    """Where and why every unpickler fails on ``buf`` having run nothing, or None."""
    cut, cut_why = _stop(buf)
    view = buf[:cut] if cut is not None else buf
    side = Analysis(Format.PICKLE, budget=analysis.budget)
    analyser = PickleAnalyser(view, 0, side)
    try:
        analyser.run()
    except BudgetExceeded:
        return None
    except FormatError as exc:
        failure = exc
    except (RecursionError, MemoryError):
        return None
    else:
        return None  # it reaches STOP: a pickle (perhaps followed by other bytes)
    message = str(failure)
    at = failure.offset if failure.offset is not None else 0
    serious = [
        f for f in side.findings if f.severity >= UNSAFE_AT and not _ON_CONSTANT.match(f.message)
    ]
    if serious and not _harmless_memo(view, serious, at):
        return None
    if any(rule_for(g.qualified) is None for g in analyser.globals):
        return None  # the import itself runs the module's code, whatever comes after
    if cut is not None and message.startswith("truncated") and at >= cut - 1:
        return f"every unpickler stops at byte {cut}, at {cut_why}"
    if message.startswith("truncated") and _import_at_end(view):
        return None
    if not (message.startswith(_CONCLUSIVE) or _bad_number(view, message)):
        return None
    if _imports_first(buf, at):
        return None
    return f"every unpickler fails at byte {at} ({message}) before importing or calling anything"


def _harmless_memo(buf: memoryview, findings: list[Finding], failed_at: int) -> bool:
    """True if every finding is a huge memo index that no unpickler allocates for: one
    read (GET: a lookup that fails), or one stored by the opcode the stream fails on (an
    empty stack: the C unpickler checks it before it grows the memo)."""
    if not all(f.message.startswith("memo index ") for f in findings):
        return False
    wanted = {f.offset for f in findings}
    names: dict[int | None, str] = {}
    reader = OpReader(buf, 0)
    with contextlib.suppress(FormatError):
        for count, op in enumerate(reader):
            if op.offset > max(o or 0 for o in wanted) or count >= MAX_WALK:
                break
            if op.offset in wanted:
                names[op.offset] = op.name
    return all(names.get(f.offset, "").endswith("GET") or f.offset == failed_at for f in findings)


def _stop(buf: memoryview) -> tuple[int | None, str]:
    """The first opcode at which every unpickler must stop whatever the stack holds."""
    reader = OpReader(buf, 0)
    with contextlib.suppress(FormatError):
        for count, op in enumerate(reader):
            if count >= MAX_WALK or op.name == "STOP":
                break
            if op.name in ("PERSID", "BINPERSID"):
                return op.offset, "a persistent id (no loader accepts one in the first pickle)"
            if op.name in ("GLOBAL", "INST") and isinstance(op.arg, tuple):
                module = str(op.arg[0])
                if not all(part.isidentifier() for part in module.split(".")) and not findable(
                    module
                ):
                    return op.offset, f"an import of {module[:60]!r} (not a module name)"
    return None, ""


def _bad_number(buf: memoryview, message: str) -> bool:
    """True if an INT/LONG/FLOAT line that failed to parse fails in every unpickler too."""
    if not message.startswith(("invalid integer literal", "invalid float literal")):
        return False
    start = _failing_op(buf)
    if start is None:
        return False
    line = bytes(buf[start + 1 : start + 1 + 4096]).split(b"\n", 1)[0]
    syntax = _INT_SYNTAX if message.startswith("invalid integer") else _FLOAT_SYNTAX
    # The C unpickler parses a copy of the line as a C string (strtol, PyLong_FromString,
    # PyOS_string_to_double): a NUL ends it there, and INT reads an empty one as 0.
    before_nul = line.split(b"\0", 1)[0]
    if b"\0" in line and (not before_nul or syntax.fullmatch(before_nul) is not None):
        return False
    return syntax.fullmatch(line) is None


def _failing_op(buf: memoryview) -> int | None:
    """Where the opcode starts whose argument the reader fails on, if it fails."""
    reader = OpReader(buf, 0)
    start = 0
    try:
        for count, op in enumerate(reader):
            if op.name == "STOP" or count >= MAX_WALK:
                return None
            start = reader.pos
    except FormatError:
        return start
    return None


def _import_at_end(buf: memoryview) -> bool:
    """True if the stream ends in a GLOBAL or INST whose lines the end cuts short, on a
    module the import system may find: the pure-Python unpickler (joblib's) reads a last
    line without its newline (less its last byte), imports the module, and INST calls the
    name, before it finds the end."""
    start = _failing_op(buf)
    if start is None or start >= len(buf) or bytes(buf[start : start + 1]) not in b"ci":
        return False
    line, newline, _ = bytes(buf[start + 1 : start + 1 + 4096]).partition(b"\n")
    try:
        module = (line if newline else line[:-1]).decode("utf-8")
    except UnicodeDecodeError:
        return False  # the unpickler fails on the name before it imports
    mapped = {m for m, _ in _compat_pickle.NAME_MAPPING} | set(_compat_pickle.IMPORT_MAPPING)
    return module in mapped or findable(module)


def _imports_first(buf: memoryview, at: int) -> bool:
    """True if the opcode at ``at`` is an INST the pure-Python unpickler (joblib's) would
    import before it finds the MARK missing."""
    reader = OpReader(buf, 0)
    with contextlib.suppress(FormatError):
        for count, op in enumerate(reader):
            if op.offset > at or count >= MAX_WALK:
                break
            if op.offset == at and op.name == "INST" and isinstance(op.arg, tuple):
                return rule_for(f"{op.arg[0]}.{op.arg[1]}") is None
    return False
