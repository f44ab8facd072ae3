"""PostgreSQL backend: one table shared by many runs, for ranks spread over many hosts.

Needs the ``postgres`` extra (``psycopg``), imported only when this backend is used.
Each append is one transaction that first takes a transaction-level advisory lock
derived from the run id, then reads the tail, inserts and commits, so appenders of one
run are serialised across hosts while other runs proceed in parallel; the lock is
released by the commit or by the server when a killed client's connection drops.
``(run_id, seq)`` is the primary key, a backstop against duplicates.

Besides what the process says about itself (the signed ``actor``), the server records
who actually connected (``db_user``, ``client_addr``) in columns outside the hash: with
one database role per user, that attribution does not depend on the job telling the
truth (see docs/keys.md).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import blake3

from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
    COLUMNS,
    Entry,
    LedgerBackend,
    LedgerBusyError,
    LedgerError,
    Tail,
)

TABLE = "trainguard_ledger"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    run_id text NOT NULL,
    seq bigint NOT NULL,
    time text NOT NULL,
    kind text NOT NULL,
    actor text NOT NULL,
    payload text NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    signature text NOT NULL,
    key_id text NOT NULL,
    db_user text NOT NULL DEFAULT current_user,
    client_addr inet DEFAULT inet_client_addr(),
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
CREATE INDEX IF NOT EXISTS {TABLE}_kind ON {TABLE} (run_id, kind, seq);
"""
# one lock id for schema creation, so concurrent first runs do not race on CREATE
_SCHEMA_LOCK = 0x7472_6761_7264_0001


def _lock_id(run_id: str) -> int:
    """A signed 64-bit advisory lock key for one run."""
    return int.from_bytes(blake3.blake3(run_id.encode()).digest()[:8], "big", signed=True)


def _row(row: Any) -> Entry:
    seq, when, kind, actor, payload, prev, digest, sig, key = row
    return Entry(int(seq), when, kind, actor, payload, prev, digest, sig, key)


class PostgresBackend(LedgerBackend):
    """Entries of run ``run_id`` in the ``trainguard_ledger`` table of ``dsn``."""

    name = "postgres"

    def __init__(self, dsn: str, run_id: str, *, create: bool = False) -> None:
        try:
            # imported by name: psycopg is optional, and mypy must pass without it
            psycopg: Any = importlib.import_module("psycopg")
        except ImportError as exc:
            raise LedgerError(
                "the postgres ledger needs psycopg: pip install 'trainguard[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self.dsn = dsn
        self.run_id = run_id
        self._lock = threading.Lock()
        self._key = _lock_id(run_id)
        try:
            self._conn = psycopg.connect(dsn, autocommit=False, connect_timeout=30)
            if create:
                with self._conn.transaction():
                    self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    for statement in filter(str.strip, _SCHEMA.split(";")):
                        self._conn.execute(statement)
            else:
                with self._conn.transaction():
                    self._conn.execute(f"SELECT 1 FROM {TABLE} LIMIT 1")
        except psycopg.Error as exc:
            raise LedgerError(f"postgres ledger: {_first_line(exc)}") from exc
        except ValueError as exc:  # the DSN itself: a host name idna cannot encode, ...
            raise LedgerError(f"postgres ledger: bad connection string: {exc}") from exc

    def append_all(
        self, build: Callable[[Tail], list[Entry]], *, timeout: float | None = None
    ) -> list[Entry]:
        with self._lock:
            try:
                with self._conn.transaction():
                    if timeout is not None:
                        # bounds the wait for the advisory lock (SQLSTATE 55P03 when over)
                        ms = max(1, int(timeout * 1000))
                        self._conn.execute(f"SET LOCAL lock_timeout = {ms}")
                    self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._key,))
                    entries = build(self._tail())
                    for entry in entries:
                        self._conn.execute(
                            f"INSERT INTO {TABLE} (run_id, {COLUMNS}) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            (self.run_id, *entry.row()),
                        )
            except self._psycopg.Error as exc:
                if getattr(exc, "sqlstate", None) == "55P03":
                    raise LedgerBusyError(
                        f"postgres ledger: run {self.run_id} still locked after {timeout:g} s"
                    ) from exc
                raise LedgerError(f"postgres ledger: {_first_line(exc)}") from exc
        return entries

    def _tail(self) -> Tail:
        row = self._conn.execute(
            f"SELECT {COLUMNS} FROM {TABLE} WHERE run_id = %s ORDER BY seq DESC LIMIT 1",
            (self.run_id,),
        ).fetchone()
        cert = self._conn.execute(
            f"SELECT max(seq) FROM {TABLE} WHERE run_id = %s AND kind = %s",
            (self.run_id, CERTIFICATE_KIND),
        ).fetchone()
        cert_seq = None if cert is None or cert[0] is None else int(cert[0])
        return Tail(None if row is None else _row(row), cert_seq)

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        query = f"SELECT {COLUMNS} FROM {TABLE} WHERE run_id = %s"
        params: tuple[str, ...] = (self.run_id,)
        if kind is not None:
            query += " AND kind = %s"
            params += (kind,)
        with self._lock:
            try:
                with self._conn.transaction():
                    rows = self._conn.execute(query + " ORDER BY seq", params).fetchall()
            except self._psycopg.Error as exc:
                raise LedgerError(f"postgres ledger: {_first_line(exc)}") from exc
        return iter([_row(r) for r in rows])

    def last(self) -> Entry | None:
        with self._lock:
            try:
                with self._conn.transaction():
                    return self._tail().last
            except self._psycopg.Error as exc:
                raise LedgerError(f"postgres ledger: {_first_line(exc)}") from exc

    def attribution(self) -> dict[int, tuple[str, str | None]]:
        """Server-side ``seq -> (db_user, client_addr)``: who connected, not who claimed."""
        with self._lock, self._conn.transaction():
            rows = self._conn.execute(
                f"SELECT seq, db_user, host(client_addr) FROM {TABLE} WHERE run_id = %s",
                (self.run_id,),
            ).fetchall()
        return {int(seq): (user, addr) for seq, user, addr in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
