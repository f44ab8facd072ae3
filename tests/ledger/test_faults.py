"""The ledger under faults and hostile input: read-only storage, damaged rows, caps, locks.

Read-only runs are checked in a child bound by file modes (as root, without the
capabilities that bypass them: see tests/unprivileged.py), so ``chmod a-w`` means what
read-only storage means;
damaged rows are written with a plain SQLite connection, as an attacker with write access
to the run directory would; the busy lock is held by a real second process.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ledger.conftest import db
from tests.unprivileged import drop_file_privileges, permissions_mean_something
from trainguard.cli import EXIT_CLEAN, EXIT_ERROR, EXIT_FINDINGS, main
from trainguard.integrity import keygen
from trainguard.ledger import Ledger, LedgerBusyError, LedgerError, verify

_KILLED_WRITER = (
    "import os, signal, sys\n"
    "from trainguard.ledger import Ledger\n"
    "ledger = Ledger.create(sys.argv[1], owner_key=sys.argv[2], run_id='killed')\n"
    "for i in range(int(sys.argv[3])):\n"
    "    ledger.append('step', {'i': i})\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)

# holds the write lock (BEGIN IMMEDIATE) until a line arrives on stdin
_LOCK_HOLDER = (
    "import sqlite3, sys\n"
    "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "conn.execute('BEGIN IMMEDIATE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.readline()\n"
    "conn.execute('COMMIT')\n"
)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A tmp folder whose write bits are given back afterwards, for the cleanup."""
    yield tmp_path
    for folder, _, files in os.walk(tmp_path):
        os.chmod(folder, 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o200)


def _cli(*argv: str) -> tuple[int, str, str]:
    """``trainguard ARGV`` in a subprocess bound by file modes even when we are root."""
    why = permissions_mean_something()
    if why is not None:
        pytest.skip(why)
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", *argv],
        capture_output=True,
        timeout=30,
        preexec_fn=drop_file_privileges,
        cwd="/tmp",
        check=False,
    )
    err = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    return done.returncode, done.stdout.decode(), err


def _read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)


def _owner(shared: Path) -> tuple[Path, Path]:
    return keygen(shared / "owner")


def _check_read_only_run(run_dir: Path, public: Path, entries: int, verdict: str) -> None:
    status, out, err = _cli(
        "ledger", "verify", str(run_dir), "--pubkey", str(public), "--format", "json"
    )
    assert status == EXIT_CLEAN, err
    report = json.loads(out)
    assert report["verdict"] == verdict
    assert report["entries"] == entries
    status, out, err = _cli("ledger", "show", str(run_dir), "--format", "json")
    assert status == EXIT_CLEAN, err
    assert len(json.loads(out)["entries"]) == entries
    status, out, err = _cli("ledger", "head", str(run_dir), "--format", "json")
    assert status == EXIT_CLEAN, err
    assert json.loads(out)["seq"] == entries


# --- 1. read-only storage --------------------------------------------------------------


def test_closed_run_on_read_only_storage_verifies(shared):
    """A finished run copied to read-only storage: SQLite cannot create its -shm there."""
    private, public = _owner(shared)
    run_dir = shared / "run"
    with Ledger.create(run_dir, owner_key=private, run_id="ro") as ledger:
        for i in range(5):
            ledger.append("step", {"i": i})
        ledger.close_run({"steps": 5})
    assert sorted(p.name for p in run_dir.iterdir()) == ["ledger.db"]
    _read_only(run_dir)
    _check_read_only_run(run_dir, public, 7, "intact")


