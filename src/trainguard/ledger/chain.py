"""The hash chain: how an entry is hashed and signed, and what a run certificate says.

An entry's hash is BLAKE3 over a canonical JSON array of every other field (format tag,
seq, time, kind, actor text, payload text, previous hash), so changing any of them,
including the position, changes the hash. The signature is ed25519 over a
domain-separated message holding the hash, so an entry signature can never be replayed
as a checkpoint signature made with the same run key, or the other way round.
"""

from __future__ import annotations

import base64
import datetime as _dt
import getpass
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trainguard.integrity import signing
from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
    Actor,
    Entry,
    LedgerError,
    canonical_json,
)

FORMAT = "trainguard-ledger-1"
GENESIS = "0" * 64
_ENTRY_DOMAIN = b"trainguard.ledger.entry.v1\0"


def now() -> str:
    """UTC time as ISO 8601 with microseconds: a string, so it hashes the same everywhere."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def parse_time(text: str) -> _dt.datetime:
    value = _dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return value


def current_actor(rank: int | None) -> Actor:
    """The calling process as an :class:`Actor` (self-reported; see docs/keys.md)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Actor(user, os.getuid(), socket.gethostname(), os.getpid(), rank)


def entry_hash(
    seq: int, time: str, kind: str, actor_json: str, payload_json: str, prev_hash: str
) -> str:
    fields = [FORMAT, seq, time, kind, actor_json, payload_json, prev_hash]
    data = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return blake3.blake3(data).hexdigest()


def recompute(entry: Entry) -> str:
    return entry_hash(
        entry.seq, entry.time, entry.kind, entry.actor_json, entry.payload_json, entry.prev_hash
    )


def entry_message(hash_hex: str) -> bytes:
    return _ENTRY_DOMAIN + bytes.fromhex(hash_hex)


def make_entry(
    *,
    seq: int,
    kind: str,
    payload: Mapping[str, Any] | None,
    actor: Actor,
    prev_hash: str,
    key: Ed25519PrivateKey,
    time: str | None = None,
) -> Entry:
    """Build, hash and sign the entry that follows ``prev_hash``."""
    when = time or now()
    actor_json = actor.to_json()
    payload_json = canonical_json(dict(payload or {}))
    digest = entry_hash(seq, when, kind, actor_json, payload_json, prev_hash)
    return Entry(
        seq=seq,
        time=when,
        kind=kind,
        actor_json=actor_json,
        payload_json=payload_json,
        prev_hash=prev_hash,
        hash=digest,
        signature=signing.sign(key, entry_message(digest)),
        key_id=signing.key_id(key.public_key()),
    )


def signature_ok(entry: Entry, key: Ed25519PublicKey) -> bool:
    try:
        message = entry_message(entry.hash)
    except ValueError:
        return False
    return signing.verify(key, message, entry.signature)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except ValueError as exc:
        raise LedgerError(f"not an ed25519 public key: {text[:20]}...") from exc


@dataclass(frozen=True)
class Certificate:
    """What the owner's key vouches for: this run key may sign this run's entries.

    It is the payload of a ``run.certificate`` entry, and that entry is signed with the
    owner's long-term key; the training processes only ever hold the run key.
    """

    run_id: str
    run_key: str  # base64 raw ed25519 public key
    run_key_id: str
    owner_key: str  # base64 raw ed25519 public key
    owner_key_id: str
    not_before: str
    not_after: str
    user: str
    host: str
    info: dict[str, Any]

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_entry(entry: Entry) -> Certificate:
        """Parse and check a certificate entry (its signature by the key it names)."""
        if entry.kind != CERTIFICATE_KIND:
            raise LedgerError(f"entry {entry.seq} is a {entry.kind!r}, not a run certificate")
        try:
            data = entry.payload
            cert = Certificate(
                run_id=str(data["run_id"]),
                run_key=str(data["run_key"]),
                run_key_id=str(data["run_key_id"]),
                owner_key=str(data["owner_key"]),
                owner_key_id=str(data["owner_key_id"]),
                not_before=str(data["not_before"]),
                not_after=str(data["not_after"]),
                user=str(data["user"]),
                host=str(data["host"]),
                info=dict(data.get("info") or {}),
            )
            parse_time(cert.not_before)
            parse_time(cert.not_after)
        except RecursionError as exc:
            raise LedgerError(
                f"entry {entry.seq}: malformed run certificate (nested too deeply)"
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"entry {entry.seq}: malformed run certificate ({exc})") from exc
        owner = cert.owner_public()
        if signing.key_id(owner) != cert.owner_key_id or entry.key_id != cert.owner_key_id:
            raise LedgerError(f"entry {entry.seq}: certificate key ids do not match its keys")
        if signing.key_id(cert.run_public()) != cert.run_key_id:
            raise LedgerError(f"entry {entry.seq}: run key id does not match the run key")
        if recompute(entry) != entry.hash or not signature_ok(entry, owner):
            raise LedgerError(f"entry {entry.seq}: certificate is not signed by its owner key")
        return cert

    def owner_public(self) -> Ed25519PublicKey:
        return public_from_b64(self.owner_key)

    def run_public(self) -> Ed25519PublicKey:
        return public_from_b64(self.run_key)

    def covers(self, time: str) -> bool:
        try:
            when = parse_time(time)
        except ValueError:
            return False
        return parse_time(self.not_before) <= when <= parse_time(self.not_after)


def new_certificate(
    *,
    run_id: str,
    run_key: Ed25519PrivateKey,
    owner_key: Ed25519PrivateKey,
    valid_for: _dt.timedelta,
    info: Mapping[str, Any] | None = None,
) -> Certificate:
    start = _dt.datetime.now(_dt.timezone.utc)
    # a minute of slack before: clocks of the ranks' hosts differ a little
    not_before = (start - _dt.timedelta(minutes=1)).isoformat(timespec="microseconds")
    actor = current_actor(None)
    return Certificate(
        run_id=run_id,
        run_key=b64(signing.raw_public(run_key.public_key())),
        run_key_id=signing.key_id(run_key.public_key()),
        owner_key=b64(signing.raw_public(owner_key.public_key())),
        owner_key_id=signing.key_id(owner_key.public_key()),
        not_before=not_before,
        not_after=(start + valid_for).isoformat(timespec="microseconds"),
        user=actor.user,
        host=actor.host,
        info=dict(info or {}),
    )
