"""The PostgreSQL backend against a real server: same chain, same checks, many writers.

``.ci/run`` starts a throw-away server and sets ``TRAINGUARD_TEST_PG_DSN``; without it
(a developer running pytest by hand) these tests skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from trainguard.cli import EXIT_CLEAN, EXIT_FINDINGS, main
from trainguard.ledger import Ledger, verify

DSN = os.environ.get("TRAINGUARD_TEST_PG_DSN")
pytestmark = pytest.mark.skipif(
    not DSN,
    reason="TRAINGUARD_TEST_PG_DSN is not set: no PostgreSQL server (.ci/run starts one)",
)
APPENDER = Path(__file__).with_name("appender.py")


def connect():
    psycopg = pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    return psycopg.connect(DSN, autocommit=True)


@pytest.fixture
def pg_run(tmp_path, owner):
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    run_dir = tmp_path / "run"
    run_id = f"pg-test-{uuid.uuid4().hex[:8]}"
    ledger = Ledger.create(run_dir, owner_key=owner[0], backend="postgres", dsn=DSN, run_id=run_id)
    yield run_dir, ledger
    ledger.close()


def test_postgres_chain_verifies_and_detects_edits(pg_run, owner, capsys):
    run_dir, ledger = pg_run
    for i in range(20):
        ledger.append("step", {"step": i}, rank=i % 4)
    ledger.close_run()
    assert json.loads((run_dir / "ledger.json").read_text())["backend"] == "postgres"
    assert main(["ledger", "verify", str(run_dir), "--pubkey", str(owner[1])]) == EXIT_CLEAN
    who = ledger.backend.attribution()  # type: ignore[attr-defined]
    assert who[2][0] == "trainguard"  # the database role that really connected
    with connect() as conn:
        conn.execute(
            "UPDATE trainguard_ledger SET payload = '{\"step\":99}' WHERE run_id = %s AND seq = 7",
            (ledger.run_id,),
        )
    capsys.readouterr()
    assert main(["ledger", "verify", str(run_dir), "--format", "json"]) == EXIT_FINDINGS
    report = json.loads(capsys.readouterr().out)
    assert report["first_bad_seq"] == 7
    assert report["problems"][0]["damage"] == "edited"


def test_postgres_many_processes_one_killed(pg_run, owner):
    run_dir, ledger = pg_run
    per_writer = 250
    acks = [run_dir.parent / f"ack-{rank}" for rank in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(APPENDER), str(run_dir), str(rank), str(per_writer), str(ack)]
        )
        for rank, ack in enumerate(acks)
    ]
    deadline = time.monotonic() + 120
    while (not acks[0].exists() or len(acks[0].read_text().splitlines()) < 50) and (
        procs[0].poll() is None
    ):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    procs[0].send_signal(signal.SIGKILL)
    statuses = [p.wait(timeout=120) for p in procs]
    assert statuses == [-signal.SIGKILL, 0, 0, 0]
    ledger.close_run()
    report = verify(run_dir, owner_public_key=owner[1])
    assert report.problems == []
    assert report.verdict == "intact"
    entries = list(ledger.entries())
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    present = {e.seq: e.payload for e in entries}
    for ack in acks:
        for line in ack.read_text().splitlines():
            seq, rank, i = map(int, line.split())
            assert present[seq] == {"rank": rank, "i": i}
