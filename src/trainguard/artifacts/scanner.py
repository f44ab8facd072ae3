"""Scanning: find the files, recognise each by its bytes, hand it to its format handler.

Files over 16 MiB are memory-mapped, so a handler that reads only headers and pickle
members costs the same for a 1 GB checkpoint as for a 20 MB one; the map is touched only
in a forked child, because a file cut short under a map kills whoever reads it (SIGBUS).
Smaller files are read. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

from trainguard._io import display, open_regular, reason
from trainguard.artifacts.budget import DEFAULT_MAX_MEMORY, MemoryBudget
from trainguard.artifacts.formats import HEAD_SIZE, identify
from trainguard.artifacts.formats.archives import ZipFormat, has_trailing_zip
from trainguard.artifacts.formats.other import TorchTarFormat
from trainguard.artifacts.formats.pickles import PickleFormat, analyse_stream
from trainguard.artifacts.interface import (
    UNSAFE_AT,
    Analysis,
    FileReport,
    Format,
    FormatError,
    ScanReport,
    Verdict,
)
from trainguard.artifacts.model_files import JOBLIB_UNREAD, is_tar, why_skipped
from trainguard.artifacts.selection import Selection
from trainguard.errors import Finding, InputError, Severity

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
            analysis = Analysis(Format.EMPTY, supported=False, budget=budget)
            analysis.add(Severity.INFO, "format", "empty file")
            return analysis
        if has_trailing_zip(buf):
            handler = ZipFormat()
        elif is_tar(buf):  # a tar without the ustar magic: torch.load reads it all the same
            handler = TorchTarFormat()
        else:
            analysis = Analysis(Format.UNKNOWN, supported=False, budget=budget)
            what = next((w for magic, w in JOBLIB_UNREAD if head.startswith(magic)), None)
            analysis.add(
                Severity.INFO,
                "format",
                f"{what}: joblib.load reads it, this scanner does not"
                if what
                else "unrecognised format",
            )
            return analysis
    analysis = Analysis(handler.name, budget=budget, handler=handler)
    _run(handler.analyse, buf, analysis)
    if handler.name not in (Format.PICKLE, Format.ZIP) and _PICKLE.sniff(head, len(buf)):
        _check_pickle_polyglot(buf, analysis)
    if handler.name is Format.PICKLE and has_trailing_zip(buf):
        analysis.add(
            Severity.MEDIUM,
            "zip",
            "pickle/ZIP polyglot: loaders that look for a ZIP directory see other content",
        )
        _run(ZipFormat().analyse, buf, analysis)
        analysis.format = Format.PICKLE
    return analysis


_PICKLE = PickleFormat()


def _check_pickle_polyglot(buf: memoryview, analysis: Analysis) -> None:
    """A file of another format whose first bytes also run as a pickle.

    ``pickle.load``, and ``torch.load`` on anything that is not a ZIP, start unpickling
    at byte 0 whatever the file is: a safetensors header whose length field reads as
    ``S"`` opens a pickle string that swallows the JSON, and the tensor data then holds
    the payload. Code runs as soon as its opcode is reached, so a finding before the
    stream stops parsing counts; a stream that stops parsing is only the other format.
    """
    side = Analysis(Format.PICKLE, budget=analysis.budget)
    with contextlib.suppress(FormatError, RecursionError, MemoryError):
        analyse_stream(buf, side, member=None)
    unsafe = [f for f in side.findings if f.severity >= UNSAFE_AT and f.detector != "parse"]
    if not unsafe:
        return
    analysis.add(
        max(f.severity for f in unsafe),
        "polyglot",
        f"{analysis.format}/pickle polyglot: pickle.load or torch.load would run the pickle "
        f"that starts at byte 0 ({unsafe[0].message})",
        offset=0,
    )
    for f in unsafe:
        analysis.add(f.severity, f.detector, f"as a pickle: {f.message}", offset=f.offset)


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
    """The scan of one file's bytes: SKIPPED if they are not a model file (see
    :mod:`trainguard.artifacts.model_files`), else the verdict of their analysis."""
    analysis = analyse_buffer(buf, budget)
    skipped = why_skipped(buf, analysis)
    if skipped is not None:
        note = Finding(Severity.INFO, "format", "", f"not a model file: {skipped}")
        return FileReport(path, Format.UNKNOWN, Verdict.SKIPPED, (note,), len(buf))
    findings = sorted(analysis.findings, key=lambda f: (-f.severity, f.member or "", f.offset or 0))
    return FileReport(path, analysis.format, analysis.verdict, tuple(findings), len(buf))


@contextmanager
def _mapping(path: str | os.PathLike[str], fd: int) -> Iterator[memoryview]:
    size = os.fstat(fd).st_size
    if size == 0:
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


def _changed(path: str | os.PathLike[str]) -> InputError:
    return InputError(f"{display(path)}: the file changed while it was scanned; scan it again")


def _snapshot(path: str | os.PathLike[str], fd: int, size: int) -> bytearray:
    """The first ``size`` bytes of the file, read into memory we own."""
    data = bytearray(size)
    view = memoryview(data)
    done = 0
    try:
        while done < size:
            chunk = os.pread(fd, min(1 << 20, size - done), done)
            if not chunk:  # cut short while we read, or a pseudo-file (/sys) that lies
                raise InputError(
                    f"{display(path)}: the file ended at byte {done} of the {size} its size "
                    "says (cut short while it was read?)"
                )
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
    except OSError as exc:
        raise InputError(f"{display(path)}: cannot read: {reason(exc)}") from exc
    finally:
        view.release()
    return data


def _report_from_dict(doc: dict[str, Any]) -> FileReport:
    findings = tuple(
        Finding(
            Severity[f["severity"]],
            f["detector"],
            f["location"],
            f["message"],
            f["member"],
            f["offset"],
        )
        for f in doc["findings"]
    )
    return FileReport(
        doc["path"], Format(doc["format"]), Verdict(doc["verdict"]), findings, doc["size"]
    )


def _scan_mapped_in_child(path: str, fd: int, budget: MemoryBudget) -> FileReport:
    """Analyse the mapped file in a forked child, so a SIGBUS ends the child, not the scan.

    The child sends its report back as JSON (never a pickle) and exits.
    """
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no process to spare: map it here, as platforms without fork do
        os.close(read_end)
        os.close(write_end)
        with _mapping(path, fd) as buf:
            return report_for(path, buf, budget)
    if pid == 0:  # the child: analyse, write the report, leave without cleanup
        status = 3
        try:
            os.close(read_end)
            with _mapping(path, fd) as buf:
                report = report_for(path, buf, budget)
            payload = json.dumps(report.to_dict()).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view) :]
            os.close(write_end)
            status = 0
        except BaseException:
            status = 4
        finally:
            os._exit(status)
    os.close(write_end)
    chunks: list[bytes] = []
    wait_status: int | None = None
    try:
        while chunk := os.read(read_end, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: reaped for us
            _, wait_status = os.waitpid(pid, 0)
    if wait_status is not None and os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        if signum == signal.SIGBUS:
            raise InputError(
                f"{display(path)}: the file was cut short or failed to read while it was "
                "scanned (SIGBUS); scan it again"
            )
        raise InputError(f"{display(path)}: the analysis was killed by signal {signum}")
    try:
        if wait_status is not None and os.WEXITSTATUS(wait_status) != 0:
            raise ValueError("the child failed")
        return _report_from_dict(json.loads(b"".join(chunks)))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{display(path)}: the analysis process failed") from exc


#: Files up to this size are read whole into memory and analysed there; larger ones are
#: memory-mapped (only what the analysis touches is read) in a child process.
SNAPSHOT_MAX = 16 << 20


def scan_file(path: str | os.PathLike[str], *, budget: MemoryBudget | None = None) -> FileReport:
    """Scan one file. Raises InputError if it cannot be read or changed while scanned.

    A file another process cuts short while it is mapped kills the process touching the
    map (SIGBUS), so a large file is mapped only in a forked child; a small one is read.
    """
    budget = budget if budget is not None else MemoryBudget()
    name = os.fspath(path)
    fd = open_regular(path)
    try:
        before = os.fstat(fd)
        size = before.st_size
        if not hasattr(os, "fork"):
            with _mapping(path, fd) as buf:
                report = report_for(name, buf, budget)
        elif size <= SNAPSHOT_MAX and size <= budget.available // 4:
            budget.reserve(size, "the file's bytes")
            data = _snapshot(path, fd, size)
            report = report_for(name, memoryview(data), budget)
            del data
            budget.release(size)
        else:
            report = _scan_mapped_in_child(name, fd, budget)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise _changed(path)
        return report
    finally:
        os.close(fd)


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


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows links, like the paths named on the command line
    except OSError:
        return False  # then it is opened as a file, and refused with the reason


def _leaves(entry: os.DirEntry[str], roots: list[str], errors: list[str]) -> bool:
    """True (and an error listed) for a folder link that leads out of the folders named.

    A link to ``/`` planted in a checkpoint folder would otherwise make the scan walk the
    whole machine (/proc, /sys, every mount) for hours. Its target is refused, not
    skipped: the scan exits 2 and names it, and it can be scanned by its own name.
    """
    if not entry.is_symlink():
        return False
    target = os.path.realpath(entry.path)
    if any(target == root or target.startswith(root.rstrip("/") + "/") for root in roots):
        return False
    errors.append(
        f"{display(entry.path)}: a folder link to {display(target)}, outside the folders "
        "scanned: not followed (scan the target by name)"
    )
    return True


def collect(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[str]]:
    """Expand folders recursively (following links, each folder once): files and errors."""
    files, errors, _ = collect_selected(paths)
    return files, errors


def collect_selected(
    paths: Sequence[str | os.PathLike[str]], selection: Selection | None = None
) -> tuple[list[str], list[str], int]:
    """Expand folders recursively (following links, each folder once): the files, the
    errors, and how many files ``selection`` (--include/--exclude) left out.

    Every path is read or refused: a missing path, a broken link, a folder that cannot be
    listed (at any depth) is an error, never skipped in silence. The selection applies to
    what is found in folders, never to a path named, and an excluded folder is not entered.
    """
    select = selection if selection else None
    files: list[str] = []
    errors: list[str] = []
    excluded = 0
    seen: set[tuple[int, int]] = set()
    roots: list[str] = []  # the named folders, resolved: links may lead anywhere inside

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
        # depth first with our own stack: os.walk recurses, and a folder tree a thousand
        # levels deep would end the scan with RecursionError
        roots.append(os.path.realpath(path))
        base = path.rstrip("/") + "/" if path.rstrip("/") else "/"  # globs match below it
        stack = [path]
        while stack:
            root = stack.pop()
            try:
                here = os.stat(root)
                with os.scandir(root) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
                dirs = [
                    e.path
                    for e in entries
                    if _is_dir(e)
                    and (select is None or select.enters(_relative(e.path, base)))
                    and not _leaves(e, roots, errors)
                ]
            except OSError as exc:
                errors.append(f"{display(root)}: cannot read folder: {reason(exc)}")
                continue
            key = (here.st_dev, here.st_ino)
            if key in seen:
                continue  # a link back up the tree: walking on would never end
            seen.add(key)
            if select is None:
                files.extend(e.path for e in entries if not _is_dir(e))
                stack.extend(reversed(dirs))
                continue
            for e in entries:
                if _is_dir(e):
                    continue
                if select.reads(_relative(e.path, base)):
                    files.append(e.path)
                else:
                    excluded += 1
            stack.extend(reversed(dirs))
    return files, errors, excluded


def _relative(found: str, base: str) -> str:
    """A path found under the folder ``base`` (with its trailing /), relative to it."""
    return found[len(base) :] if found.startswith(base) else os.path.relpath(found, base)


def scan_paths(
    paths: Sequence[str | os.PathLike[str]],
    *,
    progress: Progress | None = None,
    max_memory: int | None = None,
    baseline: int = 0,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> ScanReport:
    """Scan files and folders; unreadable paths are listed in ``errors``, not raised.

    ``max_memory`` (bytes, default :data:`DEFAULT_MAX_MEMORY`, 1 GiB) bounds what the
    scan of each file may allocate, and what is read from stdin; ``baseline`` is memory
    already in use that counts against it (the command line passes its own resident set).
    A file that would need more is UNVERIFIABLE. ``include``/``exclude`` are globs over
    the paths found in folders (see :mod:`trainguard.artifacts.selection`); files that are
    not model files are in the report as SKIPPED.
    """
    limit = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
    files, errors, excluded = collect_selected(paths, Selection(tuple(include), tuple(exclude)))
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
    return ScanReport(tuple(reports), tuple(errors), excluded)
