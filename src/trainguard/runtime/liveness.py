"""Liveness: step times, hangs (with every thread's stack), and who sent a signal.

Knowing who sent SIGTERM needs the sender's pid, which Linux gives only to
``sigwaitinfo``; that works only if every thread blocks the signal, so
:func:`protect_signals` must run before any thread starts (first thing in ``main``, or
through ``trainguard.runtime``'s import in a launcher). It starts one thread that
receives the terminating signals, tells the guards that listen, and then lets each
signal do what it would have done without trainguard: the Python handler in force (run
in the main thread), nothing for SIG_IGN, or the default action (the process ends).
When it did not run, the guard still records the signal, with the sender unknown.
SIGKILL cannot be observed by its victim; the surviving ranks notice the dead peer
instead.

SIGSTOP cannot be caught either, but the SIGCONT that ends the pause can: the kernel
continues a stopped process when SIGCONT is sent, blocked or not, and the blocked signal
then waits for the receiving thread with its sender. Its default action is only that
continuing, already done: it is never sent again, and runs a Python handler only where
the job installed one.
"""

from __future__ import annotations

import _thread
import atexit
import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
#: what the receiving thread takes: the terminating signals, and SIGCONT (a stopped rank)
WATCHED = (*TERMINATING, signal.SIGCONT)

#: what a signal does once recorded: the handler in force, nothing, the default action,
#: or (SIGCONT without a handler) nothing more: the process was continued when it was sent
Action = Literal["handler", "ignored", "default", "continued"]

# A signal simulated with ``interrupt_main`` runs its handler only when the main thread
# next executes bytecode; a real one also cuts short a blocking call (``time.sleep``, a
# lock, a queue) with EINTR. This real-time signal, aimed at the main thread with a
# no-op handler, does that cutting short. Nothing else uses it unless a job does, and
# then it is left alone.
_NUDGE = signal.SIGRTMAX - 2

_protected = False
_receiver: threading.Thread | None = None
_listeners: list[SignalWatch] = []
#: sender (pid, uid) of a signal the receiving thread passes to a main-thread handler
_senders: dict[int, tuple[int, int]] = {}
_listeners_lock = threading.Lock()


def protect_signals() -> None:
    """Block the terminating signals in this thread (threads started later inherit it) and
    start the thread that receives them with their sender.

    Call it before the process starts threads (before ``init_process_group``); the
    guard then learns each signal's sender. Idempotent; a no-op outside the main thread.
    """
    global _protected, _receiver
    if _protected or threading.current_thread() is not threading.main_thread():
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, set(WATCHED))
    _protected = True
    if signal.getsignal(_NUDGE) in (signal.SIG_DFL, None):
        signal.signal(_NUDGE, _nudged)
    _receiver = threading.Thread(target=_receive, name="trainguard-signals", daemon=True)
    _receiver.start()
    # daemon threads stop running when the interpreter finalises: from then on the
    # main thread must receive the signals itself, or a SIGTERM at exit would be lost
    atexit.register(signal.pthread_sigmask, signal.SIG_UNBLOCK, set(WATCHED))


def _nudged(signum: int, frame: Any) -> None:
    """The nudge only interrupts a blocking call; the signal's own handler does the rest."""


def _unprotect_in_child() -> None:
    # a fork copies only the forking thread: the child (a DataLoader worker) has no
    # receiver and must take its signals directly, or it could not be stopped
    global _protected
    if _protected:
        _protected = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(WATCHED))


os.register_at_fork(after_in_child=_unprotect_in_child)


def _receive() -> None:
    while True:
        info = signal.sigwaitinfo(set(WATCHED))
        _deliver(info.si_signo, info.si_pid, info.si_uid)


def _action(handler: Any, signum: int) -> Action:
    if signum == signal.SIGCONT:
        # continued by the kernel at sending time; the default action is nothing more,
        # and must never be re-sent (a handler set outside Python is not ours to run)
        return "handler" if callable(handler) else "continued"
    if handler == signal.SIG_IGN:
        return "ignored"
    if callable(handler):
        return "handler"
    return "default"  # SIG_DFL, or None: a handler set outside Python, which we cannot run


def _deliver(signum: int, pid: int, uid: int) -> None:
    """Tell the listeners, then act as the signal would have without trainguard."""
    handler = signal.getsignal(signum)
    action = _action(handler, signum)
    if isinstance(getattr(handler, "__self__", None), SignalWatch):
        _senders[signum] = (pid, uid)  # a watch's own handler reports it, with the sender
    with _listeners_lock:
        listeners = list(_listeners)
    event = _event(signum, pid, uid, action)
    for watch in listeners:
        watch.report(event)
    if action == "handler":
        # runs the handler in force now (the job's, or SIGINT's KeyboardInterrupt) in the
        # main thread, as a real delivery would
        _thread.interrupt_main(signal.Signals(signum))
        main = threading.main_thread().ident
        if main is not None and signal.getsignal(_NUDGE) is _nudged:
            with contextlib.suppress(OSError, ProcessLookupError):
                signal.pthread_kill(main, _NUDGE)
    elif action == "default":
        # unblocked in this thread only and sent to it: the default action ends the
        # process (signal.signal, which would reset the disposition, is main-thread only)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.pthread_kill(threading.get_ident(), signum)
        # still here: the job installed a handler in the meantime, which has now run
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})


