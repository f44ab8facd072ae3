"""Checkpoint lineage: a Guard resumes only from the run's latest recorded checkpoint.

The technique (issue 11): resuming a job from an older signed checkpoint of the same run,
or from a signed checkpoint of another run of the same owner. Both verify (the owner
signed them), so the signature alone cannot refuse them. The ledger records every
checkpoint saved and loaded; an earlier one of the run needs ``rollback=True``, another
run's needs ``fork=True``, each recorded with who asked; a checkpoint signed for the run
whose hash the ledger does not record is refused outright. Real Guard runs, real files.

PYTEST_DONT_REWRITE: this file plays the job's own code (see tests/runtime/test_guard.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import trainguard
from tests.ledger.conftest import db
from trainguard.errors import CheckpointError
from trainguard.integrity import keygen
from trainguard.ledger import verify
from trainguard.ledger.verify import read_entries


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("owner") / "keys")


def guarded(run_dir: Path, key: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = trainguard.Guard(
        model,
        optimizer,
        run_dir=run_dir,
        every=5,
        owner_key=key,
        verify_env=False,
        seed=0,
        code_roots=[__file__],
    )
    return model, optimizer, guard


def train(model, optimizer, guard, steps):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        guard.step(loss=loss)


def run_with_saves(run_dir: Path, key: Path, seed: int = 0) -> tuple[Path, Path]:
    """A closed run that saved at steps 5 and 10."""
    model, optimizer, guard = guarded(run_dir, key, seed)
    train(model, optimizer, guard, 5)
    guard.save_checkpoint(run_dir / "step5.safetensors")
    train(model, optimizer, guard, 5)
    guard.save_checkpoint(run_dir / "step10.safetensors")
    guard.close()
    assert guard.alerts == []
    return run_dir / "step5.safetensors", run_dir / "step10.safetensors"


def state(model, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for per_param in optimizer.state_dict()["state"].values():
        tensors += [v.clone() for v in per_param.values() if isinstance(v, torch.Tensor)]
    return tensors


def unchanged(before: list[torch.Tensor], model, optimizer) -> bool:
    after = state(model, optimizer)
    return len(before) == len(after) and all(
        torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )


def recorded(run_dir: Path, kind: str) -> list[dict]:
    return [e.payload for e in read_entries(run_dir)[0] if e.kind == kind]


def test_latest_checkpoint_resumes(tmp_path, owner):
    run_dir = tmp_path / "run"
    _, step10 = run_with_saves(run_dir, owner[0])
    model, optimizer, guard = guarded(run_dir, owner[0])
    guard.load_checkpoint(step10)
    train(model, optimizer, guard, 2)
    guard.close()
    assert guard.alerts == []
    assert recorded(run_dir, "run.resumed")[-1]["to_step"] == 10
    assert verify(run_dir, owner_public_key=owner[1]).verdict == "intact"


def test_older_checkpoint_of_the_run_needs_rollback(tmp_path, owner):
    """Step 5 of the same run, signed and intact, without rollback=True: refused, model
    and optimizer untouched; with it: restored and recorded with who asked."""
    run_dir = tmp_path / "run"
    step5, _ = run_with_saves(run_dir, owner[0])
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 1)  # an optimizer state to leave untouched
    before = state(model, optimizer)
    with pytest.raises(CheckpointError, match="not this run's latest checkpoint") as refused:
        guard.load_checkpoint(step5)
    assert "\n" not in str(refused.value)
    assert unchanged(before, model, optimizer)
    guard.load_checkpoint(step5, rollback=True)
    train(model, optimizer, guard, 2)
    guard.close()
    rollback = recorded(run_dir, "run.rollback")[-1]
    assert rollback["to_step"] == 5
    assert rollback["asked_by"].startswith(__file__)
    assert recorded(run_dir, "checkpoint.refused")
    # the restored checkpoint is now the run's latest: a resume from it needs nothing
    model, optimizer, guard = guarded(run_dir, owner[0])
    guard.load_checkpoint(step5)
    guard.close()
    assert verify(run_dir, owner_public_key=owner[1]).verdict == "intact"


def test_another_runs_checkpoint_needs_fork(tmp_path, owner):
    """A checkpoint of another run of the same owner: refused, untouched; fork=True
    restores it and records the fork with who asked."""
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_with_saves(run_dir, owner[0])
    _, foreign = run_with_saves(other, owner[0], seed=3)
    model, optimizer, guard = guarded(run_dir, owner[0])
    this_run = guard.ledger.run_id
    before = state(model, optimizer)
    with pytest.raises(CheckpointError, match="pass fork=True"):
        guard.load_checkpoint(foreign)
    assert unchanged(before, model, optimizer)
    guard.load_checkpoint(foreign, fork=True)
    guard.close()
    forked = recorded(run_dir, "run.forked")[-1]
    assert forked["checkpoint_run"] not in (None, this_run)
    assert forked["asked_by"].startswith(__file__)
    assert not unchanged(before, model, optimizer)


def test_unrecorded_checkpoint_of_the_run_is_refused_even_as_rollback(tmp_path, owner):
    """A checkpoint signed for this run whose record is gone (its ``checkpoint.saved``
    entry deleted while it was last): no declaration makes it acceptable."""
    run_dir = tmp_path / "run"
    model, optimizer, guard = guarded(run_dir, owner[0])
    train(model, optimizer, guard, 5)
    guard.save_checkpoint(tmp_path / "kept.safetensors")
    train(model, optimizer, guard, 2)
    guard.save_checkpoint(tmp_path / "unrecorded.safetensors")
    conn = db(run_dir)
    # the record and anything after it (a check's tail record, written by a thread)
    conn.execute(
        "DELETE FROM entries WHERE seq >= "
        "(SELECT MAX(seq) FROM entries WHERE kind = 'checkpoint.saved')"
    )
    conn.close()
    before = state(model, optimizer)
    for declared in ({}, {"rollback": True}, {"fork": True}):
        with pytest.raises(CheckpointError, match="records no such checkpoint"):
            guard.load_checkpoint(tmp_path / "unrecorded.safetensors", **declared)
    assert unchanged(before, model, optimizer)
    guard.load_checkpoint(tmp_path / "kept.safetensors", rollback=True)
    guard.close()
