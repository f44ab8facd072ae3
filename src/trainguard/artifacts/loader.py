"""The safe loader: ``trainguard.load``.

The file is read once into private memory; the static analysis runs on those bytes and,
only if it finds nothing, a restricted unpickler rebuilds the object from the *same*
bytes (no second read of the path, so the file cannot be swapped in between). The
unpickler's ``find_class`` admits only the allowlist, so even a gap in the analysis
could not reach a callable outside it. Tensors are views into the private buffer, as
``torch.load`` reads each record into memory.

Objects of classes outside the allowlist that the analysis accepts as data (see
docs/scan-policy.md) come back as :class:`InertObject` records, their modules never
imported, unless the caller names the classes in ``allow``: then the real classes are
imported and rebuilt.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from typing import Any

from trainguard._io import describe_mode, display, read_stream_capped, reason
from trainguard.artifacts.allowlist import allowing
from trainguard.artifacts.budget import DEFAULT_MAX_MEMORY, MemoryBudget
from trainguard.artifacts.interface import FormatError, NotLoadable, Verdict
from trainguard.artifacts.scanner import analyse_buffer
from trainguard.artifacts.unpickler import InertObject, MapLocation, RestrictedUnpickler
from trainguard.errors import (
    CheckpointError,
    InputError,
    Severity,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UsageError,
)

__all__ = ["InertObject", "RestrictedUnpickler", "load", "load_bytes", "read_private"]


def read_private(path: str | os.PathLike[str], budget: MemoryBudget | None = None) -> bytearray:
    """The whole file, read once into memory we own (a FIFO works too: it is read once).

    Its size is reserved in ``budget`` before anything is allocated; a FIFO is read up to
    what the budget leaves. A device, a socket or a folder is refused from its ``stat``,
    before it is opened.
    """
    budget = budget if budget is not None else MemoryBudget()
    shown = display(path)
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{shown}: is a directory (load takes one file)")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            raise InputError(f"{shown}: is {describe_mode(info.st_mode)}, not a file")
        with open(path, "rb", buffering=0) as f:
            info = os.fstat(f.fileno())
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
                raise InputError(f"{shown}: is {describe_mode(info.st_mode)}, not a file")
            if stat.S_ISFIFO(info.st_mode):
                data = bytearray(read_stream_capped(f, budget.available, shown))
                budget.reserve(len(data), "the file")
                return data
            if info.st_size > budget.available:
                raise CheckpointError(
                    f"{shown}: the file is {info.st_size} bytes, above the {budget.available} "
                    f"bytes the {budget.limit}-byte memory budget leaves (--max-memory)"
                )
            budget.reserve(info.st_size, "the file")
            data = bytearray(info.st_size)
            view = memoryview(data)
            filled = 0
            while filled < len(data):
                n = f.readinto(view[filled:])
                if not n:
                    break
                filled += n
            view.release()
            del data[filled:]
            if f.read(1):  # it grew while we read: what we checked would not be what it is
                raise InputError(f"{shown}: the file changed while it was read")
            return data
    except IsADirectoryError as exc:
        raise InputError(f"{shown}: is a directory (load takes one file)") from exc
    except OSError as exc:
        raise InputError(f"{shown}: cannot read: {reason(exc)}") from exc


def load(
    path: str | os.PathLike[str],
    map_location: MapLocation = None,
    *,
    max_memory: int | None = None,
    allow: Iterable[str] | None = None,
) -> Any:
    """Load a model file without executing code from it. See :func:`trainguard.load`."""
    name = os.fspath(path)
    budget = MemoryBudget(DEFAULT_MAX_MEMORY if max_memory is None else max_memory)
    data = read_private(name, budget)
    return load_bytes(data, display(name), map_location=map_location, budget=budget, allow=allow)


def load_bytes(
    data: bytearray,
    name: str,
    map_location: MapLocation = None,
    *,
    budget: MemoryBudget | None = None,
    allow: Iterable[str] | None = None,
) -> Any:
    """Analyse ``data`` and, if it is safe, rebuild its object from the same bytes.

    ``budget`` (1 GiB when not given) bounds what the analysis and the rebuild allocate
    beyond ``data`` itself. Classes named in ``allow`` (``module.Name``) are trusted:
    imported and rebuilt for real; other classes outside the allowlist that the file
    rebuilds as plain data come back as :class:`InertObject` records.
    """
    try:
        trusted = allowing(allow)
    except ValueError as exc:
        raise UsageError(f"allow: {exc}") from exc
    with trusted:
        return _load_bytes(data, name, map_location, budget)


def _load_bytes(
    data: bytearray, name: str, map_location: MapLocation, budget: MemoryBudget | None
) -> Any:
    budget = budget if budget is not None else MemoryBudget()
    buf = memoryview(data)
    analysis = analyse_buffer(buf, budget)
    verdict = analysis.verdict
    if verdict is Verdict.UNSUPPORTED:
        raise UnsupportedFormatError(f"{name}: {analysis.format} files are not supported")
    if verdict is not Verdict.SAFE:
        refused = [f for f in analysis.findings if f.severity >= Severity.MEDIUM]
        raise UnsafeCheckpointError(name, refused or analysis.findings)
    try:
        if analysis.handler is None:
            raise NotLoadable
        # the handler that recognised the bytes rebuilds them
        return analysis.handler.load(data, analysis, map_location)
    except NotLoadable:
        raise UnsupportedFormatError(
            f"{name}: {analysis.format} files can be scanned but not loaded"
        ) from None
    except (CheckpointError, InputError):
        raise
    except FormatError as exc:
        raise CheckpointError(f"{name}: cannot rebuild the checkpoint: {exc}") from exc
    except MemoryError as exc:
        raise CheckpointError(f"{name}: out of memory while rebuilding the checkpoint") from exc
    except Exception as exc:  # the bytes passed analysis but do not rebuild: fail closed
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{name}: cannot rebuild the checkpoint: {detail}") from exc
