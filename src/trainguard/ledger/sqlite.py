"""SQLite backend: one file per run directory, safe for many processes on one host.

Durability and concurrency come from SQLite itself: WAL journal with
``synchronous=FULL`` (a commit is on disk when it returns, so a process killed right
after an append loses nothing it was told was written; one killed during it leaves the
transaction rolled back), and each append is one ``BEGIN IMMEDIATE`` transaction, which
takes the write lock before the tail is read, so two processes can never both extend
the same tail. ``seq`` is the primary key, a backstop against duplicates. SQLite's
locks need a file system with working POSIX locks: use the PostgreSQL backend when
ranks on several hosts share a network file system.

Reading never trusts the file: rows are read as raw bytes with their SQLite types, and
a row that does not hold what the format says (text that is not UTF-8, a blob or a
number where text belongs, a sequence number that is not an integer, a missing column)
comes back as an :class:`Entry` whose ``defect`` says what is wrong, for the verifier to
report as an edit of that entry. Read-only storage is handled in :func:`_open_readonly`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from trainguard._io import describe_mode, open_regular, reason
from trainguard.errors import InputError
from trainguard.ledger.interface import (
    CERTIFICATE_KIND,
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

#: the text columns, in the order of ``Entry.row()`` after ``seq``
_TEXT = ("time", "kind", "actor", "payload", "prev_hash", "hash", "signature", "key_id")
_INSERT = f"INSERT INTO entries (seq, {', '.join(_TEXT)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _show(value: object) -> str:
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _type(value: object) -> str:
    """A ``typeof()`` result (bytes, as the connection returns text)."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _seq_of(value: object, kind: str, after: int) -> int:
    """The sequence number a row with a non-integer ``seq`` most likely had."""
    if kind == "real" and isinstance(value, float) and math.isfinite(value):
        return math.floor(value)
    if kind == "text" and isinstance(value, bytes):
        with contextlib.suppress(ValueError):
            return int(value.decode("ascii").strip())
    return after + 1


def _decode(row: Sequence[object], extras: Sequence[str], after: int = 0) -> Entry:
    """An Entry from ``(seq, typeof(seq), col, typeof(col), ..., typeof(extra)...)``.

    ``after`` is the last sequence number read before this row (to name a row whose own
    number is unusable).
    """
    defects: list[str] = []
    raw, kind = row[0], _type(row[1])
    if kind == "integer" and isinstance(raw, int):
        seq = raw
    else:
        seq = _seq_of(raw, kind, after)
        defects.append(f"its sequence number {_show(raw)} is {kind}, not an integer")
    texts: list[str] = []
    for index, name in enumerate(_TEXT):
        value, kind = row[2 + 2 * index], _type(row[3 + 2 * index])
        if kind == "text" and isinstance(value, bytes):
            try:
                texts.append(value.decode("utf-8"))
                continue
            except UnicodeDecodeError as exc:
                defects.append(f"column {name} is not UTF-8 text (byte {exc.start})")
        elif kind == "missing":
            defects.append(f"column {name} is missing from the table")
        elif kind == "null":
            defects.append(f"column {name} is NULL")
        else:
            defects.append(f"column {name} holds {'an' if kind == 'integer' else 'a'} {kind}")
        if isinstance(value, bytes):
            texts.append(value.decode("utf-8", "backslashreplace"))
        else:
            texts.append("" if value is None else str(value))
    for name, extra in zip(extras, row[2 + 2 * len(_TEXT) :], strict=True):
        if _type(extra) != "null":
            defects.append(f"column {name} is not part of the ledger format but holds a value")
    time_, kind_, actor, payload, prev, digest, sig, key = texts
    defect = "; ".join(defects) if defects else None
    return Entry(seq, time_, kind_, actor, payload, prev, digest, sig, key, defect=defect)


