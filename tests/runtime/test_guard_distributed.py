"""Real two-process gloo runs under the Guard: the interfered rank is named."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.test_metrics_log import assert_recorded
from tests.runtime.worker import AFTER_CHECK, AT, CHECK_BEFORE_SAVE, VICTIM
from trainguard.cli import main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def start_ranks(
    module: str,
    head: list[str],
    world: int,
    tail: list[str],
    *,
    text: bool = False,
    preexec: Any = None,
) -> list[subprocess.Popen[Any]]:
    """``python -m MODULE *HEAD RANK WORLD PORT *TAIL`` for each rank, one fresh port."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [sys.executable, "-m", module, *head, str(rank), str(world), port, *tail],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=text,
            preexec_fn=preexec,
        )
        for rank in range(world)
    ]


def launch(scenario: str, run_dir: Path, key: Path) -> list[subprocess.Popen[bytes]]:
    return start_ranks("tests.runtime.worker", [scenario], 2, [str(run_dir), str(key)])


def finish(procs: list[subprocess.Popen[bytes]], timeout: float = 90) -> list[int]:
    codes = []
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        codes.append(proc.returncode)
    return codes


def alerts(run_dir: Path, rank: int) -> list[dict]:
    return json.loads((run_dir / f"alerts-rank{rank}.json").read_text())


def run(scenario: str, tmp_path: Path, key: Path) -> tuple[Path, list[int]]:
    run_dir = tmp_path / scenario
    codes = finish(launch(scenario, run_dir, key))
    return run_dir, codes


def ledger_alerts(run_dir: Path, detector: str) -> list[dict]:
    """The run's alert entries from the given detector, read with `trainguard ledger show`."""
    show = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "show", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    entries = json.loads(show.stdout)["entries"]
    return [e for e in entries if e["kind"] == "alert" and e["payload"]["detector"] == detector]


def test_clean_run_raises_nothing_and_the_ledger_verifies(tmp_path, owner_key):
    run_dir, codes = run("clean", tmp_path, owner_key)
    assert codes == [0, 0]
    assert alerts(run_dir, 0) == []
    assert alerts(run_dir, 1) == []
    assert main(["ledger", "verify", str(run_dir)]) == 0
    # one check entry per check with both ranks' rows; both metrics files chained into them
    assert_recorded(run_dir, 2)


@pytest.mark.parametrize(
    ("scenario", "evidence"),
    [("weights", "sensor:params-written"), ("lr", "lr-schedule"), ("rng", "sensor:reseed")],
)
def test_interfered_rank_is_named(tmp_path, owner_key, scenario, evidence):
    run_dir, codes = run(scenario, tmp_path, owner_key)
    assert codes == [0, 0]
    mine = alerts(run_dir, VICTIM)
    assert any(a["detector"] == evidence and a["rank"] == VICTIM for a in mine), mine
    first = min(a["step"] for a in mine)
    assert AT <= first <= AT + 2 * 5, "detected within two check intervals"
    cross = [a for a in alerts(run_dir, 0) if a["detector"] == "agreement"]
    if scenario != "rng":
        # DDP averages the gradients: a re-seed changes dropout masks, not the replicas
        assert cross, "rank 0 sees the disagreement too"
    assert {a["rank"] for a in cross} <= {VICTIM}


def test_straggler_is_named(tmp_path, owner_key):
    run_dir, codes = run("straggler", tmp_path, owner_key)
    assert codes == [0, 0]
    found = [a for r in (0, 1) for a in alerts(run_dir, r) if a["detector"] == "straggler"]
    assert found
    assert {a["rank"] for a in found} == {VICTIM}


def closed(run_dir: Path) -> bool:
    """`trainguard ledger verify` says intact and closed (the run key is gone too)."""
    verify = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "verify", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(verify.stdout)
    return verify.returncode == 0 and report["closed"] and not (run_dir / "run.key").exists()


