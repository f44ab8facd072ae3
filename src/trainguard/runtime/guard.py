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

The Guard itself is an orchestrator: what it watches is done by detectors behind the
:class:`~trainguard.runtime.interface.Detector` protocol (``core.py``, ``registry.py``),
each owning its fields of the fingerprint (``fields.py``); how it reports is
``reporting.py``; how it protects itself is ``selfcheck.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import Error, Severity
from trainguard.runtime import (
    agreement,
    assembly,
    checkpoints,
    closing,
    ledger_tail,
    replay_mode,
    selfcheck,
)
from trainguard.runtime.assembly import _detached, _dist, unwrap_optimizer
from trainguard.runtime.comm import CommTimer
from trainguard.runtime.core import WATCH_RATE, LedgerWatch, OptimizerWatch
from trainguard.runtime.dynamics import LrSchedule, RobustAnomaly
from trainguard.runtime.fingerprint import float_bits, params_hash, rng_hashes, text_hash
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
from trainguard.runtime.metrics_log import MetricsLog, chain_bits
from trainguard.runtime.notify import Notifier
from trainguard.runtime.provenance import Provenance
from trainguard.runtime.reporting import Reporting, _describe
from trainguard.runtime.sensors import AuditSensor, SeedWatch
from trainguard.runtime.startup import open_ledger, startup_line, verify_start
from trainguard.runtime.update_check import DEFAULT_RATE


