"""Many real processes append to one ledger; one is killed with SIGKILL mid-stream.

The ledger must verify afterwards, hold every entry whose append had returned, and have
no duplicate or missing sequence numbers.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainguard.ledger import Ledger, verify

APPENDER = Path(__file__).with_name("appender.py")
WRITERS = 4
PER_WRITER = 1000


def _acks(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [tuple(map(int, line.split())) for line in lines if line]  # type: ignore[misc]


@pytest.mark.slow
def test_four_processes_one_killed(tmp_path, owner):
    run_dir = tmp_path / "run"
    Ledger.create(run_dir, owner_key=owner[0], run_id="concurrent").close()
    acks = [tmp_path / f"ack-{rank}" for rank in range(WRITERS)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(APPENDER), str(run_dir), str(rank), str(PER_WRITER), str(ack)]
        )
        for rank, ack in enumerate(acks)
    ]
    victim = random.randrange(WRITERS)
    # kill at a random moment once the victim is appending: between 1 and 900 of its appends
    target = random.randint(1, 900)
    deadline = time.monotonic() + 120
    while len(_acks(acks[victim])) < target and procs[victim].poll() is None:
        assert time.monotonic() < deadline, "appender made no progress"
        time.sleep(random.uniform(0, 0.005))
    procs[victim].send_signal(signal.SIGKILL)
    for rank, proc in enumerate(procs):
        status = proc.wait(timeout=120)
        assert status == (-signal.SIGKILL if rank == victim else 0), f"rank {rank}: {status}"

    # the ledger stays writable after the kill: no lock was left behind
    with Ledger.open(run_dir, rank=0) as ledger:
        ledger.close_run({"note": "after the kill"})

    report = verify(run_dir, owner_public_key=owner[1])
    assert report.problems == [], report.problems[:3]
    assert report.verdict == "intact"

    with Ledger.open(run_dir, readonly=True) as ledger:
        entries = list(ledger.entries())
    seqs = [e.seq for e in entries]
    assert seqs == list(range(1, len(entries) + 1)), "duplicate or missing sequence numbers"
    by_seq = {e.seq: e for e in entries}
    acknowledged = [a for path in acks for a in _acks(path)]
    for seq, rank, i in acknowledged:
        assert seq in by_seq, f"acknowledged entry {seq} (rank {rank}, step {i}) is lost"
        assert by_seq[seq].payload == {"rank": rank, "i": i}
        assert by_seq[seq].actor.rank == rank
    survivors = [a for a in acknowledged if a[1] != victim]
    assert len(survivors) == (WRITERS - 1) * PER_WRITER
    killed = [a for a in acknowledged if a[1] == victim]
    assert target <= len(killed) < PER_WRITER
    steps = [e for e in entries if e.kind == "step"]
    # at most one entry more than acknowledged: the victim's last append may have
    # committed in the instant before the kill, before it could say so
    assert len(acknowledged) <= len(steps) <= len(acknowledged) + 1
