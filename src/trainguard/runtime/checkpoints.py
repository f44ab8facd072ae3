"""Checkpoints through the Guard: signed saves, verified resumes and declared rollbacks.

A resume (a fresh Guard, before its first step) continues the step count from the
checkpoint's. A rollback (``rollback=True``) returns to an earlier checkpoint of the run in
the middle of training: it is recorded in the ledger with who asked for it, and what the
restore sets (weights, optimizer state, RNG states, the learning rate) becomes the new
baseline of every sensor, so that the job's own rollback is never an alert.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from trainguard.errors import Error, Severity
from trainguard.runtime.fingerprint import (
    WriteWatch,
    hyperparameter_values,
    hyperparameters_hash,
    learning_rates,
    optimizer_state_hash,
)
from trainguard.runtime.interface import Alert, GuardHalt

if TYPE_CHECKING:
    from trainguard.runtime.guard import Guard


def save(guard: Guard, path: str | os.PathLike[str], **extra: Any) -> Any:
    """A signed checkpoint of model, optimizer and RNG, recorded in the ledger (rank 0)."""
    from trainguard import checkpoint

    saved = None
    failed: Error | None = None
    if guard.rank == 0:
        try:
            saved = checkpoint.save(
                path,
                model=_unwrap(guard.model),
                optimizer=guard.optimizer,
                step=guard._step,
                data_position={"step": guard._step},
                extra=extra or None,
                ledger=guard.ledger,
            )
        except Error as exc:  # a full disk, say: the other ranks wait in the barrier first
            failed = exc
    _barrier(guard.group, guard.world)
    if failed is not None:
        raise failed
    return saved


def load(guard: Guard, path: str | os.PathLike[str], *, rollback: bool = False) -> Any:
    """Verify and restore a checkpoint; a tampered or foreign one halts before training.

    Resuming (a fresh process, before its first step) continues the step count from
    the checkpoint's. ``rollback=True`` declares a return to an earlier checkpoint of
    this run in the middle of training (after a loss spike, say): it is recorded in the
    ledger with who asked for it, and what the restore does to the weights, the
    optimizer and the RNG is the job's own doing, not an alert. Restoring in the middle
    of training without declaring it is refused under policy "halt".
    """
    from trainguard import checkpoint
    from trainguard.errors import CheckpointError

    if guard._stepped and not rollback:
        alert = Alert(
            guard.at,
            guard.rank,
            "checkpoint",
            Severity.HIGH,
            f"checkpoint {path} restored in the middle of training without being declared "
            "(pass rollback=True to roll back)",
            {"path": str(path)},
        )
        guard._raise(alert)
        if guard.policy == "halt":
            raise GuardHalt(alert)
    with contextlib.suppress(Exception):
        guard._drain()  # the steps before the restore are judged as they were
    guard.seeds.active = False  # the restore sets the RNG states: not a re-seed
    try:
        loaded = checkpoint.load(
            path, model=_unwrap(guard.model), optimizer=guard.optimizer, ledger=guard.ledger
        )
    except CheckpointError as exc:
        alert = Alert(
            guard.at,
            guard.rank,
            "checkpoint",
            Severity.CRITICAL,
            f"refused checkpoint {path}: {exc}",
            {"path": str(path)},
        )
        guard._raise(alert)
        if guard.policy == "halt":
            raise GuardHalt(alert) from exc
        raise
    finally:
        guard.seeds.active = True
    previous = guard._step
    if loaded.step is not None:
        guard._step = int(loaded.step)
    restored(guard, rollback)
    with contextlib.suppress(Error):
        guard.ledger.append(
            "run.rollback" if rollback else "run.resumed",
            {
                "path": str(path),
                "from_step": previous,
                "to_step": guard._step,
                "checkpoint_run": loaded.run_id,
                "asked_by": guard.provenance.of_stack(sys._getframe(1)).where,
            },
            rank=guard.rank,
        )
    return loaded


def restored(guard: Guard, rollback: bool) -> None:
    """Baselines after a restore: what the checkpoint set is the new normal."""
    guard.seeds.seed = torch.initial_seed()
    guard._versions_after = None
    guard._writes = WriteWatch(guard._params)
    guard.comm.discard()
    guard._hyper_values = hyperparameter_values(guard.optimizer, guard._managed)
    guard._hyper = hyperparameters_hash(guard.optimizer)
    guard._state_hash = optimizer_state_hash(guard.optimizer).to(guard.device)
    guard._lr_used = learning_rates(guard.optimizer)
    guard._done = False
    if rollback:
        guard._new_dynamics()  # the loss goes back up to where it was: a new history
    guard._stepped = False  # restoring RNG states after a resume is set-up too


# --- closing -------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _barrier(group: Any, world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier(group=group)
