"""The Guard protects itself.

Code in the attacked process can replace the guard's own functions as easily as torch's.
Three defences, each an invariant rather than a recognised trick:

- **Bound at start.** The methods the guard and its detectors call during training are
  bound into each object when the guard starts, so a later replacement of a class's
  function (``UpdateCheck.after_step = no_op``) changes nothing that runs; replacing the
  bound method on the object is seen at the next check (:meth:`GuardIntegrity.at_check`).
- **Watched like torch.** trainguard's own modules and classes are snapshotted as torch's
  are (``sensors.PatchWatch``); any change to them is tamper evidence on this rank, whoever
  made it: no job has a reason to patch the tool that watches it.
- **Rows that stop moving.** A rank's row must be its own and fresh: it carries the process
  id that rank announced at start, and a clock that moves forward. A row that carries
  another rank's pid (a copied row), repeats its previous count of rows (a replayed row), or
  whose parameters stop moving while every peer's move (a frozen value) is named: only
  that rank's own process could have produced it.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from torch.nn.modules.dropout import _DropoutNd

from trainguard.errors import Severity
from trainguard.runtime import fields
from trainguard.runtime.interface import Alert, BaseDetector, Context
from trainguard.runtime.sensors import PatchWatch

#: the sweeps of every watched function and hook (core.SensorChecks; trainguard's own
#: here), about 1 ms of the check on the reference job, run at the first check and then at
#: every this many: a patch or a hook in place for two check intervals is always seen (the
#: sweep compares with start's state, so nothing is missed in between; a change made and
#: undone while no sweep looks is beyond any sweep)
SWEEP_EVERY = 2


def sweep_due(checks: int) -> bool:
    """Whether the sweeps run at check number ``checks`` (1 for the first)."""
    return checks % SWEEP_EVERY == 1 % SWEEP_EVERY


#: the methods the Guard calls on each detector while training
PROTOCOL = (
    "before_step",
    "after_step",
    "observe",
    "on_step",
    "at_check",
    "row",
    "compare",
    "reset",
    "close",
)


def _own_modules() -> tuple[str, ...]:
    return tuple(
        sorted(
            name
            for name in list(sys.modules)
            if name == "trainguard"
            or name.startswith(("trainguard.runtime", "trainguard.ledger", "trainguard.checkpoint"))
        )
    )


def bind(obj: Any, names: Iterable[str]) -> list[tuple[Any, str, Any]]:
    """Bind each named method into ``obj``'s own namespace; what was bound, to check."""
    bound = []
    for name in names:
        method = getattr(obj, name, None)
        func = getattr(method, "__func__", None)
        if func is None:
            continue
        try:
            setattr(obj, name, method)
        except (AttributeError, TypeError):  # a slotted object: nothing to bind
            continue
        bound.append((obj, name, func))
    return bound


#: checks in a row at which both ranks' generators moved before one that stops is named
_STEADY = 1

#: fields every rank's row must change between checks when a strict majority's do:
#: (field, kind, what it means)
_MUST_MOVE = (
    (
        "params",
        "frozen",
        "parameters did not change since the last check while ranks {others} trained on: "
        "its values are frozen or replayed",
    ),
    (
        "rng_torch",
        "rng-still",
        "random generator did not move since the last check while ranks {others} drew "
        "from theirs: set back to the same state before every check, or replaced",
    ),
)


