"""Scanning: find the files, recognise each by its bytes, hand it to its format handler.

Files are memory-mapped, so a handler that reads only headers and pickle members costs
the same for a 1 GB checkpoint as for a 1 MB one. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from trainguard._io import describe_mode, display, reason
from trainguard.artifacts.budget import DEFAULT_MAX_MEMORY, MemoryBudget
from trainguard.artifacts.formats import HEAD_SIZE, identify
from trainguard.artifacts.formats.archives import ZipFormat, has_trailing_zip
from trainguard.artifacts.interface import Analysis, FileReport, FormatError, ScanReport
from trainguard.errors import InputError, Severity

#: Called after each file is scanned, with the number done and the number of files.
Progress = Callable[[int, int], None]

STDIN = "-"

logger = logging.getLogger(__name__)


def analyse_buffer(buf: memoryview, budget: MemoryBudget | None = None) -> Analysis:
    """Recognise and analyse one file's bytes. Never raises for bad content.

    ``budget`` bounds what the analysis allocates (1 GiB when not given).
    """
    budget = budget if budget is not None else MemoryBudget()
    head = bytes(buf[:HEAD_SIZE])
    handler = identify(head, len(buf))
    if handler is None:
        if len(buf) == 0:
            analysis = Analysis("empty", supported=False, budget=budget)
            analysis.add(Severity.INFO, "format", "empty file")
            return analysis
        if has_trailing_zip(buf):
            handler = ZipFormat()
        else:
            analysis = Analysis("unknown", supported=False, budget=budget)
            analysis.add(Severity.INFO, "format", "unrecognised format")
            return analysis
    analysis = Analysis(handler.name, budget=budget)
    _run(handler.analyse, buf, analysis)
    if handler.name == "pickle" and has_trailing_zip(buf):
        analysis.add(
            Severity.MEDIUM,
            "zip",
            "pickle/ZIP polyglot: loaders that look for a ZIP directory see other content",
        )
        _run(ZipFormat().analyse, buf, analysis)
        analysis.format = "pickle"
    return analysis


def _run(step: Callable[[memoryview, Analysis], None], buf: memoryview, analysis: Analysis) -> None:
    # Fail closed: whatever stops an analyser, the file is UNVERIFIABLE with the reason,
    # and the scan of the other files goes on.
    try:
        step(buf, analysis)
    except FormatError as exc:
        analysis.fail(exc)
    except RecursionError:
        analysis.fail(FormatError("structure nested too deeply to analyse"))
    except MemoryError:
        analysis.fail(FormatError("too large to analyse in memory"))
    except Exception as exc:  # an analyser bug must not pass the file, nor stop the scan
        logger.warning("analyser %s failed", analysis.format, exc_info=True)
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        analysis.fail(
            FormatError(f"analysis failed ({type(exc).__name__}{': ' + detail if detail else ''})")
        )


def report_for(path: str, buf: memoryview, budget: MemoryBudget | None = None) -> FileReport:
    analysis = analyse_buffer(buf, budget)
    findings = sorted(analysis.findings, key=lambda f: (-f.severity, f.member or "", f.offset or 0))
    return FileReport(path, analysis.format, analysis.verdict, tuple(findings), len(buf))


def _refuse_special(path: str | os.PathLike[str], info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{display(path)}: is {describe_mode(info.st_mode)}, not a file")


@contextmanager
def mapped(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """The file's bytes, memory-mapped read-only. Raises InputError if unreadable.

    A FIFO, a device or a socket is refused from its ``stat``, before it is opened
    (opening a FIFO waits for a writer; opening some devices has effects).
    """
    try:
        _refuse_special(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{display(path)}: cannot read: {reason(exc)}") from exc
    try:
        info = os.fstat(fd)
        _refuse_special(path, info)  # replaced between the stat and the open
        if info.st_size == 0:
            yield memoryview(b"")
            return
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise InputError(f"{display(path)}: cannot map the file: {exc}") from exc
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()
            # a slice may still be referenced (a traceback); the map then goes with it
            with contextlib.suppress(BufferError):
                mm.close()
    finally:
        os.close(fd)


def scan_file(path: str | os.PathLike[str], *, budget: MemoryBudget | None = None) -> FileReport:
    with mapped(path) as buf:
        return report_for(os.fspath(path), buf, budget)


def scan_bytes(data: bytes, name: str = STDIN, *, budget: MemoryBudget | None = None) -> FileReport:
    return report_for(name, memoryview(data), budget)


def read_stdin(stream: BinaryIO, cap: int) -> bytearray:
    """At most ``cap`` bytes of ``stream`` in one growing buffer (never joined or copied:
    the peak is what was read), or InputError once there is more."""
    data = bytearray()
    while True:
        try:
            chunk = stream.read(min(1 << 20, cap + 1 - len(data)))
        except OSError as exc:
            raise InputError(f"{STDIN}: cannot read: {reason(exc)}") from exc
        if not chunk:
            return data
        if len(data) + len(chunk) > cap:
            raise InputError(
                f"{STDIN}: input is above the {cap}-byte limit the memory budget sets "
                "(--max-memory)"
            )
        data += chunk


def collect(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """Expand folders recursively (following links, each folder once).

    Every path is read or refused: a missing path, a broken link, a folder that cannot be
    listed (at any depth) is an error, never skipped in silence.
    """
    files: list[str] = []
    errors: list[str] = []
    seen: set[tuple[int, int]] = set()

    def unlistable(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else "?"
        errors.append(f"{display(where)}: cannot read folder: {reason(exc)}")

    for raw in paths:
        path = os.fspath(raw)
        if path == STDIN:
            files.append(STDIN)
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            kind = "broken symbolic link" if os.path.islink(path) else reason(exc)
            errors.append(f"{display(path)}: {kind}")
            continue
        if not stat.S_ISDIR(info.st_mode):
            files.append(path)
            continue
        for root, dirs, names in os.walk(path, followlinks=True, onerror=unlistable):
            try:
                here = os.stat(root)
            except OSError as exc:
                errors.append(f"{display(root)}: cannot read folder: {reason(exc)}")
                dirs[:] = []
                continue
            key = (here.st_dev, here.st_ino)
            if key in seen:
                dirs[:] = []  # a link back up the tree: walking on would never end
                continue
            seen.add(key)
            dirs.sort()
            files.extend(str(Path(root) / name) for name in sorted(names))
    return files, errors


def scan_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    progress: Progress | None = None,
    max_memory: int | None = None,
    baseline: int = 0,
) -> ScanReport:
    """Scan files and folders; unreadable paths are listed in ``errors``, not raised.

    ``max_memory`` (bytes, default :data:`DEFAULT_MAX_MEMORY`, 1 GiB) bounds what the
    scan of each file may allocate, and what is read from stdin; ``baseline`` is memory
    already in use that counts against it (the command line passes its own resident set).
    A file that would need more is UNVERIFIABLE.
    """
    limit = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    files, errors = collect(paths)
    reports: list[FileReport] = []
    for done, path in enumerate(files, 1):
        budget = MemoryBudget(limit, baseline=baseline)
        try:
            if path == STDIN:
                # 7/8 of the budget at most: the analysis of what was read needs room too
                data = read_stdin(sys.stdin.buffer, budget.available // 8 * 7)
                budget.reserve(len(data), "standard input")
                reports.append(report_for(STDIN, memoryview(data), budget))
                del data
            else:
                reports.append(scan_file(path, budget=budget))
        except InputError as exc:
            errors.append(str(exc))
        except Exception as exc:  # one bad file never ends the scan of the others
            logger.warning("scanning %s failed", display(path), exc_info=True)
            errors.append(f"{display(path)}: cannot scan: {type(exc).__name__}: {exc}"[:500])
        if progress is not None:
            progress(done, len(files))
    return ScanReport(tuple(reports), tuple(errors))
