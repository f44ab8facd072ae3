"""Liveness: the straggler rule's table (busy time, arrival, steps in; alerts out), and a
rank that another process stops (SIGSTOP) and continues (SIGCONT), with real signals."""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runtime.test_guard_distributed import ROOT
from trainguard.errors import Severity
from trainguard.runtime.agreement import Straggler, _peer_medians

MS = 1e-3


def fired(checks: list[tuple[list[float], list[float] | None, int]]) -> list[tuple[int, int]]:
    """(check number, rank) of each alert, over checks of (busy s, arrival s or None, steps)."""
    rule = Straggler()
    out = []
    for n, (busy, arrival, steps) in enumerate(checks, start=1):
        alerts = rule.check(n * steps, busy, arrival or [0.0] * len(busy), steps=steps)
        out += [(n, a.rank) for a in alerts]
        assert all(a.detector == "straggler" and a.severity == Severity.MEDIUM for a in alerts)
    return out


def same(busy: list[float], times: int, steps: int = 10, arrival: list[float] | None = None):
    return [(busy, arrival, steps)] * times


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        # healthy: alike within noise, at any size of job
        pytest.param(same([10 * MS, 11 * MS], 8), [], id="healthy-2"),
        pytest.param(same([10 * MS, 12 * MS, 9 * MS, 11 * MS], 8), [], id="healthy-4"),
        # rank 0 saves a checkpoint or logs on some steps: a one-off slow step leaves the
        # window's median alone, and reaching the check late once proves nothing
        pytest.param(
            same([10 * MS, 10 * MS], 2) + same([10 * MS, 10 * MS], 1, arrival=[0.5, 0.0]) * 3,
            [],
            id="rank0-late-at-a-few-checks",
        ),
        # a slow window that does not come back (a compile, a neighbour's burst)
        pytest.param(
            same([5 * MS, 5 * MS], 2) + same([300 * MS, 5 * MS], 1) + same([5 * MS, 5 * MS], 6),
            [],
            id="one-slow-window",
        ),
        # slow every other window: never two checks in a row
        pytest.param(
            (same([300 * MS, 5 * MS], 1) + same([5 * MS, 5 * MS], 1)) * 5, [], id="alternating"
        ),
        # unmistakable (x20, +105 ms): named at the second check that covers 16 steps
        pytest.param(same([5 * MS, 110 * MS], 6), [(2, 1)], id="large-2"),
        pytest.param(same([5 * MS, 6 * MS, 5 * MS, 110 * MS], 6), [(2, 3)], id="large-4"),
        # checks every 5 steps: two checks are 10 steps, not enough; the fourth is 20
        pytest.param(same([5 * MS, 110 * MS], 6, steps=5), [(4, 1)], id="large-every-5"),
        # a small excess (x3.5, +25 ms) still needs 50 steps
        pytest.param(same([10 * MS, 35 * MS], 7), [(5, 1)], id="small-needs-50-steps"),
        # many times slower but by little time (x30, +29 ms): the patient tier
        pytest.param(same([1 * MS, 30 * MS], 7), [(5, 1)], id="large-ratio-small-time"),
        # x4 of a large step is not 50 ms more when the step is 10 ms: patient tier
        pytest.param(same([10 * MS, 45 * MS], 4), [], id="x4.5-but-35ms"),
        # late at every check by far: counts only towards the patient tier
        pytest.param(
            same([10 * MS, 10 * MS], 6, arrival=[0.0, 0.5]), [(5, 1)], id="late-at-every-check"
        ),
        # named once per streak; again after it recovered and slowed down again
        pytest.param(
            same([5 * MS, 110 * MS], 4) + same([5 * MS, 5 * MS], 1) + same([5 * MS, 110 * MS], 2),
            [(2, 1), (7, 1)],
            id="once-per-streak",
        ),
        # a lone rank has no peers to be slower than
        pytest.param(same([300 * MS], 6), [], id="one-rank"),
    ],
)
def test_straggler_table(checks, expected):
    assert fired(checks) == expected


def worker(tmp_path: Path, owner_key: Path, *how: str) -> tuple[subprocess.Popen[bytes], int]:
    """A guarded job (``tests.runtime.cont_worker``) that is training; and its pid."""
    job = subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.cont_worker", str(tmp_path), str(owner_key), *how],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"the job never started training:\n{job.communicate()[1].decode()}")
        time.sleep(0.05)
    return job, int((tmp_path / "pid").read_text())


def finish(job: subprocess.Popen[bytes], tmp_path: Path) -> list[dict]:
    (tmp_path / "finish").touch()
    try:
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 0, err.decode()[-3000:]
    return json.loads((tmp_path / "alerts.json").read_text())


@pytest.mark.slow
def test_stopped_and_continued_rank_names_the_sender(tmp_path, owner_key):
    job, pid = worker(tmp_path, owner_key)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(1.0)
    os.kill(pid, signal.SIGCONT)
    time.sleep(0.5)  # it trains on after the pause
    alerts = finish(job, tmp_path)
    assert [a["detector"] for a in alerts] == ["signal"], alerts
    alert = alerts[0]
    assert alert["severity"] == "MEDIUM"
    assert alert["message"].startswith(
        f"rank 0 was stopped and continued: SIGCONT from pid {os.getpid()} "
    )
    assert alert["details"]["sender_pid"] == os.getpid()
    assert alert["details"]["sender_uid"] == os.getuid()
    assert alert["details"]["idle_s"] >= 0.9  # no step ended while it was stopped
    # the run was not ended by it: training went on and the run closed normally
    assert int((tmp_path / "steps").read_text()) > 3


@pytest.mark.slow
def test_a_job_never_continued_raises_nothing(tmp_path, owner_key):
    job, _ = worker(tmp_path, owner_key)
    time.sleep(1.0)
    assert finish(job, tmp_path) == []


@pytest.mark.slow
def test_continued_without_protect_signals_is_still_seen(tmp_path, owner_key):
    """Without ``protect_signals`` the guard's own SIGCONT handler sees the signal (the
    sender unknown), and never sends it again."""
    job, pid = worker(tmp_path, owner_key, "unprotected")
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(pid, signal.SIGCONT)
    time.sleep(0.5)
    alerts = finish(job, tmp_path)
    assert [(a["detector"], a["rank"]) for a in alerts] == [("signal", 0)], alerts
    assert "rank 0 was stopped and continued: SIGCONT" in alerts[0]["message"]
    assert alerts[0]["details"]["sender_pid"] is None
    assert int((tmp_path / "steps").read_text()) > 3


def test_peer_medians_match_the_median_of_the_others():
    gen = random.Random(0)
    for n in range(2, 12):
        for _ in range(100):
            values = [gen.choice([0.1, 0.2, gen.random()]) for _ in range(n)]
            expected = [statistics.median(values[:i] + values[i + 1 :]) for i in range(n)]
            assert _peer_medians(values) == expected