class Guard(Reporting):
    """Watches one rank of a training job. See the module docstring."""

    # its parts, installed by assembly.install in the order they must wrap what they watch
    provenance: Provenance
    seeds: SeedWatch
    audit: AuditSensor
    comm: CommTimer
    watchdog: Watchdog
    ctx: Context
    optimizer_watch: OptimizerWatch
    ledger_watch: LedgerWatch
    integrity: selfcheck.GuardIntegrity
    _loss: RobustAnomaly
    _params: list[torch.Tensor]
    _hook_handles: list[Any]
    _pending: list[tuple[int, Any, Any, list[float], list[float] | None, float]]
    _metrics: MetricsLog
    _straggler: agreement.Straggler
    _tail: ledger_tail.TailRecord
    _compared: frozenset[str]
    _reported: agreement.Reported
    _gone: set[int]
    _busy_window: list[float]
    _last_end: float

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
        watch_rate: float = WATCH_RATE,
    ) -> None:
        if every < 1:
            raise GuardError("every must be at least 1")
        for name, rate in (("update_rate", update_rate), ("watch_rate", watch_rate)):
            if not 0.0 < rate <= 1.0:
                raise GuardError(f"{name} must be in (0, 1], not {rate}")
        if policy not in ("alert", "halt"):
            raise GuardError(f"policy must be 'alert' or 'halt', not {policy!r}")
        self.model = model
        # accelerate's and Lightning's wrappers delegate to the optimizer that steps
        self.optimizer = optimizer = unwrap_optimizer(optimizer)
        #: the plan when ``trainguard replay`` runs this job (its run goes to the plan's folder)
        self.replay = replay_mode.plan_from_env()
        # absolute: the job may change its working folder during training
        self.run_dir = Path(os.path.abspath(self.replay.folder if self.replay else run_dir))
        self.every, self.policy, self.halt_at, self.group = every, policy, halt_at, group
        self.rank, self.world = _dist()
        self.alerts: list[Alert] = []
        self.events: list[dict[str, Any]] = []
        self._step = 0
        self._done = False  # the current step's optimizer.step has run
        self._stepped = False  # training has started (seeding before that is set-up)
        self._flags = self._pending_severity = 0
        self._closed = False
        #: what close() could not do or write, one line each (it never raises for them)
        self.close_problems: list[str] = []
        #: the guard's own failures so far, by place and kind of error: how often each
        self.faults: dict[str, int] = {}
        self._notify = Notifier(hook)
        self._stream = self.run_dir / f"alerts-rank{self.rank}.jsonl"
        self._recorded: dict[tuple[str, str], int] = {}
        self._table: torch.Tensor | None = None
        #: the check whose collective is under way: (its step, steps timed, the wait)
        self._gathering: tuple[int, int, Any] | None = None
        self._checked_at: int | None = None  # while comparing: the check's step
        self.detectors: list[Detector] = []
        self._callers = {}
        #: seconds spent in the guard's own code during training (step and hooks, and the
        #: all-reduce sensor's work on sampled steps, in the backward and on the
        #: collective's thread)
        self.overhead_seconds = 0.0
        #: of which in the check's collective: mostly waiting for the last rank to arrive,
        #: which a synchronous job would otherwise spend at its next all-reduce
        self.collective_seconds = 0.0
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
                    **({"replay": self.replay.describe()} if self.replay else {}),
                },
                rank=self.rank,
            )
            rates = {"update_rate": update_rate, "watch_rate": watch_rate}
            assembly.install(self, lr_schedule, seed, code_roots, rates, loader, hang_timeout)
            self._peers = selfcheck.exchange(self)
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

    def _set_flag(self, flag: int) -> None:
        self._flags |= flag

    # --- hooks around optimizer.step: inside the job's call, a failure of theirs is the
    # guard's, reported, and never raised into the step (but GuardHalt, under "halt")

    def _pre_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        entered = time.perf_counter()
        self._done = False
        try:
            if self._gathering is not None:
                # the last check's table, before this step updates anything: a check that
                # halts the run stops it before the next update
                self._finish_check()
            self._each("before the step", "before_step")
        finally:
            self.overhead_seconds += time.perf_counter() - entered

    def _post_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        entered = time.perf_counter()
        self._done = True
        try:
            self._each("after the step", "after_step")
        finally:
            self.overhead_seconds += time.perf_counter() - entered

    # --- the step ----------------------------------------------------------------------

    def step(self, loss: Any = None, batch: Any = None, grad_norm: float | None = None) -> None:
        """Call once per training step, after ``optimizer.step()``."""
        if self._closed:
            raise GuardError("step() after close()")
        entered = time.perf_counter()
        # each part on its own: a failure of the local checks must not skip the check,
        # whose collective every rank enters at the same step
        try:
            self.watchdog.beat()
            opt = self.optimizer_watch
            # busy time: the step's wall time less the time spent waiting in collectives
            busy = max(0.0, entered - self._last_end - self.comm.take_wait())
            # values stay on their device until the check: no synchronisation per step
            self._pending.append(
                (
                    self._step,
                    _detached(loss),
                    _detached(grad_norm),
                    opt.lr_used,
                    opt.lr_expected,
                    busy,
                )
            )
            if self.world == 1 and not isinstance(loss, torch.Tensor):
                self._drain()
            self._busy_window.append(busy)
        except Exception as exc:
            self._guard_failed(exc, "the step's checks", may_halt=False)
        self._each("at the step", "observe", loss, batch, may_halt=False)
        try:
            if self._gathering is not None:
                self._finish_check()  # a step whose optimizer.step did not run
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
            with contextlib.suppress(Exception):
                self.overhead_seconds += self.comm.take_own()  # the all-reduce sensor's
        if self.replay is not None:
            replay_mode.stop_if_due(self)

    def _drain(self) -> None:
        """Run the detectors over the steps since the last check (one sync for all)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = [v for _, loss, norm, *_ in pending for v in (loss, norm)]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        numbers = iter(_resolved(tensors)) if tensors else None
        resolved = [next(numbers) if isinstance(v, torch.Tensor) and numbers else v for v in values]
        metrics = self._metrics
        for i, (step, _, _, lr, wanted, busy) in enumerate(pending):
            loss, norm = resolved[2 * i], resolved[2 * i + 1]
            metrics.add(step, loss, norm, lr[0] if lr else None, busy)
            info = StepInfo(step, loss, list(lr), norm, wanted)
            self._each("at the check", "on_step", info, may_halt=False)

    def _write_metrics(self) -> None:
        """The per-step metrics lines since the last check, one chunk (metrics_log.py)."""
        if self._metrics.failed is not None:
            return  # reported once, when it failed
        try:
            self._metrics.flush()
        except OSError as exc:
            self._sensor_failed("writing the per-step metrics file", exc)

    def _check(self) -> None:
        # the collective below is entered whatever happened here (the peers are in it)
        try:
            self._drain()
        except Exception as exc:
            self._guard_failed(exc, "the dynamics detectors", may_halt=False)
        self._write_metrics()
        self._each("at the check", "at_check", may_halt=False)
        row = self._fingerprint()
        entered = time.perf_counter()
        wait = agreement.gather_start(row, self.group)
        self.collective_seconds += time.perf_counter() - entered
        self._gathering = (self.at, len(self._busy_window), wait)
        self._flags = 0
        self._busy_window.clear()
        if self.world == 1:
            self._finish_check()  # nobody to wait for

    def _finish_check(self) -> None:
        """Compare the ranks' rows of the last check. With peers this runs at the next
        step's start (or before a checkpoint is saved or loaded, or at close): the
        collective completes meanwhile, and the alerts carry the check's step. Under
        policy "halt", every rank halts together here."""
        pending, self._gathering = self._gathering, None
        if pending is None:
            return
        at, window, wait = pending
        self._checked_at = at
        self._compared_severity = 0
        try:
            entered = time.perf_counter()
            table = wait()
            self.collective_seconds += time.perf_counter() - entered
            for alert in self._reported.new(agreement.compare(at, table, self._compared)):
                self._raise_once(alert)
            rows = table.tolist()
            self._each("comparing the ranks", "compare", rows, may_halt=False)
            self._tail.at_check(self, rows, agreement.INDEX)
            busy = [row[agreement.INDEX["busy_us"]] / 1e6 for row in rows]
            arrival = [row[agreement.INDEX["arrival_us"]] / 1e6 for row in rows]
            for alert in self._straggler.check(at, busy, arrival, steps=window):
                self._raise_once(alert)
            self._table = table
        except GuardHalt:
            raise
        except Exception as exc:
            self._guard_failed(exc, "the check", may_halt=False)
        finally:
            self._checked_at = None
        self._settle(checked=True)

    def _fingerprint(self) -> torch.Tensor:
        """This rank's row for the check; if computing it fails, a row that says so
        (the peers are waiting in the collective, and compare nothing against it)."""
        try:
            return self._row()
        except Exception as exc:
            self._guard_failed(exc, "the fingerprint", may_halt=False)
        values = dict.fromkeys(agreement.FIELDS, 0)
        values.update(self._own_values(), flags=self._flags | agreement.GUARD_FAILED)
        values["arrival_us"] = int(time.time() * 1e6)
        row = torch.tensor([values[name] for name in agreement.FIELDS], dtype=torch.int64)
        return row.to(self.device)

    def _own_values(self) -> dict[str, int]:
        return {
            "step": self._step,
            "flags": self._flags,
            "busy_us": int(statistics.median(self._busy_window or [0.0]) * 1e6),
            "pid": os.getpid(),
            "severity": self._pending_severity,
        }

    def _row(self) -> torch.Tensor:
        rng = rng_hashes()
        grad_norm, wall = self._metrics.interval()
        values: dict[str, Any] = {
            **self._own_values(),
            "rng_torch": rng["torch"],
            "rng_cuda": rng["cuda"],
            "rng_python": rng["python"],
            "rng_numpy": rng["numpy"],
            "code": self.code_hash,
            "events": len(self.events),
            "loss_drift": float_bits(self._loss.drift()),
            **ledger_tail.row_values(self.ledger),
            "params": params_hash(self.model),
            "metrics_chain": chain_bits(self._metrics.link),
            "grad_norm_mean": float_bits(grad_norm),
            "wall_us": int(wall * 1e6),
        }
        for detector in self.detectors:
            values.update(detector.row())
        values["flags"] = self._flags  # detectors' rows may have set evidence bits
        on_device = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        numbers = [0 if n in on_device else int(values.get(n, 0)) for n in agreement.FIELDS]
        row = torch.tensor(numbers, dtype=torch.int64).to(self.device)
        for name, tensor in on_device.items():
            row[agreement.INDEX[name]] = tensor.to(self.device)
        # last, just before the collective: when this rank got there
        row[agreement.INDEX["arrival_us"]] = int(time.time() * 1e6)
        return row

    # --- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike[str], **extra: Any) -> Any:
        """A signed checkpoint of model, optimizer and RNG, recorded in the ledger (rank 0)."""
        self._finish_check()  # the last check's verdict first: never sign a halted state
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
        self._finish_check()
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


def _resolved(tensors: list[torch.Tensor]) -> list[float]:
    """The 0-d tensors' values, in one copy to the CPU (one stack when they share a device
    and dtype, as a job's losses do: not two tensor operations each)."""
    first = tensors[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in tensors):
        values: list[float] = torch.stack(tensors).float().cpu().tolist()
        return values
    stacked: list[float] = torch.stack([t.float().cpu() for t in tensors]).tolist()
    return stacked