@pytest.mark.parametrize("keep_shm", [True, False], ids=["wal-and-shm", "wal-only"])
def test_killed_run_on_read_only_storage_reads_the_wal(shared, keep_shm):
    """A run whose writer was SIGKILLed: its entries are still in ledger.db-wal.

    Opening with ``immutable=1`` would read ledger.db alone and miss every one of them.
    """
    private, public = _owner(shared)
    run_dir = shared / "run"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(run_dir), str(private), "6"], check=False
    )
    assert done.returncode == -signal.SIGKILL
    wal = run_dir / "ledger.db-wal"
    assert wal.stat().st_size > 0
    if not keep_shm:
        (run_dir / "ledger.db-shm").unlink()
    _read_only(run_dir)
    _check_read_only_run(run_dir, public, 7, "open")
    assert wal.stat().st_size > 0  # nothing checkpointed into the evidence


# --- 2. damaged rows are tampering, naming the entry -------------------------------------

_EDITS = {
    "invalid utf-8": "UPDATE entries SET payload = CAST(x'ff' AS TEXT) || payload WHERE seq = 5",
    "blob payload": "UPDATE entries SET payload = CAST(payload AS BLOB) WHERE seq = 5",
    "blob with bad bytes": "UPDATE entries SET actor = x'ff00fe' WHERE seq = 5",
    "integer kind": "UPDATE entries SET kind = 7 WHERE seq = 5",
    "real hash": "UPDATE entries SET hash = 1.5 WHERE seq = 5",
    "bad utf-8 hash": "UPDATE entries SET hash = CAST(x'c3' AS TEXT) WHERE seq = 5",
}


