"""A run as its ledger records it: the verified entries read into plain records.

The ledger is verified first (:func:`trainguard.ledger.verify`). Only the entries before
the first damaged one are read: what follows a break in the chain may have been written
or rewritten by anyone, so nothing in the report rests on it. Each record keeps the
entry's ``seq``, its time and its actor (the process that wrote it, as it said).
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.errors import Error
from trainguard.ledger import Actor, Entry, VerifyReport, verify
from trainguard.ledger.chain import parse_time
from trainguard.ledger.verify import read_entries

#: the kind of rank 0's record of one check (fingerprint rows and metrics per rank)
CHECK_KIND = "check"
#: the kind older runs wrote at each check instead (tails only: no rows, no metrics)
TAIL_KIND = "ledger.tail"


class ReportError(Error):
    """The run cannot be reported on (no run folder, no ledger, an unreadable one)."""


@dataclass(frozen=True)
class Writer:
    """The process that wrote an entry, as the ledger names it, with its command line
    when the same process recorded one (``run.started``)."""

    user: str
    uid: int
    host: str
    pid: int
    rank: int | None
    argv: tuple[str, ...] | None = None

    def describe(self) -> str:
        where = f"{self.user} (uid {self.uid}) on {self.host}, pid {self.pid}"
        if self.rank is not None:
            where += f", rank {self.rank}"
        if self.argv:
            where += f": {' '.join(self.argv)}"
        return where

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "uid": self.uid,
            "host": self.host,
            "pid": self.pid,
            "rank": self.rank,
            "argv": list(self.argv) if self.argv is not None else None,
        }


@dataclass(frozen=True)
class AlertRecord:
    seq: int
    time: str
    step: int | None
    rank: int | None
    detector: str
    severity: str
    message: str
    details: dict[str, Any]
    writer: Writer


@dataclass(frozen=True)
class CheckpointRecord:
    """A ``checkpoint.saved`` / ``.loaded`` / ``.refused`` entry."""

    seq: int
    time: str
    action: str  # saved, loaded, refused
    path: str
    step: int | None
    manifest: str | None
    writer: Writer
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckRecord:
    """One check: every rank's fingerprint row and the interval's metrics per rank."""

    seq: int
    time: str
    step: int
    fields: tuple[str, ...]
    rows: tuple[tuple[int, ...], ...]
    severity: int
    metrics: dict[str, list[Any]]
    chains: tuple[str, ...]


@dataclass
class RunModel:
    """What the verified part of a run's ledger says."""

    run_dir: Path
    verification: VerifyReport
    run_id: str | None = None
    owner_key_id: str | None = None
    world: int = 1
    every: int | None = None
    policy: str | None = None
    started: str | None = None
    #: the time the run ended or halted, and how ("halted", "closed", "last entry")
    ended: str | None = None
    end_kind: str = "last entry"
    halted: AlertRecord | None = None
    alerts: list[AlertRecord] = field(default_factory=list)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    checks: list[CheckRecord] = field(default_factory=list)
    #: each rank's closing entry payload, by rank
    closed_ranks: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: ledger.tail entries (runs that predate check records)
    tail_records: int = 0
    #: entries after the first damaged one, not read
    untrusted: int = 0
    trusted_upto: int | None = None

    @property
    def intact(self) -> bool:
        return self.verification.verdict == "intact"


