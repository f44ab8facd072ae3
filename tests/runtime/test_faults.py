"""Fault injection: the Guard never takes the job down (unless policy says halt).

Under policy "alert" nothing the Guard does may raise into the training loop: a failure of
its own (a torch function it uses replaced by something that raises, a ledger that cannot
be written) is an alert from detector ``guard`` and a ``guard.error`` entry, and training
goes on. Under policy "halt" the same fault stops the job deliberately with GuardHalt.
A failed start removes everything the Guard installed; ``close()`` always finishes and
reports what it could not write. The job's own exceptions still reach the job.

PYTEST_DONT_REWRITE: this file plays the job's own code (see test_guard.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest
import torch
import torch.distributed as dist

import trainguard
from tests.runtime.test_guard_distributed import start_ranks
from trainguard.cli import main
from trainguard.ledger import open_backend, verify
from trainguard.runtime import GuardHalt

POLICIES = ("alert", "halt")


class Raising:
    """A stand-in for a torch function: calling it raises."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError("injected: called")


class Hostile:
    """An object whose every attribute access raises (``__class__`` included)."""

    def __getattribute__(self, name):
        raise RuntimeError(f"injected: attribute {name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError("injected: called")


class HostileRepr(str):
    """A seed string whose repr raises; ``random.seed`` uses only its characters."""

    def __repr__(self):
        raise RuntimeError("injected: repr")


def make(run_dir: Path, key: Path, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    settings = {"every": 5, "owner_key": key, "verify_env": False, "seed": 0, **options}
    settings.setdefault("code_roots", [__file__])
    guard = trainguard.Guard(model, optimizer, run_dir=run_dir, **settings)
    return model, optimizer, guard


def train(model, optimizer, guard, steps, before=None):
    gen = torch.Generator().manual_seed(1)
    done = 0
    for step in range(steps):
        if before is not None:
            before(step)
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        guard.step(loss=loss)
        done += 1
    return done


def ledger_kinds(run_dir: Path) -> list[str]:
    with sqlite3.connect(run_dir / "ledger.db") as conn:
        return [row[0] for row in conn.execute("SELECT kind FROM entries ORDER BY seq")]


@pytest.fixture
def swap():
    """``swap(owner, name, value)`` replaces an attribute for the test, restored after."""
    missing = object()
    saved = []

    def put(owner, name, value):
        saved.append((owner, name, vars(owner).get(name, missing)))
        setattr(owner, name, value)

    yield put
    for owner, name, value in reversed(saved):
        if value is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


# --- 1. the Guard's own failures never reach the training loop under "alert" ------------


def test_a_torch_function_the_guard_uses_raising_does_not_stop_training(tmp_path, owner_key, swap):
    """torch.cat replaced by an object that raises: the Guard's optimizer hooks and its
    fingerprint use it; the job does not. Training goes on, the fault is recorded."""
    model, optimizer, guard = make(tmp_path / "run", owner_key)
    assert (
        train(model, optimizer, guard, 20, lambda s: s == 3 and swap(torch, "cat", Raising())) == 20
    )
    guard.close()
    assert "guard" in {a.detector for a in guard.alerts}
    assert "guard.error" in ledger_kinds(tmp_path / "run")
    assert main(["ledger", "verify", str(tmp_path / "run")]) == 0


def test_the_same_fault_halts_under_halt(tmp_path, owner_key, swap):
    model, optimizer, guard = make(tmp_path / "run", owner_key, policy="halt")
    with pytest.raises(GuardHalt):
        train(model, optimizer, guard, 20, lambda s: s == 3 and swap(torch, "cat", Raising()))
    guard.close()
    assert guard.close_problems == []
    kinds = ledger_kinds(tmp_path / "run")
    assert "run.halted" in kinds
    assert kinds[-1] == "run.closed"


def test_a_watched_function_whose_attributes_raise_is_a_monkeypatch_not_a_crash(
    tmp_path, owner_key, swap
):
    model, optimizer, guard = make(tmp_path / "run", owner_key)
    train(
        model,
        optimizer,
        guard,
        12,
        lambda s: s == 2 and swap(torch.nn.functional, "relu", Hostile()),
    )
    guard.close()
    patched = [a for a in guard.alerts if a.detector == "monkeypatch"]
    assert any("relu was replaced" in a.message for a in patched)
    assert main(["ledger", "verify", str(tmp_path / "run")]) == 0


def test_a_seed_the_guard_cannot_show_still_seeds(tmp_path, owner_key):
    """The seed wrapper shows the arguments: one whose repr raises must not break the
    job's own ``random.seed`` (which only hashes it)."""
    model, optimizer, guard = make(tmp_path / "run", owner_key)
    train(model, optimizer, guard, 2)
    random.seed(HostileRepr("seed"))
    first = random.random()
    random.seed("seed")
    assert first == random.random()
    train(model, optimizer, guard, 8)
    guard.close()
    assert ["<HostileRepr>"] in [e.get("args") for e in guard.events]


def test_a_class_attribute_that_raises_when_read_is_contained(tmp_path, owner_key, swap):
    """A descriptor planted on a watched class raises when the patch sensor reads it."""

    class Trap:
        def __get__(self, obj, owner=None):
            raise RuntimeError("injected: descriptor")

    model, optimizer, guard = make(tmp_path / "run", owner_key)
    swap(torch.optim.SGD, "trap", Trap())
    assert train(model, optimizer, guard, 12) == 12
    guard.close()
    assert any("SGD.trap was added" in a.message for a in guard.alerts)


def test_the_jobs_own_exceptions_still_propagate(tmp_path, owner_key):
    model, optimizer, guard = make(tmp_path / "run", owner_key)

    def jobs_hook(opt, args, kwargs):
        raise ValueError("the job's own hook")

    handle = optimizer.register_step_pre_hook(jobs_hook)
    with pytest.raises(ValueError, match="the job's own hook"):
        train(model, optimizer, guard, 1)
    handle.remove()
    with pytest.raises(ValueError, match="invalid literal"):
        torch.manual_seed("not a seed")  # the wrapped seeding function's own error
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    with pytest.raises(RuntimeError, match="threads can only be started once"):
        thread.start()
    guard.close()


# --- 2. a failed start leaves nothing behind --------------------------------------------


def _installed():
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optim_mod

    return {
        "global optimizer hooks": (
            dict(optim_mod._global_optimizer_pre_hooks),
            dict(optim_mod._global_optimizer_post_hooks),
        ),
        "global module hooks": (
            dict(module_mod._global_forward_hooks),
            dict(module_mod._global_forward_pre_hooks),
        ),
        "seeders": (torch.manual_seed, torch.random.manual_seed, random.seed, numpy.random.seed),
        "thread start": threading.Thread.start,
        "signals": [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)],
        "all_reduce": dist.all_reduce,
        "threads": {t.ident for t in threading.enumerate() if t.is_alive()},
    }


def _failed_start(tmp_path, owner_key, case):
    run_dir = tmp_path / "run"
    key = owner_key
    if case == "run folder cannot be created":
        (tmp_path / "file").write_text("x")
        run_dir = tmp_path / "file" / "run"
    elif case == "key missing":
        key = tmp_path / "no-such.key"
    elif case == "ledger cannot be opened":
        run_dir.mkdir()
        (run_dir / "ledger.db").write_bytes(b"not a database" * 100)
        (run_dir / "run.key").write_bytes(b"")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    pre, post = (
        dict(optimizer._optimizer_step_pre_hooks),
        dict(optimizer._optimizer_step_post_hooks),
    )
    before = _installed()
    with pytest.raises(trainguard.Error) as caught:
        trainguard.Guard(
            model, optimizer, run_dir=run_dir, owner_key=key, verify_env=False, every=5
        )
    message = str(caught.value)
    assert "\n" not in message
    assert message == message[:1].lower() + message[1:]
    time.sleep(0.3)  # the watchdog thread notices it was stopped
    assert dict(optimizer._optimizer_step_pre_hooks) == pre
    assert dict(optimizer._optimizer_step_post_hooks) == post
    assert _installed() == before
    return message


@pytest.mark.parametrize(
    "case", ["run folder cannot be created", "key missing", "ledger cannot be opened"]
)
def test_a_failed_start_removes_what_it_installed(tmp_path, owner_key, case):
    _failed_start(tmp_path, owner_key, case)


def test_a_sensor_whose_install_raises_fails_the_start_cleanly(tmp_path, owner_key, swap):
    """An object planted in a watched module makes the patch sensor's snapshot raise,
    after the optimizer hooks, seed wrappers and collectives' wrappers are installed."""
    swap(torch.nn.functional, "planted", Hostile())
    message = _failed_start(tmp_path, owner_key, "sensor")
    assert "injected" in message


# --- 3. close() always finishes --------------------------------------------------------


def test_close_finishes_when_the_run_folder_was_deleted(tmp_path, owner_key, caplog):
    model, optimizer, guard = make(tmp_path / "run", owner_key)
    train(model, optimizer, guard, 4)
    shutil.rmtree(tmp_path / "run")
    train(model, optimizer, guard, 8)
    before = threading.Thread.start
    with caplog.at_level(logging.WARNING, logger="trainguard"):
        guard.close()
    assert threading.Thread.start is not before  # the guard's wrapper was removed
    assert guard.close_problems
    assert len(caplog.records) >= len(guard.close_problems)
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert "ledger" in {a.detector for a in guard.alerts}


# --- 4. the ledger vanishing or replaced mid-run ---------------------------------------


def test_a_deleted_ledger_is_noticed(tmp_path, owner_key):
    run_dir = tmp_path / "run"
    model, optimizer, guard = make(run_dir, owner_key)

    def delete(step):
        if step == 6:
            for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
                (run_dir / name).unlink(missing_ok=True)

    assert train(model, optimizer, guard, 20, delete) == 20
    guard.close()
    lost = [a for a in guard.alerts if a.detector == "ledger"]
    assert len(lost) == 1
    assert "deleted" in lost[0].message
    lines = [json.loads(x) for x in (run_dir / "alerts-rank0.jsonl").read_text().splitlines()]
    assert "ledger" in {x["detector"] for x in lines}


def test_a_replaced_ledger_is_noticed_and_halts(tmp_path, owner_key):
    run_dir = tmp_path / "run"
    model, optimizer, guard = make(run_dir, owner_key, policy="halt")

    def replace(step):
        if step == 6:
            shutil.copy(run_dir / "ledger.db", run_dir / "copy.db")
            os.replace(run_dir / "copy.db", run_dir / "ledger.db")

    with pytest.raises(GuardHalt, match="replaced"):
        train(model, optimizer, guard, 20, replace)
    guard.close()


def test_the_ledgers_own_checkpoints_raise_no_alert(tmp_path, owner_key, monkeypatch):
    """Many entries (the job's own re-seeding, recorded) make SQLite checkpoint its WAL:
    the database keeps its inode, nothing is reported; nor when the job changes its
    working folder under a run folder given as a relative path."""
    monkeypatch.chdir(tmp_path)
    model, optimizer, guard = make(Path("run"), owner_key, policy="halt", every=2)
    for i in range(300):
        guard.ledger.append("note", {"i": i, "pad": "x" * 2000}, rank=0)
    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "elsewhere")
    train(model, optimizer, guard, 10, lambda s: torch.manual_seed(s))
    guard.close()
    assert guard.alerts == []
    assert guard.close_problems == []