def stopped(run_dir: Path, rank: int) -> tuple[int, str]:
    step, kind = (run_dir / f"stopped-{rank}").read_text().split()
    return int(step), kind


def test_halt_stops_every_rank_at_the_same_check(tmp_path, owner_key):
    """A check's rows are compared when the next step begins: every rank halts there, in
    optimizer.step, before the update; the run is closed."""
    run_dir, codes = run("halt", tmp_path, owner_key)
    assert all(code != 0 for code in codes)
    for rank in (0, 1):
        assert any(a["rank"] == VICTIM for a in alerts(run_dir, rank))
    assert closed(run_dir)
    ends = [stopped(run_dir, rank) for rank in (0, 1)]
    assert ends[0] == ends[1]
    step, kind = ends[0]
    assert kind == "GuardHalt"
    assert step % 5 == 0, "the step after a check"


def test_an_alert_between_a_check_and_its_comparison_halts_every_rank_together(tmp_path, owner_key):
    """A rank's own alert raised after a check's collective started and before its rows
    are compared travels in the next check's row: the victim does not halt alone (its
    peer would wait in DDP's next all-reduce until the process group times out)."""
    run_dir, codes = run("halt-window", tmp_path, owner_key)
    assert all(code != 0 for code in codes)
    ends = [stopped(run_dir, rank) for rank in (0, 1)]
    assert ends[0] == ends[1] == (AFTER_CHECK + 5, "GuardHalt")
    assert any(a["rank"] == VICTIM for a in alerts(run_dir, VICTIM))
    assert closed(run_dir)


def test_no_checkpoint_is_signed_over_a_check_that_halts(tmp_path, owner_key):
    run_dir, codes = run("halt-save", tmp_path, owner_key)
    assert all(code != 0 for code in codes)
    assert [stopped(run_dir, rank) for rank in (0, 1)] == [(CHECK_BEFORE_SAVE, "GuardHalt")] * 2
    assert not list(run_dir.glob("after-check-*"))
    assert closed(run_dir)


def test_a_crash_inside_the_guard_closes_the_run(tmp_path, owner_key):
    """Every rank fails with the same bug in the middle of training: each records the
    failure, and the run is closed rather than left open with its key."""
    run_dir, codes = run("crash", tmp_path, owner_key)
    assert all(code != 0 for code in codes)
    failures = [a for r in (0, 1) for a in alerts(run_dir, r) if a["detector"] == "failure"]
    assert {a["rank"] for a in failures} == {0, 1}
    assert closed(run_dir)


def test_sigterm_sender_is_reported(tmp_path, owner_key):
    run_dir = tmp_path / "sigterm"
    procs = launch("sigterm", run_dir, owner_key)
    deadline = time.monotonic() + 60
    while not (run_dir / f"ready-{VICTIM}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = int((run_dir / f"pid-{VICTIM}").read_text())
    killer = subprocess.Popen([sys.executable, "-c", f"import os; os.kill({victim}, 15)"])
    killer.wait()
    finish(procs)
    signals = ledger_alerts(run_dir, "signal")
    assert signals, "the SIGTERM is in the ledger"
    details = signals[0]["payload"]["details"]
    assert details["sender_pid"] == killer.pid
    assert details["sender_uid"] == os.getuid()
    assert signals[0]["payload"]["rank"] == VICTIM


def test_hang_records_every_stack(tmp_path, owner_key):
    run_dir = tmp_path / "hang"
    procs = launch("hang", run_dir, owner_key)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (run_dir / f"ready-{VICTIM}").exists():
            break
        time.sleep(0.1)
    time.sleep(6)  # the watchdogs (3 s) fire on both ranks
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    finish(procs)
    hangs = ledger_alerts(run_dir, "hang")
    assert {e["payload"]["rank"] for e in hangs} >= {VICTIM}
    stacks = hangs[0]["payload"]["details"]["stacks"]
    assert any(
        "time.sleep" in s or "sleep" in s or "all_reduce" in s or "wait" in s
        for s in stacks.values()
    )