def _check_file(path: Path) -> None:
    """Refuse a ledger.db that is missing or not a regular file, before SQLite opens it."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise LedgerError(f"no ledger at {path}") from exc
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger: {reason(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise LedgerError(f"{path}: the ledger is {describe_mode(info.st_mode)}, not a file")


def _connect(target: str | Path, timeout: float, *, uri: bool = False) -> sqlite3.Connection:
    # one connection for all threads: the backend's lock serialises its use
    conn = sqlite3.connect(
        target, uri=uri, timeout=timeout, isolation_level=None, check_same_thread=False
    )
    # rows are decoded by _decode, which tells bad bytes from good instead of failing
    conn.text_factory = bytes
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    return conn


def _probe(conn: sqlite3.Connection) -> None:
    """A first read: this is where SQLite opens the WAL and its -shm index."""
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()


def _copy(source: Path, target: Path) -> None:
    try:
        fd = open_regular(source, "ledger file")
    except InputError as exc:
        raise LedgerError(str(exc)) from exc
    with os.fdopen(fd, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _open_readonly(path: Path, timeout: float) -> tuple[sqlite3.Connection, Path | None, str]:
    """A read-only view of the ledger that includes every committed entry.

    ``mode=ro`` first: it reads ledger.db and its WAL, but needs the ``-shm`` index to
    exist or be creatable, which fails on read-only storage for a run closed cleanly (no
    -shm left) or one whose -shm was removed. Then: without a WAL (or with an empty one)
    every entry is in ledger.db and ``immutable=1`` reads it without any side file. With
    a non-empty WAL, ``immutable=1`` would silently miss the entries still in it, so the
    db and its WAL are copied to a private temporary folder and read there (SQLite
    recovers the WAL into the copy; the evidence is never written).
    Returns the connection, the temporary folder to remove on close, and how it was read.
    """
    try:
        conn = _connect(f"{path.resolve().as_uri()}?mode=ro", timeout, uri=True)
        try:
            _probe(conn)
        except BaseException:
            conn.close()
            raise
        return conn, None, "read-only"
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "unable to open" not in text and "readonly" not in text and "read-only" not in text:
            raise
    wal = path.with_name(path.name + "-wal")
    try:
        wal_info: os.stat_result | None = os.stat(wal)
    except FileNotFoundError:
        wal_info = None
    except OSError as exc:
        raise LedgerError(f"{wal}: cannot read the ledger's WAL: {reason(exc)}") from exc
    if wal_info is None or (stat.S_ISREG(wal_info.st_mode) and wal_info.st_size == 0):
        conn = _connect(f"{path.resolve().as_uri()}?immutable=1", timeout, uri=True)
        _probe(conn)
        return conn, None, "immutable"
    folder = Path(tempfile.mkdtemp(prefix="trainguard-ledger-"))
    try:
        _copy(path, folder / "ledger.db")
        _copy(wal, folder / "ledger.db-wal")
        conn = _connect(folder / "ledger.db", timeout)
        _probe(conn)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return conn, folder, "snapshot"


class SQLiteBackend(LedgerBackend):
    """Entries of one run in ``path`` (normally ``RUN_DIR/ledger.db``).

    ``readonly`` opens never write to the run directory, even on read-only storage (see
    :func:`_open_readonly`); ``read_mode`` says how it was read (``read-only``,
    ``immutable``: no WAL to read, or ``snapshot``: a private copy of the db and its WAL).
    """

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
        self.read_mode = "read-write"
        self._lock = threading.Lock()
        self._snapshot: Path | None = None
        self._closed = False
        if not create or self.path.exists():
            _check_file(self.path)
        try:
            if readonly:
                conn, self._snapshot, self.read_mode = _open_readonly(self.path, timeout)
            else:
                conn = _connect(self.path, timeout)
            self._conn = conn
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                if create:
                    self._write(lambda c: c.executescript("BEGIN IMMEDIATE;" + _SCHEMA), timeout)
            self._columns()
        except sqlite3.DatabaseError as exc:
            self._discard()
            raise LedgerError(f"{self.path}: not a readable ledger ({exc})") from exc
        except UnicodeDecodeError as exc:
            # SQLite's own message quotes the schema, which is not UTF-8 here
            self._discard()
            raise LedgerError(f"{self.path}: not a readable ledger (schema is not UTF-8)") from exc
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
        if self._snapshot is not None:
            shutil.rmtree(self._snapshot, ignore_errors=True)
            self._snapshot = None

    def _columns(self) -> tuple[str, list[str]]:
        """The SELECT list for the table as it is, and the names of unknown columns."""
        rows = self._conn.execute("PRAGMA table_info(entries)").fetchall()
        names = [
            r[1].decode("utf-8", "backslashreplace") if isinstance(r[1], bytes) else str(r[1])
            for r in rows
        ]
        if not names:
            raise LedgerError(f"{self.path}: not a trainguard ledger (no entries table)")
        if "seq" not in names:
            raise LedgerError(f"{self.path}: not a trainguard ledger (no seq column)")
        parts = ["seq", "typeof(seq)"]
        for column in _TEXT:
            if column in names:
                parts += [_quote(column), f"typeof({_quote(column)})"]
            else:
                parts += ["NULL", "'missing'"]
        extras = [n for n in names if n != "seq" and n not in _TEXT]
        parts += [f"typeof({_quote(n)})" for n in extras]
        return ", ".join(parts), extras

    def _open(self) -> None:
        if self._closed:
            raise LedgerError(f"{self.path}: the ledger connection is closed")

    def _rows(
        self, where: str = "", params: tuple[object, ...] = (), tail: bool = False
    ) -> list[Entry]:
        self._open()
        select, extras = self._columns()
        order = "ORDER BY seq DESC LIMIT 1" if tail else "ORDER BY seq"
        fetched = self._conn.execute(f"SELECT {select} FROM entries {where} {order}", params)
        out: list[Entry] = []
        after = 0
        for row in fetched.fetchall():
            entry = _decode(row, extras, after)
            out.append(entry)
            after = max(after, entry.seq)
        return out

    def _write(self, work: Callable[[sqlite3.Connection], object], timeout: float) -> None:
        """Run ``work`` (which begins a transaction) and commit, retrying while locked.

        Waits at most ``timeout`` seconds for other writers (SQLite's busy handler is set
        to the same bound), then raises LedgerBusyError.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                # SQLite's busy handler waits for the lock; never past our deadline
                left = max(1, int((deadline - time.monotonic()) * 1000))
                self._conn.execute(f"PRAGMA busy_timeout = {left}")
                try:
                    work(self._conn)
                    self._conn.execute("COMMIT")
                    return
                except sqlite3.OperationalError as exc:
                    self._rollback()
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise LedgerError(f"{self.path}: {exc}") from exc
                    if time.monotonic() >= deadline - 0.001:
                        raise LedgerBusyError(
                            f"{self.path}: still locked by another writer after {timeout:g} s"
                        ) from exc
                time.sleep(min(random.uniform(0.001, 0.02), max(0.0, deadline - time.monotonic())))
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def append_all(
        self, build: Callable[[Tail], list[Entry]], *, timeout: float | None = None
    ) -> list[Entry]:
        done: list[Entry] = []

        def work(conn: sqlite3.Connection) -> None:
            done.clear()
            # IMMEDIATE takes the write lock now, before the tail is read
            conn.execute("BEGIN IMMEDIATE")
            entries = build(self._tail())
            conn.executemany(_INSERT, [e.row() for e in entries])
            done.extend(entries)

        with self._lock:
            self._open()
            try:
                self._write(work, self.timeout if timeout is None else timeout)
            except sqlite3.IntegrityError as exc:
                self._rollback()
                raise LedgerError(f"{self.path}: duplicate sequence number ({exc})") from exc
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                self._rollback()
                raise LedgerError(f"{self.path}: cannot write the ledger ({exc})") from exc
            except BaseException:
                self._rollback()
                raise
        return list(done)

    def _tail(self) -> Tail:
        rows = self._rows(tail=True)
        cert = self._conn.execute(
            "SELECT max(seq) FROM entries WHERE kind = ? AND typeof(seq) = 'integer'",
            (CERTIFICATE_KIND,),
        ).fetchone()
        return Tail(rows[0] if rows else None, None if cert[0] is None else int(cert[0]))

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        with self._lock:
            try:
                rows = self._rows() if kind is None else self._rows("WHERE kind = ?", (kind,))
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                raise LedgerError(f"{self.path}: cannot read entries ({exc})") from exc
        return iter(rows)

    def last(self) -> Entry | None:
        with self._lock:
            try:
                return self._tail().last
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                raise LedgerError(f"{self.path}: cannot read entries ({exc})") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._discard()
