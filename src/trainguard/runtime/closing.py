"""How a Guard ends: closing entries, the alerts file, peers that are gone.

A run ends cleanly when every rank wrote its closing entry (``rank.closed``) and rank 0
then closed the run (``run.closed``, which deletes the run key). A healthy end waits for
the peers in a barrier; an end by a signal, Ctrl-C or a crash waits at most a few seconds
for the peers' closing entries in the ledger instead (they may never reach a collective
again), and leaves the run open — which ``ledger verify`` reports — rather than hang.
A peer on this host whose process is gone without its closing entry is an alert.

Closing always finishes: every step that can run does (sensors stopped, hooks removed,
signal handlers restored, the ledger closed), whatever happened to the run folder (deleted,
read-only, full). What could not be done is logged, one warning line each, and kept in
``guard.close_problems``; nothing is raised for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from trainguard.errors import Severity
from trainguard.runtime import ledger_tail
from trainguard.runtime.interface import Alert, GuardHalt
from trainguard.runtime.liveness import pid_alive

if TYPE_CHECKING:
    from collections.abc import Callable

    from trainguard.runtime.guard import Guard

_log = logging.getLogger("trainguard.runtime")


def close(guard: Guard, error: BaseException | None = None) -> None:
    """Write the closing entries (this rank's; rank 0 the run's) and the alerts file;
    stop the sensors. Works on a Guard whose start was interrupted."""
    with guard._close_lock:
        if guard._closed:
            return
        guard._closed = True
    if error is None:
        error = sys.exc_info()[1]  # closed from a `finally` while an error propagates

    def attempt(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:
            problem(guard, what, exc)

    if getattr(guard, "_gathering", None) is not None:
        if error is None or isinstance(error, GuardHalt):
            attempt("comparing the last check", lambda: _finish_check(guard))
        else:
            guard._gathering = None  # the peers may never complete it: not waited for
    if getattr(guard, "_pending", None) is not None:
        attempt("reading the last steps", guard._drain)  # the steps since the last check
    if getattr(guard, "_metrics", None) is not None:
        attempt("writing the per-step metrics file", guard._write_metrics)
        attempt("closing the per-step metrics file", guard._metrics.close)
    if guard.ledger is not None:
        # after a failed collective a peer may still be dying (its sockets closed before
        # its process is gone): looked for a moment longer, never in a healthy close
        wait = _PEER_WAIT_S if getattr(getattr(guard, "comm", None), "failed", False) else 0.0
        attempt("looking for peers that are gone", lambda: report_gone_peers(guard, wait))
        watch = getattr(guard, "ledger_watch", None)
        if watch is not None:
            attempt("checking the ledger", watch.at_check)
    # a Guard stopped during its start (Ctrl-C, a failure) has only some of its parts
    parts = (
        ("watchdog", "stop"),
        ("audit", "close"),
        ("comm", "close"),
        ("seeds", "restore"),
        ("provenance", "close"),
    )
    for name, stop in parts:
        part = getattr(guard, name, None)
        if part is not None:
            attempt(f"stopping the {name} sensor", getattr(part, stop))
    for detector in getattr(guard, "detectors", ()):
        attempt(f"stopping the {detector.name} detector", detector.close)
    for handle in getattr(guard, "_hook_handles", ()):
        attempt("removing the optimizer hooks", handle.remove)
    if error is not None and not isinstance(error, GuardHalt):
        attempt("recording the failure", lambda: report_failure(guard, error))
    attempt("writing the alerts file", lambda: write_alerts_file(guard))
    healthy = error is None or isinstance(error, GuardHalt)
    if guard.ledger is None:
        attempt("restoring the signal handlers", guard.signals.close)
        return
    if getattr(getattr(guard, "ledger_watch", None), "lost", False):
        problem(guard, "writing the closing entries", "the run's ledger is gone (see the alert)")
    tail = getattr(guard, "_tail", None)
    if tail is not None:
        attempt("writing the ledger's tail records", tail.flush)
        attempt("reporting a cut in the ledger", lambda: tail.report_cut(guard))
    payload = closing_payload(guard, error)
    append_once(guard, "rank", "rank.closed", _rank_payload(guard, payload))
    # only now: a launcher's SIGTERM while closing (it stops every rank once one died) runs
    # the handler, which writes this closing entry if it was not written yet, instead of
    # ending the process with no entry at all (a peer then reported the rank as gone)
    attempt("restoring the signal handlers", guard.signals.close)
    ended = False
    try:
        if not healthy:
            # Ctrl-C, the job's own handler exiting, a crash: the peers may be stopping
            # too and never reach a collective again; their entries are enough, and a
            # run whose ranks all ended is closed
            ended = peers_closed(guard)
        else:
            ended = settled_barrier(guard.group, guard.world, healthy=healthy)
    except Exception as exc:
        problem(guard, "waiting for the other ranks' closing entries", exc)
    if ended and guard.rank == 0:
        append_once(guard, "run", "run.closed", payload)
    attempt("closing the ledger", guard.ledger.close)


#: how long closing looks for a dying peer after a failed collective
_PEER_WAIT_S = 1.0


def _finish_check(guard: Guard) -> None:
    """The last check's comparison; a halt it calls for is recorded (``run.halted``), and
    the run closes all the same."""
    with contextlib.suppress(GuardHalt):
        guard._finish_check()


def _rank_payload(guard: Guard, payload: dict[str, Any]) -> dict[str, Any]:
    """A rank's closing entry also says which entries it wrote (ledger_tail.py) and
    what it wrote to its per-step metrics file (metrics_log.py)."""
    mine = ledger_tail.closing_values(guard.ledger)
    out = payload if mine is None else {**payload, "ledger": mine}
    metrics = getattr(guard, "_metrics", None)
    if metrics is not None:
        out = {**out, "metrics": metrics.closing()}
    return out


def problem(guard: Guard, what: str, exc: BaseException | str) -> None:
    """Something closing could not do: one warning line, kept in ``close_problems``."""
    if isinstance(exc, BaseException):
        from trainguard.runtime.reporting import _describe

        reason = _describe(exc)
    else:
        reason = exc
    line = " ".join(f"{what}: {reason}".split())
    guard.close_problems.append(line)
    _log.warning("trainguard: rank %s could not finish closing the run: %s", guard.rank, line)


def close_before_death(guard: Guard) -> None:
    """The signal's default action is about to end the process: write what close()
    would, except that it waits on no collective (the peers are dying too) and leaves
    the sensors alone (the main thread may still be running through them)."""
    try:
        write_alerts_file(guard)
    except Exception as exc:
        problem(guard, "writing the alerts file", exc)
    tail = getattr(guard, "_tail", None)
    if tail is not None:
        tail.flush(timeout=2.0)  # the process ends: what is not written by then is not
    payload = closing_payload(guard, None)
    append_once(guard, "rank", "rank.closed", _rank_payload(guard, payload))
    try:
        ended = guard.rank == 0 and peers_closed(guard)
    except Exception as exc:
        problem(guard, "waiting for the other ranks' closing entries", exc)
        ended = False
    if ended:
        append_once(guard, "run", "run.closed", payload)


def closing_payload(guard: Guard, error: BaseException | None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "steps": guard._step,
        "alerts": len(guard.alerts),
        "error": repr(error)[:300] if error else None,
    }
    if guard._signal is not None:
        sig = guard._signal
        payload["reason"] = (
            f"{sig['signal']} from pid {sig['sender_pid']} (uid {sig['sender_uid']}): "
            f"{sig['sender']}"
        )
    return payload


def append_once(guard: Guard, what: str, kind: str, payload: dict[str, Any]) -> None:
    """This rank's or the run's closing entry, written once whichever thread gets here
    first (the main thread's close(), or the signal thread before the process dies)."""
    with guard._close_lock:
        if what in guard._ending:
            return
        guard._ending.add(what)
    try:
        if kind == "run.closed":
            guard.ledger.close_run(payload)
        else:
            guard.ledger.append(kind, payload, rank=guard.rank)
    except Exception as exc:
        # (closing the run also deletes the run key: the entry may be written and the key
        # left behind in a read-only folder)
        problem(guard, f"writing {kind} to the ledger", exc)


def write_alerts_file(guard: Guard) -> None:
    (guard.run_dir / f"alerts-rank{guard.rank}.json").write_text(
        json.dumps([a.to_dict() for a in guard.alerts], indent=1, default=str)
    )


def peers_closed(guard: Guard, within: float = 3.0) -> bool:
    """Whether, within ``within`` seconds, every other rank wrote its closing entry or
    (on this host) is gone: what a run stopped by a signal waits for instead of a
    collective, so that rank 0 closes the run after the others' entries, never hangs."""
    if guard.world == 1:
        return True
    deadline = time.monotonic() + within
    host = socket.gethostname()
    while True:
        done = closed_peers(guard)
        done.update(
            rank
            for rank, (where, pid) in enumerate(guard._peers)
            if where == host and not pid_alive(pid)
        )
        if done.issuperset(range(guard.world)):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def closed_peers(guard: Guard) -> set[int]:
    """The ranks (this one included) with a closing entry after this rank's start.
    Entries of an earlier session of the same run come before it."""
    me = (socket.gethostname(), os.getpid())
    started: int | None = None
    for entry in guard.ledger.entries("run.started"):
        if (entry.actor.host, entry.actor.pid) == me:
            started = entry.seq
    if started is None:
        return set()
    return {
        entry.actor.rank
        for entry in guard.ledger.entries("rank.closed")
        if entry.seq > started and entry.actor.rank is not None
    }


def report_gone_peers(guard: Guard, wait: float = 0.0) -> None:
    """Alerts for the peers on this host that are gone without their closing entry; a
    rank that wrote it (stopped by the same SIGTERM or Ctrl-C) was not killed unseen.
    ``wait``: seconds to keep looking while no peer is dead yet."""
    host = socket.gethostname()
    local = {r for r, (where, pid) in enumerate(guard._peers) if where == host}
    deadline = time.monotonic() + wait
    while True:
        dead = {r for r in local if not pid_alive(guard._peers[r][1])}
        if dead or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if not dead:
        return
    closed = closed_peers(guard)  # read after: a peer dead above wrote it before dying
    quiet = set(range(len(guard._peers))) - (dead - closed) - guard._gone
    guard._gone |= quiet
    try:
        peers_gone(guard)
    finally:
        guard._gone -= quiet - closed


def report_failure(guard: Guard, error: BaseException) -> None:
    if guard._signal is not None and isinstance(error, (KeyboardInterrupt, SystemExit)):
        return  # the signal's own doing (Ctrl-C, the job's handler exiting): recorded
    if guard.ledger is None:
        sys.stderr.write(f"trainguard: start stopped with {type(error).__name__}\n")
        return
    guard._raise(
        Alert(
            guard.at,
            guard.rank,
            "failure",
            Severity.HIGH,
            f"training stopped with {type(error).__name__}: {error}"[:300],
            {},
        )
    )


def peers_gone(guard: Guard) -> None:
    """Alerts for peer ranks on this host whose process no longer exists (once each)."""
    host = socket.gethostname()
    for rank, (where, pid) in enumerate(guard._peers):
        if rank == guard.rank or where != host or rank in guard._gone or pid_alive(pid):
            continue
        guard._gone.add(rank)
        guard._raise(
            Alert(
                guard.at,
                rank,
                "liveness",
                Severity.CRITICAL,
                f"rank {rank} (pid {pid}) is gone: killed or crashed",
                {"pid": pid},
            )
        )


def settled_barrier(group: Any, world: int, *, healthy: bool) -> bool:
    """Wait for every rank's closing entry; False when a peer is gone (no closing entry
    then: the run did not end cleanly, and ``ledger verify`` says so)."""
    import datetime

    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return True
    if not healthy:
        return False
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=60))
    except RuntimeError:
        return False
    return True
