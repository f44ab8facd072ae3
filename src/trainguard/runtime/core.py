"""The Guard's own detectors, each behind the :class:`~trainguard.runtime.interface.Detector`
protocol like any other: the optimizer's settings, learning rate and writes to the
parameters (:class:`OptimizerWatch`), the in-process sensors read at checks
(:class:`SensorChecks`: patches, hooks, model state, seeding, the sensors themselves) and
the run's ledger file (:class:`LedgerWatch`)."""

from __future__ import annotations

import operator
import os
import sqlite3
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import Severity
from trainguard.runtime import fields
from trainguard.runtime.dynamics import LearningRate, SchedulerRate, is_scheduler, scheduler_keys
from trainguard.runtime.fingerprint import (
    WriteWatch,
    float_bits,
    hyperparameter_values,
    hyperparameters_hash,
    learning_rates,
    optimizer_state_hash,
    settings_changes,
    text_hash,
)
from trainguard.runtime.hookwatch import HookWatch
from trainguard.runtime.interface import Alert, BaseDetector, Coins, Context, StepInfo
from trainguard.runtime.modelstate import ModelState
from trainguard.runtime.provenance import Attribution, Origin
from trainguard.runtime.reporting import _describe
from trainguard.runtime.selfcheck import sweep_due, tampered
from trainguard.runtime.sensors import AuditSensor, PatchWatch, SeedWatch

_VERSION = operator.attrgetter("_version")

#: the optimizer state joins the fingerprint at every this many checks
STATE_EVERY = 4
#: the share of steps (a keyed draw) after which the parameters are watched until the
#: next step begins, and the optimizer's settings compared (and at every check): writes or
#: setting changes on every step are seen within a few steps, one-off ones with this
#: probability each; the cross-rank hash sees any write that makes a rank differ
WATCH_RATE = 1 / 8


