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
import json
import operator
import os
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainguard.errors import Error, Severity
from trainguard.runtime import agreement
from trainguard.runtime.dynamics import LearningRate, LrSchedule, NonFinite, RobustAnomaly
from trainguard.runtime.fingerprint import (
    WriteWatch,
    float_bits,
    hyperparameter_values,
    hyperparameters_hash,
    learning_rates,
    optimizer_state_hash,
    params_hash,
    rng_hashes,
    text_hash,
)
from trainguard.runtime.interface import Alert, GuardError, GuardHalt, Policy, StepInfo
from trainguard.runtime.liveness import CommTimer, SignalWatch, Watchdog, pid_alive
from trainguard.runtime.notify import Notifier
from trainguard.runtime.sensors import AuditSensor, HookWatch, PatchWatch, SeedWatch
from trainguard.runtime.startup import open_ledger, verify_start

_VERSION = operator.attrgetter("_version")

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
        lr_schedule: LrSchedule | None = None,
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
    ) -> None:
        if every < 1:
            raise GuardError("every must be at least 1")
        if policy not in ("alert", "halt"):
            raise GuardError(f"policy must be 'alert' or 'halt', not {policy!r}")
        self.model = model
        self.optimizer = optimizer
        self.run_dir = Path(run_dir)
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
        self._notify = Notifier(hook)
        self._stream = self.run_dir / f"alerts-rank{self.rank}.jsonl"
        self.ledger = open_ledger(self.run_dir, self.rank, self.world, owner_key)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        env_alerts, env_summary = verify_start(
            verify_env, manifest, pubkey, packages, config, self.run_dir, config_sha256
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
        self._detectors: list[Any] = [
            NonFinite(self.rank),
            RobustAnomaly("loss-anomaly", lambda i: i.loss, self.rank),
            RobustAnomaly("grad-norm-anomaly", lambda i: i.grad_norm, self.rank),
        ]
        self._loss = self._detectors[1]
        self._lr = LearningRate(lr_schedule, self.rank) if lr_schedule else None
        self._hyper = hyperparameters_hash(optimizer)
        self._hyper_values = hyperparameter_values(optimizer)
        self._pending: list[tuple[int, Any, Any, list[float]]] = []
        self._checks = 0
        self._state_hash = torch.zeros((), dtype=torch.int64)
        self._seed = seed
        # seeding before the guard starts is the job's own; the seed in force now is the
        # baseline (ranks often seed differently: seed + rank)
        self.seeds = SeedWatch(lambda e: self._event(e, agreement.RESEEDED), torch.initial_seed())
        self._install_optimizer_hooks()
        # before the patch snapshot: the guard observes dist.all_reduce itself
        self.comm = CommTimer(model, lambda: (self._step + 1) % self.every == 0)
        self.patches = PatchWatch((type(model), type(optimizer)))
        self.hooks = HookWatch(model, optimizer)
        self.audit = AuditSensor(lambda e: self._event(e, agreement.AUDIT_EVENT))
        self.audit.block = policy == "halt"
        self.signals = SignalWatch(self._on_signal)
        self.watchdog = Watchdog(hang_timeout, self._on_hang)
        self._straggler = agreement.Straggler()
        self._compared: frozenset[str] = frozenset(agreement.MUST_AGREE)
        self._diverged: set[str] = set()
        self._pending_diverged: set[str] = set()
        self._blamed: dict[str, int] = {}
        self._gone: set[int] = set()
        self._busy_window: list[float] = []
        self._peers = self._exchange_pids()
        self._last_end = time.perf_counter()
        try:
            for alert in env_alerts:
                self._raise(alert)
            self._settle(start=True)
        except BaseException as exc:
            # refused at start: nothing of the guard may outlive it (its audit hook blocks)
            self.close(exc)
            raise

    # --- hooks around optimizer.step -----------------------------------------------

    def _install_optimizer_hooks(self) -> None:
        #: seconds spent in the guard's own code during training (step and hooks)
        self.overhead_seconds = 0.0
        self._lr_used: list[float] = learning_rates(self.optimizer)
        self._versions_after: int | None = None
        self._opt_end = 0.0

        self._params = list(self.model.parameters())
        self._writes = WriteWatch(self._params)

        def pre(opt: Any, args: Any, kwargs: Any) -> None:
            entered = time.perf_counter()
            self._done = False
            self._lr_used = learning_rates(opt)
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
            self.overhead_seconds += time.perf_counter() - entered

        def post(opt: Any, args: Any, kwargs: Any) -> None:
            entered = time.perf_counter()
            self._done = True
            self._versions_after = self._versions()
            self._writes.after_step()
            self._opt_end = time.perf_counter()
            self.overhead_seconds += self._opt_end - entered

        self._hook_handles = [
            self.optimizer.register_step_pre_hook(pre),
            self.optimizer.register_step_post_hook(post),
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

    # --- events and alerts ---------------------------------------------------------

    @property
    def at(self) -> int:
        """The step an alert is about: once a step's optimizer.step has run, what is seen
        can only affect the next one."""
        return self._step + 1 if self._done else self._step

    def _event(self, event: dict[str, Any], flag: int) -> None:
        event = {"step": self.at, "rank": self.rank, **event}
        self.events.append(event)
        setup = flag == agreement.RESEEDED and not self._stepped
        if event.get("event") in _RECORD_ONLY or setup:
            # code compiled from strings is common inside torch itself: kept, not alerted
            with contextlib.suppress(Error):
                self.ledger.append("sensor.event", event, rank=self.rank)
            return
        self._flags |= flag
        severity = Severity.HIGH
        self._raise(
            Alert(
                self.at,
                self.rank,
                f"sensor:{event['event']}",
                severity,
                _event_text(event),
                event,
            )
        )

    def _raise(self, alert: Alert) -> None:
        self.alerts.append(alert)
        sys.stderr.write(alert.line() + "\n")
        # one line per alert as it happens: a rank that is killed never reaches close()
        with contextlib.suppress(OSError), open(self._stream, "a") as stream:
            stream.write(json.dumps(alert.to_dict(), default=str) + "\n")
        try:
            self.ledger.append("alert", alert.to_dict(), rank=self.rank)
        except Error as exc:
            sys.stderr.write(f"trainguard: cannot record the alert in the ledger: {exc}\n")
        self._notify.send(alert)
        if alert.severity >= self.halt_at:
            self._pending_severity = max(self._pending_severity, int(alert.severity))

    def _on_signal(self, event: dict[str, Any]) -> None:
        # a launcher stops the survivors after one rank died: say which one first
        self._peers_gone()
        self._raise(
            Alert(
                self.at,
                self.rank,
                "signal",
                Severity.CRITICAL,
                f"received {event['signal']} from pid {event['sender_pid']} "
                f"(uid {event['sender_uid']}): {event['sender']}",
                event,
            )
        )
        self.ledger.close()

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
        self.watchdog.beat()
        try:
            self._local_checks(loss, grad_norm, now)
            if (self._step + 1) % self.every == 0:
                self._check()
            self._settle()
        except GuardHalt:
            raise
        except Exception as exc:
            self._guard_failed(exc)
        finally:
            self._step += 1
            self._done = False
            self.comm.in_backward = True
            self._stepped = True
            self._last_end = time.perf_counter()
            self.overhead_seconds += self._last_end - entered

    def _local_checks(self, loss: Any, grad_norm: Any, now: float) -> None:
        # values stay on their device until the check: no synchronisation per step
        self._pending.append(
            (self._step, _detached(loss), _detached(grad_norm), list(self._lr_used))
        )
        if self.world == 1 and not isinstance(loss, torch.Tensor):
            self._drain()
        hyper = hyperparameter_values(self.optimizer)
        if hyper != self._hyper_values:
            self._hyper_values = hyper
            self._hyper = hyperparameters_hash(self.optimizer)
            self._flags |= agreement.HYPER_CHANGED
            self._raise(
                Alert(
                    self.at,
                    self.rank,
                    "hyperparameters",
                    Severity.HIGH,
                    "optimizer settings changed during training (betas, weight decay, eps...)",
                    {},
                )
            )
        # busy time: the step's wall time less the time spent waiting in DDP's all-reduce
        self._busy_window.append(max(0.0, now - self._last_end - self.comm.take_wait()))

    def _drain(self) -> None:
        """Run the dynamics detectors over the steps since the last check (one sync)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        values = [v for _, loss, norm, _ in pending for v in (loss, norm)]
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        numbers = (
            iter(torch.stack([t.float().cpu() for t in tensors]).tolist()) if tensors else None
        )
        resolved = [next(numbers) if isinstance(v, torch.Tensor) and numbers else v for v in values]
        for i, (step, _, _, lr) in enumerate(pending):
            loss, norm = resolved[2 * i], resolved[2 * i + 1]
            info = StepInfo(step, loss, lr, norm)
            for detector in self._detectors:
                for alert in detector.on_step(info):
                    self._raise(alert)
            if self._lr is not None:
                alert = self._lr.check(step, lr)
                if alert is not None:
                    self._flags |= agreement.LR_OFF_SCHEDULE
                    self._raise(alert)

    def _check(self) -> None:
        self._drain()
        for change in self.patches.changes():
            self._flags |= agreement.PATCHED
            self._raise(Alert(self.at, self.rank, "monkeypatch", Severity.HIGH, change, {}))
        for change in self.hooks.changes():
            self._flags |= agreement.PATCHED
            self._raise(Alert(self.at, self.rank, "hooks", Severity.HIGH, change, {}))
        if self._writes.written() and not self._flags & agreement.PARAMS_WRITTEN:
            self._params_written("their values or storage")
        reseeded = self.seeds.initial_seed_changed()
        if reseeded:
            self._event({"event": "reseed", "detail": reseeded}, agreement.RESEEDED)
            self.seeds.seed = torch.initial_seed()
        table = agreement.gather(self._row(), self.group)
        for alert in agreement.compare(self.at, table, self._compared):
            key = str(alert.details.get("field"))
            if key in self._diverged:
                continue  # reported at an earlier check; a divergence does not heal
            if alert.rank is not None:
                self._blamed[key] = alert.rank
            if alert.rank is None and key in self._blamed:
                continue
            self._pending_diverged.add(key)
            if alert.rank is None or alert.rank == self.rank or self.rank == 0:
                self._raise(alert)
        self._diverged |= self._pending_diverged
        self._pending_diverged.clear()
        rows = table.tolist()
        busy = [row[agreement.INDEX["busy_us"]] / 1e6 for row in rows]
        arrival = [row[agreement.INDEX["arrival_us"]] / 1e6 for row in rows]
        for alert in self._straggler.check(self.at, busy, arrival):
            if alert.rank == self.rank or self.rank == 0:
                self._raise(alert)
        self._table = table
        self._flags = 0
        self._busy_window.clear()

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
        }
        row = torch.tensor([values[name] for name in agreement.FIELDS], dtype=torch.int64)
        row = row.to(self.device)
        row[agreement.INDEX["params"]] = params_hash(self.model).to(self.device)
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
            self.ledger.append("run.halted", worst.to_dict(), rank=self.rank)
            raise GuardHalt(worst)

    def _guard_failed(self, exc: Exception) -> None:
        sys.stderr.write(f"trainguard: guard error (training continues): {exc!r}\n")
        with contextlib.suppress(Error):
            self.ledger.append("guard.error", {"error": repr(exc)[:500]}, rank=self.rank)
        if self.policy == "halt":
            raise GuardHalt(
                Alert(self.at, self.rank, "guard", Severity.HIGH, f"the guard failed: {exc!r}", {})
            ) from exc

    def _exchange_pids(self) -> list[tuple[str, int]]:
        import torch.distributed as dist

        me = (socket.gethostname(), os.getpid())
        if self.world == 1:
            return [me]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, me, group=self.group)
        table = agreement.gather(self._row(), self.group)
        self._compared = agreement.shared_at_start(table)
        for name in ("params", "code", "hyperparameters", "lr"):
            if name not in self._compared:
                self._raise(
                    Alert(
                        -1,
                        None,
                        "agreement",
                        Severity.HIGH,
                        f"ranks start with different {name}",
                        {"field": name},
                    )
                )
        self._compared |= {"params", "code", "hyperparameters", "lr", "step", "optimizer_state"}
        return [tuple(x) for x in out]

    # --- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike[str], **extra: Any) -> Any:
        """A signed checkpoint of model, optimizer and RNG, recorded in the ledger (rank 0)."""
        from trainguard import checkpoint

        saved = None
        if self.rank == 0:
            saved = checkpoint.save(
                path,
                model=_unwrap(self.model),
                optimizer=self.optimizer,
                step=self._step,
                data_position={"step": self._step},
                extra=extra or None,
                ledger=self.ledger,
            )
        _barrier(self.group, self.world)
        return saved

    def load_checkpoint(self, path: str | os.PathLike[str]) -> Any:
        """Verify and restore a checkpoint; a tampered or foreign one halts before training."""
        from trainguard import checkpoint
        from trainguard.errors import CheckpointError

        try:
            loaded = checkpoint.load(
                path, model=_unwrap(self.model), optimizer=self.optimizer, ledger=self.ledger
            )
        except CheckpointError as exc:
            alert = Alert(
                self.at,
                self.rank,
                "checkpoint",
                Severity.CRITICAL,
                f"refused checkpoint {path}: {exc}",
                {"path": str(path)},
            )
            self._raise(alert)
            if self.policy == "halt":
                raise GuardHalt(alert) from exc
            raise
        if loaded.step is not None:
            self._step = int(loaded.step)
        self._stepped = False  # restoring RNG states after a resume is set-up too
        return loaded

    # --- closing -------------------------------------------------------------------------

    def close(self, error: BaseException | None = None) -> None:
        """Write the closing entry (rank 0) and the alerts file; stop the sensors."""
        if self._closed:
            return
        self._closed = True
        if error is None:
            error = sys.exc_info()[1]  # closed from a `finally` while an error propagates
        with contextlib.suppress(Exception):
            self._drain()  # the steps since the last check
        with contextlib.suppress(Exception):
            self._peers_gone()  # a peer killed mid-run shows up as a failed collective here
        self.watchdog.stop()
        self.audit.close()
        self.comm.close()
        self.seeds.restore()
        for handle in self._hook_handles:
            handle.remove()
        if error is not None and not isinstance(error, GuardHalt):
            self._report_failure(error)
        alerts_file = self.run_dir / f"alerts-rank{self.rank}.json"
        alerts_file.write_text(
            json.dumps([a.to_dict() for a in self.alerts], indent=1, default=str)
        )
        payload = {
            "steps": self._step,
            "alerts": len(self.alerts),
            "error": repr(error)[:300] if error else None,
        }
        try:
            self.ledger.append("rank.closed", payload, rank=self.rank)
            healthy = error is None or isinstance(error, GuardHalt)
            if _settled_barrier(self.group, self.world, healthy=healthy) and self.rank == 0:
                self.ledger.close_run(payload)
        finally:
            self.ledger.close()

    def _report_failure(self, error: BaseException) -> None:
        self._raise(
            Alert(
                self.at,
                self.rank,
                "failure",
                Severity.HIGH,
                f"training stopped with {type(error).__name__}: {error}"[:300],
                {},
            )
        )

    def _peers_gone(self) -> None:
        """Alerts for peer ranks on this host whose process no longer exists (once each)."""
        host = socket.gethostname()
        for rank, (where, pid) in enumerate(self._peers):
            if rank == self.rank or where != host or rank in self._gone or pid_alive(pid):
                continue
            self._gone.add(rank)
            self._raise(
                Alert(
                    self.at,
                    rank,
                    "liveness",
                    Severity.CRITICAL,
                    f"rank {rank} (pid {pid}) is gone: killed or crashed",
                    {"pid": pid},
                )
            )

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        self.close(error)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.detach()
        return value.detach().reshape(-1)[0] if value.numel() else None
    return None if value is None else float(value)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _settled_barrier(group: Any, world: int, *, healthy: bool) -> bool:
    """Wait for every rank's closing entry; False when a peer is gone (no closing entry
    then: the run did not end cleanly, and ``ledger verify`` says so)."""
    import datetime

    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return True
    if not healthy:
        return False
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=60))
    except RuntimeError:
        return False
    return True


def _barrier(group: Any, world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier(group=group)


_RECORD_ONLY = frozenset({"compile", "exec"})


def _event_text(event: dict[str, Any]) -> str:
    detail = event.get("detail") or event.get("call") or ""
    args = event.get("args")
    return f"{event['event']}: {detail}{' ' + ', '.join(args) if args else ''}".strip()
