"""Whose code made something happen: the job's, an installed package's, or nobody's we know.

A sensor sees an event (a hook registered, a watched function replaced, a process started,
a re-seed, a global unpickled). Ordinary training code does all of these: DataLoader
workers unpickle batches, frameworks register hooks, jobs seed their workers. What
separates interference from practice is where the code that did it came from:

* ``MACHINERY``: the standard library, torch and trainguard. They act on behalf of whoever
  called them, so attribution looks past them to their caller.
* ``PACKAGE``: a file of an installed distribution (site-packages).
* ``JOB``: the job's own code, as far as it is vouched for: the entry script (its hash is
  in the ledger and agreed across ranks) and the folders or files the job declares
  (``code_roots``, typically the ones sealed in its manifest). A module that merely sits
  next to the job (an insider's file dropped into the repository and imported from a
  ``sitecustomize``) is not vouched for.
* ``UNKNOWN``: code compiled from a string, a file anywhere else (a ``sitecustomize`` on a
  writable path), or a code object whose bytes are not what the file it names compiles to
  (``compile(src, "/site-packages/torch/x.py", "exec")`` claims a file it did not come from).

Attribution is a sensor too: code in the process can lie. The forged-file check makes the
cheap lie (naming a trusted file) fail; the cross-rank fingerprint and the ledger remain the
trust anchors.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger("trainguard.runtime")


def _log_fault(where: str, exc: BaseException) -> None:
    _log.warning("trainguard: %s failed: %s", where, type(exc).__name__)


class Origin(enum.Enum):
    MACHINERY = "machinery"
    PACKAGE = "package"
    JOB = "job"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Attribution:
    """The code an event is attributed to, and where it lives."""

    origin: Origin
    where: str

    @property
    def trusted(self) -> bool:
        return self.origin is not Origin.UNKNOWN

    def describe(self) -> str:
        return f"{self.where} ({self.origin.value} code)"


def _real(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def default_job_roots() -> list[str]:
    """The job's own code without being told: the entry script alone."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return [_real(main)] if main and os.path.isfile(main) else []


