"""Entries deleted from the end of a ledger while they were last are found without a head.

The technique: ``DELETE FROM entries WHERE seq > N`` on a live run (or after it) leaves a
chain that verifies, and the run writes on from the new end (issue 11, "the ledger's last
entries"). What the deletion cannot reach is each writer's memory of what it wrote: the
Guard's checks record it (``check`` entries), each rank's closing entry counts its entries.
Real Guards and real processes write real SQLite ledgers; the attacker is sqlite3.

PYTEST_DONT_REWRITE: this file plays the job's own code (see tests/runtime/test_guard.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainguard
from tests.ledger.conftest import db
from trainguard.cli import EXIT_CLEAN, EXIT_FINDINGS, main
from trainguard.ledger import Ledger, verify
from trainguard.ledger.verify import read_entries

ROOT = Path(__file__).resolve().parents[2]


def guarded(run_dir: Path, key: Path, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    settings = {"every": 5, "owner_key": key, "verify_env": False, "seed": 0, **options}
    guard = trainguard.Guard(model, optimizer, run_dir=run_dir, code_roots=[__file__], **settings)
    return model, optimizer, guard


def train(model, optimizer, guard, steps, batches=False):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        guard.step(loss=loss, batch=x if batches else None)


def kinds(run_dir: Path) -> list[tuple[int, str]]:
    return [(e.seq, e.kind) for e in read_entries(run_dir)[0]]


def records(run_dir: Path, at_least: int = 1) -> list[int]:
    """The ``check`` entries' seqs, once there are ``at_least`` (rank 0 writes them
    from a thread of its own, so that the step never waits for the disk)."""
    deadline = time.monotonic() + 10
    while True:
        found = [seq for seq, kind in kinds(run_dir) if kind == "check"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def cut(run_dir: Path, after: int) -> None:
    """The attack: every entry after ``after`` deleted, as they are the last ones."""
    conn = db(run_dir)
    conn.execute("DELETE FROM entries WHERE seq > ?", (after,))
    conn.close()


def truncations(run_dir: Path) -> list[dict]:
    report = verify(run_dir)
    return [p.to_dict() for p in report.problems if p.damage == "truncated"]


def test_deleted_while_last_then_written_on_is_truncation(tmp_path, owner):
    """Mid-run ``DELETE ... WHERE seq > N``, then the run writes on: the check records
    after it, the rank's own alert and its closing entry all show the cut."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 7)  # a check at step 5 records the tail
    recorded = records(run_dir)
    assert recorded
    cut(run_dir, recorded[-1] - 1)  # the record itself was the last entry: gone
    train(model, optimizer, guard, 8)
    guard.close()
    assert [a.detector for a in guard.alerts] == ["ledger"], [a.line() for a in guard.alerts]
    found = truncations(run_dir)
    assert found
    assert found[0]["seq"] == recorded[-1]
    assert f"entry {recorded[-1]} deleted from the end" in found[0]["message"]
    assert main(["ledger", "verify", str(run_dir)]) == EXIT_FINDINGS


def test_check_records_deleted_with_the_rest_are_still_found(tmp_path, owner):
    """The attacker who read the code deletes the tail records too (everything from the
    first record on): the memory is in the processes, not in the records."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 12)
    first = min(records(run_dir, 2))
    cut(run_dir, first - 1)
    train(model, optimizer, guard, 3)  # no check before the end: the closing entries tell
    guard.close()
    found = truncations(run_dir)
    assert found
    assert verify(run_dir).verdict == "tampered"


def test_last_entries_after_the_final_check_are_found_by_the_closing_count(tmp_path, owner):
    """Entries written after the final check (a checkpoint record here), deleted while
    last, before the run closes: the closing entry's count and last entry prove them."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 10)
    records(run_dir, 2)
    guard.save_checkpoint(tmp_path / "ckpt.safetensors")
    saved = max(seq for seq, kind in kinds(run_dir) if kind == "checkpoint.saved")
    cut(run_dir, saved - 1)
    guard.close()
    messages = [p["message"] for p in truncations(run_dir)]
    assert any(f"entry {saved} deleted from the end" in m for m in messages)
    assert any("wrote" in m and "1 was deleted" in m for m in messages)


def test_another_writers_entries_cut_are_counted(tmp_path, owner):
    """A writer whose entry was cut while the others wrote on, and that then wrote above
    the old end (so its own memory saw nothing go back): its closing count proves it."""
    run_dir = tmp_path / "run"
    main_ledger = Ledger.create(run_dir, owner_key=owner[0], rank=0)
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger.tail_writer", str(run_dir), "1"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None
    assert writer.stdout is not None

    def ask(command: str) -> int:
        writer.stdin.write(command + "\n")
        writer.stdin.flush()
        return int(writer.stdout.readline())

    ask("append")
    victim = ask("append")
    cut(run_dir, victim - 1)
    for _ in range(3):
        main_ledger.append("note", {"rank": 0})
    ask("append")
    closing = ask("close")
    writer.stdin.close()
    assert writer.wait(timeout=30) == 0
    main_ledger.close_run({})
    main_ledger.close()
    found = truncations(run_dir)
    assert [p["seq"] for p in found] == [closing]
    assert "wrote 3 entries" in found[0]["message"]
    assert "1 was deleted" in found[0]["message"]