def state_fresh(step: int, every: int) -> bool:
    """Whether the check at ``step`` hashes the optimizer state afresh (else its row holds
    the last hash taken): the first check of a run from step 0, then every STATE_EVERY."""
    return (step // max(1, every)) % STATE_EVERY == 1 % STATE_EVERY


class OptimizerWatch(BaseDetector):
    """Settings, learning rate, the gradients the step reads and the parameters it writes."""

    name = "optimizer"

    def __init__(self, ctx: Context, lr_schedule: Any) -> None:
        self.ctx = ctx
        self.optimizer = ctx.optimizer
        self.lr: LearningRate | None = None
        self.scheduler: SchedulerRate | None = None
        self.managed: frozenset[str] = frozenset()
        if is_scheduler(lr_schedule):
            self.scheduler = SchedulerRate(lr_schedule, ctx.rank)
            self.managed = scheduler_keys(lr_schedule)
        elif lr_schedule is not None:
            self.lr = LearningRate(lr_schedule, ctx.rank)
        self._coin = Coins(b"optimizer-gap", ctx.options.get("watch_rate", WATCH_RATE))
        self._watched = False
        self.reset()

    def reset(self) -> None:
        """Baselines after a restore: what the checkpoint set is the new normal."""
        self.lr_used: list[float] = learning_rates(self.optimizer)
        self.lr_expected: list[float] | None = None
        self._versions_after: int | None = None
        self._writes = WriteWatch(self.ctx.params)
        self._hyper_values = hyperparameter_values(self.optimizer, self.managed)
        self._hyper = hyperparameters_hash(self.optimizer)
        self._state_hash = optimizer_state_hash(self.optimizer).to(self.ctx.device)
        self.ctx.comm.discard()

    def _versions(self) -> int:
        return sum(map(_VERSION, self.ctx.params))

    def _written(self, how: str) -> None:
        detail = f"parameters changed outside optimizer.step ({how})"
        self.ctx.event({"event": "params-written", "detail": detail}, fields.PARAMS_WRITTEN)

    def before_step(self) -> None:
        self.lr_used = learning_rates(self.optimizer)
        if self.scheduler is not None:
            self.lr_expected = self.scheduler.expected()
        comm = self.ctx.comm
        comm.in_backward = False
        altered = comm.grads_changed(self.ctx.params) if comm.active else None
        if altered:
            self.ctx.event(
                {"event": "grads-altered", "detail": f"after the all-reduce: {altered}"},
                fields.GRADS_ALTERED,
            )
        if self._versions_after is None:
            return  # an unwatched gap
        self._writes.before_step()
        if self._versions() != self._versions_after:
            self._written("an in-place operation")
        self._versions_after = None

    def after_step(self) -> None:
        # the gap to the next step is watched on a keyed draw (see WATCH_RATE)
        self._watched = self._coin(self.ctx.shared_key, self.ctx.steps())
        self._versions_after = self._versions() if self._watched else None
        if self._watched:
            self._writes.after_step()

    def observe(self, loss: Any, batch: Any) -> None:
        if self._watched:
            self._compare_settings()

    def _compare_settings(self) -> None:
        hyper = hyperparameter_values(self.optimizer, self.managed)
        if hyper == self._hyper_values:
            return
        changes = settings_changes(self._hyper_values, hyper)
        self._hyper_values = hyper
        self._hyper = hyperparameters_hash(self.optimizer)
        text = "optimizer settings changed during training: " + "; ".join(changes[:4])
        self.ctx.alert(
            Alert(
                self.ctx.at(),
                self.ctx.rank,
                "hyperparameters",
                Severity.HIGH,
                text,
                {"changes": changes},
            ),
            fields.HYPER_CHANGED,
        )

    def on_step(self, info: StepInfo) -> Iterable[Alert]:
        alert = None
        if self.lr is not None:
            alert = self.lr.check(info.step, info.lr)
        elif self.scheduler is not None:
            alert = self.scheduler.check_set(info.step, info.lr, info.wanted)
        if alert is not None:
            self.ctx.alert(alert, fields.LR_OFF_SCHEDULE)
        return ()

    def at_check(self) -> None:
        self._compare_settings()
        if self._writes.written():
            self._written("their values or storage")

    def row(self) -> Mapping[str, Any]:
        if state_fresh(self.ctx.at(), self.ctx.options.get("every", 1)):
            # the optimizer state is three times the parameters: hashed every few checks,
            # chosen by the step, so a resumed run (and its replay) hashes where the
            # original did
            self._state_hash = optimizer_state_hash(self.optimizer).to(self.ctx.device)
        return {
            "hyperparameters": self._hyper,
            "lr": text_hash(repr(self.lr_used)),
            "lr0": float_bits(self.lr_used[0] if self.lr_used else 0.0),
            "optimizer_state": self._state_hash,
        }


class SensorChecks(BaseDetector):
    """What the in-process sensors saw since the last check, attributed to its code."""

    name = "sensors"

    def __init__(self, ctx: Context, audit: AuditSensor, seeds: SeedWatch) -> None:
        self.ctx = ctx
        self.audit = audit
        self.seeds = seeds
        # before the patch snapshot: it wraps Module.__setattr__
        self.model_state = ModelState(ctx.model, ctx.provenance)
        self.model_state.on_fault = ctx.fault
        try:
            self.patches = PatchWatch((type(ctx.model), type(ctx.optimizer)))
            self.hooks = HookWatch(ctx.model, ctx.optimizer, ctx.provenance)
        except BaseException:
            self.model_state.close()  # a failed start leaves nothing installed
            raise
        if self.hooks.nodes is not None:
            self.hooks.nodes.on_fault = ctx.fault
        self._tamper_reported = False
        self._checks = 0

    def at_check(self) -> None:
        self._checks += 1
        parts: tuple[tuple[str, Callable[[], None]], ...] = (
            ("the model-state sensor", self._model_state),
            ("the sensors' self-check", self._intact),
            ("the seed sensor", self._seed),
        )
        if sweep_due(self._checks):
            parts = (("the patch sensor", self._patches), ("the hook sensor", self._hooks), *parts)
        for where, part in parts:
            try:
                part()
            except Exception as exc:  # noqa: PERF203 - each part on its own
                self.ctx.fault(where, exc)

    def row(self) -> Mapping[str, Any]:
        modes, attributes = self.model_state.digests()
        return {
            "modes": modes,
            "attributes": attributes,
            "buffers": self.model_state.buffers_hash(),
        }

    def close(self) -> None:
        try:
            self.model_state.close()
        finally:
            self.hooks.close()

    def _patches(self) -> None:
        for change, replacement in self.patches.changes():
            by = self._attribution(replacement)
            if by.origin is Origin.MACHINERY:
                # torch's own code under another watched name is no job's doing
                by = Attribution(Origin.UNKNOWN, by.where)
            self.ctx.attributed("monkeypatch", change, by)

    def _hooks(self) -> None:
        for kind, hook in self.hooks.changes():
            if isinstance(hook, Attribution):  # an autograd node hook, seen as registered
                self.ctx.attributed("hooks", f"a new {kind} registered after start", hook)
                continue
            by = self._attribution(hook)
            if by.origin is Origin.MACHINERY and not _stateful(hook):
                # a bare torch or standard-library function as a hook (torch.nn.init.zeros_
                # on a gradient, a functools wrapper around something else) says nothing
                # about who registered it; torch's own hook objects (weight and spectral
                # norm) are torch's doing
                by = Attribution(Origin.UNKNOWN, by.where)
            self.ctx.attributed("hooks", f"a new {kind} registered after start", by)

    def _model_state(self) -> None:
        for change, by in self.model_state.changes():
            self.ctx.attributed("model-state", change, by)
        if self.model_state.buffers_written():
            self.ctx.flag(fields.BUFFERS_WRITTEN)

    def _attribution(self, obj: Any) -> Attribution:
        """Who a replacement or a hook belongs to; an object that raises when looked at
        (its attributes, ``__class__``) belongs to nobody we can vouch for."""
        try:
            return self.ctx.provenance.of_callable(obj)  # type: ignore[no-any-return]
        except Exception as exc:
            kind = type(obj).__name__  # type() reads no attribute of the object
            return Attribution(
                Origin.UNKNOWN, f"a {kind} object that raises when inspected ({_describe(exc)})"
            )

    def _intact(self) -> None:
        """Tamper evidence: the guard's own sensors switched off or unwrapped while the
        guard runs (a sensor can be silenced by code that knows it; not silently)."""
        off = [
            name for name, part in (("audit", self.audit), ("seeds", self.seeds)) if not part.active
        ]
        off += [
            f"{getattr(owner, '__name__', owner)}.{name}"
            for owner, name, _ in self.seeds.originals
            if not getattr(getattr(owner, name, None), "__trainguard_wrapped__", False)
        ]
        if off and not self._tamper_reported:
            self._tamper_reported = True
            self.audit.active = self.seeds.active = True  # and back on
            text = "the guard's sensors were switched off or unwrapped in this process: "
            tampered(self.ctx, text + ", ".join(off), {"sensors": off})

    def _seed(self) -> None:
        reseeded = self.seeds.initial_seed_changed()
        if reseeded:
            self.ctx.event({"event": "reseed", "detail": reseeded}, fields.RESEEDED)
            self.seeds.seed = torch.initial_seed()


def _missing(conn: sqlite3.Connection, recent: list[tuple[int, str]]) -> list[int]:
    """Which of the (seq, hash) this rank wrote are no longer in the ledger file as written
    (through a read-only connection of its own: the writer's connection and lock are left
    alone)."""
    marks = ",".join("?" * len(recent))
    rows = conn.execute(
        f"SELECT seq, hash FROM entries WHERE seq IN ({marks})", [s for s, _ in recent]
    ).fetchall()
    found = {int(seq): str(digest) for seq, digest in rows}
    return [seq for seq, digest in recent if found.get(seq) != digest]


class LedgerWatch(BaseDetector):
    """The run's ledger file deleted or replaced, or its folder no longer writable: the
    record this run is writing goes nowhere. Every rank on the host sees it (a rank that
    deleted it cannot keep the others quiet); reported once, HIGH. SQLite's own WAL
    checkpoints keep the file's inode, so they are never mistaken for it."""

    name = "ledger"

    def __init__(self, ctx: Context, ledger: Any) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.lost = False
        self.tampered = False  # reported once
        self._reader: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None
        self.path: Path | None = None
        path = getattr(getattr(ledger, "backend", None), "path", None)
        if isinstance(path, Path):  # not a file (PostgreSQL): nothing on this host to watch
            # absolute: a job that changes its working folder has not lost its ledger
            self.path = Path(os.path.abspath(path))
            info = os.stat(self.path)
            self.identity = (info.st_dev, info.st_ino)

    def at_check(self) -> None:
        if self.identity is None or self.path is None or self.lost:
            return
        self._look_at_recent()
        path = self.path
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            what = "was deleted"
        except OSError as exc:
            what = f"cannot be read any more ({_describe(exc)})"
        else:
            if (info.st_dev, info.st_ino) != self.identity:
                what = "was replaced by another file"
            elif not os.access(path.parent, os.W_OK):
                what = "is in a run folder that is no longer writable"
            else:
                return
        self.lost = True
        self._alert(
            f"the run's ledger {path} {what} during training: the run's record is "
            "incomplete from here on",
            {"path": str(path)},
        )

    def _alert(self, text: str, details: dict[str, Any]) -> None:
        """HIGH, naming no rank (whoever did it, not the rank that saw it)."""
        details = {**details, "seen_by": self.ctx.rank}
        self.ctx.alert(Alert(self.ctx.at(), None, "ledger", Severity.HIGH, text, details), 0)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _look_at_recent(self) -> None:
        """The entries this rank wrote last, still in the ledger as written: entries
        deleted or rewritten anywhere among them (not only at the end) are seen at the
        next check, once. A read that fails (the file locked for long) is no finding."""
        try:
            recent = list(getattr(self.ledger, "recent", ()))
        except RuntimeError:  # the writer thread added one meanwhile: the next check looks
            return
        if not recent or self.tampered or self.path is None:
            return
        if getattr(self.ledger, "cut_from", None) is not None:
            return  # a cut this rank's own writes saw: ledger_tail.py reports it, better
        try:
            if self._reader is None:
                uri = f"file:{self.path}?mode=ro"
                self._reader = sqlite3.connect(uri, uri=True, timeout=1.0, check_same_thread=False)
            gone = _missing(self._reader, recent)
        except sqlite3.Error:
            return
        if not gone:
            return
        self.tampered = True
        self._alert(
            f"entries this rank wrote were deleted or rewritten in the run's ledger during "
            f"training: {', '.join(map(str, gone[:8]))} (written by rank {self.ctx.rank})",
            {"entries": gone},
        )


def _stateful(hook: Any) -> bool:
    """A hook object or a bound method (state of its own), not a bare function or partial."""
    import functools

    if isinstance(hook, functools.partial):
        return False
    if isinstance(hook, types.MethodType):
        return True
    return not isinstance(hook, (types.FunctionType, types.BuiltinFunctionType))