def parse_when(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def read_run(
    run_dir: str | os.PathLike[str],
    *,
    heads: tuple[str, ...] = (),
    owner_public_key: str | None = None,
) -> RunModel:
    """Verify ``run_dir``'s ledger and read its trusted entries into a :class:`RunModel`."""
    folder = Path(run_dir)
    try:
        info = os.stat(folder)
    except FileNotFoundError as exc:
        raise ReportError(f"{folder}: no such run folder") from exc
    except OSError as exc:
        raise ReportError(f"{folder}: cannot read the run folder: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ReportError(f"{folder}: not a run folder")
    verification = verify(folder, heads=heads, owner_public_key=owner_public_key)
    entries, _ = read_entries(folder)
    bad = verification.first_bad_seq
    model = RunModel(folder, verification, run_id=verification.run_id)
    model.owner_key_id = verification.owner_key_id
    trusted = [e for e in entries if bad is None or e.seq < bad]
    model.untrusted = len(entries) - len(trusted)
    model.trusted_upto = trusted[-1].seq if trusted else None
    _read(model, trusted)
    return model


def _read(model: RunModel, entries: list[Entry]) -> None:
    argv: dict[tuple[str, int], tuple[str, ...]] = {}
    for entry in entries:
        try:
            payload = entry.payload
            actor = entry.actor
        except (ValueError, TypeError, AttributeError, RecursionError):
            continue
        if not isinstance(payload, dict):
            continue
        if entry.kind == "run.started":
            raw = payload.get("argv")
            if isinstance(raw, list):
                argv[(actor.host, actor.pid)] = tuple(str(a) for a in raw)
            world = _int(payload.get("world"))
            model.world = max(model.world, world or 1)
            every = _int(payload.get("every"))
            model.every = every if every is not None and every > 0 else model.every
            model.policy = str(payload.get("policy")) if payload.get("policy") else model.policy
            if model.started is None:
                model.started = entry.time
        writer = _writer(actor, argv)
        if entry.kind == "alert":
            model.alerts.append(_alert(entry, payload, writer))
        elif entry.kind == "run.halted" and model.halted is None:
            model.halted = _alert(entry, payload, writer)
        elif entry.kind.startswith("checkpoint."):
            model.checkpoints.append(_checkpoint(entry, payload, writer))
        elif entry.kind == CHECK_KIND:
            check = _check(entry, payload)
            if check is not None:
                model.checks.append(check)
        elif entry.kind == TAIL_KIND:
            model.tail_records += 1
        elif entry.kind == "rank.closed":
            rank = actor.rank if actor.rank is not None else _int(payload.get("rank"))
            if rank is not None:
                model.closed_ranks[rank] = payload
        elif entry.kind == "run.closed":
            model.ended, model.end_kind = entry.time, "closed"
    if model.started is None and entries:
        model.started = entries[0].time
    if model.halted is not None:
        model.ended, model.end_kind = model.halted.time, "halted"
    elif model.ended is None and entries:
        model.ended = entries[-1].time


def _writer(actor: Actor, argv: dict[tuple[str, int], tuple[str, ...]]) -> Writer:
    return Writer(
        actor.user, actor.uid, actor.host, actor.pid, actor.rank, argv.get((actor.host, actor.pid))
    )


def _alert(entry: Entry, payload: dict[str, Any], writer: Writer) -> AlertRecord:
    details = payload.get("details")
    return AlertRecord(
        entry.seq,
        entry.time,
        _int(payload.get("step")),
        _int(payload.get("rank")),
        str(payload.get("detector", "?")),
        str(payload.get("severity", "?")),
        str(payload.get("message", "")),
        details if isinstance(details, dict) else {},
        writer,
    )


def _checkpoint(entry: Entry, payload: dict[str, Any], writer: Writer) -> CheckpointRecord:
    reasons = payload.get("reasons")
    manifest = payload.get("manifest_blake3")
    return CheckpointRecord(
        entry.seq,
        entry.time,
        entry.kind.split(".", 1)[1],
        str(payload.get("path", "?")),
        _int(payload.get("step")),
        str(manifest) if manifest is not None else None,
        writer,
        tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
    )


def _check(entry: Entry, payload: dict[str, Any]) -> CheckRecord | None:
    step = _int(payload.get("step"))
    fields = payload.get("fields")
    rows = payload.get("rows")
    if step is None or not isinstance(fields, list) or not isinstance(rows, list):
        return None
    clean_rows = tuple(
        tuple(v if _int(v) is not None else 0 for v in row) for row in rows if isinstance(row, list)
    )
    metrics = payload.get("metrics")
    chains = payload.get("metrics_chain")
    return CheckRecord(
        entry.seq,
        entry.time,
        step,
        tuple(str(f) for f in fields),
        clean_rows,
        _int(payload.get("severity")) or 0,
        {str(k): v for k, v in metrics.items() if isinstance(v, list)}
        if isinstance(metrics, dict)
        else {},
        tuple(str(c) for c in chains) if isinstance(chains, list) else (),
    )
