"""In-process sensors: monkeypatches, hooks, re-seeding, and audited operations.

* A watch-list of torch, optimizer, distributed and data-loading functions is
  snapshotted at start (object identity and code); any replacement is reported.
* Hooks the guard did not install (global optimizer hooks, module and gradient
  hooks) are reported when they appear.
* Seeding functions are wrapped: re-seeding after start is an event, and
  ``torch.initial_seed()`` is compared with the declared seed.
* ``sys.addaudithook`` sees code compiled from strings, subprocesses, ``os.system``,
  ``os.kill``, unpickling of globals outside the checkpoint allowlist and writes into
  site-packages. Audit hooks cannot be removed, and can block (policy "halt").

These are sensors, not proofs: code in the process can lie. Each rank's event count
also travels in the cross-rank fingerprint, and every event goes to the ledger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainguard.artifacts.allowlist import rule_for
from trainguard.runtime.patchwatch import PatchWatch as PatchWatch
from trainguard.runtime.patchwatch import resolve as _resolve
from trainguard.runtime.provenance import Attribution, Origin, Provenance

Event = dict[str, Any]
#: what a sensor calls when its own code fails where it runs for the job: (where, error)
FaultCallback = Callable[[str, BaseException], None]

_log = logging.getLogger("trainguard.runtime")


def log_fault(where: str, exc: BaseException) -> None:
    """The fault callback of a sensor no guard listens to: one warning line."""
    _log.warning("trainguard: %s failed: %s", where, type(exc).__name__)


#: threads of the guard's own (the alert hook's): their subprocesses and connections are
#: not sensor events. Only :func:`quiet` adds to it, from the thread itself
_QUIET_THREADS: set[int] = set()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The calling thread is the guard's own (the alert hook's delivery) while inside."""
    ident = threading.get_ident()
    _QUIET_THREADS.add(ident)
    try:
        yield
    finally:
        _QUIET_THREADS.discard(ident)  # thread ids are reused once a thread ends


_SEEDERS = (
    ("torch", "manual_seed"),
    ("torch.random", "manual_seed"),
    ("torch", "seed"),
    ("torch", "set_rng_state"),
    ("torch.random", "set_rng_state"),
    ("torch.random", "seed"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "manual_seed_all"),
    ("torch.cuda", "set_rng_state"),
    ("random", "seed"),
    ("random", "setstate"),
    ("numpy.random", "seed"),
    ("numpy.random", "set_state"),
    ("numpy.random.mtrand", "seed"),
    ("numpy.random.mtrand", "set_state"),
)


class SeedWatch:
    """Wraps the seeding functions so that re-seeding after start is recorded, with the
    code that asked for it (``attribute`` maps the caller's frame to an attribution)."""

    def __init__(
        self,
        record: Callable[[Event], None],
        seed: int | None,
        attribute: Callable[[Any], Any] | None = None,
    ) -> None:
        self.record = record
        self.seed = seed
        self.attribute = attribute
        self.active = True
        self.on_fault: FaultCallback = log_fault
        self._local = threading.local()
        self.originals: list[tuple[Any, str, Any]] = []
        for module_name, name in _SEEDERS:
            try:
                owner = _resolve(module_name)
            except (ImportError, AttributeError):
                continue
            original = getattr(owner, name, None)
            if original is None or getattr(original, "__trainguard_wrapped__", False):
                continue
            self.originals.append((owner, name, original))
            setattr(owner, name, self._wrap(f"{module_name}.{name}", original))

    def _wrap(self, label: str, original: Any) -> Any:
        watch = self

        def seeding(*args: Any, **kwargs: Any) -> Any:
            # only the sensor's part is guarded: the seeding function's own errors are the
            # job's and reach it as they would without the guard
            outermost = not getattr(watch._local, "inside", False)
            if watch.active and outermost:
                try:
                    shown = [_shown(a) for a in args]
                    event: Event = {"event": "reseed", "call": label, "args": shown}
                    if watch.attribute is not None:
                        event["by"] = watch.attribute(sys._getframe(1))
                    watch.record(event)
                except Exception as exc:
                    watch.on_fault("the seed sensor", exc)
            watch._local.inside = True
            try:
                return original(*args, **kwargs)
            finally:
                watch._local.inside = not outermost
                if outermost and watch.seed is not None:
                    try:
                        watch.seed = torch.initial_seed()  # reported; track the new seed
                    except Exception as exc:
                        watch.on_fault("the seed sensor", exc)

        seeding.__trainguard_wrapped__ = True  # type: ignore[attr-defined]
        seeding.__wrapped__ = original  # type: ignore[attr-defined]
        seeding.__name__ = getattr(original, "__name__", label)
        return seeding

    def initial_seed_changed(self) -> str | None:
        """What ``torch.initial_seed()`` says when it is not the seed in force."""
        if self.seed is None:
            return None
        current = torch.initial_seed()
        return (
            None if current == self.seed else f"torch.initial_seed() is {current}, not {self.seed}"
        )

    def restore(self) -> None:
        self.active = False
        for owner, name, original in self.originals:
            setattr(owner, name, original)


