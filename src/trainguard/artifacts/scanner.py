"""Scanning: find the files, recognise each by its bytes, hand it to its format handler.

Files are memory-mapped, so a handler that reads only headers and pickle members costs
the same for a 1 GB checkpoint as for a 1 MB one. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from trainguard.artifacts.formats import HEAD_SIZE, identify
from trainguard.artifacts.formats.archives import ZipFormat, has_trailing_zip
from trainguard.artifacts.interface import Analysis, FileReport, FormatError, ScanReport
from trainguard.errors import InputError, Severity

#: Called after each file is scanned, with the number done and the number of files.
Progress = Callable[[int, int], None]

STDIN = "-"


def analyse_buffer(buf: memoryview) -> Analysis:
    """Recognise and analyse one file's bytes. Never raises for bad content."""
    head = bytes(buf[:HEAD_SIZE])
    handler = identify(head, len(buf))
    if handler is None:
        if len(buf) == 0:
            analysis = Analysis("empty", supported=False)
            analysis.add(Severity.INFO, "format", "empty file")
            return analysis
        if has_trailing_zip(buf):
            handler = ZipFormat()
        else:
            analysis = Analysis("unknown", supported=False)
            analysis.add(Severity.INFO, "format", "unrecognised format")
            return analysis
    analysis = Analysis(handler.name)
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
    try:
        step(buf, analysis)
    except FormatError as exc:
        analysis.fail(exc)
    except RecursionError:
        analysis.fail(FormatError("structure nested too deeply to analyse"))
    except MemoryError:
        analysis.fail(FormatError("too large to analyse in memory"))


def report_for(path: str, buf: memoryview) -> FileReport:
    analysis = analyse_buffer(buf)
    findings = sorted(analysis.findings, key=lambda f: (-f.severity, f.member or "", f.offset or 0))
    return FileReport(path, analysis.format, analysis.verdict, tuple(findings), len(buf))


@contextmanager
def mapped(path: str | os.PathLike[str]) -> Iterator[memoryview]:
    """The file's bytes, memory-mapped read-only. Raises InputError if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror.lower() if exc.strerror else exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file")
        if info.st_size == 0:
            yield memoryview(b"")
            return
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot map the file: {exc}") from exc
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


def scan_file(path: str | os.PathLike[str]) -> FileReport:
    with mapped(path) as buf:
        return report_for(os.fspath(path), buf)


def scan_bytes(data: bytes, name: str = STDIN) -> FileReport:
    return report_for(name, memoryview(data))


def collect(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """Expand folders recursively (following links, each folder once); missing paths are errors."""
    files: list[str] = []
    errors: list[str] = []
    seen: set[tuple[int, int]] = set()
    for raw in paths:
        path = os.fspath(raw)
        if path == STDIN:
            files.append(STDIN)
            continue
        try:
            info = os.stat(path)
        except OSError as exc:
            kind = "broken symbolic link" if os.path.islink(path) else exc.strerror or str(exc)
            errors.append(f"{path}: {kind.lower()}")
            continue
        if not stat.S_ISDIR(info.st_mode):
            files.append(path)
            continue
        for root, dirs, names in os.walk(path, followlinks=True, onerror=None):
            try:
                here = os.stat(root)
            except OSError:
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
    paths: Sequence[str | os.PathLike[str]], *, progress: Progress | None = None
) -> ScanReport:
    """Scan files and folders; unreadable paths are listed in ``errors``, not raised."""
    files, errors = collect(paths)
    reports: list[FileReport] = []
    for done, path in enumerate(files, 1):
        try:
            if path == STDIN:
                reports.append(scan_bytes(sys.stdin.buffer.read()))
            else:
                reports.append(scan_file(path))
        except InputError as exc:
            errors.append(str(exc))
        if progress is not None:
            progress(done, len(files))
    return ScanReport(tuple(reports), tuple(errors))
