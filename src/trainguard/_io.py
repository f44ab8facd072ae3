"""Reading and writing the small files trainguard trusts, safely whatever the path is.

Every input a command names (a key, a manifest, a head, a ledger config, stdin) goes
through :func:`read_capped`: a FIFO, a device or a socket is refused before it is read
(so nothing blocks and ``/dev/zero`` is not read forever), and a regular file larger than
the cap for its kind is refused before it is read. Every output goes through
:func:`check_output` before any work is done and is then written with
:func:`write_atomic`: a temporary file in the same folder renamed over the target, which
is only ever done over a regular file (a device node or a FIFO named as output is refused,
never replaced). JSON from a file goes through :func:`parse_json`, which bounds nesting.

This module is a leaf: it imports only :mod:`trainguard.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from trainguard.errors import InputError, UsageError

#: Caps on what trainguard reads whole into memory, by kind of file.
KEY_CAP = 64 * 1024
HEAD_CAP = 1 << 20
CONFIG_CAP = 1 << 20
MANIFEST_CAP = 512 << 20
#: JSON deeper than this is refused (trainguard's own documents nest less than 10 deep).
JSON_DEPTH = 64

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def describe_mode(mode: int) -> str:
    """``"a FIFO"``, ``"a directory"``, ... for a ``st_mode`` that is not a regular file."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def reason(exc: OSError) -> str:
    """An OSError as the short lower-case reason a one-line message ends with."""
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def open_regular(path: str | os.PathLike[str], what: str = "file") -> int:
    """A read-only descriptor on ``path``, refused (InputError) unless it is a regular file.

    A FIFO, a device or a socket is refused from its ``stat``, before it is opened
    (opening a FIFO waits for a writer; opening some devices has effects), and again
    from the descriptor (replaced between the two). Opened non-blocking for the same
    reason; the descriptor is blocking again when returned.
    """

    def refuse_special(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{_name(path)}: {what} is {describe_mode(info.st_mode)}, not a file")

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        refuse_special(os.stat(path))
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputError(f"{_name(path)}: cannot read {what}: {reason(exc)}") from exc
    try:
        refuse_special(os.fstat(fd))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: str | os.PathLike[str], cap: int, what: str = "file") -> bytes:
    """The whole of a regular file no larger than ``cap`` bytes, or InputError."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise InputError(f"{_name(path)}: {what} is {size} bytes, above the {cap}-byte limit")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:  # it grew while we read
                raise InputError(f"{_name(path)}: {what} is above the {cap}-byte limit")
    except OSError as exc:
        raise InputError(f"{_name(path)}: cannot read {what}: {reason(exc)}") from exc
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_text_capped(path: str | os.PathLike[str], cap: int, what: str = "file") -> str:
    data = read_capped(path, cap, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{_name(path)}: {what} is not UTF-8 text (byte {exc.start})") from exc


def read_stream_capped(stream: IO[bytes], cap: int, name: str = "-") -> bytes:
    """At most ``cap`` bytes from a stream (stdin); InputError if there is more."""
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = stream.read(min(1 << 20, cap + 1 - total))
        except OSError as exc:
            raise InputError(f"{name}: cannot read: {reason(exc)}") from exc
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            raise InputError(f"{name}: input is above the {cap}-byte limit")
    return b"".join(chunks)


def parse_json(text: str | bytes, where: str, *, max_depth: int = JSON_DEPTH) -> Any:
    """``json.loads`` with the nesting bounded; InputError naming ``where`` otherwise."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise InputError(f"{where}: JSON nested too deeply") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from exc
    except ValueError as exc:  # an integer of more digits than int() converts
        raise InputError(f"{where}: not valid JSON ({str(exc).split(':')[0].lower()})") from exc
    if _depth_over(value, max_depth):
        raise InputError(f"{where}: JSON nested deeper than {max_depth} levels")
    return value


def _depth_over(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def check_output(
    path: str | os.PathLike[str], *, force: bool = False, what: str = "output"
) -> Path:
    """Refuse an output path before any work is done; the path to write.

    Refused: an existing non-regular file (a device, a FIFO: it would be replaced by a
    regular file), an existing file without ``force``, a name the file system cannot take,
    a folder that cannot be written.
    """
    out = Path(path)
    try:
        info = os.stat(out)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{_name(out)}: file name too long") from exc
        raise UsageError(f"{_name(out)}: cannot use as {what}: {reason(exc)}") from exc
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(
                f"{_name(out)}: is {describe_mode(info.st_mode)}; refusing to replace it"
            )
        if not force:
            raise UsageError(f"{_name(out)}: already exists (use --force to overwrite)")
    try:
        limit = os.pathconf(out.parent if str(out.parent) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(out.name)) > limit:
        raise UsageError(f"{_name(out)}: file name too long ({limit} bytes at most)")
    return out


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (os.write may write less) and fsync it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[str], None] | bytes,
    *,
    mode: int | None = None,
    what: str = "output",
) -> Path:
    """Write through a temporary file in the same folder, renamed over ``path`` when whole.

    ``write`` is the bytes, or a function given the temporary path. The rename happens only
    over a regular file or nothing; the temporary file never outlives a failure.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name[:100]}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"{_name(out)}: cannot write {what}: {reason(exc)}") from exc
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            if isinstance(write, bytes):
                write_all(fd, write)
        finally:
            os.close(fd)
        if not isinstance(write, bytes):
            write(tmp)
        with contextlib.suppress(FileNotFoundError):
            info = os.stat(out)
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(
                    f"{_name(out)}: is {describe_mode(info.st_mode)}; refusing to replace it"
                )
        os.replace(tmp, out)
    except OSError as exc:
        raise UsageError(f"{_name(out)}: cannot write {what}: {reason(exc)}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return out


def _name(path: str | os.PathLike[str]) -> str:
    """A path as printable text, whatever bytes its name holds."""
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        return raw.decode(sys.getfilesystemencoding(), "backslashreplace")
    try:
        data = raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte (from JSON)
        data = raw.encode("utf-8", "backslashreplace")
    return data.decode("utf-8", "backslashreplace")


display = _name
