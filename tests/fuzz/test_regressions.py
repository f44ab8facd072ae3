"""One named test per crash the fuzz targets found (tests/fuzz/targets.py, scripts/fuzz.py).

Each docstring says what input broke which contract. Each is an xfail (strict) until
the owner of the code lands the fix and removes the mark.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import trainguard
from trainguard.integrity import keygen
from trainguard.ledger import Ledger, verify


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    """A closed SQLite ledger and a head taken from it: (run_dir, head file)."""
    private, _ = keygen(tmp_path / "owner")
    run_dir = tmp_path / "run"
    with Ledger.create(run_dir, owner_key=private, run_id="fuzz-regression") as ledger:
        for i in range(3):
            ledger.append("step", {"step": i})
        ledger.close_run({"steps": 3})
        head = tmp_path / "head.json"
        head.write_text(json.dumps(ledger.head().to_dict()))
    return run_dir, head


def test_load_object_array_with_short_item_list_does_not_crash_the_process(
    tmp_path: Path,
) -> None:
    """An object-dtype ``.npy`` whose pickled ``ndarray.__setstate__`` says 123 items but
    carries a list of 2: the scan calls it SAFE and ``trainguard.load`` kills the process
    with SIGSEGV inside numpy (2.4). Found by the ``load`` target (one byte of the shape
    changed). It must be refused with a trainguard.Error, the process alive."""
    buf = io.BytesIO()
    np.save(buf, np.array([1, "x"], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    assert data.count(b"K\x01K\x02\x85") == 1
    path = tmp_path / "short.npy"
    path.write_bytes(data.replace(b"K\x01K\x02\x85", b"K\x01K{\x85"))
    code = textwrap.dedent(
        f"""
        import sys, trainguard
        try:
            trainguard.load({str(path)!r})
        except trainguard.Error as exc:
            print("refused:", exc)
            sys.exit(3)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, f"exit {done.returncode}: {done.stderr[-500:]}"


def test_head_whose_hash_is_not_hex_fails_closed(run: tuple[Path, Path], tmp_path: Path) -> None:
    """A head file whose ``hash`` is a list (or any non-hex text) passes ``parse_head``
    (it is ``str()``-ed) and then ``bytes.fromhex`` raises a raw ValueError out of
    ``ledger.verify`` (exit 2 as "internal error"). Found by the ``head`` target."""
    run_dir, head = run
    doc = json.loads(head.read_text())
    doc["hash"] = [doc["hash"]]
    bad = tmp_path / "bad-head.json"
    bad.write_text(json.dumps(doc))
    with contextlib.suppress(trainguard.Error):
        verify(run_dir, heads=[bad])


def test_ledger_config_with_lone_surrogate_run_id_fails_closed(tmp_path: Path) -> None:
    """``ledger.json`` whose ``run_id`` is the valid JSON string ``"\\udcff"``: the
    PostgreSQL backend's lock id encodes it and raises UnicodeEncodeError out of
    ``ledger.verify``. Found by the ``ledger_json`` target."""
    (tmp_path / "ledger.json").write_text(
        '{"backend": "postgres", "dsn": "host=127.0.0.1 port=1", "run_id": "\\udcff"}'
    )
    with contextlib.suppress(trainguard.Error):
        verify(tmp_path)


def test_ledger_config_with_lone_surrogate_dsn_fails_closed(tmp_path: Path) -> None:
    """``ledger.json`` whose ``dsn`` is ``"\\udcff"``: psycopg encodes the DSN and a raw
    UnicodeEncodeError leaves ``ledger.verify``. Found by the ``ledger_json`` target."""
    (tmp_path / "ledger.json").write_text(
        '{"backend": "postgres", "dsn": "\\udcff", "run_id": "r"}'
    )
    with contextlib.suppress(trainguard.Error):
        verify(tmp_path)


def test_ledger_db_with_non_utf8_schema_fails_closed(run: tuple[Path, Path]) -> None:
    """``ledger.db`` with one byte of the stored ``CREATE TABLE`` text set to 0xff: opening
    it raises a raw UnicodeDecodeError (reading ``sqlite_master``) out of
    ``ledger.verify``. Found by the ``ledger_db`` target."""
    run_dir, _ = run
    db = run_dir / "ledger.db"
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").connection.close()
    data = db.read_bytes()
    at = data.index(b"NOT NULL")
    db.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    with contextlib.suppress(trainguard.Error):
        verify(run_dir)


def test_edited_certificate_row_is_reported_tampered_with_a_head(run: tuple[Path, Path]) -> None:
    """Entry 1 (the run certificate) with its ``payload`` replaced by the integer 0, then
    verified with a head kept elsewhere: ``verify`` raises HeadError ("head 5 is signed by
    key ..., unknown to this run", exit 2) instead of reporting entry 1 as tampered
    (exit 1). Found by the ``ledger_rows`` target (any edit that breaks the certificate)."""
    run_dir, head = run
    conn = sqlite3.connect(run_dir / "ledger.db", isolation_level=None)
    conn.execute("UPDATE entries SET payload = 0 WHERE seq = 1")
    conn.close()
    report = verify(run_dir, heads=[head])
    assert report.tampered
    assert report.first_bad_seq == 1


def test_convert_datetime_array_fails_closed(tmp_path: Path) -> None:
    """A plain ``.npy`` of ``datetime64[D]`` loads, but ``convert`` hands it to
    ``torch.from_numpy`` and a raw TypeError ("can't convert np.ndarray of type
    numpy.datetime64") leaves it. Found by the ``convert`` target (the dtype letter of an
    object array changed to ``M``). It must be a trainguard.Error naming the dtype."""
    from trainguard.artifacts.convert import convert

    source = tmp_path / "dates.npy"
    np.save(source, np.array(["2024-01-01", "2024-01-02"], dtype="datetime64[D]"))
    with contextlib.suppress(trainguard.Error):
        convert(source, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dates.npy"]


def test_ledger_config_with_bad_host_name_fails_closed(tmp_path: Path) -> None:
    """``ledger.json`` whose ``dsn`` names ``host=a..b``: resolving it raises a raw
    ``UnicodeError`` (the idna codec: "label empty or too long"), not a psycopg error,
    out of ``ledger.verify``. Found by the ``ledger_json`` target."""
    (tmp_path / "ledger.json").write_text(
        '{"backend": "postgres", "dsn": "host=a..b port=1", "run_id": "r"}'
    )
    with contextlib.suppress(trainguard.Error):
        verify(tmp_path)
