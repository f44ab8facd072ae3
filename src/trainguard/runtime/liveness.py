"""Liveness: step times, hangs (with every thread's stack), and who sent a signal.

Knowing who sent SIGTERM needs the sender's pid, which Linux gives only to
``sigwaitinfo``; that works only if every thread blocks the signal, so
:func:`protect_signals` must run before any thread starts (first thing in ``main``, or
through ``trainguard.runtime``'s import in a launcher). When it did not, the guard still
records the signal, with the sender unknown. SIGKILL cannot be observed by its victim;
the surviving ranks notice the dead peer instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

_protected = False


def protect_signals() -> None:
    """Block the terminating signals in this thread, so that threads started later do too.

    Call it before the process starts threads (before ``init_process_group``); the
    guard then learns each signal's sender. Idempotent.
    """
    global _protected
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, set(TERMINATING))
        _protected = True


def _all_threads_block(signum: int) -> bool:
    bit = 1 << (signum - 1)
    try:
        tasks = os.listdir("/proc/self/task")
        for task in tasks:
            with open(f"/proc/self/task/{task}/status") as f:
                for line in f:
                    if line.startswith("SigBlk:") and not int(line.split()[1], 16) & bit:
                        return False
    except OSError:
        return False
    return True


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "(exited)"


SignalCallback = Callable[[dict[str, Any]], None]


class SignalWatch:
    """Reports each terminating signal, with its sender where the OS tells, then lets it act."""

    def __init__(self, callback: SignalCallback) -> None:
        self.callback = callback
        self.with_sender = _protected and all(_all_threads_block(s) for s in TERMINATING)
        self._previous: dict[int, Any] = {}
        if self.with_sender:
            threading.Thread(target=self._wait, name="trainguard-signals", daemon=True).start()
        elif threading.current_thread() is threading.main_thread():
            for signum in TERMINATING:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _report(self, signum: int, pid: int | None, uid: int | None) -> None:
        event = {
            "signal": signal.Signals(signum).name,
            "sender_pid": pid,
            "sender_uid": uid,
            "sender": _describe(pid) if pid else "unknown (signals were not protected early)",
        }
        try:
            self.callback(event)
        except Exception as exc:  # never let reporting stop the signal
            sys.stderr.write(f"trainguard: could not record {event['signal']}: {exc}\n")

    def _wait(self) -> None:
        while True:
            info = signal.sigwaitinfo(set(TERMINATING))
            self._report(info.si_signo, info.si_pid, info.si_uid)
            signal.signal(info.si_signo, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {info.si_signo})
            os.kill(os.getpid(), info.si_signo)

    def _handle(self, signum: int, frame: Any) -> None:
        self._report(signum, None, None)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def thread_stacks() -> dict[str, str]:
    """Every thread's current stack, by thread name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return {
        f"{names.get(ident, 'thread')} ({ident})": "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    }


class Watchdog:
    """Calls ``on_hang(seconds, stacks)`` when no step has finished for ``timeout`` seconds."""

    def __init__(self, timeout: float, on_hang: Callable[[float, dict[str, str]], None]) -> None:
        self.timeout = timeout
        self.on_hang = on_hang
        self.last = time.monotonic()
        self.reported = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainguard-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()
        self.reported = False

    def _run(self) -> None:
        period = max(0.05, min(1.0, self.timeout / 4))
        while not self._stop.wait(period):
            idle = time.monotonic() - self.last
            if idle >= self.timeout and not self.reported:
                self.reported = True
                try:
                    self.on_hang(idle, thread_stacks())
                except Exception as exc:
                    sys.stderr.write(f"trainguard: hang report failed: {exc}\n")

    def stop(self) -> None:
        self._stop.set()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CommTimer:
    """Time each rank spends waiting in DDP's gradient all-reduce, through a comm hook.

    All ranks leave an all-reduce together, so wall step times are equal; the waiting is
    what differs: a slow rank waits little, its peers wait for it. A model that is not
    DDP, or already has a comm hook, reports no waiting.
    """

    def __init__(self, model: Any) -> None:
        self._wait = 0.0
        self._lock = threading.Lock()
        self.active = False
        register = getattr(model, "register_comm_hook", None)
        if register is None:
            return
        try:
            # DDP inspects the hook's annotations; a lambda has none to mislead it
            register(state=None, hook=lambda state, bucket: self._hook(state, bucket))
            self.active = True
        except (RuntimeError, ValueError, TypeError):
            self.active = False

    def _hook(self, state: Any, bucket: Any) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        started = time.perf_counter()
        future = allreduce_hook(state, bucket)

        def finished(fut: Any) -> Any:
            waited = time.perf_counter() - started
            with self._lock:
                self._wait = max(self._wait, waited)
            return fut.value()

        return future.then(finished)

    def take_wait(self) -> float:
        with self._lock:
            waited, self._wait = self._wait, 0.0
        return waited
