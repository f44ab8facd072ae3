"""The Guard: a few lines in the training loop that make interference visible.

    guard = Guard(model, optimizer, run_dir="runs/42", every=10, policy="halt",
                  lr_schedule=lambda step: scheduler_lr(step), seed=1234)
    for batch in loader:
        ...
        optimizer.step()
        guard.step(loss=loss, batch=batch)
    guard.close()

At start it verifies the environment and writes "run.started" to the ledger; at every
step it runs the local detectors; every ``every`` steps all ranks exchange one small
fingerprint. Every alert goes to the ledger, to stderr as one line, and to an optional
hook. Under policy "halt" an alert of ``halt_at`` severity or more stops every rank at the
same check (local alerts travel in the fingerprint), raising :class:`GuardHalt`.
The guard's own failures are reported and never stop training unless policy is "halt".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
import socket
import statistics
import sys
import threading
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import Error, Severity
from trainguard.runtime import agreement, checkpoints, closing, ledger_tail, registry
from trainguard.runtime.comm import CommTimer
from trainguard.runtime.dynamics import (
    LearningRate,
    LrSchedule,
    NonFinite,
    RobustAnomaly,
    SchedulerRate,
    is_scheduler,
    scheduler_keys,
)
from trainguard.runtime.fingerprint import (
    WriteWatch,
    float_bits,
    hyperparameter_values,
    hyperparameters_hash,
    learning_rates,
    optimizer_state_hash,
    params_hash,
    rng_hashes,
    settings_changes,
    text_hash,
)
from trainguard.runtime.interface import (
    Alert,
    Context,
    Detector,
    GuardError,
    GuardHalt,
    Policy,
    StepInfo,
)
from trainguard.runtime.liveness import SignalWatch, Watchdog
from trainguard.runtime.modelstate import ModelState
from trainguard.runtime.notify import Notifier
from trainguard.runtime.provenance import Attribution, Origin, Provenance
from trainguard.runtime.sensors import AuditSensor, HookWatch, PatchWatch, SeedWatch, arm
from trainguard.runtime.startup import open_ledger, startup_line, verify_start
from trainguard.runtime.update_check import DEFAULT_RATE, UpdateCheck

_VERSION = operator.attrgetter("_version")
_log = logging.getLogger("trainguard.runtime")

#: the optimizer state joins the fingerprint at every this many checks
STATE_EVERY = 4


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Guard:
    """Watches one rank of a training job. See the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        run_dir: str | os.PathLike[str],
        every: int = 50,
        policy: Policy = "alert",
        lr_schedule: LrSchedule | Any | None = None,
        seed: int | None = None,
        owner_key: str | os.PathLike[str] | None = None,
        manifest: str | os.PathLike[str] | None = None,
        pubkey: str | os.PathLike[str] | None = None,
        packages: Sequence[str] = ("torch",),
        verify_env: bool = True,
        config: Any = None,
        config_sha256: str | None = None,
        halt_at: Severity = Severity.HIGH,
        hang_timeout: float = 600.0,
        hook: str | None = None,
        group: Any = None,
        code_roots: Sequence[str | os.PathLike[str]] = (),
        update_rate: float = DEFAULT_RATE,
        loader: Any = None,
    ) -> None:
        if every < 1:
            raise GuardError("every must be at least 1")
        if not 0.0 < update_rate <= 1.0:
            raise GuardError(f"update_rate must be in (0, 1], not {update_rate}")
        self._update_rate = update_rate
        if policy not in ("alert", "halt"):
            raise GuardError(f"policy must be 'alert' or 'halt', not {policy!r}")
        self.model = model
        # accelerate's and Lightning's wrappers delegate to the optimizer that steps
        self.optimizer = unwrap_optimizer(optimizer)
        optimizer = self.optimizer
        # absolute: the job may change its working folder during training
        self.run_dir = Path(os.path.abspath(run_dir))
        self.every = every
        self.policy = policy
        self.halt_at = halt_at
        self.group = group
        self.rank, self.world = _dist()
        self.alerts: list[Alert] = []
        self.events: list[dict[str, Any]] = []
        self._step = 0
        self._done = False  # the current step's optimizer.step has run
        self._stepped = False  # training has started (seeding before that is set-up)
        self._flags = 0
        self._pending_severity = 0
        self._closed = False
        #: what close() could not do or write, one line each (it never raises for them)
        self.close_problems: list[str] = []
        #: the guard's own failures so far, by place and kind of error: how often each
        self.faults: dict[str, int] = {}
        self._ledger_id: tuple[int, int] | None = None
        self._ledger_lost = False
        self._notify = Notifier(hook)
        self._stream = self.run_dir / f"alerts-rank{self.rank}.jsonl"
        # from here on a signal (Ctrl-C, torchrun's SIGTERM) can end the start anywhere:
        # what _on_signal and close() need exists first, and the signal is recorded
        self._close_lock = threading.Lock()
        self._ending: set[str] = set()  # "rank", "run": closing entries written
        self._signal: dict[str, Any] | None = None  # the signal that ends the run
        self._peers: list[tuple[str, int]] = []
        self.ledger: Any = None
        self.signals = SignalWatch(self._on_signal)
        try:
            self.ledger = open_ledger(self.run_dir, self.rank, self.world, owner_key)
            self._notify.run_id = self.ledger.run_id
            self._ledger_id = self._ledger_identity()
            self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
            # once per host: the first rank there verifies, the others wait for its result
            env_alerts, env_summary = verify_start(
                verify_env,
                manifest,
                pubkey,
                packages,
                config,
                self.run_dir,
                config_sha256,
                rank=self.rank,
                world=self.world,
                group=group,
            )
            self.code_hash = text_hash(env_summary["code"])
            self.ledger.append(
                "run.started",
                {
                    "rank": self.rank,
                    "world": self.world,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "argv": sys.argv[:20],
                    "every": every,
                    "policy": policy,
                    "seed": seed,
                    **env_summary,
                },
                rank=self.rank,
            )
            self._new_dynamics()
            self._lr: LearningRate | None = None
            self._scheduler: SchedulerRate | None = None
            self._managed: frozenset[str] = frozenset()
            if is_scheduler(lr_schedule):
                self._scheduler = SchedulerRate(lr_schedule, self.rank)
                self._managed = scheduler_keys(lr_schedule)
            elif lr_schedule is not None:
                self._lr = LearningRate(lr_schedule, self.rank)
            self._hyper = hyperparameters_hash(optimizer)
            self._hyper_values = hyperparameter_values(optimizer, self._managed)
            self.provenance = Provenance(code_roots)
            self.provenance.watch_threads()
            self._recorded: dict[tuple[str, str], int] = {}
            self._tamper_reported = False
            self._pending: list[tuple[int, Any, Any, list[float], list[float] | None]] = []
            self._checks = 0
            self._state_hash = torch.zeros((), dtype=torch.int64)
            self._seed = seed
            # seeding before the guard starts is the job's own; the seed in force now is the
            # baseline (ranks often seed differently: seed + rank)
            self.provenance.on_fault = self._sensor_failed
            self.seeds = SeedWatch(
                lambda e: self._event(e, agreement.RESEEDED),
                torch.initial_seed(),
                self.provenance.of_stack,
            )
            self.seeds.on_fault = self._sensor_failed
            self._install_optimizer_hooks()
            # before the patch snapshot: the guard observes dist.all_reduce itself
            self.comm = CommTimer(model, lambda: (self._step + 1) % self.every == 0)
            self.comm.params = self._params
            self.comm.on_fault = self._sensor_failed
            # before the patch snapshot: it wraps Module.__setattr__
            self.model_state = ModelState(model, self.provenance)
            self.model_state.on_fault = self._sensor_failed
            self.ctx = Context(
                model=model,
                optimizer=optimizer,
                params=self._params,
                rank=self.rank,
                world=self.world,
                group=group,
                device=self.device,
                at=lambda: self.at,
                steps=lambda: self._step,
                alert=self._alert_with,
                alert_once=self._raise_once,
                record=self._record,
                fault=self._sensor_failed,
                provenance=self.provenance,
                comm=self.comm,
                shared_key=os.urandom(32),
                options={"loader": loader, "seed": seed},
            )
            self.detectors: list[Detector] = registry.build(self.ctx)
            self.patches = PatchWatch((type(model), type(optimizer)))
            self.hooks = HookWatch(model, optimizer, self.provenance)
            if self.hooks.nodes is not None:
                self.hooks.nodes.on_fault = self._sensor_failed
            self.audit = AuditSensor(
                lambda e: self._event(e, agreement.AUDIT_EVENT), self.provenance
            )
            self.audit.block = policy == "halt"
            self.audit.on_fault = self._sensor_failed
            for sensor in (self.audit, self.seeds):
                arm(sensor)
            self.watchdog = Watchdog(hang_timeout, self._on_hang)
            self.watchdog.on_fault = self._sensor_failed
            self._straggler = agreement.Straggler()
            self._tail = ledger_tail.TailRecord()
            self._compared: frozenset[str] = frozenset(agreement.MUST_AGREE)
            self._diverged: set[str] = set()
            self._pending_diverged: set[str] = set()
            self._blamed: dict[str, int] = {}
            self._gone: set[int] = set()
            self._busy_window: list[float] = []
            self._peers = self._exchange_pids()
            self._last_end = time.perf_counter()
            for alert in env_alerts:
                if alert.rank is None:
                    # a host's drift, known to every rank: one report, and every rank halts
                    self._raise_once(alert)
                else:
                    self._raise(alert)
            self._settle(start=True)
        except BaseException as exc:
            # refused, or interrupted (Ctrl-C) at start: close what was opened (close()
            # removes every part that was installed and never raises), then let it
            # propagate; nothing of the guard may outlive it (its audit hook blocks)
            self.close(exc)
            if isinstance(exc, Exception) and not isinstance(exc, Error):
                raise GuardError(f"cannot start the guard: {_describe(exc)}") from exc
            raise
        with contextlib.suppress(Exception):  # a closed stderr is no reason to stop
            sys.stderr.write(
                startup_line(self.ledger.run_id, self.rank, self.world, env_summary, every) + "\n"
            )

    # --- hooks around optimizer.step -----------------------------------------------

    def _install_optimizer_hooks(self) -> None:
        #: seconds spent in the guard's own code during training (step and hooks)
        self.overhead_seconds = 0.0
        self._lr_used: list[float] = learning_rates(self.optimizer)
        self._lr_expected: list[float] | None = None
        self._versions_after: int | None = None
        self._opt_end = 0.0

        self._params = list(self.model.parameters())
        self._writes = WriteWatch(self._params)

        # both hooks run inside the job's optimizer.step: a failure of theirs is the
        # guard's, reported, and never raised into the step (but GuardHalt, under "halt")
        def pre(opt: Any, args: Any, kwargs: Any) -> None:
            entered = time.perf_counter()
            self._done = False
            try:
                self._lr_used = learning_rates(opt)
                if self._scheduler is not None:
                    self._lr_expected = self._scheduler.expected()
                self.comm.in_backward = False
                altered = self.comm.grads_changed(self._params) if self.comm.active else None
                if altered:
                    self._event(
                        {"event": "grads-altered", "detail": f"after the all-reduce: {altered}"},
                        agreement.GRADS_ALTERED,
                    )
                self._writes.before_step()
                if self._versions_after is not None and self._versions() != self._versions_after:
                    self._versions_after = None
                    self._params_written("an in-place operation")
                self._update.before_step()
            except Exception as exc:
                self._guard_failed(exc, "the optimizer pre-step hook")
            finally:
                try:
                    self._each("before the step", lambda d: d.before_step())
                finally:
                    self.overhead_seconds += time.perf_counter() - entered

        def post(opt: Any, args: Any, kwargs: Any) -> None:
            entered = time.perf_counter()
            self._done = True
            try:
                self._versions_after = self._versions()
                self._writes.after_step()
                self._update.after_step()
            except Exception as exc:
                self._versions_after = None
                self._guard_failed(exc, "the optimizer post-step hook")
            finally:
                try:
                    self._each("after the step", lambda d: d.after_step())
                finally:
                    self._opt_end = time.perf_counter()
                    self.overhead_seconds += self._opt_end - entered

        self._hook_handles = [
            self.optimizer.register_step_pre_hook(pre),
            self.optimizer.register_step_post_hook(post),
        ]

    def _new_dynamics(self) -> None:
        self._loss = RobustAnomaly("loss-anomaly", lambda i: i.loss, self.rank)
        # a fresh key and baseline: after a rollback the restored values are the new normal
        self._update = UpdateCheck(
            self.model,
            self.optimizer,
            self.rank,
            clock=lambda: self._step,
            record=self._record,
            rate=self._update_rate,
        )
        self._each("after a rollback", lambda d: d.reset(), may_halt=False)
        self._detectors: list[Any] = [
            NonFinite(self.rank),
            self._loss,
            RobustAnomaly("grad-norm-anomaly", lambda i: i.grad_norm, self.rank),
            self._update,
        ]

    def _params_written(self, how: str) -> None:
        self._event(
            {
                "event": "params-written",
                "detail": f"parameters changed outside optimizer.step ({how})",
            },
            agreement.PARAMS_WRITTEN,
        )

    def _versions(self) -> int:
        return sum(map(_VERSION, self._params))

    def _each(self, when: str, call: Any, *, may_halt: bool = True) -> None:
        """Call every detector, each on its own: one failing is the guard's failure and
        leaves the others running."""
        for detector in getattr(self, "detectors", ()):
            try:
                call(detector)
            except Exception as exc:  # noqa: PERF203 - each detector on its own
                self._guard_failed(exc, f"the {detector.name} detector {when}", may_halt=may_halt)

    def _steps_alerts(self, info: StepInfo, detector: Detector) -> None:
        for alert in detector.on_step(info):
            self._raise(alert)

    def _alert_with(self, alert: Alert, flag: int = 0) -> None:
        self._flags |= flag
        self._raise(alert)

    # --- events and alerts ---------------------------------------------------------

    @property
    def at(self) -> int:
        """The step an alert is about: once a step's optimizer.step has run, what is seen
        can only affect the next one."""
        return self._step + 1 if self._done else self._step

    def _event(self, event: dict[str, Any], flag: int) -> None:
        by: Attribution | None = event.pop("by", None)
        event = {"step": self.at, "rank": self.rank, **event}
        if by is not None:
            event["by"] = by.where
            event["origin"] = by.origin.value
        self.events.append(event)
        setup = flag == agreement.RESEEDED and not self._stepped
        if event.get("event") in _RECORD_ONLY or setup or (by is not None and by.trusted):
            # the job's own code, its packages and torch at work: kept, not alerted
            self._record(event)
            return
        self._flags |= flag
        self._raise(
            Alert(
                self.at,
                self.rank,
                f"sensor:{event['event']}",
                Severity.HIGH,
                _event_text(event),
                event,
            )
        )

    def _sensors_intact(self) -> None:
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
            self._raise(
                Alert(
                    self.at,
                    self.rank,
                    "guard-tampered",
                    Severity.HIGH,
                    "the guard's sensors were switched off or unwrapped in this process: "
                    + ", ".join(off),
                    {"sensors": off},
                )
            )

    def _record(self, event: dict[str, Any]) -> None:
        """A sensor event that is not an alert goes to the ledger once per kind and place
        (a DataLoader re-created every epoch must not flood it); repeats are counted."""
        key = (str(event.get("event")), str(event.get("by") or event.get("detail")))
        seen = self._recorded.get(key, 0)
        self._recorded[key] = seen + 1
        if seen == 0:
            self._write("sensor.event", event)

    def _attributed(self, detector: str, change: str, by: Attribution) -> None:
        """A change seen at a check (a hook, a patch): recorded when trusted code made it."""
        details = {"change": change, "by": by.where, "origin": by.origin.value}
        if by.trusted:
            self._record({"step": self.at, "rank": self.rank, "event": detector, **details})
            return
        self._flags |= agreement.PATCHED
        self._raise(
            Alert(
                self.at, self.rank, detector, Severity.HIGH, f"{change} by {by.describe()}", details
            )
        )

    def _raise(self, alert: Alert) -> None:
        """An alert to every sink. Each sink may fail on its own (a closed stderr, a
        deleted or full run folder, a broken ledger): the others still get the alert,
        the failure is one of the guard's own, and nothing is raised to the caller."""
        self.alerts.append(alert)
        self._hold_for_halt(alert)
        try:
            sys.stderr.write(alert.line() + "\n")
        except Exception as exc:
            self._guard_failed(exc, "writing to stderr", may_halt=False)
        # one line per alert as it happens: a rank that is killed never reaches close()
        try:
            with open(self._stream, "a") as stream:
                stream.write(json.dumps(alert.to_dict(), default=str) + "\n")
        except Exception as exc:
            self._guard_failed(exc, "writing the alerts file", may_halt=False)
        self._write("alert", alert.to_dict())
        try:
            self._notify.send(alert)
        except Exception as exc:
            self._guard_failed(exc, "starting the alert hook", may_halt=False)

    def _write(self, kind: str, payload: dict[str, Any]) -> None:
        """One ledger entry, never stalling the step: when another process holds the
        ledger's write lock the entry is queued (the ledger writes it, with its delay, at
        the next write, a flush or close). A failure to write it is one of the guard's own
        (once closed, only logged: the run's record is complete or close() says what is
        missing)."""
        if self.ledger is None:
            return
        try:
            self.ledger.try_append(kind, payload, rank=self.rank)
        except Exception as exc:
            if self._closed:
                _log.warning("trainguard: cannot write %s to the ledger: %s", kind, _describe(exc))
            else:
                self._guard_failed(exc, "writing the ledger", may_halt=False)

    def _guard_failed(self, exc: BaseException, where: str, *, may_halt: bool = True) -> None:
        """A failure of the guard's own code, never the job's: an alert from detector
        ``guard`` and a ``guard.error`` entry, once per place and kind of error (repeats
        are counted in :attr:`faults`). Under policy "alert" training goes on. Under
        "halt" the run halts with GuardHalt: at once where the guard may raise into the
        loop (``may_halt``: its step and optimizer hooks) in a single process, else at the
        next check, every rank together. Raises nothing else."""
        key = f"{where}: {type(exc).__name__}"
        seen = self.faults.get(key, 0)
        self.faults[key] = seen + 1
        severity = Severity.HIGH
        if self.policy == "halt":
            severity = max(severity, self.halt_at)
        if seen == 0:
            # marked before reporting: a sink that fails while reporting this is counted
            # under its own key once, and reporting ends
            then = "training halts" if self.policy == "halt" else "training continues"
            text = f"the guard failed in {where} ({then}): {_describe(exc)}"
            details = {"where": where, "error": _describe(exc)}
            self._raise(Alert(self.at, self.rank, "guard", severity, text, details))
            if where != "writing the ledger":
                self._write("guard.error", details)
        else:
            self._pending_severity = max(self._pending_severity, int(severity))
        if may_halt and self.policy == "halt" and self.world == 1:
            self._settle()

    def _sensor_failed(self, where: str, exc: BaseException) -> None:
        """What a sensor calls when its own code fails where it runs for the job (a
        wrapper, an audit hook, a thread): reported, never raised."""
        try:
            self._guard_failed(exc, where, may_halt=False)
        except Exception as inner:  # the last resort: one log line
            _log.warning("trainguard: %s failed: %s", where, _describe(inner))

    def _hold_for_halt(self, alert: Alert) -> None:
        """An alert of halt_at severity or more halts every rank at the next settle."""
        if alert.severity >= self.halt_at:
            self._pending_severity = max(self._pending_severity, int(alert.severity))

    def _raise_once(self, alert: Alert) -> None:
        """An alert every rank computes alike from the gathered table: rank 0 reports it
        (one line, one ledger entry per incident); the others keep it for the halt."""
        if self.rank == 0:
            self._raise(alert)
            return
        self.alerts.append(alert)
        self._hold_for_halt(alert)

    def _on_signal(self, event: dict[str, Any]) -> None:
        """A terminating signal and its sender, from the signal thread. With action
        "default" the process ends as soon as this returns: the run is closed first."""
        if event["action"] != "ignored":
            self._signal = event
        what = {"handler": "its handler runs", "ignored": "ignored", "default": "the process ends"}
        text = (
            f"received {event['signal']} from pid {event['sender_pid']} "
            f"(uid {event['sender_uid']}): {event['sender']}; {what[event['action']]}"
        )
        if self.ledger is None:  # still starting: no run to write to yet
            sys.stderr.write(f"trainguard: rank {self.rank} {text}\n")
        else:
            # a launcher stops the survivors after one rank died: say which one first
            with contextlib.suppress(Exception):
                closing.report_gone_peers(self)
            severity = self._pending_severity
            self._raise(Alert(self.at, self.rank, "signal", Severity.CRITICAL, text, event))
            # the signal does what the job set it to do; being recorded never halts it
            self._pending_severity = severity
        if event["action"] == "default":
            closing.close_before_death(self)

    def _on_hang(self, idle: float, stacks: dict[str, str]) -> None:
        self._raise(
            Alert(
                self.at,
                self.rank,
                "hang",
                Severity.HIGH,
                f"no step for {idle:.0f} s; every thread's stack is in the ledger",
                {"idle_s": idle, "stacks": stacks},
            )
        )

    # --- the step --------------------------------------------------------------------

    def step(self, loss: Any = None, batch: Any = None, grad_norm: float | None = None) -> None:
        """Call once per training step, after ``optimizer.step()``."""
        if self._closed:
            raise GuardError("step() after close()")
        now = time.perf_counter()
        entered = now
        # each part on its own: a failure of the local checks must not skip the check,
        # whose collective every rank enters at the same step
        try:
            self.watchdog.beat()
            self._local_checks(loss, grad_norm, now)
        except Exception as exc:
            self._guard_failed(exc, "the step's checks", may_halt=False)
        self._each("at the step", lambda d: d.observe(loss, batch), may_halt=False)
        try:
            if (self._step + 1) % self.every == 0:
                self._check()
            self._settle()
        except GuardHalt:
            raise
        except Exception as exc:
            self._guard_failed(exc, "the check")
        finally:
            self._step += 1
            self._done = False
            self._stepped = True
            try:
                self.comm.discard()  # results of a step whose optimizer.step was skipped
                self.comm.take_wait()  # the check's own collectives are not the job's waiting
                self.comm.in_backward = True
            except Exception as exc:
                self._guard_failed(exc, "the step's bookkeeping", may_halt=False)
            self._last_end = time.perf_counter()
            self.overhead_seconds += self._last_end - entered

    def _local_checks(self, loss: Any, grad_norm: Any, now: float) -> None:
        # values stay on their device until the check: no synchronisation per step
        self._pending.append(
            (
                self._step,
                _detached(loss),
                _detached(grad_norm),
                list(self._lr_used),
                self._lr_expected,
            )
        )
        if self.world == 1 and not isinstance(loss, torch.Tensor):
            self._drain()
        hyper = hyperparameter_values(self.optimizer, self._managed)
        if hyper != self._hyper_values:
            changes = settings_changes(self._hyper_values, hyper)
            self._hyper_values = hyper
            self._hyper = hyperparameters_hash(self.optimizer)
            self._flags |= agreement.HYPER_CHANGED
            self._raise(
                Alert(
                    self.at,
                    self.rank,
                    "hyperparameters",
                    Severity.HIGH,
                    "optimizer settings changed during training: " + "; ".join(changes[:4]),
                    {"changes": changes},
                )
            )
        # busy time: the step's wall time less the time spent waiting in DDP's all-reduce
        self._busy_window.append(max(0.0, now - self._last_end - self.comm.take_wait()))

    def _drain(self) -> None:
        """Run the dynamics detectors over the steps since the last check (one sync)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = [v for _, loss, norm, _, _ in pending for v in (loss, norm)]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        numbers = (
            iter(torch.stack([t.float().cpu() for t in tensors]).tolist()) if tensors else None
        )
        resolved = [next(numbers) if isinstance(v, torch.Tensor) and numbers else v for v in values]
        for i, (step, _, _, lr, wanted) in enumerate(pending):
            loss, norm = resolved[2 * i], resolved[2 * i + 1]
            info = StepInfo(step, loss, lr, norm)
            for detector in self._detectors:
                for alert in detector.on_step(info):
                    self._raise(alert)
            self._each("at the check", functools.partial(self._steps_alerts, info), may_halt=False)
            alert = None
            if self._lr is not None:
                alert = self._lr.check(step, lr)
            elif self._scheduler is not None:
                alert = self._scheduler.check_set(step, lr, wanted)
            if alert is not None:
                self._flags |= agreement.LR_OFF_SCHEDULE
                self._raise(alert)

    def _check(self) -> None:
        # every part on its own, so that one failing leaves the others running; the
        # collective below is entered whatever happened here (the peers are in it)
        parts = (
            ("the dynamics detectors", self._drain),
            ("the patch sensor", self._check_patches),
            ("the hook sensor", self._check_hooks),
            ("the model-state sensor", self._check_model_state),
            ("the sensors' self-check", self._sensors_intact),
            ("the parameter write sensor", self._check_writes),
            ("the seed sensor", self._check_seed),
            ("the ledger watch", self._watch_ledger),
        )
        for where, part in parts:
            try:
                part()
            except Exception as exc:  # noqa: PERF203 - each part on its own
                self._guard_failed(exc, where, may_halt=False)
        self._each("at the check", lambda d: d.at_check(), may_halt=False)
        table = agreement.gather(self._fingerprint(), self.group)
        for alert in agreement.compare(self.at, table, self._compared):
            key = str(alert.details.get("field"))
            if key in self._diverged:
                continue  # reported at an earlier check; a divergence does not heal
            if alert.rank is not None:
                self._blamed[key] = alert.rank
            if alert.rank is None and key in self._blamed:
                continue
            self._pending_diverged.add(key)
            self._raise_once(alert)
        self._diverged |= self._pending_diverged
        self._pending_diverged.clear()
        rows = table.tolist()
        self._each("comparing the ranks", lambda d: d.compare(rows), may_halt=False)
        self._tail.at_check(self, rows, agreement.INDEX)
        busy = [row[agreement.INDEX["busy_us"]] / 1e6 for row in rows]
        arrival = [row[agreement.INDEX["arrival_us"]] / 1e6 for row in rows]
        window = len(self._busy_window)
        for alert in self._straggler.check(self.at, busy, arrival, steps=window):
            self._raise_once(alert)
        self._table = table
        self._flags = 0
        self._busy_window.clear()

    def _check_patches(self) -> None:
        for change, replacement in self.patches.changes():
            by = self._attribution(replacement)
            if by.origin is Origin.MACHINERY:
                # torch's own code under another watched name is no job's doing
                by = Attribution(Origin.UNKNOWN, by.where)
            self._attributed("monkeypatch", change, by)

    def _check_hooks(self) -> None:
        for kind, hook in self.hooks.changes():
            if isinstance(hook, Attribution):  # an autograd node hook, seen as registered
                self._attributed("hooks", f"a new {kind} registered after start", hook)
                continue
            by = self._attribution(hook)
            if by.origin is Origin.MACHINERY and not _stateful(hook):
                # a bare torch or standard-library function as a hook (torch.nn.init.zeros_
                # on a gradient, a functools wrapper around something else) says nothing
                # about who registered it; torch's own hook objects (weight and spectral
                # norm) are torch's doing
                by = Attribution(Origin.UNKNOWN, by.where)
            self._attributed("hooks", f"a new {kind} registered after start", by)

    def _check_model_state(self) -> None:
        for change, by in self.model_state.changes():
            self._attributed("model-state", change, by)
        if self.model_state.buffers_written():
            self._flags |= agreement.BUFFERS_WRITTEN

    def _attribution(self, obj: Any) -> Attribution:
        """Who a replacement or a hook belongs to; an object that raises when looked at
        (its attributes, ``__class__``) belongs to nobody we can vouch for."""
        try:
            return self.provenance.of_callable(obj)
        except Exception as exc:
            kind = type(obj).__name__  # type() reads no attribute of the object
            return Attribution(
                Origin.UNKNOWN, f"a {kind} object that raises when inspected ({_describe(exc)})"
            )

    def _check_writes(self) -> None:
        if self._writes.written() and not self._flags & agreement.PARAMS_WRITTEN:
            self._params_written("their values or storage")

    def _check_seed(self) -> None:
        reseeded = self.seeds.initial_seed_changed()
        if reseeded:
            self._event({"event": "reseed", "detail": reseeded}, agreement.RESEEDED)
            self.seeds.seed = torch.initial_seed()

    def _ledger_identity(self) -> tuple[int, int] | None:
        path = getattr(getattr(self.ledger, "backend", None), "path", None)
        if not isinstance(path, Path):
            return None  # not a file (PostgreSQL): nothing on this host to watch
        # absolute: a job that changes its working folder has not lost its ledger
        self._ledger_path = Path(os.path.abspath(path))
        info = os.stat(self._ledger_path)
        return (info.st_dev, info.st_ino)

    def _watch_ledger(self) -> None:
        """The run's ledger file deleted or replaced, or its folder no longer writable:
        the record this run is writing goes nowhere. Every rank on the host sees it (a
        rank that deleted it cannot keep the others quiet); reported once, HIGH. SQLite's
        own WAL checkpoints keep the file's inode, so they are never mistaken for it."""
        if self._ledger_id is None or self._ledger_lost:
            return
        path = self._ledger_path
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            what = "was deleted"
        except OSError as exc:
            what = f"cannot be read any more ({_describe(exc)})"
        else:
            if (info.st_dev, info.st_ino) != self._ledger_id:
                what = "was replaced by another file"
            elif not os.access(path.parent, os.W_OK):
                what = "is in a run folder that is no longer writable"
            else:
                return
        self._ledger_lost = True
        self._raise(
            Alert(
                self.at,
                None,
                "ledger",
                Severity.HIGH,
                f"the run's ledger {path} {what} during training: the run's record is "
                "incomplete from here on",
                {"path": str(path), "seen_by": self.rank},
            )
        )

    def _fingerprint(self) -> torch.Tensor:
        """This rank's row for the check; if computing it fails, a row that says so
        (the peers are waiting in the collective, and compare nothing against it)."""
        try:
            return self._row()
        except Exception as exc:
            self._guard_failed(exc, "the fingerprint", may_halt=False)
        values = dict.fromkeys(agreement.FIELDS, 0)
        values.update(
            step=self._step,
            flags=self._flags | agreement.GUARD_FAILED,
            busy_us=int(statistics.median(self._busy_window or [0.0]) * 1e6),
            pid=os.getpid(),
            severity=self._pending_severity,
            arrival_us=int(time.time() * 1e6),
        )
        row = torch.tensor([values[name] for name in agreement.FIELDS], dtype=torch.int64)
        return row.to(self.device)

    def _row(self) -> torch.Tensor:
        rng = rng_hashes()
        values = {
            "step": self._step,
            "params": 0,
            "hyperparameters": self._hyper,
            "lr": text_hash(repr(self._lr_used)),
            "optimizer_state": 0,
            "rng_torch": rng["torch"],
            "rng_cuda": rng["cuda"],
            "rng_python": rng["python"],
            "rng_numpy": rng["numpy"],
            "code": self.code_hash,
            "events": len(self.events),
            "flags": self._flags,
            "busy_us": int(statistics.median(self._busy_window or [0.0]) * 1e6),
            "loss_drift": float_bits(self._loss.drift()),
            "pid": os.getpid(),
            "severity": self._pending_severity,
            "arrival_us": 0,
            "lr0": float_bits(self._lr_used[0] if self._lr_used else 0.0),
            **ledger_tail.row_values(self.ledger),
        }
        values["modes"], values["attributes"] = self.model_state.digests()
        values["buffers"] = 0  # hashed on the device below
        on_device: dict[str, torch.Tensor] = {}
        for detector in self.detectors:
            for name, value in detector.row().items():
                if isinstance(value, torch.Tensor):
                    on_device[name] = value
                    value = 0
                values[name] = int(value)
        row = torch.tensor([values.get(name, 0) for name in agreement.FIELDS], dtype=torch.int64)
        row = row.to(self.device)
        for name, tensor in on_device.items():
            row[agreement.INDEX[name]] = tensor.to(self.device)
        row[agreement.INDEX["params"]] = params_hash(self.model).to(self.device)
        row[agreement.INDEX["buffers"]] = self.model_state.buffers_hash().to(self.device)
        if self._checks % STATE_EVERY == 0:
            # the optimizer state is three times the parameters: hashed every few checks
            self._state_hash = optimizer_state_hash(self.optimizer).to(self.device)
        row[agreement.INDEX["optimizer_state"]] = self._state_hash
        self._checks += 1
        # last, just before the collective: when this rank got there
        row[agreement.INDEX["arrival_us"]] = int(time.time() * 1e6)
        return row

    def _settle(self, start: bool = False) -> None:
        """Halt every rank together: at a check, or at once when there is no peer."""
        if self.policy != "halt":
            return
        table = getattr(self, "_table", None)
        at_check = table is not None and (start or (self._step + 1) % self.every == 0)
        severity = self._pending_severity
        if at_check and table is not None:
            severity = max(severity, max(r[agreement.INDEX["severity"]] for r in table.tolist()))
        elif self.world > 1 and not start:
            return
        if severity >= int(self.halt_at):
            worst = max(
                (a for a in self.alerts if a.severity >= self.halt_at),
                key=lambda a: a.severity,
                default=None,
            )
            if worst is None:
                worst = Alert(
                    self.at,
                    None,
                    "peer",
                    Severity(severity),
                    "another rank raised an alert that halts the run",
                    {},
                )
            self._write("run.halted", worst.to_dict())  # a failure here is counted, not raised
            raise GuardHalt(worst)

    def _exchange_pids(self) -> list[tuple[str, int]]:
        import torch.distributed as dist

        me = (socket.gethostname(), os.getpid())
        if self.world == 1:
            return [me]
        out: list[Any] = [None] * self.world
        # rank 0's key is every rank's: draws keyed by it fall on the same steps everywhere
        dist.all_gather_object(out, (*me, self.ctx.shared_key), group=self.group)
        self.ctx.shared_key = out[0][2]
        out = [entry[:2] for entry in out]
        table = agreement.gather(self._row(), self.group)
        self._compared = agreement.shared_at_start(table)
        for name in ("params", "code", "hyperparameters", "lr"):
            if name not in self._compared:
                self._raise_once(
                    Alert(
                        -1,
                        None,
                        "agreement",
                        Severity.HIGH,
                        f"ranks start with different {name}",
                        {"field": name},
                    )
                )
        self._compared |= {"params", "code", "hyperparameters", "lr", "step"}
        if not _sharded(self.optimizer):
            # ZeroRedundancyOptimizer: each rank holds its own shard of the state
            self._compared |= {"optimizer_state"}
        return [tuple(x) for x in out]

    # --- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike[str], **extra: Any) -> Any:
        """A signed checkpoint of model, optimizer and RNG, recorded in the ledger (rank 0)."""
        return checkpoints.save(self, path, **extra)

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, rollback: bool = False, fork: bool = False
    ) -> Any:
        """Verify and restore a checkpoint; a tampered or foreign one halts before training.

        Before the first step this is a resume: the step count continues from the
        checkpoint's. ``rollback=True`` declares a return to an earlier checkpoint of this
        run in the middle of training, recorded in the ledger with who asked for it; a
        restore in the middle of training that is not declared is an alert (a halt under
        policy "halt"). Only the run's latest recorded checkpoint is taken without
        ``rollback=True`` (an earlier one of this run) or ``fork=True`` (one of another
        run); see :mod:`trainguard.runtime.checkpoints`.
        """
        return checkpoints.load(self, path, rollback=rollback, fork=fork)

    def close(self, error: BaseException | None = None) -> None:
        """Write the closing entries (this rank's; rank 0 the run's) and the alerts file;
        stop the sensors. Works on a Guard whose start was interrupted. Always finishes:
        what it could not do or write is logged and kept in :attr:`close_problems`."""
        closing.close(self, error)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        self.close(error)