# --- 5. fault injection in real jobs ---------------------------------------------------


def start_job(scenario, policy, tmp_path, key, world=1, preexec=None):
    run_dir = tmp_path / f"{scenario}-{policy}"
    procs = start_ranks(
        "tests.runtime.fault_worker",
        [scenario, policy],
        world,
        [str(run_dir), str(key)],
        preexec=preexec,
    )
    return run_dir, procs


def summaries(procs, timeout=90):
    """Each rank's summary; every rank must end normally (exit 0, no traceback)."""
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr.decode()[-3000:]
        assert b"Traceback" not in stderr, stderr.decode()[-3000:]
        out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return out


def run_job(scenario, policy, tmp_path, key, world=1):
    run_dir, procs = start_job(scenario, policy, tmp_path, key, world)
    return run_dir, summaries(procs)


def _unprivileged():
    from tests.unprivileged import drop_file_privileges, permissions_mean_something

    why = permissions_mean_something()
    if why is not None:
        pytest.skip(f"a read-only folder means nothing here: {why}")
    return drop_file_privileges


@pytest.mark.slow
def test_read_only_run_folder(tmp_path, owner_key):
    """The run folder made read-only mid-run (as a user bound by permission bits): the
    ledger's open file still takes entries, nothing new can be created there."""
    preexec = _unprivileged()
    jobs = {p: start_job("readonly", p, tmp_path, owner_key, preexec=preexec) for p in POLICIES}
    done = {p: summaries(procs)[0] for p, (_, procs) in jobs.items()}
    for run_dir, _ in jobs.values():
        os.chmod(run_dir, 0o755)
    assert done["alert"]["steps"] == 20
    assert not done["alert"]["halted"]
    assert "ledger" in done["alert"]["detectors"]
    assert any("run.key" in p or "alerts" in p for p in done["alert"]["close_problems"])
    assert done["halt"]["halted"]
    assert done["halt"]["steps"] < 20


