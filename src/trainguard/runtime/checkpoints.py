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
from trainguard.runtime import replay_mode
from trainguard.runtime.interface import Alert, GuardHalt

if TYPE_CHECKING:
    from trainguard.ledger import Ledger
    from trainguard.runtime.guard import Guard


def save(guard: Guard, path: str | os.PathLike[str], **extra: Any) -> Any:
    """A signed checkpoint of model, optimizer and RNG, recorded in the ledger (rank 0)."""
    from trainguard import checkpoint

    saved = None
    failed: Error | None = None
    ranks = _every_rank_rng(guard)
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
                rng_ranks=ranks,
            )
        except Error as exc:  # a full disk, say: the other ranks wait in the barrier first
            failed = exc
    _barrier(guard.group, guard.world)
    if failed is not None:
        raise failed
    return saved


def load(
    guard: Guard, path: str | os.PathLike[str], *, rollback: bool = False, fork: bool = False
) -> Any:
    """Verify and restore a checkpoint; a tampered or foreign one halts before training.

    Resuming (a fresh process, before its first step) continues the step count from
    the checkpoint's. ``rollback=True`` declares a return to an earlier checkpoint of
    this run in the middle of training (after a loss spike, say): it is recorded in the
    ledger with who asked for it, and what the restore does to the weights, the
    optimizer and the RNG is the job's own doing, not an alert. Restoring in the middle
    of training without declaring it is refused under policy "halt".

    Lineage (:func:`lineage`): the run's latest recorded checkpoint is accepted; another
    checkpoint this run saved only with ``rollback=True``; one of another run (or of no
    run) only with ``fork=True``; a checkpoint signed for this run whose hash the ledger
    does not record, never.
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
            path,
            model=_unwrap(guard.model),
            optimizer=guard.optimizer,
            ledger=guard.ledger,
            accept=lambda found: lineage(
                guard.ledger,
                found,
                rollback=rollback,
                # a replay starts a run of its own from the replayed run's checkpoint
                fork=fork or replay_mode.is_start(guard, found.manifest_hash),
            ),
            rank=guard.rank,
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
    own = loaded.run_id == guard.ledger.run_id
    with contextlib.suppress(Error):
        guard.ledger.append(
            "run.forked" if not own else "run.rollback" if rollback else "run.resumed",
            {
                "path": str(path),
                "from_step": previous,
                "to_step": guard._step,
                "checkpoint_run": loaded.run_id,
                "manifest_blake3": loaded.manifest_hash,
                "asked_by": guard.provenance.of_stack(sys._getframe(1)).where,
            },
            rank=guard.rank,
        )
    return loaded


def lineage(ledger: Ledger, found: Any, *, rollback: bool, fork: bool) -> None:
    """Refuse (CheckpointError, one line) a checkpoint outside the run's declared lineage.

    ``found`` is what the signature vouches for (manifest hash, run id, step). The run's
    latest checkpoint is the last one its ledger records as saved or loaded (a rollback,
    resume or fork makes the restored one the latest); read from the signed entries of the
    ledger, so a fresh process resuming a closed run knows it too.
    """
    from trainguard.errors import CheckpointError

    latest, saved = recorded_checkpoints(ledger)
    digest = found.manifest_hash
    if latest is not None and digest == latest[0]:
        return
    where = f"checkpoint {found.path}" + ("" if found.step is None else f" (step {found.step})")
    if found.run_id == ledger.run_id:
        if digest not in saved:
            raise CheckpointError(
                f"{where} is signed for this run but the run's ledger records no such "
                "checkpoint: refused"
            )
        if not rollback:
            raise CheckpointError(
                f"{where} is not this run's latest checkpoint (step "
                f"{latest[1] if latest else None}); pass rollback=True to return to it"
            )
        return
    if not fork:
        source = f"run {found.run_id}" if found.run_id else "no run (signed by the owner key)"
        raise CheckpointError(
            f"{where} belongs to {source}, not to this run {ledger.run_id}; pass fork=True to "
            "start from it"
        )


def recorded_checkpoints(ledger: Ledger) -> tuple[tuple[str, Any] | None, dict[str, Any]]:
    """The run's latest checkpoint (manifest hash, step) and every checkpoint it saved
    (hash -> step), from ledger entries signed by a run key its owner certified."""
    from trainguard.ledger import chain

    owner = ledger.certificate.owner_key_id
    keys = {}
    for entry in ledger.entries("run.certificate"):
        with contextlib.suppress(Error):
            cert = chain.Certificate.from_entry(entry)
            if cert.owner_key_id == owner and cert.run_id == ledger.run_id:
                keys[cert.run_key_id] = cert.run_public()
    latest: tuple[int, str, Any] | None = None
    saved: dict[str, Any] = {}
    for kind in ("checkpoint.saved", "checkpoint.loaded"):
        for entry in ledger.entries(kind):
            key = keys.get(entry.key_id)
            if key is None or entry.defect is not None or chain.recompute(entry) != entry.hash:
                continue
            if not chain.signature_ok(entry, key):
                continue
            try:
                payload = entry.payload
                digest = str(payload["manifest_blake3"])
            except (ValueError, TypeError, KeyError, RecursionError):
                continue
            if kind == "checkpoint.saved":
                saved[digest] = payload.get("step")
            if latest is None or entry.seq > latest[0]:
                latest = (entry.seq, digest, payload.get("step"))
    return (latest[1:] if latest else None), saved


def restored(guard: Guard, rollback: bool) -> None:
    """Baselines after a restore: what the checkpoint set is the new normal (every
    detector's ``reset``: the loss goes back up to where it was, a new history)."""
    guard.seeds.seed = torch.initial_seed()
    guard._done = False
    guard._each("after a restore", "reset", may_halt=False)
    guard._stepped = False  # restoring RNG states after a resume is set-up too


def _every_rank_rng(guard: Guard) -> list[Any] | None:
    """Every rank's RNG states, on rank 0 (None on the others, and in a one-rank job):
    ranks that draw different dropout masks each resume their own. They cross ranks as
    bytes the checkpoint's own encoder wrote (safetensors and JSON), never as a pickle,
    in two collectives every rank enters alike; a state rank 0 cannot read leaves the
    checkpoint with the common states only (a note in the log), never a hang."""
    import json

    import torch.distributed as dist
    from safetensors.torch import load as read_tensors
    from safetensors.torch import save as write_tensors

    from trainguard.artifacts.convert import decode_structure, encode_tree
    from trainguard.checkpoint import rng as _rng

    if guard.world == 1 or not dist.is_initialized():
        return None
    named, structure = encode_tree(_rng.capture())
    head = json.dumps(structure).encode()
    blob = len(head).to_bytes(8, "little") + head + write_tensors(named)
    mine = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(guard.device)
    size = torch.tensor([mine.numel()], dtype=torch.int64, device=guard.device)
    sizes = [torch.zeros_like(size) for _ in range(guard.world)]
    dist.all_gather(sizes, size, group=guard.group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=guard.device)
    padded[: mine.numel()] = mine
    gathered = [torch.empty_like(padded) for _ in range(guard.world)]
    dist.all_gather(gathered, padded, group=guard.group)
    if guard.rank != 0:
        return None
    states = []
    try:
        for length, data in zip(sizes, gathered, strict=True):
            raw = data[: int(length)].cpu().numpy().tobytes()
            n = int.from_bytes(raw[:8], "little")
            tensors = read_tensors(raw[8 + n :])
            states.append(decode_structure(json.loads(raw[8 : 8 + n]), tensors))
    except Exception as exc:
        guard._sensor_failed("reading the ranks' RNG states for the checkpoint", exc)
        return None
    return states


# --- closing -------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _barrier(group: Any, world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier(group=group)