class GuardIntegrity(BaseDetector):
    """See the module docstring."""

    name = "guard-integrity"

    def __init__(self, ctx: Context, guard: Any, detectors: list[Any]) -> None:
        self.ctx = ctx
        classes = {type(guard), *(type(d) for d in detectors)}
        self.watch = PatchWatch(
            tuple(c for c in classes if c.__module__.startswith("trainguard")),
            modules=_own_modules(),
            classes=(),
            reexports={},
        )
        self.bound: list[tuple[Any, str, Any]] = []
        self.pids: list[int] = []  # each rank's pid as it announced it at start
        self._previous: list[list[int]] | None = None
        self._named: set[tuple[int, str]] = set()
        #: per check, which ranks' torch generators moved since the one before (two ranks)
        self._rng_moves: deque[list[bool]] = deque(maxlen=_STEADY + 1)
        self._rows = 0  # rows this rank built: a fresh row has a higher count
        self._checks = 0
        self._restored = False  # reset() since the last check
        self._steps: int | None = None  # the guard's step count at the last check

    def reset(self) -> None:
        # a declared rollback or a restore: replaying the same steps draws the same random
        # numbers and reaches the same parameters again, so what must move is not compared
        # at the next check when the guard's step count did not pass the last check's (a
        # reset() called by other code, with no step count set back, silences nothing)
        self._restored = True

    def bind(self, guard: Any, names: Iterable[str], detectors: list[Any]) -> None:
        self.bound = bind(guard, names)
        for detector in detectors:
            self.bound += bind(detector, PROTOCOL)

    def at_check(self) -> None:
        self._checks += 1
        # trainguard's own modules swept as torch's are (sweep_due); the bound methods, at
        # every check
        changed = [change for change, _ in self.watch.changes()] if sweep_due(self._checks) else []
        changed += [
            f"{type(obj).__name__}.{name} was replaced on the running object"
            for obj, name, func in self.bound
            if getattr(obj.__dict__.get(name), "__func__", None) is not func
        ]
        if changed:
            self.bound = [
                (obj, name, func)
                for obj, name, func in self.bound
                if getattr(obj.__dict__.get(name), "__func__", None) is func
            ]
            text = "trainguard's own code was changed in this process: " + "; ".join(changed[:4])
            tampered(self.ctx, text, {"changes": changed})

    def compare(self, rows: list[list[int]]) -> None:
        previous, self._previous = self._previous, rows
        steps, last = self.ctx.steps(), self._steps
        replayed = self._restored and last is not None and steps <= last
        self._restored, self._steps = False, steps
        failed = fields.GUARD_FAILED
        index = fields.INDEX
        for rank, row in enumerate(rows):
            if row[index["flags"]] & failed:
                continue
            if len(self.pids) == len(rows) and row[index["pid"]] != self.pids[rank]:
                owner = (
                    self.pids.index(row[index["pid"]]) if row[index["pid"]] in self.pids else None
                )
                whose = f"rank {owner}'s" if owner is not None else "an unknown"
                self._name(
                    rank,
                    "pid",
                    f"rank {rank}'s row carries {whose} process id {row[index['pid']]}, not its "
                    f"own ({self.pids[rank]}): its row is not its own",
                )
            before = previous[rank] if previous is not None and len(previous) == len(rows) else None
            if before is None or before[index["flags"]] & failed:
                continue
            if row[index["rows"]] <= before[index["rows"]]:
                self._name(
                    rank,
                    "replay",
                    f"rank {rank} sent a row from the past (its count of rows did not move "
                    "since the last check)",
                )
        if previous is not None and len(previous) == len(rows) and len(rows) > 1 and not replayed:
            self._frozen(previous, rows)
            if len(rows) == 2:
                self._stopped(previous, rows)
        else:
            self._rng_moves.clear()

    def _stopped(self, previous: list[list[int]], rows: list[list[int]]) -> None:
        """Two ranks have no majority, but a generator that moved at every check on both
        ranks and then stops on one, while the other's still moves, with no re-seeding,
        mode or module setting changed on it: the same code drew from it as before, so it
        was set back (rewound before every step). A job whose draws stop legitimately
        stops them on both ranks; one that never drew was never moving. Only where both
        models hold CPU dropout in training mode (row field ``dropout``): without it, the CPU
        generator may move at epochs only, and on one rank only (rank 0's sampling)."""
        index = fields.INDEX
        i = index["rng_torch"]
        if rows[0][index["dropout"]] != 1 or rows[1][index["dropout"]] != 1:
            # no CPU dropout: the CPU generator may move only at epochs, on one rank only
            self._rng_moves.clear()
            return
        if any(
            (r[index["flags"]] | p[index["flags"]]) & fields.GUARD_FAILED
            for r, p in zip(rows, previous, strict=True)
        ):
            self._rng_moves.clear()
            return
        moved = [rows[r][i] != previous[r][i] for r in range(2)]
        history = list(self._rng_moves)
        self._rng_moves.append(moved)
        if len(history) < _STEADY or not all(all(m) for m in history[-_STEADY:]):
            return
        if moved.count(False) != 1:
            return
        rank = moved.index(False)
        calm = ("events", "modes", "attributes")
        if any(rows[rank][index[f]] != previous[rank][index[f]] for f in calm):
            return  # re-seeded, or its model changed mode or settings: not provably set back
        self._name(
            rank,
            "rng-stopped",
            f"rank {rank}'s random generator stopped moving since the last check, after moving "
            f"before it, while rank {1 - rank}'s still moves, with CPU dropout in training mode "
            f"on both ranks, and rank {rank} neither re-seeded nor changed its model's modes or "
            "settings: set back to the same state before every step",
        )

    def _frozen(self, previous: list[list[int]], rows: list[list[int]]) -> None:
        for field, what, text in _MUST_MOVE:
            i, flag = fields.INDEX[field], fields.INDEX["flags"]
            usable = [
                r
                for r in range(len(rows))
                if not (rows[r][flag] | previous[r][flag]) & fields.GUARD_FAILED
            ]
            still = [r for r in usable if rows[r][i] == previous[r][i]]
            moved = [r for r in usable if rows[r][i] != previous[r][i]]
            if len(rows) < 3 or not still or len(moved) * 2 <= len(usable):
                # nobody moved (lr 0, skipped steps, no random draws), or no strict majority
                # that did: with two ranks an attacker's rank that moves alone would make an
                # honest one look frozen
                continue
            for rank in still:
                others = ", ".join(map(str, moved))
                self._name(rank, what, f"rank {rank}'s {text.format(others=others)}")

    def _name(self, rank: int, what: str, text: str) -> None:
        if (rank, what) in self._named:
            return
        self._named.add((rank, what))
        self.ctx.alert_once(
            Alert(
                self.ctx.at(),
                rank,
                "guard-integrity",
                Severity.HIGH,
                text,
                {"rank": rank, "kind": what},
            )
        )

    def row(self) -> Mapping[str, Any]:
        self._rows += 1
        return {"rows": self._rows, "dropout": _dropout(self.ctx.model, self.ctx.device)}


