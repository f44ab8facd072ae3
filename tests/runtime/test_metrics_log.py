"""What the run records for the incident report (issue 13): one ``check`` entry per check,
written by rank 0, with every rank's row and metrics, and per-step metrics files chained
into those entries (``runtime/metrics_log.py``). Real Guards, real SQLite ledgers.

PYTEST_DONT_REWRITE: this file plays the job's own code (see test_guard.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import trainguard
from trainguard.ledger.verify import read_entries
from trainguard.runtime import agreement
from trainguard.runtime.metrics_log import CHAIN0, chain


def chunks_by_check(path: Path, checks: list[int]) -> list[bytes]:
    """The file's lines cut where the checks cut them: a check at step S (the numbering
    alerts use: the state after steps 0 .. S-1) covers the steps before S."""
    cuts: list[list[bytes]] = [[] for _ in checks]
    rest: list[bytes] = []
    for line in path.read_bytes().splitlines(keepends=True):
        step = json.loads(line)["step"]
        at = next((i for i, c in enumerate(checks) if step < c), None)
        (rest if at is None else cuts[at]).append(line)
    return [b"".join(c) for c in cuts] + [b"".join(rest)]


def assert_recorded(run_dir: Path, world: int) -> list[dict]:
    """Every check entry holds every rank's row and metrics; every rank's metrics file
    hashes to the chain its check entries and its closing entry hold."""
    entries = read_entries(run_dir)[0]
    checks = [e.payload for e in entries if e.kind == "check"]
    assert checks, "no check entry"
    assert len({c["step"] for c in checks}) == len(checks), "one entry per check, not per rank"
    for check in checks:
        assert check["fields"] == list(agreement.FIELDS)
        assert len(check["rows"]) == world
        assert all(len(row) == len(agreement.FIELDS) for row in check["rows"])
        assert all(len(values) == world for values in check["metrics"].values())
        assert len(check["metrics_chain"]) == world
    closing = {e.actor.rank: e.payload for e in entries if e.kind == "rank.closed"}
    for rank in range(world):
        steps = [c["step"] for c in checks]
        link = CHAIN0
        parts = chunks_by_check(run_dir / "metrics" / f"rank{rank}.jsonl", steps)
        for check, part in zip(checks, parts, strict=False):
            link = chain(link, part)
            assert check["metrics_chain"][rank] == link.hex()
        if parts[-1]:
            link = chain(link, parts[-1])
        assert closing[rank]["metrics"]["chain"] == link.hex()
    return checks


def test_the_checks_and_the_steps_are_recorded(tmp_path, owner_key):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run_dir = tmp_path / "run"
    guard = trainguard.Guard(
        model, optimizer, run_dir=run_dir, every=5, owner_key=owner_key, verify_env=False
    )
    gen = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for _ in range(12):
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        guard.step(loss=loss, grad_norm=norm)
        losses.append(loss.item())
        norms.append(norm.item())
    guard.close()
    assert guard.alerts == []
    lines = [
        json.loads(line)
        for line in (run_dir / "metrics" / "rank0.jsonl").read_text().split("\n")
        if line
    ]
    assert [line["step"] for line in lines] == list(range(12))
    assert [line["loss"] for line in lines] == losses
    assert [line["grad_norm"] for line in lines] == norms
    assert all(line["lr"] == 0.05 and line["busy_s"] >= 0 for line in lines)
    checks = assert_recorded(run_dir, 1)
    assert [c["step"] for c in checks] == [5, 10]
    first = checks[0]["metrics"]
    assert math.isclose(first["grad_norm"][0], sum(norms[:5]) / 5, rel_tol=1e-12)
    assert first["lr"] == [0.05]
    assert first["wall_s"][0] > 0
    assert checks[0]["severity"] == 0


def test_an_edited_metrics_file_no_longer_matches_its_chain():
    honest = b'{"step": 0, "loss": 1.5, "grad_norm": null, "lr": 0.1, "busy_s": 0.01}\n'
    edited = honest.replace(b"1.5", b"0.5")
    assert chain(CHAIN0, honest) != chain(CHAIN0, edited)
    assert chain(CHAIN0, honest) != chain(CHAIN0, honest + honest), "a line added"


def test_a_metrics_file_that_cannot_be_written_is_reported_and_training_goes_on(
    tmp_path, owner_key
):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics").write_text("a file where the folder goes")
    guard = trainguard.Guard(
        model, optimizer, run_dir=run_dir, every=5, owner_key=owner_key, verify_env=False
    )
    for _ in range(12):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        guard.step(loss=loss)
    guard.close()
    faults = [a for a in guard.alerts if "metrics file" in a.message]
    assert len(faults) == 1, [a.line() for a in guard.alerts]
    closing = next(e.payload for e in read_entries(run_dir)[0] if e.kind == "rank.closed")
    assert closing["metrics"]["lines"] == 0
    assert "failed" in closing["metrics"]
    assert guard._step == 12


def test_replay_refuses_a_metrics_file_that_is_not_a_regular_file(tmp_path):
    """A FIFO where a rank's metrics file was: replay's reader notes it, never blocks."""
    import os

    from trainguard.replay import Record, _trusted_lines

    fifo = tmp_path / "rank0.jsonl"
    os.mkfifo(fifo)
    record = Record()
    assert _trusted_lines(fifo, 0, record, {"chain": "00" * 8}) == {}
    assert len(record.notes) == 1
    assert "not used" in record.notes[0]
