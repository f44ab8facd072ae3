"""The ledger's one extension point (the storage backend), its record types and errors.

A backend stores :class:`Entry` rows for one run and appends them atomically: it reads
the tail of the chain, lets the caller build the next entry from it, and commits, all
under one lock, so concurrent appenders never see the same tail. Everything else (the
hash chain, signatures, verification) lives above the backend and is the same for
SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NewType

from trainguard.errors import Error

RunId = NewType("RunId", str)
Rank = NewType("Rank", int)

#: the kind of the entry that certifies a run key (signed by the owner's key)
CERTIFICATE_KIND = "run.certificate"
#: the kind of the entry that ends a run; nothing but a new certificate may follow it
CLOSED_KIND = "run.closed"

Damage = Literal[
    "edited",  # an entry's fields no longer match its hash
    "bad-signature",  # the hash matches but the signature does not (re-hashed, or another key)
    "deleted",  # a sequence number is missing, or an entry links to one that is gone
    "reordered",  # an entry links to an entry that sits elsewhere in the ledger
    "truncated",  # entries a head kept elsewhere covers are missing at the end
    "rewritten",  # the ledger differs from a head kept elsewhere
    "bad-certificate",  # the run certificate is malformed or not signed by the owner
    "untrusted-owner",  # the certificate is signed by a key other than the one pinned
    "after-close",  # an entry follows the closing entry without a new certificate
    "outside-validity",  # an entry's time is outside its certificate's validity
]

Verdict = Literal["intact", "open", "tampered"]


class LedgerError(Error):
    """The ledger cannot be opened, read or written (not: the ledger is tampered)."""


class LedgerClosedError(LedgerError):
    """An append to a run whose closing entry is already written."""


class LedgerBusyError(LedgerError):
    """The ledger stayed locked by other writers for longer than the timeout."""


class HeadError(LedgerError):
    """A head file cannot be read, or does not belong to this run."""


@dataclass(frozen=True)
class Actor:
    """Who appended an entry, as the appending process says (see docs/keys.md)."""

    user: str
    uid: int
    host: str
    pid: int
    rank: int | None = None

    def to_json(self) -> str:
        return canonical_json(asdict(self))

    @staticmethod
    def from_json(text: str) -> Actor:
        data = json.loads(text)
        return Actor(
            str(data.get("user", "")),
            int(data.get("uid", -1)),
            str(data.get("host", "")),
            int(data.get("pid", -1)),
            None if data.get("rank") is None else int(data["rank"]),
        )


#: the entry columns both backends store, in the order of ``Entry.row()``
COLUMNS = "seq, time, kind, actor, payload, prev_hash, hash, signature, key_id"


@dataclass(frozen=True)
class Entry:
    """One ledger record, exactly as stored.

    ``actor_json`` and ``payload_json`` are the stored texts (canonical JSON when written):
    the hash covers these texts byte for byte, so a change that parses to the same value
    is still a change. ``signature`` is base64 ed25519 over the hash, by the key named
    ``key_id`` (the owner's key for certificates, the run key for everything else).
    """

    seq: int
    time: str
    kind: str
    actor_json: str
    payload_json: str
    prev_hash: str
    hash: str
    signature: str
    key_id: str
    #: set by a backend for a stored row that does not hold what the format says (text
    #: that is not UTF-8, a blob or number where text belongs, a non-integer seq, a
    #: missing column): what is wrong with it. The other fields are then a best-effort
    #: reading; the verifier reports the entry as edited.
    defect: str | None = None

    @property
    def payload(self) -> Any:
        return json.loads(self.payload_json)

    @property
    def actor(self) -> Actor:
        return Actor.from_json(self.actor_json)

    def row(self) -> tuple[Any, ...]:
        """The stored columns, in the order of :data:`COLUMNS`."""
        return (
            self.seq,
            self.time,
            self.kind,
            self.actor_json,
            self.payload_json,
            self.prev_hash,
            self.hash,
            self.signature,
            self.key_id,
        )

    def to_dict(self) -> dict[str, Any]:
        try:
            payload: Any = self.payload
            # a payload nested too deep to print is shown as its stored text
            json.dumps(payload)
        except (ValueError, RecursionError):
            payload = self.payload_json
        try:
            actor: Any = asdict(self.actor)
        except (ValueError, TypeError, AttributeError, RecursionError):
            actor = self.actor_json
        shown = {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "actor": actor,
            "payload": payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature,
            "key_id": self.key_id,
        }
        if self.defect is not None:
            shown["defect"] = self.defect
        return shown


@dataclass(frozen=True)
class Tail:
    """What an appender needs to know, read inside the append transaction."""

    last: Entry | None
    certificate_seq: int | None


@dataclass(frozen=True)
class SignedHead:
    """The (sequence, hash) of a ledger's latest entry, with that entry's signature.

    Small enough to paste into a ticket; kept elsewhere, it pins every entry up to
    ``seq``: a later truncation or rewrite of those entries no longer matches it.
    ``root`` is the hash of entry 1 (the run certificate).
    """

    run_id: str
    seq: int
    hash: str
    signature: str
    key_id: str
    root: str
    owner_key_id: str
    time: str

    def to_dict(self) -> dict[str, Any]:
        return {"format": "trainguard-ledger-head", "version": 1, **asdict(self)}

    def to_line(self) -> str:
        return canonical_json(self.to_dict())


@dataclass(frozen=True)
class Problem:
    """One piece of damage found by :func:`trainguard.ledger.verify`."""

    seq: int
    damage: Damage
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "damage": self.damage, "message": self.message}


@dataclass
class VerifyReport:
    """The result of verifying one run's ledger.

    ``verdict`` is ``intact`` (chain, signatures and heads check out and the run is
    closed), ``open`` (all that, but no closing entry yet: a running or crashed run,
    not a tampered one) or ``tampered`` (``first_bad_seq`` and ``problems`` say where).
    """

    run_id: str | None
    entries: int
    last_seq: int
    closed: bool
    owner_key_id: str | None
    owner_pinned: bool
    heads_checked: int
    problems: list[Problem] = field(default_factory=list)
    problems_omitted: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tampered(self) -> bool:
        return bool(self.problems)

    @property
    def first_bad_seq(self) -> int | None:
        return min((p.seq for p in self.problems), default=None)

    @property
    def first_problem(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq, default=None)

    @property
    def verdict(self) -> Verdict:
        if self.problems:
            return "tampered"
        return "intact" if self.closed else "open"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "verdict": self.verdict,
            "first_bad_seq": self.first_bad_seq,
            "entries": self.entries,
            "last_seq": self.last_seq,
            "closed": self.closed,
            "owner_key_id": self.owner_key_id,
            "owner_pinned": self.owner_pinned,
            "heads_checked": self.heads_checked,
            "problems": [p.to_dict() for p in self.problems],
            "problems_omitted": self.problems_omitted,
            "notes": list(self.notes),
        }


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text, no NaN: one spelling per value."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"payload is not plain json: {exc}") from exc


class LedgerBackend(ABC):
    """Storage for one run's entries. Implementations: SQLite (default), PostgreSQL."""

    #: a short name for messages and the run directory's config ("sqlite", "postgres")
    name: str

    @abstractmethod
    def append_all(
        self, build: Callable[[Tail], list[Entry]], *, timeout: float | None = None
    ) -> list[Entry]:
        """Atomically read the tail, store the entries ``build(tail)`` returns, commit.

        Only one appender at a time (across processes and hosts) may be between the
        read of the tail and the commit; the entries are durable when this returns.
        Waits at most ``timeout`` seconds (the backend's own default when None) for
        other appenders, then raises :class:`LedgerBusyError` having written nothing.
        """

    def append(self, build: Callable[[Tail], Entry], *, timeout: float | None = None) -> Entry:
        """:meth:`append_all` for one entry."""
        return self.append_all(lambda tail: [build(tail)], timeout=timeout)[0]

    @abstractmethod
    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        """Entries in sequence order (only those of ``kind`` when given)."""

    @abstractmethod
    def last(self) -> Entry | None:
        """The entry with the highest sequence number, or None for an empty ledger."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; the backend cannot be used afterwards."""