def _dropout(model: Any, device: Any) -> int:
    """1 (CPU) or 2 (an accelerator) when a dropout module of the model is in training
    mode with p > 0 (its masks are drawn from that device's generator at every forward)."""
    modules = getattr(model, "modules", None)
    if modules is None:
        return 0
    for module in modules():
        if isinstance(module, _DropoutNd) and module.training and module.p > 0:
            return 1 if getattr(device, "type", "cpu") == "cpu" else 2
    return 0


def tampered(ctx: Context, text: str, details: dict[str, Any]) -> None:
    """Tamper evidence against this rank's own guard: a HIGH alert naming the rank, with
    the evidence bit that explains its row's differences."""
    alert = Alert(ctx.at(), ctx.rank, "guard-tampered", Severity.HIGH, text, details)
    ctx.alert(alert, fields.PATCHED)


def exchange(guard: Any) -> list[tuple[str, int]]:
    """At start: every rank's (host, pid), rank 0's shared key for every rank, and the
    fields the ranks agree on (those that differ from the start are not compared)."""
    import torch.distributed as dist

    from trainguard.runtime import agreement

    me = (socket.gethostname(), os.getpid())
    if guard.world == 1:
        guard.integrity.pids = [me[1]]
        return [me]
    out: list[Any] = [None] * guard.world
    # rank 0's key is every rank's: draws keyed by it fall on the same steps everywhere
    dist.all_gather_object(out, (*me, guard.ctx.shared_key), group=guard.group)
    guard.ctx.shared_key = out[0][2]
    peers = [(str(entry[0]), int(entry[1])) for entry in out]
    guard.integrity.pids = [pid for _, pid in peers]
    table = agreement.gather(guard._row(), guard.group)
    guard._compared = agreement.shared_at_start(table)
    for name in ("params", "code", "hyperparameters", "lr"):
        if name not in guard._compared:
            guard._raise_once(
                Alert(
                    -1,
                    None,
                    "agreement",
                    Severity.HIGH,
                    f"ranks start with different {name}",
                    {"field": name},
                )
            )
    guard._compared |= {"params", "code", "hyperparameters", "lr", "step"}
    if type(guard.optimizer).__name__ != "ZeroRedundancyOptimizer":
        # ZeroRedundancyOptimizer: each rank holds its own shard of the state
        guard._compared |= {"optimizer_state"}
    return peers