@pytest.mark.parametrize("edit", sorted(_EDITS))
def test_damaged_row_is_tampered(capsys, make_run, edit):
    run_dir = make_run(10)
    conn = db(run_dir)
    conn.execute(_EDITS[edit])
    conn.close()
    capsys.readouterr()
    assert main(["ledger", "verify", str(run_dir), "--format", "json"]) == EXIT_FINDINGS
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "tampered"
    assert report["first_bad_seq"] == 5
    assert report["problems"][0]["damage"] == "edited"
    assert "entry 5" in report["problems"][0]["message"]
    assert main(["ledger", "verify", str(run_dir)]) == EXIT_FINDINGS
    assert "first bad entry: 5" in capsys.readouterr().err
    # show lists it (it does not verify); head refuses to vouch for it
    assert main(["ledger", "show", str(run_dir), "--format", "json"]) == EXIT_CLEAN
    assert len(json.loads(capsys.readouterr().out)["entries"]) == 12
    assert main(["ledger", "head", str(run_dir)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "tampered" in err
    assert len(err.strip().splitlines()) == 1


def _rebuild(run_dir: Path, columns: str, select: str) -> None:
    """Recreate the entries table with another schema, as an attacker can."""
    conn = db(run_dir)
    conn.executescript(
        f"BEGIN; CREATE TABLE new ({columns}); INSERT INTO new SELECT {select} FROM entries; "
        "DROP TABLE entries; ALTER TABLE new RENAME TO entries; COMMIT;"
    )
    conn.close()


_ALL = "seq, time, kind, actor, payload, prev_hash, hash, signature, key_id"

_SCHEMA_EDITS = {
    "null actor": (_ALL, _ALL, "UPDATE entries SET actor = NULL WHERE seq = 5"),
    "text seq": (_ALL, _ALL, "UPDATE entries SET seq = '5x' WHERE seq = 5"),
    "real seq": (_ALL, _ALL, "UPDATE entries SET seq = 5.5 WHERE seq = 5"),
    "missing column": (
        "seq, time, kind, actor, payload, prev_hash, hash, key_id",
        "seq, time, kind, actor, payload, prev_hash, hash, key_id",
        None,
    ),
    "extra column with a value": (
        _ALL + ", note",
        _ALL + ", NULL",
        "UPDATE entries SET note = 'hidden' WHERE seq = 5",
    ),
}


@pytest.mark.parametrize("edit", sorted(_SCHEMA_EDITS))
def test_rebuilt_table_is_tampered(capsys, make_run, edit):
    columns, select, update = _SCHEMA_EDITS[edit]
    run_dir = make_run(10)
    _rebuild(run_dir, columns, select)
    if update:
        conn = db(run_dir)
        conn.execute(update)
        conn.close()
    capsys.readouterr()
    assert main(["ledger", "verify", str(run_dir), "--format", "json"]) == EXIT_FINDINGS
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "tampered"
    expected = 1 if edit == "missing column" else 5
    assert report["first_bad_seq"] == expected, report["problems"][:3]
    assert main(["ledger", "head", str(run_dir)]) == EXIT_ERROR


def test_extra_column_left_empty_is_ignored(capsys, make_run):
    run_dir = make_run(3)
    conn = db(run_dir)
    conn.execute("ALTER TABLE entries ADD COLUMN note TEXT")
    conn.close()
    assert main(["ledger", "verify", str(run_dir)]) == EXIT_CLEAN


@pytest.mark.parametrize(
    "content",
    [b"not a database at all" * 100, b""],
    ids=["not-sqlite", "empty"],
)
def test_unreadable_ledger_is_an_error(capsys, tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.db").write_bytes(content)
    for command in ("verify", "head", "show"):
        capsys.readouterr()
        assert main(["ledger", command, str(run_dir)]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "internal error" not in err
        assert "ledger.db" in err


def test_wrong_schema_is_an_error(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    conn = sqlite3.connect(run_dir / "ledger.db")
    conn.execute("CREATE TABLE other (x)")
    conn.close()
    for command in ("verify", "head", "show"):
        capsys.readouterr()
        assert main(["ledger", command, str(run_dir)]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert "no entries table" in err
        assert len(err.strip().splitlines()) == 1


def test_deeply_nested_certificate_payload_is_tampered(capsys, make_run):
    run_dir = make_run(2)
    conn = db(run_dir)
    conn.execute("UPDATE entries SET payload = ? WHERE seq = 1", ("[" * 100_000 + "]" * 100_000,))
    conn.close()
    capsys.readouterr()
    assert main(["ledger", "verify", str(run_dir), "--format", "json"]) == EXIT_FINDINGS
    assert json.loads(capsys.readouterr().out)["first_bad_seq"] == 1
    assert main(["ledger", "show", str(run_dir), "--format", "json"]) == EXIT_CLEAN


# --- 4. caps and special files -------------------------------------------------------------


def test_nested_and_huge_head_files_are_refused(capsys, make_run, tmp_path):
    run_dir = make_run(2)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200_000 + "]" * 200_000)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(64 << 20)
    for head, words in ((nested, "nested"), (huge, "limit")):
        capsys.readouterr()
        assert main(["ledger", "verify", str(run_dir), "--head", str(head)]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert words in err, err
        assert str(head) in err
        assert len(err.strip().splitlines()) == 1


def _with_fifo_writer_watchdog(fifo: Path) -> threading.Timer:
    """If a reader blocks on the FIFO, open it for writing after 5 s so the test ends."""

    def release() -> None:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    timer = threading.Timer(5.0, release)
    timer.daemon = True
    timer.start()
    return timer


@pytest.mark.parametrize("option", ["--head", "--pubkey"])
def test_fifo_options_are_refused_up_front(capsys, make_run, tmp_path, option):
    run_dir = make_run(2)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    timer = _with_fifo_writer_watchdog(fifo)
    start = time.monotonic()
    try:
        capsys.readouterr()
        assert main(["ledger", "verify", str(run_dir), option, str(fifo)]) == EXIT_ERROR
    finally:
        timer.cancel()
    assert time.monotonic() - start < 4.0
    assert "FIFO" in capsys.readouterr().err


def test_fifo_as_ledger_files_is_refused(capsys, tmp_path):
    for name in ("ledger.db", "ledger.json"):
        run_dir = tmp_path / name.replace(".", "-")
        run_dir.mkdir()
        os.mkfifo(run_dir / name)
        timer = _with_fifo_writer_watchdog(run_dir / name)
        start = time.monotonic()
        try:
            for command in ("verify", "head", "show"):
                capsys.readouterr()
                assert main(["ledger", command, str(run_dir)]) == EXIT_ERROR
                assert "FIFO" in capsys.readouterr().err
        finally:
            timer.cancel()
        assert time.monotonic() - start < 4.0


def test_huge_and_nested_config_is_refused(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ledger.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["ledger", "verify", str(run_dir)]) == EXIT_ERROR
    assert "nested" in capsys.readouterr().err
    with open(run_dir / "ledger.json", "wb") as handle:
        handle.truncate(64 << 20)
    assert main(["ledger", "verify", str(run_dir)]) == EXIT_ERROR
    assert "limit" in capsys.readouterr().err


def test_fifo_run_key_is_refused(make_run):
    run_dir = make_run(1, closed=False)
    (run_dir / "run.key").unlink()
    os.mkfifo(run_dir / "run.key", 0o600)
    timer = _with_fifo_writer_watchdog(run_dir / "run.key")
    start = time.monotonic()
    try:
        with pytest.raises(LedgerError, match="FIFO"):
            Ledger.open(run_dir)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 4.0


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_head_output_never_replaces_a_device(capsys, make_run, tmp_path):
    run_dir = make_run(2)
    before = os.stat("/dev/null")
    assert main(["ledger", "head", str(run_dir), "-o", "/dev/null"]) == EXIT_ERROR
    assert "refusing to replace" in capsys.readouterr().err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert os.stat("/dev/null").st_ino == before.st_ino
    out = tmp_path / "head.json"
    out.write_text("old")
    assert main(["ledger", "head", str(run_dir), "-o", str(out)]) == EXIT_CLEAN
    assert json.loads(out.read_text())["seq"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- 5. a busy write lock never stalls a training step -------------------------------------


class _LockHolder:
    """A real second process holding the ledger's write lock until released."""

    def __init__(self, run_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LOCK_HOLDER, str(run_dir / "ledger.db")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)


@pytest.fixture
def lock_holder() -> Iterator[list[_LockHolder]]:
    held: list[_LockHolder] = []
    yield held
    for holder in held:
        holder.release()


def test_try_append_queues_while_locked_and_writes_later(make_run, lock_holder):
    run_dir = make_run(0, closed=False)
    with Ledger.open(run_dir, rank=0) as ledger:
        lock_holder.append(holder := _LockHolder(run_dir))
        start = time.monotonic()
        assert ledger.try_append("step", {"i": 0}) is None
        assert ledger.try_append("step", {"i": 1}) is None
        took = time.monotonic() - start
        assert took < 1.0, f"two bounded appends took {took:.2f} s"
        assert ledger.pending == 2
        holder.release()
        time.sleep(0.05)
        written = ledger.try_append("step", {"i": 2})
        assert written is not None
        assert ledger.pending == 0
    steps = list(Ledger.open(run_dir, readonly=True).entries("step"))
    assert [e.payload["i"] for e in steps] == [0, 1, 2]
    assert steps[-1] == written
    for entry in steps[:2]:
        assert entry.payload["delayed_s"] > 0.0
        assert entry.payload["queued_at"] < entry.time
    assert "delayed_s" not in steps[2].payload
    report = verify(run_dir)
    assert report.problems == []


def test_append_writes_the_queue_first(make_run, lock_holder):
    run_dir = make_run(0, closed=False)
    with Ledger.open(run_dir, rank=0) as ledger:
        lock_holder.append(holder := _LockHolder(run_dir))
        assert ledger.try_append("alert", {"n": 1}, wait=0.01) is None
        holder.release()
        entry = ledger.append("alert", {"n": 2})
        assert ledger.pending == 0
        ledger.close_run({"steps": 0})
    kinds = [(e.kind, e.payload.get("n")) for e in Ledger.open(run_dir, readonly=True).entries()]
    assert kinds[-3:] == [("alert", 1), ("alert", 2), ("run.closed", None)]
    assert entry.payload == {"n": 2}
    assert verify(run_dir).verdict == "intact"


def test_close_run_flushes_the_queue_before_closing(make_run, lock_holder):
    run_dir = make_run(0, closed=False)
    ledger = Ledger.open(run_dir, rank=0)
    lock_holder.append(holder := _LockHolder(run_dir))
    assert ledger.try_append("step", {"i": 0}) is None
    threading.Timer(0.3, holder.release).start()
    ledger.close_run({"steps": 1})
    ledger.close()
    entries = list(Ledger.open(run_dir, readonly=True).entries())
    assert [e.kind for e in entries][-2:] == ["step", "run.closed"]
    assert verify(run_dir).verdict == "intact"


def test_flush_and_close_raise_busy_naming_what_is_left(make_run, lock_holder):
    run_dir = make_run(0, closed=False)
    ledger = Ledger.open(run_dir, rank=0)
    lock_holder.append(holder := _LockHolder(run_dir))
    for i in range(3):
        assert ledger.try_append("step", {"i": i}, wait=0.01) is None
    start = time.monotonic()
    with pytest.raises(LedgerBusyError, match="3 entries"):
        ledger.flush(timeout=0.3)
    assert 0.25 < time.monotonic() - start < 3.0
    assert ledger.pending == 3
    with pytest.raises(LedgerBusyError, match="3 entries could not be written"):
        ledger.close(timeout=0.3)
    holder.release()
    with pytest.raises(LedgerError):  # the connection is closed all the same
        ledger.append("step", {"i": 9})


def test_blocking_append_under_a_lock_raises_and_keeps_nothing(make_run, lock_holder):
    run_dir = make_run(0, closed=False)
    with Ledger.open(run_dir, rank=0) as ledger:
        lock_holder.append(holder := _LockHolder(run_dir))
        with pytest.raises(LedgerBusyError):
            ledger.append("step", {"i": 0}, timeout=0.2)
        assert ledger.pending == 0
        holder.release()
        ledger.append("step", {"i": 1})
    assert [e.payload["i"] for e in Ledger.open(run_dir, readonly=True).entries("step")] == [1]


def test_flush_writes_what_was_queued(make_run, lock_holder):
    run_dir = make_run(0, closed=False)
    with Ledger.open(run_dir, rank=0) as ledger:
        lock_holder.append(holder := _LockHolder(run_dir))
        assert ledger.try_append("step", {"i": 0}, wait=0.01) is None
        holder.release()
        assert ledger.flush() == 1
        assert ledger.flush() == 0
    assert len(list(Ledger.open(run_dir, readonly=True).entries("step"))) == 1


def test_try_append_refuses_reserved_payload_keys(make_run):
    with Ledger.open(make_run(0, closed=False)) as ledger:
        with pytest.raises(LedgerError, match="reserved"):
            ledger.try_append("step", {"delayed_s": 1})
        assert ledger.pending == 0


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("hash", "zz", "not hexadecimal"), ("seq", 2, "the head was edited")],
)
def test_edited_head_file_is_an_error_not_a_crash(capsys, make_run, tmp_path, field, value, words):
    """A head whose hash is not hex crashed verify (ValueError); one whose seq was moved
    reported a genuine ledger as truncated. Both are heads that are not genuine: exit 2."""
    run_dir = make_run(2)
    good = tmp_path / "head.json"
    assert main(["ledger", "head", str(run_dir), "-o", str(good)]) == EXIT_CLEAN
    head = json.loads(good.read_text())
    head[field] = value
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(head))
    capsys.readouterr()
    assert main(["ledger", "verify", str(run_dir), "--head", str(edited)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert words in err
    assert "internal error" not in err
    assert main(["ledger", "verify", str(run_dir), "--head", str(good)]) == EXIT_CLEAN