def _shown(value: Any) -> str:
    """An argument as the event shows it; one whose repr raises is shown by its type."""
    try:
        return repr(value)[:40]
    except Exception:
        return f"<{type(value).__name__}>"


_SITE_DIRS = tuple(
    p for p in {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")} if p
)
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND
_SPAWNS = ("subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn")
#: files of the process-to-process channel DataLoader workers and torch.multiprocessing
#: hand batches over with: what they unpickle is the job's own data, not a file's
_IPC_FILES = (
    f"{os.sep}multiprocessing{os.sep}connection.py",
    f"{os.sep}multiprocessing{os.sep}queues.py",
    f"{os.sep}multiprocessing{os.sep}reduction.py",
    f"{os.sep}multiprocessing{os.sep}resource_sharer.py",
    f"{os.sep}torch{os.sep}multiprocessing{os.sep}reductions.py",
)
#: standard-library modules whose classes are plain data (argparse.Namespace in a
#: checkpoint, a pathlib path, a datetime): rebuilding one runs no code of note
_DATA_MODULES = frozenset(
    "argparse pathlib datetime enum collections decimal fractions uuid types".split()
)

#: the events _classify looks at; every other one returns at once
_AUDITED = frozenset(
    (
        *_SPAWNS,
        "ctypes.dlopen",
        "ctypes.dlsym",
        "os.kill",
        "os.killpg",
        "compile",
        "exec",
        "pickle.find_class",
        "open",
    )
)
_NEVER_DATA = frozenset("torch builtins os posix subprocess sys".split())


class AuditSensor:
    """A ``sys.addaudithook`` hook; once added it stays for the life of the process,
    so ``close`` only switches it off.

    Each event is attributed (``provenance``) to the code that caused it: the job's own
    code and installed packages are recorded; code of unknown origin is an alert, and is
    blocked under policy "halt". Kills of the process's own children (DataLoader workers
    being shut down) and the job's own inter-process unpickling are not events at all.
    """

    def __init__(
        self,
        record: Callable[[Event], None],
        provenance: Provenance,
        protected: tuple[str, ...] = (),
    ) -> None:
        self.record = record
        self.provenance = provenance
        self.block = False
        self.active = True
        self.on_fault: FaultCallback = log_fault
        self.protected = tuple(p for p in (*_SITE_DIRS, *protected) if p)
        self._local = threading.local()
        self._pid = os.getpid()
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if (
            event not in _AUDITED  # first: every id() and attribute read is an event
            or not self.active
            or getattr(self._local, "busy", False)
            or threading.get_ident() in _QUIET_THREADS
        ):
            return
        self._local.busy = True
        block = False
        try:
            found = self._classify(event, args)
            if found is None:
                return
            detail, by = found
            block = self.block and not by.trusted and event not in ("compile", "exec")
            self.record({"event": event, "detail": detail, "by": by, "blocked": block})
        except Exception as exc:
            # the hook runs inside whatever the job does (every open, every import): its
            # own failure is reported, never raised into the job's operation
            self.on_fault("the audit sensor", exc)
        finally:
            self._local.busy = False
        if block:
            raise PermissionError(f"blocked by trainguard: {event}: {detail}")

    def _caller(self) -> Attribution:
        # frames: this method, _classify, _hook; then the code that raised the event
        return self.provenance.of_stack(sys._getframe(3))

    def _classify(self, event: str, args: tuple[Any, ...]) -> tuple[str, Attribution] | None:
        if event in _SPAWNS:
            return f"{event} {str(args[0])[:120] if args else ''}", self._caller()
        if event in ("ctypes.dlopen", "ctypes.dlsym"):
            # C functions reached directly (libc's system, kill) skip every other event
            name = args[-1] if args else ""
            by = self._caller()
            return None if by.trusted else (f"{event} {str(name)[:80]}", by)
        if event in ("os.kill", "os.killpg") and len(args) > 1:
            # signal 0 only asks whether a process exists; the job's own children (its
            # DataLoader workers, its compilers) are its own to stop
            if not args[1] or _own_child(args[0], self._pid):
                return None
            return f"signal {args[1]} to pid {args[0]}", self._caller()
        if event == "compile" and len(args) > 1 and str(args[1]).startswith("<"):
            source = args[0]
            text = source.decode(errors="replace") if isinstance(source, bytes) else str(source)
            return f"code compiled from a string ({args[1]}): {text[:80]!r}", self._caller()
        if event == "exec" and args:
            name = getattr(args[0], "co_filename", "")
            return (f"exec of code from {name}", self._caller()) if name.startswith("<") else None
        if event == "pickle.find_class" and len(args) > 1:
            return self._unpickled(str(args[0]), str(args[1]))
        if event == "open" and len(args) > 2:
            path, mode, flags = args[0], args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writes and isinstance(path, str) and path.startswith(self.protected):
                return f"write to {path}", self._caller()
        return None

    def _unpickled(self, module: str, name: str) -> tuple[str, Attribution] | None:
        qualified = f"{module}.{name}"
        if rule_for(qualified):
            return None
        frame: types.FrameType | None = sys._getframe(3)
        # the innermost Python frames around the C unpickler: the IPC channel's own files
        # (verified, not merely named so) mean batches handed over by the job's workers
        for _ in range(4):
            if frame is None:
                break
            code = frame.f_code
            if code.co_filename.endswith(_IPC_FILES) and (
                self.provenance.code_origin(code) is Origin.MACHINERY
            ):
                return None
            frame = frame.f_back
        found = sys.modules.get(module)
        if isinstance(getattr(found, name, None), type):
            top = module.split(".")[0]
            origin = self.provenance.file_origin(getattr(found, "__file__", None) or "")
            if top in _DATA_MODULES or (
                origin in (Origin.PACKAGE, Origin.JOB) and top not in _NEVER_DATA
            ):
                # a class of the job's or a package's (a Trainer's arguments, a Namespace)
                return None
        return (
            f"unpickling imports {qualified}",
            Attribution(Origin.UNKNOWN, "the unpickled data (not on the checkpoint allowlist)"),
        )

    def close(self) -> None:
        self.active = False


def _own_child(pid: Any, me: int) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == me
    except (OSError, ValueError, IndexError):
        return False


#: sensors live in the training process only: a forked child (a DataLoader worker) runs
#: the job's own code and must neither report nor block in the parent's name
_ARMED: weakref.WeakSet[Any] = weakref.WeakSet()


def arm(sensor: Any) -> None:
    """Register something with an ``active`` flag to be switched off in forked children."""
    _ARMED.add(sensor)


def _disarm_in_child() -> None:
    # (the terminating signals are unblocked in the child by liveness's own fork handler)
    for sensor in list(_ARMED):
        sensor.active = False


os.register_at_fork(after_in_child=_disarm_in_child)