def test_cut_with_the_closing_entries_reads_as_not_closed(tmp_path, owner, capsys):
    """Everything after a check deleted, closing entries included, after the run ended:
    the limit without a head. It reads as a run that did not close (exit 0, said plainly;
    exit 1 with --require-closed), and a head kept elsewhere shows the truncation."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 12)
    guard.close()
    head = tmp_path / "head.json"
    assert main(["ledger", "head", str(run_dir), "-o", str(head)]) == EXIT_CLEAN
    last_record = max(seq for seq, kind in kinds(run_dir) if kind == "check")
    cut(run_dir, last_record)
    capsys.readouterr()
    assert main(["ledger", "verify", str(run_dir), "--format", "json"]) == EXIT_CLEAN
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "open"
    note = next(n for n in report["notes"] if n.startswith("not closed"))
    assert f"ends at entry {last_record}" in note
    assert "head kept elsewhere" in note
    assert main(["ledger", "verify", str(run_dir), "--require-closed"]) == EXIT_FINDINGS
    assert main(["ledger", "verify", str(run_dir), "--head", str(head)]) == EXIT_FINDINGS


def test_resume_rollback_and_a_concurrent_writer_stay_intact(tmp_path, owner):
    """Ordinary practice raises nothing: another process appending while the Guard checks
    every step (its entries land after rank 0's records), a declared rollback, a resume
    into the closed run in a fresh Guard, each with its own records and counts."""
    run_dir = tmp_path / "run"
    ckpt = tmp_path / "ckpt.safetensors"
    model, optimizer, guard = guarded(run_dir, owner[0], every=1)
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger.appender", str(run_dir), "1", "300", "/dev/null"],
        cwd=ROOT,
    )
    try:
        train(model, optimizer, guard, 6)
        guard.save_checkpoint(ckpt)
        train(model, optimizer, guard, 20)
        guard.load_checkpoint(ckpt, rollback=True)
        train(model, optimizer, guard, 4)
    finally:
        assert writer.wait(timeout=60) == 0
    guard.close()
    assert guard.alerts == []
    model, optimizer, guard = guarded(run_dir, owner[0])
    guard.load_checkpoint(ckpt)
    train(model, optimizer, guard, 11)
    guard.close()
    assert guard.alerts == []
    report = verify(run_dir, owner_public_key=owner[1])
    assert report.verdict == "intact", report.problems
    assert sum(kind == "check" for _, kind in kinds(run_dir)) >= 10


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_a_peers_entry_cut_mid_run_is_found(tmp_path, owner):
    """Two gloo ranks: rank 1's entry is deleted while last and rank 0 writes on; rank 0's
    next check record carries rank 1's memory of it, and rank 1's closing entry too."""
    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.ledger.tail_worker",
                str(rank),
                "2",
                port,
                str(run_dir),
                str(owner[0]),
            ],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        for rank in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    gone = int((run_dir / "cut").read_text())
    found = truncations(run_dir)
    assert found
    assert found[0]["seq"] == gone
    assert any("which rank 1 wrote" in p["message"] for p in found)
    assert any("rank 1 (pid" in p["message"] for p in found)
    assert main(["ledger", "verify", str(run_dir)]) == EXIT_FINDINGS


def test_each_check_records_one_digest_of_every_ranks_data_commitment(tmp_path, owner):
    """The data detector's commitments ride in the check's one ``ledger.tail`` entry."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 10, batches=True)
    guard.close()
    tails = [e.payload for e in read_entries(run_dir)[0] if e.kind == "check"]
    assert len(tails) == 2
    assert all(len(t["data"]) == 32 for t in tails)
    assert tails[0]["data"] != tails[1]["data"], "the commitment moves with every batch"
    events = [e.payload.get("event") for e in read_entries(run_dir)[0]]
    assert "data-commitment" not in events, "no entry of its own at each check"
    assert "data-commitments" in events, "each rank's, once, at close"


def test_entries_deleted_before_the_last_one_are_seen_at_the_next_check(tmp_path, owner):
    """The cut raced with the writer (the attacker chose the last rows, then the run wrote
    one more): entries deleted behind the rank's latest one. No number is handed out
    again; the live look at the entries the rank wrote last sees them gone."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 7)
    recorded = records(run_dir)
    conn = db(run_dir)
    conn.execute("DELETE FROM entries WHERE seq = ?", (recorded[-1] - 1,))
    conn.close()
    train(model, optimizer, guard, 6)
    guard.close()
    (alert,) = guard.alerts
    assert alert.detector == "ledger"
    assert f"{recorded[-1] - 1}" in alert.message
    assert "deleted or rewritten" in alert.message