def _stateful(hook: Any) -> bool:
    """A hook object or a bound method (state of its own), not a bare function or partial."""
    import functools

    if isinstance(hook, functools.partial):
        return False
    if isinstance(hook, types.MethodType):
        return True
    return not isinstance(hook, (types.FunctionType, types.BuiltinFunctionType))


def _describe(exc: BaseException) -> str:
    """An exception as one short line, whatever its ``__str__`` or ``__repr__`` does."""
    try:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    except Exception:
        text = type(exc).__name__
    return " ".join(text.split())[:300]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.detach()
        return value.detach().reshape(-1)[0] if value.numel() else None
    return None if value is None else float(value)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that really steps, under accelerate's ``AcceleratedOptimizer`` or
    Lightning's ``LightningOptimizer`` (both delegate, and hold it as ``optimizer`` or
    ``_optimizer``). ``ZeroRedundancyOptimizer`` steps itself and is kept."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise GuardError(
            f"cannot watch optimizer {type(optimizer).__name__}: it is not a torch.optim "
            "optimizer and holds none"
        )
    return optimizer


def _sharded(optimizer: Any) -> bool:
    return type(optimizer).__name__ == "ZeroRedundancyOptimizer"


_RECORD_ONLY = frozenset({"compile", "exec"})


def _event_text(event: dict[str, Any]) -> str:
    detail = event.get("detail") or event.get("call") or ""
    args = event.get("args")
    return f"{event['event']}: {detail}{' ' + ', '.join(args) if args else ''}".strip()