class Provenance:
    """Classifies code objects and call stacks; results are cached per code object."""

    def __init__(self, job_roots: Iterable[str | os.PathLike[str]] = ()) -> None:
        import torch

        import trainguard

        paths = sysconfig.get_paths()
        self._sites = sorted(
            {_real(p) for p in (paths.get("purelib"), paths.get("platlib")) if p}
            | {_real(p) for p in sys.path if p and "site-packages" in p}
        )
        # folders the environment's own .pth files add (editable installs) are installed code
        self._editable = sorted(set(_pth_folders(self._sites)) - set(self._sites))
        self._recorded: frozenset[str] | None = None
        self._stdlib = sorted(
            {_real(p) for p in (paths.get("stdlib"), paths.get("platstdlib")) if p}
        )
        # torch as imported and as installed (an overlay of symlinks resolves to the latter)
        self._machinery = sorted(
            {_real(Path(m.__file__ or "").parent) for m in (torch, trainguard)}
            | {os.path.join(site, "torch") for site in self._sites}
        )
        self._sites = sorted({*self._sites, *self._editable})
        roots = [*default_job_roots(), *(os.fspath(r) for r in job_roots)]
        # the environment and trainguard itself are never the job's code, even when the job's
        # folder holds them (a virtualenv inside the repository, an editable install)
        prefixes = [_real(p) for p in (sys.prefix, sys.base_prefix)]
        self._job = sorted(
            r for r in {_real(r) for r in roots} - set(self._sites) if not _under(r, prefixes)
        )
        # by identity (code objects compare equal whatever file they name); the code is kept
        # so that its id is not reused
        self._codes: dict[int, tuple[types.CodeType, Origin]] = {}
        self._thread_start: Any = None
        #: called with (where, error) when the thread-start wrapper's own code fails
        self.on_fault: Callable[[str, BaseException], None] = _log_fault
        self._files: dict[str, dict[tuple[str, int], types.CodeType] | None] = {}
        for root in self._job:
            if os.path.isfile(root):
                self._compiled(root)  # the entry script as it was at start, before any edit

    # --- files and code objects ----------------------------------------------------------

    def file_origin(self, filename: str) -> Origin:
        """Where a file lives (by path only; see :meth:`code_origin` for code objects)."""
        if filename.startswith("<frozen "):
            return Origin.MACHINERY
        if filename.startswith("<") or not filename:
            return Origin.UNKNOWN
        path = _real(filename)
        if _under(path, self._machinery):
            return Origin.MACHINERY
        if _under(path, self._sites):
            # installed code is a file some distribution's RECORD lists: a module an insider
            # dropped into site-packages is in none
            if _under(path, self._editable) or path in self._record_files():
                return Origin.PACKAGE
            return Origin.UNKNOWN
        if _under(path, self._stdlib):
            return Origin.MACHINERY
        if _under(path, self._job):
            return Origin.JOB
        return Origin.UNKNOWN

    def _record_files(self) -> frozenset[str]:
        if self._recorded is None:
            import importlib.metadata

            files: set[str] = set()
            for dist in importlib.metadata.distributions():
                for entry in dist.files or ():
                    if entry.suffix in (".py", ".pyc", ".so"):
                        files.add(_real(dist.locate_file(entry)))  # type: ignore[arg-type]
            self._recorded = frozenset(files)
        return self._recorded

    def _compiled(self, filename: str) -> dict[tuple[str, int], types.CodeType] | None:
        """Every code object the file compiles to, by (name, first line): its bytecode."""
        if filename in self._files:
            return self._files[filename]
        table: dict[tuple[str, int], types.CodeType] | None = None
        try:
            if filename.startswith("<frozen "):
                import _imp

                name = filename[len("<frozen ") : -1]
                top: Any = _imp.get_frozen_object(name)
            else:
                with open(filename, "rb") as f:
                    source = f.read(8 << 20)
                top = compile(source, filename, "exec", dont_inherit=True)
            table = {}
            for code in _walk(top):
                table[(code.co_name, code.co_firstlineno)] = code
        except (OSError, SyntaxError, ValueError, ImportError, TypeError, AttributeError):
            table = None
        self._files[filename] = table
        return table

    def code_origin(self, code: types.CodeType) -> Origin:
        """The origin of one code object; a trusted file name with other bytecode is UNKNOWN."""
        cached = self._codes.get(id(code))
        if cached is not None and cached[0] is code:
            return cached[1]
        origin = self.file_origin(code.co_filename)
        if origin is not Origin.UNKNOWN:
            table = self._compiled(code.co_filename)
            # the whole code object must be what the file compiles to: its bytecode, and
            # its names, constants and arguments (``code.replace`` keeps the bytecode). A
            # file that cannot be read back is not evidence of forgery (a deleted .py with
            # its .pyc, a zip import): the path decides
            if table is not None and table.get((code.co_name, code.co_firstlineno)) != code:
                origin = Origin.UNKNOWN
        self._codes[id(code)] = (code, origin)
        return origin

    # --- callables and stacks -------------------------------------------------------------

    def of_callable(self, obj: Any, _seen: frozenset[int] = frozenset()) -> Attribution:
        """Where a callable's code lives (a hook, a replacement function)."""
        code = code_of(obj)
        if code is None:
            # C functions and partials of them: what runs is known, who arranged it is not
            return Attribution(Origin.UNKNOWN, f"{_name(obj)} (no Python code to attribute)")
        origin = self.code_origin(code)
        where = f"{code.co_filename}:{code.co_firstlineno} in {code.co_name}"
        func = getattr(obj, "__func__", obj)
        if origin is not Origin.UNKNOWN and isinstance(func, types.FunctionType):
            # trusted code can be given foreign parts: a module namespace other than its
            # file's, or a closure holding someone else's function
            module_file = func.__globals__.get("__file__")
            stem = os.path.splitext(_real(code.co_filename))[0]
            if module_file and os.path.splitext(_real(module_file))[0] != stem:
                return Attribution(Origin.UNKNOWN, f"{where} (with another module's globals)")
            for cell in func.__closure__ or ():
                try:
                    held = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(held, types.FunctionType) and id(held) not in _seen | {id(func)}:
                    inner = self.of_callable(held, _seen | {id(func)})
                    if inner.origin is Origin.UNKNOWN:
                        return Attribution(Origin.UNKNOWN, f"{where} wrapping {inner.where}")
        return Attribution(origin, where)

    def of_stack(self, frame: types.FrameType | None) -> Attribution:
        """The innermost frame that is not machinery: the code that asked for what happened.
        A stack of machinery with torch or trainguard in it (a thread torch started) is
        machinery; one of the standard library alone (a ``threading.Timer`` or an ``atexit``
        entry running ``os.system`` itself) hides who arranged it, and is unknown."""
        torch_seen = False
        while frame is not None:
            code = frame.f_code
            origin = self.code_origin(code)
            if origin is not Origin.MACHINERY:
                return Attribution(origin, f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
            torch_seen = torch_seen or _under(_real(code.co_filename), self._machinery)
            frame = frame.f_back
        if torch_seen:
            return Attribution(Origin.MACHINERY, "torch")
        started_by = getattr(threading.current_thread(), "_trainguard_started_by", None)
        if isinstance(started_by, Attribution):
            # Thread(target=subprocess.run, ...): the code that started the thread
            return started_by
        return Attribution(
            Origin.UNKNOWN, "standard-library code only (whoever arranged the call is unknown)"
        )

    def watch_threads(self) -> None:
        """From now on, remember the code that starts each thread, so that a thread running
        only standard-library code is attributed to its starter; :meth:`close` stops."""
        if self._thread_start is not None:
            return
        original = threading.Thread.start
        provenance = self

        def start(thread: threading.Thread) -> None:
            if provenance._thread_start is not None:
                try:
                    thread._trainguard_started_by = provenance.of_stack(  # type: ignore[attr-defined]
                        sys._getframe(1)
                    )
                except Exception as exc:  # the guard's part; the start itself is the job's
                    provenance.on_fault("the thread-start sensor", exc)
            original(thread)

        self._thread_start = (original, start)
        threading.Thread.start = start  # type: ignore[method-assign,assignment]

    def close(self) -> None:
        installed, self._thread_start = self._thread_start, None
        # put the original back unless someone wrapped ours since (then ours goes inert)
        if installed is not None and threading.Thread.start is installed[1]:
            threading.Thread.start = installed[0]  # type: ignore[method-assign]


def _pth_folders(sites: Iterable[str]) -> list[str]:
    folders: list[str] = []
    for site in sites:
        try:
            names = [n for n in os.listdir(site) if n.endswith(".pth")]
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(site, name), errors="replace") as f:
                    lines = f.read(1 << 16).splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import")) and os.path.isdir(line):
                    folders.append(_real(line))
    return folders


def _walk(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _walk(const)


def code_of(obj: Any) -> types.CodeType | None:
    """The Python code a callable runs: through bound methods, partials and callable objects."""
    import functools

    for _ in range(8):
        if isinstance(obj, functools.partial):
            obj = obj.func
            if not isinstance(getattr(obj, "__code__", None), types.CodeType) and not hasattr(
                obj, "__func__"
            ):
                return None  # a partial of a C function: arguments chosen by someone unknown
            continue
        func = getattr(obj, "__func__", obj)
        code = getattr(func, "__code__", None)
        if isinstance(code, types.CodeType):
            return code
        call = vars(type(obj)).get("__call__") if not isinstance(obj, type) else None
        if not isinstance(getattr(call, "__code__", None), types.CodeType):
            return None  # a C function, a class, an object without a Python __call__
        obj = call
    return None


def _name(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj))
