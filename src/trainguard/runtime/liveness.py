"""Liveness: step times, hangs (with every thread's stack), and who sent a signal.

Knowing who sent SIGTERM needs the sender's pid, which Linux gives only to
``sigwaitinfo``; that works only if every thread blocks the signal, so
:func:`protect_signals` must run before any thread starts (first thing in ``main``, or
through ``trainguard.runtime``'s import in a launcher). When it did not, the guard still
records the signal, with the sender unknown. SIGKILL cannot be observed by its victim;
the surviving ranks notice the dead peer instead.
"""

from __future__ import annotations

import contextlib
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


class CommTimer:
    """Time each rank spends waiting in collectives, and the gradients they produce.

    All ranks leave a collective together, so wall step times are equal; the waiting is
    what differs: a slow rank waits little, its peers wait for it. The guard observes
    ``torch.distributed.all_reduce`` (through which the loss is usually averaged and, with
    the stock comm hook it registers when the model has none, DDP's gradient buckets
    go): the time each call takes, and on check steps the sum of the reduced values'
    bit patterns, which must equal the same sum over the gradients the optimizer then
    uses — gradients changed after the all-reduce are local to a rank.
    """

    def __init__(self, model: Any, sample_now: Callable[[], bool] = lambda: False) -> None:
        import torch.distributed as dist

        self._wait = 0.0
        self._lock = threading.Lock()
        self.sample_now = sample_now
        self.in_backward = True  # between a step's start and its optimizer.step
        self._reduced: Any = None
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active:
            return
        register = getattr(model, "register_comm_hook", None)
        if register is not None:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            # the stock hook: DDP's buckets then go through dist.all_reduce, which we
            # observe; a model with a hook of its own raises here and keeps it
            with contextlib.suppress(RuntimeError, ValueError, TypeError):
                register(state=None, hook=allreduce_hook)
        self._original = dist.all_reduce
        dist.all_reduce = self._all_reduce

    def _all_reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        sample = self.in_backward and self.sample_now()
        work = self._original(tensor, *args, **kwargs)
        if work is None:
            self._done(started, tensor if sample else None)
            return work
        work.get_future().then(lambda fut: self._done(started, tensor if sample else None))
        return work

    def _done(self, started: float, reduced: Any) -> None:
        waited = time.perf_counter() - started
        sums = _moments(reduced) if reduced is not None else None
        with self._lock:
            self._wait += waited
            if sums is not None:
                self._reduced = sums if self._reduced is None else self._reduced + sums

    def grads_changed(self, params: list[Any]) -> str | None:
        """On a sampled step: are the gradients about to be used what the all-reduces
        produced, up to one positive factor (clipping, loss-scale unscaling)? Compares
        (sum, sum of absolute values, sum of squares) in float64; one sync."""
        with self._lock:
            reduced, self._reduced = self._reduced, None
        if reduced is None:
            return None
        import torch

        used = torch.zeros(3, dtype=torch.float64, device=reduced.device)
        for p in params:
            if p.grad is not None:
                used += _moments(p.grad).to(used.device)
        (r_sum, r_abs, r_sq), (u_sum, u_abs, u_sq) = reduced.tolist(), used.tolist()
        if r_abs == 0.0:
            return None if u_abs == 0.0 else "gradients appeared after an all-reduce of zeros"
        c = u_abs / r_abs
        tol = 1e-4
        if abs(u_sq - c * c * r_sq) > tol * max(c * c * r_sq, 1e-300):
            return "gradients are not the all-reduced ones (their spread changed)"
        if abs(u_sum - c * r_sum) > tol * c * r_abs:
            return "gradients are not the all-reduced ones (their signs changed)"
        return None

    def take_wait(self) -> float:
        with self._lock:
            waited, self._wait = self._wait, 0.0
        return waited

    def close(self) -> None:
        import torch.distributed as dist

        if self.active and dist.all_reduce is self._all_reduce:
            dist.all_reduce = self._original


def _moments(tensor: Any) -> Any:
    """(sum, sum of absolute values, sum of squares) of a tensor, in float64, on its device."""
    import torch

    flat = tensor.detach().reshape(-1).to(torch.float64)
    return torch.stack([flat.sum(), flat.abs().sum(), flat.square().sum()])
