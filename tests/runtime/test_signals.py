"""Signals on a real torchrun job under the Guard (``protect_signals``): the sender is
recorded, then the signal does what it would have done without trainguard.

Each test starts ``torchrun --nproc-per-node 2`` (two gloo ranks of
``tests.runtime.signal_worker``) and signals torchrun as a scheduler or a terminal
would: torchrun passes the signal on to every rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.runtime.test_guard_distributed import ROOT, free_port, ledger_alerts
from trainguard.runtime.liveness import pid_alive

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RANKS = (0, 1)


def torchrun(scenario: str, run_dir: Path, key: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            free_port(),
            "-m",
            "tests.runtime.signal_worker",
            scenario,
            str(run_dir),
            str(key),
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(run_dir: Path, marker: str, launcher: subprocess.Popen[bytes]) -> list[int]:
    """Waits until every rank wrote ``marker-RANK``; returns the ranks' pids."""
    deadline = time.monotonic() + 120
    while not all((run_dir / f"{marker}-{rank}").exists() for rank in RANKS):
        if launcher.poll() is not None or time.monotonic() > deadline:
            launcher.kill()
            out, err = launcher.communicate()
            pytest.fail(f"the job never reached {marker}:\n{err.decode()[-3000:]}")
        time.sleep(0.1)
    return [int((run_dir / f"pid-{rank}").read_text()) for rank in RANKS]


def all_gone(pids: list[int], within: float) -> float | None:
    """Seconds until every pid is gone, or None if some outlived ``within``."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if not any(pid_alive(pid) for pid in pids):
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def stop(launcher: subprocess.Popen[bytes], pids: list[int]) -> str:
    """Whatever is left is killed (a failed test must not leave a job running)."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if launcher.poll() is None:
        launcher.kill()
    _, err = launcher.communicate(timeout=60)
    return err.decode(errors="replace")


def verify(run_dir: Path) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "verify", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, json.loads(done.stdout)


