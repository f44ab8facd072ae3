"""SQLite backend: one file per run directory, safe for many processes on one host.

Durability and concurrency come from SQLite itself: WAL journal with
``synchronous=FULL`` (a commit is on disk when it returns, so a process killed right
after an append loses nothing it was told was written; one killed during it leaves the
transaction rolled back), and each append is one ``BEGIN IMMEDIATE`` transaction, which
takes the write lock before the tail is read, so two processes can never both extend
the same tail. ``seq`` is the primary key, a backstop against duplicates. SQLite's
locks need a file system with working POSIX locks: use the PostgreSQL backend when
ranks on several hosts share a network file system.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
    COLUMNS,
    Entry,
    LedgerBackend,
    LedgerBusyError,
    LedgerError,
    Tail,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY NOT NULL,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    key_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_kind ON entries (kind, seq);
"""


def _row(row: tuple[object, ...]) -> Entry:
    seq, when, kind, actor, payload, prev, digest, sig, key = row
    return Entry(
        int(seq),  # type: ignore[call-overload]
        str(when),
        str(kind),
        str(actor),
        str(payload),
        str(prev),
        str(digest),
        str(sig),
        str(key),
    )


class SQLiteBackend(LedgerBackend):
    """Entries of one run in ``path`` (normally ``RUN_DIR/ledger.db``)."""

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        readonly: bool = False,
        timeout: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._lock = threading.Lock()
        if not create and not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}")
        try:
            if readonly:
                # read-only: verifying must not change the evidence it checks
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(
                    uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
                )
            else:
                # one connection for all threads: self._lock serialises its use
                conn = sqlite3.connect(
                    self.path, timeout=timeout, isolation_level=None, check_same_thread=False
                )
            self._conn = conn
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                if create:
                    self._write(lambda c: c.executescript("BEGIN IMMEDIATE;" + _SCHEMA))
            conn.execute("SELECT count(*) FROM entries WHERE seq = 1").fetchone()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a readable ledger ({exc})") from exc

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> None:
        """Run ``work`` (which begins a transaction) and commit, retrying while locked."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                work(self._conn)
                self._conn.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:  # noqa: PERF203 - a retry loop
                self._rollback()
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise LedgerError(f"{self.path}: {exc}") from exc
                if time.monotonic() > deadline:
                    raise LedgerBusyError(
                        f"{self.path}: still locked after {self.timeout:.0f} s; "
                        "is a process stuck holding the ledger?"
                    ) from exc
                time.sleep(random.uniform(0.001, 0.02))

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def append(self, build: Callable[[Tail], Entry]) -> Entry:
        done: list[Entry] = []

        def work(conn: sqlite3.Connection) -> None:
            done.clear()
            # IMMEDIATE takes the write lock now, before the tail is read
            conn.execute("BEGIN IMMEDIATE")
            entry = build(self._tail())
            conn.execute(
                f"INSERT INTO entries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                entry.row(),
            )
            done.append(entry)

        with self._lock:
            try:
                self._write(work)
            except sqlite3.IntegrityError as exc:
                self._rollback()
                raise LedgerError(f"{self.path}: duplicate sequence number ({exc})") from exc
            except BaseException:
                self._rollback()
                raise
        return done[0]

    def _tail(self) -> Tail:
        row = self._conn.execute(
            f"SELECT {COLUMNS} FROM entries ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        cert = self._conn.execute(
            "SELECT max(seq) FROM entries WHERE kind = ?", (CERTIFICATE_KIND,)
        ).fetchone()
        return Tail(None if row is None else _row(row), None if cert[0] is None else int(cert[0]))

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        with self._lock:
            try:
                if kind is None:
                    rows = self._conn.execute(f"SELECT {COLUMNS} FROM entries ORDER BY seq")
                else:
                    rows = self._conn.execute(
                        f"SELECT {COLUMNS} FROM entries WHERE kind = ? ORDER BY seq", (kind,)
                    )
                fetched = rows.fetchall()
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"{self.path}: cannot read entries ({exc})") from exc
        return iter([_row(r) for r in fetched])

    def last(self) -> Entry | None:
        with self._lock:
            try:
                return self._tail().last
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"{self.path}: cannot read entries ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