def _event(signum: int, pid: int | None, uid: int | None, action: Action) -> dict[str, Any]:
    return {
        "signal": signal.Signals(signum).name,
        "sender_pid": pid,
        "sender_uid": uid,
        "sender": _describe(pid) if pid else "unknown (signals were not protected early)",
        "action": action,
    }


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "(exited)"


def _all_threads_block(signum: int) -> bool:
    bit = 1 << (signum - 1)
    # the receiving thread shows it unblocked while it waits in sigwaitinfo
    receiving = str(_receiver.native_id) if _receiver is not None else None
    try:
        for task in os.listdir("/proc/self/task"):
            if task == receiving:
                continue
            with open(f"/proc/self/task/{task}/status") as f:
                for line in f:
                    if line.startswith("SigBlk:") and not int(line.split()[1], 16) & bit:
                        return False
    except OSError:
        return False
    return True


SignalCallback = Callable[[dict[str, Any]], None]

#: how long reporting a signal may hold it up (writing the ledger, closing the run)
REPORT_TIMEOUT = 10.0


class SignalWatch:
    """Reports each terminating signal, and SIGCONT, to ``callback``, with its sender
    where the OS tells.

    The event says what the signal does next (``action``): with "default" the process
    ends as soon as the callback returns, so the callback writes what must survive it.
    Without :func:`protect_signals` the watch installs handlers in the main thread that
    report, then pass the signal on to the handler they replaced, or its default action.
    """

    def __init__(self, callback: SignalCallback) -> None:
        self.callback = callback
        # a thread started before protect_signals (OpenMP's, at ``import torch``) may
        # take a signal too; then handlers in the main thread see every signal, and
        # the receiving thread hands them the sender of those it got
        self.with_sender = _protected and all(_all_threads_block(s) for s in WATCHED)
        self._previous: dict[int, Any] = {}
        if self.with_sender:
            with _listeners_lock:
                _listeners.append(self)
        elif threading.current_thread() is threading.main_thread():
            for signum in WATCHED:
                self._previous[signum] = signal.signal(signum, self._handle)

    def report(self, event: dict[str, Any]) -> None:
        try:
            self.callback(event)
        except Exception as exc:  # never let reporting stop the signal
            sys.stderr.write(f"trainguard: could not record {event['signal']}: {exc}\n")

    def _handle(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum)
        action = _action(previous, signum)
        pid, uid = _senders.pop(signum, (None, None))
        # report from another thread: this handler may have interrupted the main thread
        # inside the ledger, whose lock it holds; a wait with a limit cannot deadlock
        reporter = threading.Thread(
            target=self.report, args=(_event(signum, pid, uid, action),), daemon=True
        )
        reporter.start()
        reporter.join(REPORT_TIMEOUT)
        if callable(previous):
            previous(signum, frame)
        elif action == "default":
            signal.signal(signum, signal.SIG_DFL)
            # blocked here when protect_signals ran while other threads already existed
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            signal.raise_signal(signum)

    def close(self) -> None:
        """Stop reporting; put back the handlers this watch replaced, where still its own."""
        with _listeners_lock:
            if self in _listeners:
                _listeners.remove(self)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle and previous is not None:
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signum, previous)
        self._previous.clear()


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
        #: called with (where, error) when reporting a hang fails
        self.on_fault: Callable[[str, BaseException], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainguard-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()
        self.reported = False

    def idle(self) -> float:
        """Seconds since the last step finished (a stopped process's clock runs on)."""
        return time.monotonic() - self.last

    def _run(self) -> None:
        period = max(0.05, min(1.0, self.timeout / 4))
        while not self._stop.wait(period):
            idle = time.monotonic() - self.last
            if idle >= self.timeout and not self.reported:
                self.reported = True
                try:
                    self.on_hang(idle, thread_stacks())
                except Exception as exc:
                    if self.on_fault is not None:
                        self.on_fault("the hang watchdog", exc)
                    else:
                        sys.stderr.write(f"trainguard: hang report failed: {exc}\n")

    def stop(self, wait: float = 2.0) -> None:
        """Stop the watchdog thread, waiting up to ``wait`` seconds for it to end."""
        self._stop.set()
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(wait)


def pid_alive(pid: int) -> bool:
    """True if the process runs; a zombie (dead, not yet reaped by its launcher) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