def closing_entries(run_dir: Path) -> list[dict]:
    show = subprocess.run(
        [sys.executable, "-m", "trainguard", "ledger", "show", str(run_dir), "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [
        e for e in json.loads(show.stdout)["entries"] if e["kind"] in ("rank.closed", "run.closed")
    ]


def test_sigterm_from_torchrun_ends_every_rank_and_closes_the_run(tmp_path, owner_key):
    """A scheduler stops the job: torchrun passes SIGTERM on, and every rank must record
    who sent it and close the run before the signal's default action ends it."""
    run_dir = tmp_path / "run"
    launcher = torchrun("train", run_dir, owner_key)
    pids = wait_for(run_dir, "ready", launcher)
    launcher.send_signal(signal.SIGTERM)
    took = all_gone([launcher.pid, *pids], within=5.0)
    err = stop(launcher, pids)
    assert took is not None, f"processes outlived the SIGTERM by 5 s:\n{err[-3000:]}"

    signals = ledger_alerts(run_dir, "signal")
    assert {s["payload"]["rank"] for s in signals} == set(RANKS), err[-3000:]
    for entry in signals:
        details = entry["payload"]["details"]
        assert details["signal"] == "SIGTERM"
        assert details["sender_pid"] == launcher.pid
        assert details["sender_uid"] == os.getuid()
        assert "torch.distributed.run" in details["sender"]
        assert details["action"] == "default"
    closings = closing_entries(run_dir)
    assert sorted(e["kind"] for e in closings) == ["rank.closed", "rank.closed", "run.closed"]
    assert closings[-1]["kind"] == "run.closed"
    assert f"SIGTERM from pid {launcher.pid}" in closings[-1]["payload"]["reason"]
    code, report = verify(run_dir)
    assert code == 0
    assert report["closed"] is True


def test_ctrl_c_during_guard_start_stops_the_job(tmp_path, owner_key):
    """Ctrl-C while every rank is inside ``Guard(...)`` (reading its configuration):
    KeyboardInterrupt at once, no error from a half-built Guard."""
    run_dir = tmp_path / "run"
    launcher = torchrun("startup", run_dir, owner_key)
    pids = wait_for(run_dir, "starting", launcher)
    launcher.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to torchrun
    took = all_gone([launcher.pid, *pids], within=20.0)
    err = stop(launcher, pids)
    assert took is not None, f"the job outlived Ctrl-C by 20 s:\n{err[-3000:]}"
    assert launcher.returncode != 0
    assert "KeyboardInterrupt" in err
    assert "has no attribute" not in err
    assert "could not record" not in err
    signals = ledger_alerts(run_dir, "signal")
    assert {s["payload"]["rank"] for s in signals} == set(RANKS)
    assert all(s["payload"]["details"]["sender_pid"] == launcher.pid for s in signals)
    code, _ = verify(run_dir)
    assert code == 0


def test_ctrl_c_during_training_stops_the_job(tmp_path, owner_key):
    run_dir = tmp_path / "run"
    launcher = torchrun("train", run_dir, owner_key)
    pids = wait_for(run_dir, "ready", launcher)
    launcher.send_signal(signal.SIGINT)
    took = all_gone([launcher.pid, *pids], within=20.0)
    err = stop(launcher, pids)
    assert took is not None, f"the job outlived Ctrl-C by 20 s:\n{err[-3000:]}"
    assert launcher.returncode != 0
    assert "KeyboardInterrupt" in err
    assert "has no attribute" not in err
    signals = ledger_alerts(run_dir, "signal")
    assert {s["payload"]["rank"] for s in signals} == set(RANKS)
    assert all(s["payload"]["details"]["action"] == "handler" for s in signals)
    assert len([e for e in closing_entries(run_dir) if e["kind"] == "rank.closed"]) == 2
    code, _ = verify(run_dir)
    assert code == 0


def test_the_jobs_own_sigterm_handler_still_runs(tmp_path, owner_key):
    """Checkpoint on preemption: the job's handler runs (and exits), and the signal and
    its sender are in the ledger all the same."""
    run_dir = tmp_path / "run"
    launcher = torchrun("handler", run_dir, owner_key)
    pids = wait_for(run_dir, "ready", launcher)
    launcher.send_signal(signal.SIGTERM)
    took = all_gone([launcher.pid, *pids], within=20.0)
    err = stop(launcher, pids)
    assert took is not None, f"the job outlived SIGTERM by 20 s:\n{err[-3000:]}"
    for rank in RANKS:
        assert (run_dir / f"checkpoint-{rank}").read_text() == "SIGTERM", err[-3000:]
    signals = ledger_alerts(run_dir, "signal")
    assert {s["payload"]["rank"] for s in signals} == set(RANKS)
    for entry in signals:
        details = entry["payload"]["details"]
        assert details["sender_pid"] == launcher.pid
        assert details["sender_uid"] == os.getuid()
        assert details["action"] == "handler"
    code, _ = verify(run_dir)
    assert code == 0


UNPROTECTED_JOB = """
import os, signal, sys, torch, trainguard
mode, run_dir, key = sys.argv[1:4]
if mode == "handler":
    def handler(signum, frame):
        open(os.path.join(run_dir, "handled"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, handler)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with trainguard.Guard(model, optimizer, run_dir=run_dir, owner_key=key, verify_env=False):
    os.kill(os.getpid(), signal.SIGTERM)
    signal.raise_signal(signal.SIGUSR2)  # not reached: the SIGTERM acts first
"""


@pytest.mark.parametrize(("mode", "status"), [("default", -signal.SIGTERM), ("handler", 0)])
def test_without_protect_signals_the_previous_handler_still_acts(tmp_path, owner_key, mode, status):
    """No protect_signals: the Guard's own handlers record the signal (sender unknown),
    then hand it to the handler they replaced, or let it end the process."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", UNPROTECTED_JOB, mode, str(run_dir), str(owner_key)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == status, done.stderr[-3000:]
    assert (run_dir / "handled").exists() == (mode == "handler")
    (entry,) = ledger_alerts(run_dir, "signal")
    assert entry["payload"]["details"]["signal"] == "SIGTERM"
    assert entry["payload"]["details"]["sender_pid"] is None
    code, report = verify(run_dir)
    assert code == 0
    assert report["closed"] is True