@pytest.mark.slow
def test_full_disk(tmp_path, owner_key):
    """No file may grow (RLIMIT_FSIZE); the job then re-seeds itself, which the Guard
    writes to the ledger: the write fails."""
    jobs = {p: start_job("full", p, tmp_path, owner_key) for p in POLICIES}
    done = {p: summaries(procs)[0] for p, (_, procs) in jobs.items()}
    for summary in done.values():
        assert "guard" in summary["detectors"]
        assert "guard" in summary["stream"]
        assert summary["close_problems"]
    assert done["alert"]["steps"] == 20
    assert not done["alert"]["halted"]
    assert done["halt"]["halted"]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_deleted_ledger_is_reported_by_every_rank(tmp_path, owner_key):
    run_dir, summaries = run_job("delete-ledger", "alert", tmp_path, owner_key, world=2)
    for rank, summary in enumerate(summaries):
        assert summary["steps"] == 20
        assert "ledger" in summary["detectors"], rank
        assert "ledger" in summary["stream"], rank


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("policy", ["alert", "halt"])
def test_a_raising_sensor_on_one_rank(tmp_path, owner_key, policy):
    run_dir, summaries = run_job("raise-sensor", policy, tmp_path, owner_key, world=2)
    assert "guard" in summaries[1]["detectors"]
    for summary in summaries:
        if policy == "alert":
            assert summary["steps"] == 20
            assert not summary["halted"]
        else:
            assert summary["halted"]
            # both ranks, when the first check after the fault is compared: at the start
            # of the next step (in its optimizer.step, before the update)
            assert summary["steps"] == 10


@pytest.mark.slow
def test_a_locked_ledger_does_not_stall_training(tmp_path, owner_key):
    """Another process holds the ledger's write lock for 10 s while the job runs 20
    steps that write to the ledger (the job re-seeding itself, recorded): the steps go
    on (entries queued), and once the lock is free every entry is written, each with
    the delay it waited."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = make(run_dir, owner_key)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(10)\n",
            str(run_dir / "ledger.db"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        started = time.monotonic()
        train(model, optimizer, guard, 20, lambda s: torch.manual_seed(s))
        took = time.monotonic() - started
    finally:
        holder.wait()
        guard.close()
    assert took < 3.0
    assert not guard.close_problems
    report = verify(run_dir)
    assert not report.tampered, report.problems
    assert report.closed
    delayed = [
        e.payload
        for e in open_backend(run_dir, readonly=True).entries()
        if "delayed_s" in e.payload
    ]
    assert delayed, "entries written after the lock was freed record their delay"
    assert all(p["delayed_s"] > 0 for p in delayed)
