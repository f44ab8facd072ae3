"""How a Guard's parts are put together at start: the sensors and the detectors, in
the order they must wrap what they watch (a patch snapshot last, so that it sees every
wrapper installed before it), and each part's place in the Guard."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainguard.runtime import agreement, ledger_tail, registry, selfcheck
from trainguard.runtime.comm import CommTimer
from trainguard.runtime.core import LedgerWatch, OptimizerWatch, SensorChecks
from trainguard.runtime.dynamics import NonFinite, RobustAnomaly
from trainguard.runtime.interface import Context, GuardError
from trainguard.runtime.liveness import Watchdog
from trainguard.runtime.metrics_log import MetricsLog
from trainguard.runtime.provenance import Provenance
from trainguard.runtime.sensors import AuditSensor, SeedWatch, arm
from trainguard.runtime.update_check import UpdateCheck

if TYPE_CHECKING:
    from trainguard.runtime.guard import Guard

#: the Guard's own methods bound into it at start (see selfcheck.py)
BOUND = (
    "step",
    "_check",
    "_finish_check",
    "_drain",
    "_row",
    "_fingerprint",
    "_settle",
    "_raise",
    "_each",
)


def install(
    guard: Guard,
    lr_schedule: Any,
    seed: int | None,
    code_roots: Sequence[str | os.PathLike[str]],
    rates: dict[str, float],
    loader: Any,
    hang_timeout: float,
) -> None:
    """The sensors and detectors, in the order they must wrap what they watch."""
    guard.provenance = Provenance(code_roots)
    guard.provenance.watch_threads()
    guard.provenance.on_fault = guard._sensor_failed
    guard._pending = []
    guard._metrics = MetricsLog(guard.run_dir, guard.rank)
    # seeding before the guard starts is the job's own; the seed in force now is the
    # baseline (ranks often seed differently: seed + rank)
    guard.seeds = SeedWatch(
        lambda e: guard._event(e, agreement.RESEEDED),
        torch.initial_seed(),
        guard.provenance.of_stack,
    )
    guard.seeds.on_fault = guard._sensor_failed
    guard._params = list(guard.model.parameters())
    # before the patch snapshot: the guard observes dist.all_reduce itself
    guard.comm = CommTimer(guard.model, lambda: (guard._step + 1) % guard.every == 0)
    guard.comm.params = guard._params
    guard.comm.on_fault = guard._sensor_failed
    guard.ctx = ctx = Context(
        model=guard.model,
        optimizer=guard.optimizer,
        params=guard._params,
        rank=guard.rank,
        world=guard.world,
        group=guard.group,
        device=guard.device,
        at=lambda: guard.at,
        steps=lambda: guard._step,
        alert=guard._alert_with,
        alert_once=guard._raise_once,
        record=guard._record,
        fault=guard._sensor_failed,
        event=guard._event,
        attributed=guard._attributed,
        flag=guard._set_flag,
        provenance=guard.provenance,
        comm=guard.comm,
        shared_key=os.urandom(32),
        events=lambda: guard.events,
        options={"loader": loader, "seed": seed, "every": guard.every, **rates},
    )
    guard.optimizer_watch = OptimizerWatch(ctx, lr_schedule)
    guard._loss = RobustAnomaly("loss-anomaly", lambda i: i.loss, guard.rank)
    update = UpdateCheck(
        guard.model,
        guard.optimizer,
        guard.rank,
        clock=lambda: guard._step,
        record=guard._record,
        rate=rates["update_rate"],
    )
    grad_norm = RobustAnomaly("grad-norm-anomaly", lambda i: i.grad_norm, guard.rank)
    guard.detectors = [guard.optimizer_watch, NonFinite(guard.rank), guard._loss, grad_norm]
    guard.detectors += [update, *registry.build(ctx)]
    guard._hook_handles = [
        guard.optimizer.register_step_pre_hook(guard._pre_step),
        guard.optimizer.register_step_post_hook(guard._post_step),
    ]
    guard.audit = AuditSensor(lambda e: guard._event(e, agreement.AUDIT_EVENT), guard.provenance)
    guard.audit.block = guard.policy == "halt"
    guard.audit.on_fault = guard._sensor_failed
    # last: the patch snapshots see every wrapper the parts above installed
    guard.ledger_watch = LedgerWatch(ctx, guard.ledger)
    guard.detectors += [SensorChecks(ctx, guard.audit, guard.seeds), guard.ledger_watch]
    guard.integrity = selfcheck.GuardIntegrity(ctx, guard, guard.detectors)
    guard.detectors.append(guard.integrity)
    guard.integrity.bind(guard, BOUND, guard.detectors)
    guard._callers = {}  # taken afresh from the detectors as bound
    for sensor in (guard.audit, guard.seeds):
        arm(sensor)
    guard.watchdog = Watchdog(hang_timeout, guard._on_hang)
    guard.watchdog.on_fault = guard._sensor_failed
    guard._straggler = agreement.Straggler()
    guard._tail = ledger_tail.TailRecord()
    guard._compared = frozenset(agreement.MUST_AGREE)
    guard._reported = agreement.Reported()
    guard._gone = set()
    guard._busy_window = []
    guard._last_end = time.perf_counter()


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
