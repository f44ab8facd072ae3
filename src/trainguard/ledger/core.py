"""A run's ledger: create it with the owner's key, open it from the ranks, append, close.

``Ledger.create`` is called once per run by whoever holds the owner's long-term key
(the launcher): it makes a fresh run key, writes it to ``RUN_DIR/run.key`` (mode 0600)
and appends a ``run.certificate`` entry signed by the owner's key. Training processes
call ``Ledger.open(run_dir)``, which loads only the run key. See docs/keys.md.

The run directory holds ``ledger.db`` (SQLite, the default) or ``ledger.json``
naming a PostgreSQL database and the run id (the DSN should not contain a password:
use ``PGPASSFILE`` or ``PGPASSWORD``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trainguard import _io
from trainguard.integrity import signing
from trainguard.integrity.interface import KeyFileError
from trainguard.ledger import chain
from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
    CLOSED_KIND,
    Actor,
    Entry,
    LedgerBackend,
    LedgerBusyError,
    LedgerClosedError,
    LedgerError,
    SignedHead,
    Tail,
    canonical_json,
)

DB_NAME = "ledger.db"
CONFIG_NAME = "ledger.json"
RUN_KEY_NAME = "run.key"
BackendName = Literal["sqlite", "postgres"]
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,127}$")
#: how long :meth:`Ledger.try_append` waits for the write lock before queueing (seconds)
APPEND_WAIT = 0.1
#: entries :meth:`Ledger.try_append` holds in memory while the lock is busy, at most
MAX_PENDING = 10_000
#: payload keys the ledger adds to an entry written after a delay
_RESERVED = ("delayed_s", "queued_at")


@dataclass(eq=False)
class _Pending:
    """An entry waiting for the write lock: everything but its place in the chain."""

    kind: str
    payload: dict[str, Any]
    actor: Actor
    queued: float  # time.monotonic() when queued
    queued_at: str  # the same, as ISO 8601 UTC
    missed: bool = False  # the call that queued it gave up waiting: note the delay
    entry: Entry | None = None  # once written


def open_backend(
    run_dir: str | os.PathLike[str], *, readonly: bool = False, create: bool = False
) -> LedgerBackend:
    """The backend the run directory names: ``ledger.json`` (PostgreSQL) or ``ledger.db``.

    ``ledger.json`` is read capped (:data:`trainguard._io.CONFIG_CAP`, bounded nesting);
    a FIFO, device or socket in place of either file is refused before it is opened.
    """
    folder = Path(run_dir)
    config = folder / CONFIG_NAME
    if _exists(config):
        data = _io.parse_json(
            _io.read_text_capped(config, _io.CONFIG_CAP, "ledger configuration"),
            _io.display(config),
        )
        try:
            dsn, run_id = str(data["dsn"]), str(data["run_id"])
            # JSON can spell lone surrogates ("\udcff"), which no driver can send
            dsn.encode("utf-8")
            run_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LedgerError(
                f"{_io.display(config)}: not a ledger configuration (dsn or run id is not "
                "valid unicode)"
            ) from exc
        except (KeyError, TypeError) as exc:
            raise LedgerError(
                f"{_io.display(config)}: not a ledger configuration (no {exc})"
            ) from exc
        if data.get("backend") != "postgres":
            raise LedgerError(f"{_io.display(config)}: unknown backend {data.get('backend')!r}")
        from trainguard.ledger.postgres import PostgresBackend

        return PostgresBackend(dsn, run_id, create=create)
    from trainguard.ledger.sqlite import SQLiteBackend

    if not create and not _exists(folder / DB_NAME):
        if not _exists(folder):
            raise LedgerError(f"{_io.display(folder)}: no ledger here (no such folder)")
        raise LedgerError(f"{_io.display(folder)}: no ledger here (no {DB_NAME} or {CONFIG_NAME})")
    return SQLiteBackend(folder / DB_NAME, create=create, readonly=readonly)


def _exists(path: Path) -> bool:
    """Whether ``path`` exists (whatever it is); LedgerError if that cannot be known."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise LedgerError(f"{_io.display(path)}: cannot read: {_io.reason(exc)}") from exc
    return True


