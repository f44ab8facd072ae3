"""How the Guard reports: alerts to every sink, sensor events, its own failures, and the
halt that stops every rank together. A mixin of :class:`~trainguard.runtime.guard.Guard`:
the state it reads is the Guard's."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import Severity
from trainguard.runtime import agreement, closing
from trainguard.runtime.interface import Alert, BaseDetector, Detector, GuardHalt
from trainguard.runtime.notify import Notifier
from trainguard.runtime.provenance import Attribution

_log = logging.getLogger("trainguard.runtime")
_RECORD_ONLY = frozenset({"compile", "exec"})


class Reporting:
    """The Guard's reporting; see the module docstring."""

    rank: int
    world: int
    policy: str
    halt_at: Severity
    alerts: list[Alert]
    events: list[dict[str, Any]]
    faults: dict[str, int]
    detectors: list[Detector]
    ledger: Any
    _flags: int
    _pending_severity: int
    _stepped: bool
    _closed: bool
    _recorded: dict[tuple[str, str], int]
    _stream: Path
    _notify: Notifier
    _signal: dict[str, Any] | None
    _close_lock: threading.Lock
    _step: int
    _table: torch.Tensor | None
    _checked_at: int | None = None
    #: the most severe alert computed alike from the rows while comparing them
    _compared_severity: int = 0
    every: int
    #: each Detector method, with the detectors that implement it (see ``_each``)
    _callers: dict[str, list[tuple[Detector, Any]]]

    _done: bool

    @property
    def at(self) -> int:
        """The step an alert is about: once a step's optimizer.step has run, what is seen
        can only affect the next one."""
        if self._checked_at is not None:
            return self._checked_at  # comparing a check's rows after it
        return self._step + 1 if self._done else self._step

    def _event(self, event: dict[str, Any], flag: int) -> None:
        by: Attribution | None = event.pop("by", None)
        event = {"step": self.at, "rank": self.rank, **event}
        if by is not None:
            event["by"] = by.where
            event["origin"] = by.origin.value
        self.events.append(event)
        setup = flag == agreement.RESEEDED and not self._stepped
        if event.get("event") in _RECORD_ONLY or setup or (by is not None and by.trusted):
            # the job's own code, its packages and torch at work: kept, not alerted
            self._record(event)
            return
        self._flags |= flag
        self._raise(
            Alert(
                self.at,
                self.rank,
                f"sensor:{event['event']}",
                Severity.HIGH,
                _event_text(event),
                event,
            )
        )

    def _record(self, event: dict[str, Any]) -> None:
        """A sensor event that is not an alert goes to the ledger once per kind and place
        (a DataLoader re-created every epoch must not flood it); repeats are counted."""
        key = (str(event.get("event")), str(event.get("by") or event.get("detail")))
        seen = self._recorded.get(key, 0)
        self._recorded[key] = seen + 1
        if seen == 0:
            self._write("sensor.event", event)

    def _attributed(self, detector: str, change: str, by: Attribution) -> None:
        """A change seen at a check (a hook, a patch): recorded when trusted code made it."""
        details = {"change": change, "by": by.where, "origin": by.origin.value}
        if by.trusted:
            self._record({"step": self.at, "rank": self.rank, "event": detector, **details})
            return
        self._flags |= agreement.PATCHED
        self._raise(
            Alert(
                self.at, self.rank, detector, Severity.HIGH, f"{change} by {by.describe()}", details
            )
        )

    def _raise(self, alert: Alert) -> None:
        """An alert to every sink. Each sink may fail on its own (a closed stderr, a
        deleted or full run folder, a broken ledger): the others still get the alert,
        the failure is one of the guard's own, and nothing is raised to the caller."""
        self.alerts.append(alert)
        self._hold_for_halt(alert)
        try:
            sys.stderr.write(alert.line() + "\n")
        except Exception as exc:
            self._guard_failed(exc, "writing to stderr", may_halt=False)
        # one line per alert as it happens: a rank that is killed never reaches close()
        try:
            with open(self._stream, "a") as stream:
                stream.write(json.dumps(alert.to_dict(), default=str) + "\n")
        except Exception as exc:
            self._guard_failed(exc, "writing the alerts file", may_halt=False)
        self._write("alert", alert.to_dict())
        try:
            self._notify.send(alert)
        except Exception as exc:
            self._guard_failed(exc, "starting the alert hook", may_halt=False)

    def _write(self, kind: str, payload: dict[str, Any]) -> None:
        """One ledger entry, never stalling the step: when another process holds the
        ledger's write lock the entry is queued (the ledger writes it, with its delay, at
        the next write, a flush or close). A failure to write it is one of the guard's own
        (once closed, only logged: the run's record is complete or close() says what is
        missing)."""
        if self.ledger is None:
            return
        try:
            self.ledger.try_append(kind, payload, rank=self.rank)
        except Exception as exc:
            if self._closed:
                _log.warning("trainguard: cannot write %s to the ledger: %s", kind, _describe(exc))
            else:
                self._guard_failed(exc, "writing the ledger", may_halt=False)

    def _guard_failed(self, exc: BaseException, where: str, *, may_halt: bool = True) -> None:
        """A failure of the guard's own code, never the job's: an alert from detector
        ``guard`` and a ``guard.error`` entry, once per place and kind of error (repeats
        are counted in :attr:`faults`). Under policy "alert" training goes on. Under
        "halt" the run halts with GuardHalt: at once where the guard may raise into the
        loop (``may_halt``: its step and optimizer hooks) in a single process, else at the
        next check, every rank together. Raises nothing else."""
        key = f"{where}: {type(exc).__name__}"
        seen = self.faults.get(key, 0)
        self.faults[key] = seen + 1
        severity = Severity.HIGH
        if self.policy == "halt":
            severity = max(severity, self.halt_at)
        if seen == 0:
            # marked before reporting: a sink that fails while reporting this is counted
            # under its own key once, and reporting ends
            then = "training halts" if self.policy == "halt" else "training continues"
            text = f"the guard failed in {where} ({then}): {_describe(exc)}"
            details = {"where": where, "error": _describe(exc)}
            self._raise(Alert(self.at, self.rank, "guard", severity, text, details))
            if where != "writing the ledger":
                self._write("guard.error", details)
        else:
            self._pending_severity = max(self._pending_severity, int(severity))
        if may_halt and self.policy == "halt" and self.world == 1:
            self._settle()

    def _sensor_failed(self, where: str, exc: BaseException) -> None:
        """What a sensor calls when its own code fails where it runs for the job (a
        wrapper, an audit hook, a thread): reported, never raised."""
        try:
            self._guard_failed(exc, where, may_halt=False)
        except Exception as inner:  # the last resort: one log line
            _log.warning("trainguard: %s failed: %s", where, _describe(inner))

    def _hold_for_halt(self, alert: Alert) -> None:
        """An alert of halt_at severity or more halts every rank at the next settle."""
        if alert.severity >= self.halt_at:
            self._pending_severity = max(self._pending_severity, int(alert.severity))

    def _raise_once(self, alert: Alert) -> None:
        """An alert every rank computes alike from the gathered table: rank 0 reports it
        (one line, one ledger entry per incident); the others keep it for the halt."""
        if self._checked_at is not None:
            self._compared_severity = max(self._compared_severity, int(alert.severity))
        if self.rank == 0:
            self._raise(alert)
            return
        self.alerts.append(alert)
        self._hold_for_halt(alert)

    def _alert_with(self, alert: Alert, flag: int = 0) -> None:
        self._flags |= flag
        self._raise(alert)

    def _each(self, when: str, method: str, *args: Any, may_halt: bool = True) -> None:
        """Call ``method`` of every detector that has one of its own, each on its own: one
        failing is the guard's failure and leaves the others running. The bound methods
        are taken once (a detector's no-op default is skipped, and a method replaced on a
        running detector later is not what runs: see selfcheck.py)."""
        calls = self._callers.get(method)
        if calls is None:
            calls = self._callers[method] = [
                (detector, getattr(detector, method))
                for detector in getattr(self, "detectors", ())
                if getattr(type(detector), method, None) is not getattr(BaseDetector, method)
            ]
        for detector, call in calls:
            try:
                result = call(*args)
                if method == "on_step":
                    for alert in result:
                        self._raise(alert)
            except Exception as exc:  # noqa: PERF203 - each detector on its own
                self._guard_failed(exc, f"the {detector.name} detector {when}", may_halt=may_halt)

    def _on_signal(self, event: dict[str, Any]) -> None:
        """A terminating signal and its sender, from the signal thread. With action
        "default" the process ends as soon as this returns: the run is closed first.

        SIGCONT says another process stopped this rank (SIGSTOP, which nobody can catch)
        and let it go on: a MEDIUM alert naming the rank and the sender. Not HIGH: the
        job's state is intact and training goes on, the harm is the time lost (which the
        straggler and hang checks measure), and a person may stop their own job from a
        terminal (^Z, ``fg``); halting the run on it would add to the time lost. It
        neither closes the run nor changes what a terminating signal does."""
        if event["signal"] == "SIGCONT":
            watchdog = getattr(self, "watchdog", None)
            idle = watchdog.idle() if watchdog is not None else None
            event = {**event, "idle_s": idle}
            text = (
                f"rank {self.rank} was stopped and continued: SIGCONT from pid "
                f"{event['sender_pid']} (uid {event['sender_uid']}): {event['sender']}"
                + (f"; no step finished for {idle:.1f} s" if idle is not None else "")
            )
            if self.ledger is None:
                sys.stderr.write(f"trainguard: {text}\n")
            else:
                self._raise(Alert(self.at, self.rank, "signal", Severity.MEDIUM, text, event))
            return
        if event["action"] != "ignored":
            self._signal = event
        what = {"handler": "its handler runs", "ignored": "ignored", "default": "the process ends"}
        text = (
            f"received {event['signal']} from pid {event['sender_pid']} "
            f"(uid {event['sender_uid']}): {event['sender']}; {what[event['action']]}"
        )
        if self.ledger is None:  # still starting: no run to write to yet
            sys.stderr.write(f"trainguard: rank {self.rank} {text}\n")
        else:
            # a launcher stops the survivors after one rank died: say which one first
            with contextlib.suppress(Exception):
                closing.report_gone_peers(self)  # type: ignore[arg-type]
            severity = self._pending_severity
            self._raise(Alert(self.at, self.rank, "signal", Severity.CRITICAL, text, event))
            # the signal does what the job set it to do; being recorded never halts it
            self._pending_severity = severity
        if event["action"] == "default":
            closing.close_before_death(self)  # type: ignore[arg-type]

    def _on_hang(self, idle: float, stacks: dict[str, str]) -> None:
        self._raise(
            Alert(
                self.at,
                self.rank,
                "hang",
                Severity.HIGH,
                f"no step for {idle:.0f} s; every thread's stack is in the ledger",
                {"idle_s": idle, "stacks": stacks},
            )
        )

    def _settle(self, start: bool = False, checked: bool = False) -> None:
        """Halt every rank together: when a check's rows have been compared (``checked``),
        or at once when there is no peer."""
        if self.policy != "halt":
            return
        table = getattr(self, "_table", None)
        at_check = table is not None and (start or checked)
        severity = self._pending_severity
        if checked and self.world > 1:
            # what every rank knows alike: the rows (each rank's severity at the check) and
            # the alerts computed from them; an alert raised on one rank since the check
            # travels in the next check's row (a rank halting alone would leave its peers
            # waiting in the job's next collective)
            severity = self._compared_severity
        if at_check and table is not None:
            severity = max(severity, max(r[agreement.INDEX["severity"]] for r in table.tolist()))
        elif self.world > 1 and not start:
            return
        if severity >= int(self.halt_at):
            worst = max(
                (a for a in self.alerts if a.severity >= self.halt_at),
                key=lambda a: a.severity,
                default=None,
            )
            if worst is None:
                worst = Alert(
                    self.at,
                    None,
                    "peer",
                    Severity(severity),
                    "another rank raised an alert that halts the run",
                    {},
                )
            self._write("run.halted", worst.to_dict())  # a failure here is counted, not raised
            raise GuardHalt(worst)


def _describe(exc: BaseException) -> str:
    """An exception as one short line, whatever its ``__str__`` or ``__repr__`` does."""
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception:
        text = type(exc).__name__
    return " ".join(text.split())[:300]


def _event_text(event: dict[str, Any]) -> str:
    detail = event.get("detail") or event.get("call") or ""
    args = event.get("args")
    return f"{event['event']}: {detail}{' ' + ', '.join(args) if args else ''}".strip()
