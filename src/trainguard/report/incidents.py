"""Alerts grouped into incidents, and who the ledger can name for each.

The grouping rule: alerts are taken in step order (then ledger order); an alert joins
the current incident when its step is at most one check interval after that incident's
last alert (``every`` steps, from ``run.started``; 1 when unknown), whatever its rank or
detector; otherwise it opens a new incident. One attack is typically seen by several
detectors over a few checks (a rank's own sensor, then the cross-rank comparison, then
the gradients and the loss drifting apart): that burst is one incident, and a detector
firing again much later is a new one. A check record whose comparison found a deviation
(severity above 0) at a step with no alert in the ledger is an incident of its own
(detector ``check``).

An incident names a rank only when its alerts do (a detector names a rank only when the
evidence proves it); otherwise "cannot tell". The actors are what the ledger records:
the processes that wrote the alert entries (user, uid, host, pid, rank and the command
line of that process when it recorded one), and the sender of a signal as the receiving
rank saw it (pid, uid, command line). Nothing else is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import Severity
from trainguard.report.model import AlertRecord, RunModel, Writer

#: detail values longer than this are cut in the text report (whole in JSON)
VALUE_CHARS = 200
#: alerts of one incident listed in the text report (all of them in JSON)
TEXT_ALERTS = 8


@dataclass
class Incident:
    number: int
    detector: str
    severity: str
    first_step: int | None
    last_step: int | None
    first_time: str
    first_seq: int
    message: str
    alerts: list[AlertRecord] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        """The ranks the alerts name (proven by their detectors), in order."""
        return sorted({a.rank for a in self.alerts if a.rank is not None})

    @property
    def unnamed(self) -> bool:
        return any(a.rank is None for a in self.alerts)

    def rank_text(self) -> str:
        ranks = self.ranks
        if not ranks:
            return "cannot tell"
        named = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))
        return named + (" (some alerts cannot tell)" if self.unnamed else "")

    def writers(self) -> list[Writer]:
        seen: dict[Writer, None] = {}
        for alert in self.alerts:
            seen.setdefault(alert.writer, None)
        return list(seen)

    def senders(self) -> list[dict[str, Any]]:
        """Signal senders as recorded: pid, uid, command line (``sender``)."""
        out: list[dict[str, Any]] = []
        for alert in self.alerts:
            d = alert.details
            if "sender_pid" in d or "sender" in d:
                item = {
                    "signal": d.get("signal"),
                    "pid": d.get("sender_pid"),
                    "uid": d.get("sender_uid"),
                    "command": d.get("sender"),
                    "to_rank": alert.rank,
                }
                if item not in out:
                    out.append(item)
        return out

    @property
    def detectors(self) -> list[str]:
        return list(dict.fromkeys(a.detector for a in self.alerts)) or [self.detector]

    def values(self) -> dict[str, Any]:
        """The first alert's details (the values the detector saw)."""
        return dict(self.alerts[0].details) if self.alerts else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "detector": self.detector,
            "detectors": self.detectors,
            "severity": self.severity,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "first_time": self.first_time,
            "first_seq": self.first_seq,
            # the one rank its alerts name (others may say they cannot tell: "unnamed")
            "rank": self.ranks[0] if len(self.ranks) == 1 else None,
            "unnamed_alerts": sum(a.rank is None for a in self.alerts),
            "ranks": self.ranks,
            "rank_text": self.rank_text(),
            "message": self.message,
            "alerts": len(self.alerts),
            "alert_entries": [
                {
                    "seq": a.seq,
                    "time": a.time,
                    "step": a.step,
                    "rank": a.rank,
                    "detector": a.detector,
                    "severity": a.severity,
                    "message": a.message,
                    "details": a.details,
                }
                for a in self.alerts
            ],
            "values": self.values(),
            "written_by": [w.to_dict() for w in self.writers()],
            "signal_senders": self.senders(),
        }


def _severity(name: str) -> int:
    try:
        return int(Severity[name])
    except KeyError:
        return 0


def group(model: RunModel) -> list[Incident]:
    """The run's incidents, by the rule in the module docstring, ordered by first step."""
    every = max(1, model.every or 1)
    order = sorted(model.alerts, key=lambda a: (a.step if a.step is not None else 1 << 62, a.seq))
    incidents: list[Incident] = []
    current: Incident | None = None
    for alert in order:
        near = (
            current is not None
            and alert.step is not None
            and current.last_step is not None
            and alert.step <= current.last_step + every
        )
        if current is None or not near:
            current = Incident(
                0,
                alert.detector,
                alert.severity,
                alert.step,
                alert.step,
                alert.time,
                alert.seq,
                alert.message,
            )
            incidents.append(current)
        current.alerts.append(alert)
        if alert.step is not None:
            current.last_step = max(current.last_step or alert.step, alert.step)
        if _severity(alert.severity) > _severity(current.severity):
            current.severity = alert.severity
        if alert.seq < current.first_seq:
            current.first_seq, current.first_time = alert.seq, alert.time
    alerted = {a.step for a in model.alerts}
    for check in model.checks:
        if check.severity > 0 and check.step not in alerted:
            name = next((s.name for s in Severity if int(s) == check.severity), "?")
            incidents.append(
                Incident(
                    0,
                    "check",
                    name,
                    check.step,
                    check.step,
                    check.time,
                    check.seq,
                    "the check's comparison found a deviation and no alert was recorded",
                )
            )
    incidents.sort(
        key=lambda i: (i.first_step if i.first_step is not None else 1 << 62, i.first_seq)
    )
    for number, incident in enumerate(incidents, 1):
        incident.number = number
    return incidents


def shown(value: Any) -> str:
    """A detail value for the text report: short, one line."""
    if isinstance(value, dict) and len(repr(value)) > VALUE_CHARS:
        return f"({len(value)} items, whole in the ledger)"
    text = " ".join(str(value).split())
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."