def _private_key(key: str | os.PathLike[str] | Ed25519PrivateKey) -> Ed25519PrivateKey:
    return key if isinstance(key, Ed25519PrivateKey) else signing.load_private(key)


def _public_key(key: str | os.PathLike[str] | Ed25519PublicKey) -> Ed25519PublicKey:
    return key if isinstance(key, Ed25519PublicKey) else signing.load_public(key)


def _write_run_key(folder: Path, key: Ed25519PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, tmp = tempfile.mkstemp(prefix=".run.key.", dir=folder)  # mkstemp creates it 0600
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / RUN_KEY_NAME)


#: how many of its latest entries a writer remembers for the live look (``recent``)
RECENT = 16


class Ledger:
    """One run's append-only, hash-chained, signed event log.

    Safe to use from many processes (each opens its own ``Ledger``) and threads.
    ``append`` returns once the entry is durable.
    """

    def __init__(
        self,
        run_dir: Path,
        backend: LedgerBackend,
        certificate: chain.Certificate,
        certificate_seq: int,
        run_key: Ed25519PrivateKey | None,
        rank: int | None,
    ) -> None:
        self.run_dir = run_dir
        self.backend = backend
        self.certificate = certificate
        self.certificate_seq = certificate_seq
        self._run_key = run_key
        self.rank = rank
        self._queue: deque[_Pending] = deque()
        self._qlock = threading.Lock()  # guards _queue; never held while writing
        self._wlock = threading.Lock()  # one writer (drain) at a time in this process
        #: this object's memory of the ledger's tail, kept outside the ledger (see
        #: docs/ledger.md, "The tail"): how many entries it wrote, the (seq, hash) of the
        #: highest it wrote, and the first seq it was given again below that: entries it
        #: wrote were removed from the end. Once that happens the memory stays as it was.
        self.written = 0
        self.first_claim: tuple[int, str] | None = None
        self.tail_claim: tuple[int, str] | None = None
        self.cut_from: int | None = None
        #: the (seq, hash) of the last entries it wrote, for a live look at whether they
        #: are still there (runtime/core.py, LedgerWatch)
        self.recent: deque[tuple[int, str]] = deque(maxlen=RECENT)

    # --- creating and opening -----------------------------------------------------

    @classmethod
    def create(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        owner_key: str | os.PathLike[str] | Ed25519PrivateKey,
        run_id: str | None = None,
        valid_for: _dt.timedelta = _dt.timedelta(days=30),
        backend: BackendName = "sqlite",
        dsn: str | None = None,
        info: Mapping[str, Any] | None = None,
        rank: int | None = None,
    ) -> Ledger:
        """Start (or resume) a run: new run key, certificate signed by ``owner_key``.

        On an existing ledger this appends a new certificate, which is how a resumed
        run continues the same chain; the existing ledger must be certified by the same
        owner key. ``info`` goes into the certificate (code version, command line...).
        """
        owner = _private_key(owner_key)
        folder = Path(run_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create run directory {folder}: {exc.strerror}") from exc
        if backend == "postgres":
            if not dsn:
                raise LedgerError("the postgres ledger needs a dsn")
            config = folder / CONFIG_NAME
            if not config.exists():
                rid = run_id or _new_run_id()
                config.write_text(
                    json.dumps({"backend": "postgres", "dsn": dsn, "run_id": rid}, indent=2) + "\n"
                )
        store = open_backend(folder, create=True)
        run_key = Ed25519PrivateKey.generate()
        try:
            first = next(iter(store.entries(CERTIFICATE_KIND)), None)
            if first is not None:
                previous = chain.Certificate.from_entry(first)
                if previous.owner_key_id != signing.key_id(owner.public_key()):
                    raise LedgerError(
                        f"{folder}: this ledger belongs to owner key {previous.owner_key_id}; "
                        "use that key or a new run directory"
                    )
                rid = previous.run_id
            else:
                rid = getattr(store, "run_id", None) or run_id or _new_run_id()
            cert = chain.new_certificate(
                run_id=rid, run_key=run_key, owner_key=owner, valid_for=valid_for, info=info
            )

            def build(tail: Tail) -> Entry:
                last = tail.last
                return chain.make_entry(
                    seq=1 if last is None else last.seq + 1,
                    kind=CERTIFICATE_KIND,
                    payload=cert.to_payload(),
                    actor=chain.current_actor(rank),
                    prev_hash=chain.GENESIS if last is None else last.hash,
                    key=owner,
                )

            _write_run_key(folder, run_key)
            entry = store.append(build)
        except BaseException:
            store.close()
            raise
        ledger = cls(folder, store, cert, entry.seq, run_key, rank)
        ledger._remember([entry])
        return ledger

    @classmethod
    def open(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        rank: int | None = None,
        owner_public_key: str | os.PathLike[str] | Ed25519PublicKey | None = None,
        readonly: bool = False,
    ) -> Ledger:
        """Open a run created by :meth:`create`; load the run key unless ``readonly``.

        ``owner_public_key`` pins the owner: a ledger certified by any other key is
        refused (someone replaced the run directory's ledger with their own).
        """
        folder = Path(run_dir)
        store = open_backend(folder, readonly=readonly)
        try:
            certs = list(store.entries(CERTIFICATE_KIND))
            if not certs:
                raise LedgerError(f"{folder}: the ledger has no run certificate")
            cert = chain.Certificate.from_entry(certs[-1])
            if owner_public_key is not None:
                expected = signing.key_id(_public_key(owner_public_key))
                if cert.owner_key_id != expected:
                    raise LedgerError(
                        f"{folder}: ledger is certified by key {cert.owner_key_id}, "
                        f"not by the expected owner key {expected}"
                    )
            run_key = None
            if not readonly:
                try:
                    run_key = signing.load_private(folder / RUN_KEY_NAME)
                except KeyFileError as exc:
                    raise LedgerError(f"cannot open the run for writing: {exc}") from exc
                if signing.key_id(run_key.public_key()) != cert.run_key_id:
                    raise LedgerError(
                        f"{folder / RUN_KEY_NAME} is not the key the run certificate names"
                    )
        except BaseException:
            store.close()
            raise
        return cls(folder, store, cert, certs[-1].seq, run_key, rank)

    # --- writing ------------------------------------------------------------------

    def append(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        rank: int | None = None,
        timeout: float | None = None,
    ) -> Entry:
        """Append one event; returns the entry once it is durable.

        ``kind`` is lower-case dotted (``alert``, ``checkpoint.saved``); the run's own
        kinds (``run.certificate``, ``run.closed``) are refused: use :meth:`close_run`.
        Entries queued by :meth:`try_append` are written first, in order. Waits up to
        ``timeout`` seconds (default: the backend's, 60 s for SQLite) for the write lock,
        then raises LedgerBusyError; this entry is then not written, ever (the queued ones
        stay queued). In a training step use :meth:`try_append`, which never waits long.
        """
        return self._write_now(self._enqueue(kind, payload, rank), timeout)

    def try_append(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        rank: int | None = None,
        wait: float = APPEND_WAIT,
    ) -> Entry | None:
        """Append one event without ever stalling the caller for long: for training steps.

        Waits at most ``wait`` seconds (default :data:`APPEND_WAIT`, 0.1 s) for the write
        lock. Returns the entry once it is durable, or None when the lock stayed busy:
        the entry is then queued in memory, in order, and written by the next
        :meth:`append`, :meth:`try_append`, :meth:`flush`, :meth:`close_run` or
        :meth:`close`. An entry written later than the call that queued it gets two keys
        added to its payload, inside the hash: ``delayed_s`` (seconds from queueing to
        the write) and ``queued_at`` (ISO 8601 UTC time of queueing); its ``time`` is the
        time of the write. Those two payload keys are therefore reserved. :attr:`pending`
        counts the queued entries. Queued entries are lost if the process dies before
        they are written.

        Raises LedgerError for a bad kind or payload, a read-only or closed ledger, or a
        failure other than a busy lock (the entry stays queued); LedgerBusyError when
        :data:`MAX_PENDING` entries are already queued (this entry is not recorded).
        """
        start = time.monotonic()
        wait = max(0.0, wait)
        item = self._enqueue(kind, payload, rank)
        # another thread of this process may be writing (or waiting): don't wait for it
        if self._wlock.acquire(timeout=wait):
            try:
                self._drain(max(0.001, wait - (time.monotonic() - start)))
            except LedgerBusyError:
                pass
            finally:
                self._wlock.release()
        with self._qlock:
            item.missed = item.entry is None
        return item.entry

    @property
    def pending(self) -> int:
        """How many entries :meth:`try_append` queued that are not written yet."""
        with self._qlock:
            return len(self._queue)

    def flush(self, timeout: float | None = None) -> int:
        """Write the queued entries; return how many were written.

        Waits up to ``timeout`` seconds (default: the backend's, 60 s for SQLite), then
        raises LedgerBusyError naming how many entries could not be written (they stay
        queued); other failures raise their LedgerError with the same count.
        """
        with self._wlock:
            try:
                return self._drain(timeout)
            except LedgerError as exc:
                left = self.pending
                raise type(exc)(
                    f"{exc}; {left} {'entry' if left == 1 else 'entries'} could not be written"
                ) from exc

    def close_run(self, payload: Mapping[str, Any] | None = None) -> Entry:
        """Write the queued entries, then the closing entry, and delete the run key.

        The run signs nothing more. Waits for the lock like :meth:`append`.
        """
        entry = self._write_now(self._enqueue(CLOSED_KIND, payload, self.rank, own_kind=True))
        # once closed, a copy of the run key is all a forger would need; remove ours
        (self.run_dir / RUN_KEY_NAME).unlink(missing_ok=True)
        self._run_key = None
        return entry

    def _write_now(self, item: _Pending, timeout: float | None = None) -> Entry:
        """Write the queue up to and including ``item``, or take ``item`` out and raise."""
        with self._wlock:
            try:
                self._drain(timeout)
            except BaseException:
                with self._qlock:
                    if item.entry is None:
                        with contextlib.suppress(ValueError):
                            self._queue.remove(item)
                if item.entry is None:
                    raise
        assert item.entry is not None  # queued before the drain, so written by it
        return item.entry

    def _enqueue(
        self,
        kind: str,
        payload: Mapping[str, Any] | None,
        rank: int | None,
        *,
        own_kind: bool = False,
    ) -> _Pending:
        if not own_kind and (kind in (CERTIFICATE_KIND, CLOSED_KIND) or not _KIND.match(kind)):
            raise LedgerError(f"invalid entry kind {kind!r}")
        if self._run_key is None:
            raise LedgerError("this ledger was opened read-only or its run is closed")
        body = dict(payload or {})
        canonical_json(body)  # fail on non-json payloads before taking the lock
        taken = [key for key in _RESERVED if key in body]
        if taken:
            raise LedgerError(f"payload key {taken[0]!r} is reserved for the ledger's delay note")
        item = _Pending(
            kind,
            body,
            chain.current_actor(self.rank if rank is None else rank),
            time.monotonic(),
            chain.now(),
        )
        with self._qlock:
            if len(self._queue) >= MAX_PENDING:
                raise LedgerBusyError(
                    f"{self.run_dir}: {len(self._queue)} entries already wait for the "
                    f"ledger's write lock; this {kind!r} entry was not recorded"
                )
            self._queue.append(item)
        return item

    def _drain(self, timeout: float | None) -> int:
        """Write every queued entry in one transaction (the caller holds ``_wlock``).

        Entries whose own call gave up waiting (``missed``) get the delay note.
        """
        with self._qlock:
            batch = list(self._queue)
        if not batch:
            return 0
        key = self._run_key
        if key is None:
            raise LedgerError("this ledger was opened read-only or its run is closed")

        def build(tail: Tail) -> list[Entry]:
            last = tail.last
            if last is None or tail.certificate_seq is None:
                raise LedgerError("the ledger has no run certificate")
            if last.kind == CLOSED_KIND:
                raise LedgerClosedError(f"run {self.run_id} is closed; nothing can be appended")
            if tail.certificate_seq != self.certificate_seq:
                raise LedgerError(
                    f"run {self.run_id} was re-certified (entry {tail.certificate_seq}); "
                    "reopen the ledger"
                )
            out: list[Entry] = []
            for item in batch:
                body = item.payload
                if item.missed:
                    delay = round(time.monotonic() - item.queued, 6)
                    body = {**body, "delayed_s": delay, "queued_at": item.queued_at}
                last = chain.make_entry(
                    seq=last.seq + 1,
                    kind=item.kind,
                    payload=body,
                    actor=item.actor,
                    prev_hash=last.hash,
                    key=key,
                )
                out.append(last)
            return out

        written = self.backend.append_all(build, timeout=timeout)
        self._remember(written)
        with self._qlock:
            for item, entry in zip(batch, written, strict=True):
                item.entry = entry
                self._queue.popleft()
        return len(written)

    def _remember(self, written: list[Entry]) -> None:
        """Update the memory of the tail: a seq at or below the highest this object
        wrote means entries were removed from the end (the numbers are handed out again)."""
        if not written:
            return
        self.written += len(written)
        self.recent.extend((e.seq, e.hash) for e in written)
        if self.first_claim is None:
            self.first_claim = (written[0].seq, written[0].hash)
        if self.cut_from is not None:
            return
        if self.tail_claim is not None and written[0].seq <= self.tail_claim[0]:
            self.cut_from = written[0].seq
            return
        self.tail_claim = (written[-1].seq, written[-1].hash)

    # --- reading ------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.certificate.run_id

    @property
    def run_public_key(self) -> Ed25519PublicKey:
        return self.certificate.run_public()

    def certificate_entry(self) -> Entry:
        """The entry holding the run certificate in force (to embed in checkpoints)."""
        for entry in self.backend.entries(CERTIFICATE_KIND):
            if entry.seq == self.certificate_seq:
                return entry
        raise LedgerError(f"certificate entry {self.certificate_seq} is missing")

    def sign(self, message: bytes) -> str:
        """Sign ``message`` (already domain-separated by the caller) with the run key."""
        if self._run_key is None:
            raise LedgerError("this ledger was opened read-only or its run is closed")
        return signing.sign(self._run_key, message)

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        return self.backend.entries(kind)

    def head(self) -> SignedHead:
        return head_of(self.backend)

    def close(self, *, timeout: float | None = None) -> None:
        """Write what is queued, then close the connection (not the run: see :meth:`close_run`).

        The connection is closed whatever happens; entries that could not be written
        within ``timeout`` (default: the backend's) raise LedgerBusyError naming how many.
        """
        try:
            if self.pending:
                self.flush(timeout)
        finally:
            self.backend.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def head_of(store: LedgerBackend) -> SignedHead:
    """The signed head of a ledger: its last entry's (seq, hash, signature) and root.

    Not verified (the writer's own view, for :meth:`Ledger.head`); a head for keeping
    elsewhere comes from :func:`trainguard.ledger.verify.signed_head`, which verifies.
    """
    last = store.last()
    first = next(iter(store.entries(CERTIFICATE_KIND)), None)
    return _head(first, last)


def head_from(entries: list[Entry]) -> SignedHead:
    """The head of entries read in sequence order (see :func:`head_of`)."""
    first = next((e for e in entries if e.kind == CERTIFICATE_KIND), None)
    return _head(first, entries[-1] if entries else None)


def _head(first: Entry | None, last: Entry | None) -> SignedHead:
    if last is None or first is None:
        raise LedgerError("the ledger is empty")
    for entry in (first, last):
        if entry.defect is not None:
            raise LedgerError(f"entry {entry.seq} is damaged ({entry.defect}); no head taken")
    cert = chain.Certificate.from_entry(first)
    return SignedHead(
        run_id=cert.run_id,
        seq=last.seq,
        hash=last.hash,
        signature=last.signature,
        key_id=last.key_id,
        root=first.hash,
        owner_key_id=cert.owner_key_id,
        time=last.time,
    )


def _new_run_id() -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"run-{stamp}-{secrets.token_hex(4)}"
